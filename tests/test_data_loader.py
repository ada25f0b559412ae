"""Packed samples, the seeded global order, per-rank batches and resumption, blending, MLM masking."""

from __future__ import annotations

import collections
import pickle
import tracemalloc

import numpy as np
import pytest
import torch

pytest.register_assert_rewrite("tests.data_fixtures")

from crate_lm.data import (  # noqa: E402
    BlendedStream,
    DataError,
    MLMConfig,
    MLMStream,
    PackedTokenDataset,
    PermutedOrder,
    RankSampler,
    SampleStream,
    ShuffledStream,
    TokenShards,
    make_loader,
    mask_tokens,
)
from tests.data_fixtures import concatenated, write_token_shards  # noqa: E402

pytest_plugins = ["tests.data_fixtures"]

IGNORE = -100


class IndexDataset:
    """n samples; sample i is [i, i, i, i] (so a batch shows which samples it holds)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {"input_ids": np.full(4, i, dtype=np.int64)}


class TaggedStream(SampleStream):
    """Sample k of stream s is {"stream": [s], "k": [k]}; records what was read."""

    def __init__(self, s: int, per_epoch: int = 100) -> None:
        self.s, self.per_epoch, self.read = s, per_epoch, []

    @property
    def samples_per_epoch(self) -> int:
        return self.per_epoch

    def get(self, g: int) -> dict[str, np.ndarray]:
        self.read.append(g)
        return {"stream": np.array([self.s]), "k": np.array([g])}


class ArrayStream(SampleStream):
    def __init__(self, samples: list[np.ndarray]) -> None:
        self.samples = samples

    @property
    def samples_per_epoch(self) -> int:
        return len(self.samples)

    def get(self, g: int) -> dict[str, np.ndarray]:
        tokens = self.samples[g % len(self.samples)]
        return {"input_ids": tokens, "labels": tokens[1:], "position_ids": np.arange(len(tokens))}


def positions(world: int, micro: int, steps: int, start: int = 0) -> list[int]:
    """Global positions read in global order: for each step, rank 0's slice, then rank 1's, ..."""
    per_rank = [list(RankSampler(start, r, world, micro, steps)) for r in range(world)]
    out = []
    for s in range(steps):
        for r in range(world):
            out += per_rank[r][s * micro : (s + 1) * micro]
    return out


def global_batches(stream, world: int, micro: int, steps: int, consumed: int = 0, key: str = "input_ids"):
    """Each global step's samples (ranks concatenated in rank order), read through make_loader."""
    per_rank = [
        list(make_loader(stream, micro_batch=micro, rank=r, world_size=world, consumed_samples=consumed,
                         num_batches=steps, pin_memory=False))
        for r in range(world)
    ]  # fmt: skip
    for batches in per_rank:
        assert len(batches) == steps
        assert all(b[key].shape[0] == micro for b in batches)
    return [torch.cat([per_rank[r][s][key] for r in range(world)]) for s in range(steps)]


# ---------------------------------------------------------------------------------------------
# PermutedOrder, ShuffledStream
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permuted_order_is_a_bijection(n):
    for seed in (0, 1, [7, 3]):
        order = PermutedOrder(n, seed)
        out = order(np.arange(n))
        assert out.dtype == np.int64
        assert np.array_equal(np.sort(out), np.arange(n))
        assert [int(order(i)[0]) for i in range(min(n, 50))] == out[:50].tolist()  # per-index == vectorised
        assert np.array_equal(PermutedOrder(n, seed)(np.arange(n)), out)  # a function of (n, seed) only
    with pytest.raises(IndexError):
        PermutedOrder(n, 0)(n)


@pytest.mark.parametrize("n", [5, 64, 1000, 4097])
def test_permuted_order_depends_on_the_seed(n):
    orders = [PermutedOrder(n, seed)(np.arange(n)) for seed in (0, 1, 2, [0, 1])]
    for i in range(len(orders)):
        for j in range(i + 1, len(orders)):
            assert not np.array_equal(orders[i], orders[j])
    if n >= 64:
        assert not np.array_equal(orders[0], np.arange(n))  # actually shuffled
        assert np.mean(orders[0] == np.arange(n)) < 0.2


def test_permuted_order_of_nothing():
    with pytest.raises(ValueError):
        PermutedOrder(0, 0)


def test_shuffled_stream_epochs_cover_every_sample_once():
    n = 37
    stream = ShuffledStream(IndexDataset(n), seed=5)
    assert stream.samples_per_epoch == n
    epochs = [[stream.index(g) for g in range(e * n, (e + 1) * n)] for e in range(4)]
    for order in epochs:
        assert sorted(order) == list(range(n))
    assert len({tuple(o) for o in epochs}) == 4  # a new order every epoch
    assert [stream.index(g) for g in range(n)] == epochs[0]  # going back to an old epoch gives the same order
    assert int(stream.get(40)["input_ids"][0]) == epochs[1][3]
    other = ShuffledStream(IndexDataset(n), seed=6)
    assert [other.index(g) for g in range(n)] != epochs[0]


# ---------------------------------------------------------------------------------------------
# Ranks, worlds, resumption
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "micro"), [(1, 4), (2, 3), (3, 2), (3, 4), (2, 5)])
def test_ranks_cover_an_epoch_exactly_once(world, micro):
    n = 60
    stream = ShuffledStream(IndexDataset(n), seed=11)
    steps = n // (world * micro)
    per_rank = [list(RankSampler(0, r, world, micro, steps)) for r in range(world)]
    assert all(len(p) == steps * micro for p in per_rank)
    samples = [{stream.index(g) for g in p} for p in per_rank]
    for r in range(world):
        assert len(samples[r]) == steps * micro
        for q in range(r + 1, world):
            assert not samples[r] & samples[q]
    assert sorted(s for rank in samples for s in rank) == list(range(n))
    assert positions(world, micro, steps) == list(range(n))

    # the same through make_loader: the batches' contents are the dataset samples themselves
    read = collections.Counter()
    for r in range(world):
        loader = make_loader(stream, micro_batch=micro, rank=r, world_size=world, num_batches=steps, pin_memory=False)
        assert len(loader) == steps
        for batch in loader:
            assert batch["input_ids"].shape == (micro, 4)
            assert batch["input_ids"].dtype == torch.int64
            read.update(batch["input_ids"][:, 0].tolist())
    assert read == collections.Counter(range(n))


def test_rank_sampler_layout():
    assert list(RankSampler(12, 1, 2, 3, 2)) == [15, 16, 17, 21, 22, 23]
    assert len(RankSampler(12, 1, 2, 3, 2)) == 6
    endless = iter(RankSampler(0, 2, 3, 2))
    assert [next(endless) for _ in range(6)] == [4, 5, 10, 11, 16, 17]
    with pytest.raises(TypeError):
        len(RankSampler(0, 0, 1, 2))
    with pytest.raises(ValueError):
        RankSampler(0, 3, 3, 2)


@pytest.fixture(scope="module")
def train_stream(prepared):
    shards = TokenShards(prepared.root, "train", tokenizer_fingerprint=prepared.tokenizer.fingerprint)
    dataset = PackedTokenDataset(shards, seq_len=200, reset_at_documents=True)
    assert 20 < len(dataset) < 60  # small: the runs below cross epoch boundaries
    return ShuffledStream(dataset, seed=3)


@pytest.mark.parametrize(("world2", "micro2"), [(2, 3), (3, 2), (1, 6), (6, 1)])
def test_resume_continues_the_same_sequence(train_stream, world2, micro2):
    """N global steps at world 2 x micro 3 read exactly what k steps plus a resumed run read,
    also when the resumed run has another world size (same global batch of 6)."""
    steps, k, global_batch = 20, 7, 6
    full_pos = positions(2, 3, steps)
    assert full_pos == list(range(steps * global_batch))
    resumed_pos = positions(2, 3, k) + positions(world2, micro2, steps - k, start=k * global_batch)
    assert resumed_pos == full_pos

    full = global_batches(train_stream, 2, 3, steps)
    first = global_batches(train_stream, 2, 3, k)
    rest = global_batches(train_stream, world2, micro2, steps - k, consumed=k * global_batch)
    assert len(full) == len(first) + len(rest) == steps
    for s, (a, b) in enumerate(zip(full, first + rest)):
        assert torch.equal(a, b), f"global step {s}"
    # and the tensors are the stream's samples at those positions
    flat = torch.cat(full)
    for g in (0, 5, 6, 59, steps * global_batch - 1):
        assert torch.equal(flat[g], torch.from_numpy(train_stream.get(g)["input_ids"]))
    for key in ("labels", "position_ids", "document_ids"):
        a = torch.cat(global_batches(train_stream, 2, 3, steps, key=key))
        b = torch.cat(global_batches(train_stream, world2, micro2, steps - k, consumed=k * global_batch, key=key))
        assert torch.equal(a[k * global_batch :], b)


@pytest.mark.parametrize(("consumed", "micro", "world"), [(5, 3, 2), (7, 2, 3), (1, 2, 1), (6, 4, 1)])
def test_resume_off_a_step_boundary_is_refused(consumed, micro, world):
    stream = ShuffledStream(IndexDataset(10), seed=0)
    with pytest.raises(DataError) as info:
        make_loader(stream, micro_batch=micro, world_size=world, consumed_samples=consumed)
    assert f"consumed_samples={consumed}" in str(info.value)
    assert f"{micro} x {world}" in str(info.value)


def test_worker_processes_yield_the_same_batches(train_stream):
    kwargs = {"micro_batch": 3, "rank": 1, "world_size": 2, "consumed_samples": 12, "num_batches": 6}
    serial = list(make_loader(train_stream, num_workers=0, pin_memory=False, **kwargs))
    parallel = list(make_loader(train_stream, num_workers=2, pin_memory=False, **kwargs))
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys() == {"input_ids", "labels", "position_ids", "document_ids"}
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# PackedTokenDataset
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [16, 37])
def test_packed_samples_are_slices_of_the_stream(prepared, seq_len):
    shards = TokenShards(prepared.root, "train")
    stream, _ = concatenated(prepared.root)
    assert len(stream) == shards.num_tokens
    dataset = PackedTokenDataset(shards, seq_len)
    assert len(dataset) == (shards.num_tokens - 1) // seq_len
    for i in range(len(dataset)):
        sample = dataset[i]
        assert set(sample) == {"input_ids", "labels"}
        assert np.array_equal(sample["input_ids"], stream[i * seq_len : (i + 1) * seq_len])
        assert np.array_equal(sample["labels"], stream[i * seq_len + 1 : (i + 1) * seq_len + 1])
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.raises(IndexError):
        dataset[-1]


def test_packed_samples_span_shard_boundaries(prepared):
    shards = TokenShards(prepared.root, "train")
    assert len(shards.shards) >= 3
    boundary = int(shards.offsets[1])
    stream, _ = concatenated(prepared.root)
    assert np.array_equal(shards.read(boundary - 5, 10), stream[boundary - 5 : boundary + 5])
    assert np.array_equal(shards.read(0, shards.num_tokens), stream)
    with pytest.raises(IndexError):
        shards.read(shards.num_tokens - 3, 4)


@pytest.mark.parametrize("seq_len", [16, 53])
def test_reset_at_documents(prepared, seq_len):
    shards = TokenShards(prepared.root, "train")
    stream, doc_of = concatenated(prepared.root)
    doc_start = np.concatenate([[0], np.cumsum(np.bincount(doc_of))])[doc_of]  # each token's document start
    eod = prepared.tokenizer.eod_id
    dataset = PackedTokenDataset(shards, seq_len, reset_at_documents=True)
    masked_total = 0
    for i in range(len(dataset)):
        sample = dataset[i]
        span = np.arange(i * seq_len, (i + 1) * seq_len)
        assert set(sample) == {"input_ids", "labels", "position_ids", "document_ids"}
        assert np.array_equal(sample["input_ids"], stream[span])
        assert np.array_equal(sample["position_ids"], span - np.maximum(doc_start[span], span[0]))
        assert sample["position_ids"].max() < seq_len, "never past the model's positions"
        assert np.array_equal(sample["document_ids"], doc_of[span] - doc_of[span[0]])
        assert sample["document_ids"][0] == 0
        steps = np.diff(sample["document_ids"])
        assert set(steps.tolist()) <= {0, 1}
        assert np.array_equal(steps == 1, sample["position_ids"][1:] == 0)  # new document <=> position 0
        crosses = doc_of[span + 1] != doc_of[span]
        expected_labels = np.where(crosses, IGNORE, stream[span + 1])
        assert np.array_equal(sample["labels"], expected_labels)
        # the boundary is exactly after each end-of-document token
        assert np.array_equal(crosses, sample["input_ids"] == eod)
        masked_total += int(crosses.sum())
    covered = stream[: len(dataset) * seq_len]
    assert masked_total == np.count_nonzero(covered == eod) > 50  # every boundary in the samples was checked


def test_document_bounds_agree_with_the_document_starts(prepared):
    shards = TokenShards(prepared.root, "train")
    starts = shards.document_starts()
    assert len(shards.shards) >= 3 and len(starts) == shards.num_documents
    n = shards.num_tokens
    boundaries = [int(o) for o in shards.offsets[1:-1]]
    ranges = [(0, n), (0, 1), (n - 1, 1), (5, 0)]
    ranges += [(b - 7, 15) for b in boundaries] + [(boundaries[0] - 3, boundaries[1] - boundaries[0] + 6)]
    rng = np.random.default_rng(0)
    ranges += [(int(a), int(rng.integers(0, min(200, n - a) + 1))) for a in rng.integers(0, n, size=50)]
    for start, length in ranges:
        doc, doc_start = shards.document_bounds(start, length)
        positions = np.arange(start, start + length)
        expected = np.searchsorted(starts, positions, side="right") - 1
        assert doc.dtype == doc_start.dtype == np.int64
        assert np.array_equal(doc, expected)
        assert np.array_equal(doc_start, starts[expected])
    for start, length in [(-1, 2), (n - 2, 3)]:
        with pytest.raises(IndexError):
            shards.document_bounds(start, length)


def test_reset_at_documents_reads_the_index_memory_mapped(tmp_path):
    """Document bounds come from memory-mapped per-shard indexes: reading samples of a split whose
    indexes hold 1.2M entries (~10 MB) allocates almost nothing, and a pickled dataset (what
    DataLoader workers receive) carries no index."""
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 5, size=400_000) for _ in range(3)]
    root = write_token_shards(tmp_path / "big", lengths)
    seq_len = 64
    tracemalloc.start()
    try:
        shards = TokenShards(root, "train")
        dataset = PackedTokenDataset(shards, seq_len, reset_at_documents=True)
        boundary = int(shards.offsets[1]) // seq_len  # a sample across the first shard boundary
        picks = [0, 1, boundary, len(dataset) // 2, len(dataset) - 1]
        samples = [dataset[i] for i in picks]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak} bytes: the document index was read into memory"
    assert len(pickle.dumps(dataset)) < 64 << 10
    starts = shards.document_starts()  # built only here, to check the samples
    for i, sample in zip(picks, samples):
        span = np.arange(i * seq_len, (i + 1) * seq_len + 1)
        doc = np.searchsorted(starts, span, side="right") - 1
        assert np.array_equal(sample["position_ids"], span[:-1] - np.maximum(starts[doc[:-1]], span[0]))
        assert np.array_equal(sample["document_ids"], doc[:-1] - doc[0])
        assert np.array_equal(sample["labels"], np.where(doc[1:] != doc[:-1], IGNORE, span[1:] % 512))
    assert samples[2]["document_ids"][-1] > 0  # the boundary sample spans documents of two shards


def test_too_short_split(prepared):
    shards = TokenShards(prepared.root, "validation")
    n = shards.num_tokens
    assert len(PackedTokenDataset(shards, n - 1)) == 1
    with pytest.raises(DataError) as info:
        PackedTokenDataset(shards, n)
    msg = str(info.value)
    assert f"the validation split of {prepared.root} has {n} tokens" in msg
    assert f"seq_len + 1 = {n + 1}" in msg
    assert "shorter sequence length" in msg


# ---------------------------------------------------------------------------------------------
# BlendedStream
# ---------------------------------------------------------------------------------------------


def test_blend_proportions():
    streams = [TaggedStream(0), TaggedStream(1)]
    blend = BlendedStream(streams, [0.7, 0.3], seed=4)
    assert blend.counts.tolist() == [700, 300]
    located = [blend.locate(g) for g in range(10_000)]
    which = np.array([s for s, _ in located])
    assert abs(np.mean(which == 0) - 0.7) <= 0.01
    for b in range(10):  # every full block: exactly 700 / 300
        assert np.count_nonzero(which[b * 1000 : (b + 1) * 1000] == 0) == 700
    for start in (1, 333, 5678):  # any window of 10,000 positions
        window = [blend.locate(g)[0] for g in range(start, start + 10_000)]
        assert abs(window.count(0) / 10_000 - 0.7) <= 0.01
    assert not np.array_equal(which[:1000], which[1000:2000])  # each block has its own order


def test_blend_reads_each_stream_in_order_without_skipping():
    streams = [TaggedStream(0), TaggedStream(1), TaggedStream(2)]
    blend = BlendedStream(streams, [5, 3, 2], seed=9, block=100)
    ks = {0: [], 1: [], 2: []}
    for g in range(1000):
        s, k = blend.locate(g)
        sample = blend.get(g)
        assert int(sample["stream"][0]) == s and int(sample["k"][0]) == k
        ks[s].append(k)
    assert ks == {0: list(range(500)), 1: list(range(300)), 2: list(range(200))}
    for s, stream in enumerate(streams):
        assert stream.read == ks[s]
    # position g is a function of (seed, g): a fresh blend, read backwards, agrees
    again = BlendedStream([TaggedStream(0), TaggedStream(1), TaggedStream(2)], [5, 3, 2], seed=9, block=100)
    assert [again.locate(g) for g in reversed(range(1000))] == [blend.locate(g) for g in reversed(range(1000))]
    other = BlendedStream(streams, [5, 3, 2], seed=10, block=100)
    assert [other.locate(g) for g in range(100)] != [blend.locate(g) for g in range(100)]


def test_blend_largest_remainder_rounding():
    streams = [TaggedStream(s) for s in range(3)]
    blend = BlendedStream(streams, [1, 1, 1], seed=0)
    assert blend.counts.tolist() == [334, 333, 333]
    assert [blend.locate(g)[0] for g in range(1000)].count(0) == 334
    assert BlendedStream(streams, [0.5, 0.5, 0], seed=0, block=10).counts.tolist() == [5, 5, 0]
    assert blend.samples_per_epoch == 300


@pytest.mark.parametrize(
    ("n_streams", "weights"),
    [
        (2, [0.7]),
        (1, [0.5, 0.5]),
        (0, []),
        (2, [-0.1, 1.1]),
        (2, [0, 0]),
        (2, [float("nan"), 1.0]),
        (2, [float("inf"), 1.0]),
    ],
    ids=["too-few-weights", "too-many-weights", "no-streams", "negative", "all-zero", "nan", "inf"],
)
def test_blend_invalid_weights(n_streams, weights):
    with pytest.raises(DataError):
        BlendedStream([TaggedStream(s) for s in range(n_streams)], weights, seed=0)


# ---------------------------------------------------------------------------------------------
# MLM masking
# ---------------------------------------------------------------------------------------------

SPECIALS = [0, 1, 2, 3, 4]
MASK_ID = 2
VOCAB = 512


@pytest.fixture(scope="module")
def mlm_samples():
    """200 samples x 1000 tokens, ~5% special tokens."""
    rng = np.random.default_rng(123)
    samples = []
    for _ in range(200):
        tokens = rng.integers(5, VOCAB, size=1000)
        special = rng.random(1000) < 0.05
        tokens[special] = rng.choice(SPECIALS, size=int(special.sum()))
        samples.append(tokens)
    return samples


def test_mlm_statistics(mlm_samples):
    cfg = MLMConfig(mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    stream = ArrayStream(mlm_samples)
    mlm = MLMStream(stream, cfg, seed=17)
    assert mlm.samples_per_epoch == 200
    n_plain = n_selected = n_mask = n_random = n_kept = n_special = 0
    for g in range(200):
        original = stream.get(g)
        out = mlm.get(g)
        tokens, inputs, labels = original["input_ids"], out["input_ids"], out["labels"]
        assert inputs.shape == labels.shape == tokens.shape
        assert np.array_equal(out["position_ids"], original["position_ids"])  # other keys untouched
        special = np.isin(tokens, SPECIALS)
        selected = labels != IGNORE
        assert not (selected & special).any()
        assert np.array_equal(inputs[special], tokens[special])
        assert np.array_equal(labels[selected], tokens[selected])
        assert np.array_equal(inputs[~selected], tokens[~selected])
        changed = selected & (inputs != tokens)
        masked = selected & (inputs == MASK_ID)
        randomised = changed & ~masked
        assert not np.isin(inputs[randomised], SPECIALS).any()
        assert ((inputs >= 0) & (inputs < VOCAB)).all()
        n_special += int(special.sum())
        n_plain += int((~special).sum())
        n_selected += int(selected.sum())
        n_mask += int(masked.sum())
        n_random += int(randomised.sum())
        n_kept += int((selected & (inputs == tokens)).sum())
    assert 0.04 < n_special / 200_000 < 0.06
    assert abs(n_selected / n_plain - 0.15) <= 0.005
    assert n_mask + n_random + n_kept == n_selected
    assert abs(n_mask / n_selected - 0.8) <= 0.02
    assert abs(n_random / n_selected - 0.1) <= 0.02
    assert abs(n_kept / n_selected - 0.1) <= 0.02


def test_mlm_is_a_function_of_seed_and_position(mlm_samples):
    cfg = MLMConfig(mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS)
    same = ArrayStream(mlm_samples[:1])  # every position holds the same tokens: only the masking differs
    mlm = MLMStream(same, cfg, seed=1)
    a, b = mlm.get(7), mlm.get(7)
    c = MLMStream(same, cfg, seed=1).get(7)
    for key in ("input_ids", "labels"):
        assert np.array_equal(a[key], b[key]) and np.array_equal(a[key], c[key])
    assert not np.array_equal(mlm.get(8)["labels"], a["labels"])
    assert not np.array_equal(MLMStream(same, cfg, seed=2).get(7)["labels"], a["labels"])


def test_mlm_over_prepared_data(train_stream, prepared):
    tok = prepared.tokenizer
    cfg = MLMConfig(mask_id=tok.special_id("mask"), vocab_size=tok.vocab_size, special_ids=tok.all_special_ids)
    mlm = MLMStream(train_stream, cfg, seed=0)
    for g in (0, 1, 100):
        plain, out = train_stream.get(g), mlm.get(g)
        selected = out["labels"] != IGNORE
        assert 0 < selected.sum() < len(selected)
        assert np.array_equal(out["labels"][selected], plain["input_ids"][selected])
        eod = plain["input_ids"] == tok.eod_id
        assert eod.any() and not (selected & eod).any()
        assert np.array_equal(out["position_ids"], plain["position_ids"])
        assert np.array_equal(mlm.get(g)["input_ids"], out["input_ids"])
    batch = next(iter(make_loader(mlm, micro_batch=4, num_batches=1, pin_memory=False)))
    assert torch.equal(batch["labels"][0], torch.from_numpy(mlm.get(0)["labels"]))


def test_mask_tokens_without_random_or_keep():
    cfg = MLMConfig(mask_id=MASK_ID, vocab_size=VOCAB, special_ids=SPECIALS, mask_prob=1.0, replace_prob=1.0)
    tokens = np.array([0, 10, 11, 4, 12, 1, 13])
    inputs, labels = mask_tokens(tokens, cfg, np.random.default_rng(0))
    assert inputs.tolist() == [0, MASK_ID, MASK_ID, 4, MASK_ID, 1, MASK_ID]
    assert labels.tolist() == [IGNORE, 10, 11, IGNORE, 12, IGNORE, 13]
