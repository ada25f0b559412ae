"""Token shards -> packed samples -> a deterministic global order -> per-rank batches.

The whole run reads one global sequence of samples, fixed by the seed: position g of that
sequence is a function of g alone (``SampleStream.get(g)``). A data-parallel rank reads its
slice of each global batch. The only state is the number of samples consumed globally, so a
resumed run, even with a different number of ranks, continues the same sequence.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from crate_lm.data.errors import DataError
from crate_lm.data.shards import TokenShards

IGNORE_INDEX = -100


class PackedTokenDataset:
    """Fixed-length samples over the concatenated token stream of one split.

    Sample i holds tokens [i T, i T + T] (T = seq_len): ``input_ids`` the first T, ``labels``
    the last T (next-token targets). With ``reset_at_documents`` each sample also carries
    ``position_ids`` that restart at every document (and at the sample's start, so a document
    longer than a sample never runs past the model's positions) and ``document_ids`` that the models turn
    into a block-diagonal attention mask; targets that cross into the next document are -100.
    Document bounds come from the memory-mapped indexes, so memory does not grow with the corpus.
    """

    def __init__(self, shards: TokenShards, seq_len: int, *, reset_at_documents: bool = False) -> None:
        self.shards, self.seq_len, self.reset_at_documents = shards, seq_len, reset_at_documents
        self.num_samples = (shards.num_tokens - 1) // seq_len
        if self.num_samples < 1:
            raise DataError(
                f"the {shards.split} split of {shards.root} has {shards.num_tokens} tokens, fewer than one sample "
                f"of seq_len + 1 = {seq_len + 1}; use a shorter sequence length or more data"
            )
        if reset_at_documents:
            shards.check_document_indexes()  # a damaged index fails here, not later in a worker

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        start = i * self.seq_len
        tokens = self.shards.read(start, self.seq_len + 1)
        sample = {"input_ids": tokens[:-1], "labels": tokens[1:].copy()}
        if self.reset_at_documents:
            doc, doc_start = self.shards.document_bounds(start, self.seq_len + 1)
            # positions restart at each document and at the sample's start (the model sees no further back)
            sample["position_ids"] = np.arange(start, start + self.seq_len) - np.maximum(doc_start[:-1], start)
            sample["document_ids"] = doc[:-1] - doc[0]
            sample["labels"][doc[1:] != doc[:-1]] = IGNORE_INDEX
        return sample


class PermutedOrder:
    """A seeded pseudorandom permutation of range(n), evaluated per index in O(1) memory.

    A 4-round Feistel network over the smallest even number of bits that covers n, with cycle
    walking to stay inside range(n): a bijection for any n, without storing n indices (a
    trillion-token corpus has ~10^9 samples).
    """

    _M1 = np.uint64(0x9E3779B97F4A7C15)
    _M2 = np.uint64(0xBF58476D1CE4E5B9)

    def __init__(self, n: int, seed: int | Sequence[int]) -> None:
        if n < 1:
            raise ValueError("cannot order an empty set of samples")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.default_rng(seed).integers(0, 2**63, size=4, dtype=np.uint64)

    def _round_function(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        h = (r ^ key) * self._M1
        h ^= h >> np.uint64(29)
        h *= self._M2
        h ^= h >> np.uint64(32)
        return h & self.mask

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round_function(right, key)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = np.atleast_1d(np.asarray(index, dtype=np.uint64))
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index outside range({self.n})")
        with np.errstate(over="ignore"):
            out = self._feistel(x)
            outside = out >= self.n
            while outside.any():
                out[outside] = self._feistel(out[outside])
                outside = out >= self.n
        return out.astype(np.int64)


class SampleStream:
    """An endless, deterministic sequence of samples: ``get(g)`` is sample number g."""

    def get(self, g: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @property
    def samples_per_epoch(self) -> int:
        raise NotImplementedError


class ShuffledStream(SampleStream):
    """Epoch e visits every sample of ``dataset`` once, in the order PermutedOrder(seed, e)."""

    def __init__(self, dataset: PackedTokenDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self._orders: dict[int, PermutedOrder] = {}

    @property
    def samples_per_epoch(self) -> int:
        return len(self.dataset)

    def index(self, g: int) -> int:
        """Which dataset sample is number g of the stream."""
        epoch, i = divmod(g, len(self.dataset))
        if epoch not in self._orders:
            self._orders = {epoch: PermutedOrder(len(self.dataset), [self.seed, epoch])}
        return int(self._orders[epoch](i)[0])

    def get(self, g: int) -> dict[str, np.ndarray]:
        return self.dataset[self.index(g)]


class BlendedStream(SampleStream):
    """Mix several streams in fixed proportions.

    Positions come in blocks of ``block``; every block holds each stream's share (largest
    remainder rounding of weight x block) in a seeded order, so proportions are exact per
    block and position g maps to (stream, its k-th sample) in O(block) without history.
    """

    def __init__(self, streams: Sequence[SampleStream], weights: Sequence[float], seed: int, block: int = 1000) -> None:
        if len(streams) != len(weights) or not streams:
            raise DataError("blending needs one weight per dataset")
        w = np.asarray(weights, dtype=np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise DataError(f"blend weights must be finite, >= 0 and not all zero, got {list(weights)}")
        w = w / w.sum()
        counts = np.floor(w * block).astype(np.int64)
        order = np.argsort(-(w * block - counts), kind="stable")
        counts[order[: block - counts.sum()]] += 1
        self.streams, self.weights, self.seed, self.block, self.counts = list(streams), w, seed, block, counts
        self._pattern_block, self._pattern, self._rank = -1, None, None

    @property
    def samples_per_epoch(self) -> int:
        return sum(s.samples_per_epoch for s in self.streams)

    def _block_pattern(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b != self._pattern_block:
            pattern = np.repeat(np.arange(len(self.streams)), self.counts)
            np.random.default_rng([self.seed, b]).shuffle(pattern)
            rank = np.zeros_like(pattern)
            for s in range(len(self.streams)):
                where = pattern == s
                rank[where] = np.arange(where.sum())
            self._pattern_block, self._pattern, self._rank = b, pattern, rank
        return self._pattern, self._rank

    def locate(self, g: int) -> tuple[int, int]:
        """(stream, position within that stream) of blended position g."""
        b, r = divmod(g, self.block)
        pattern, rank = self._block_pattern(b)
        s = int(pattern[r])
        return s, b * int(self.counts[s]) + int(rank[r])

    def get(self, g: int) -> dict[str, np.ndarray]:
        s, k = self.locate(g)
        return self.streams[s].get(k)


@dataclass
class MLMConfig:
    """BERT-style masking: select ``mask_prob`` of the non-special tokens; of those, 80% become
    the mask token, 10% a random token, 10% stay; the loss reads only the selected positions."""

    mask_id: int
    vocab_size: int
    special_ids: Sequence[int]
    mask_prob: float = 0.15
    replace_prob: float = 0.8
    random_prob: float = 0.1


def mask_tokens(tokens: np.ndarray, cfg: MLMConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(masked input ids, labels with -100 at unselected positions)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    special = np.isin(tokens, np.asarray(cfg.special_ids, dtype=np.int64))
    selected = (rng.random(tokens.shape) < cfg.mask_prob) & ~special
    labels = np.where(selected, tokens, IGNORE_INDEX)
    action = rng.random(tokens.shape)
    inputs = tokens.copy()
    inputs[selected & (action < cfg.replace_prob)] = cfg.mask_id
    randomise = selected & (action >= cfg.replace_prob) & (action < cfg.replace_prob + cfg.random_prob)
    if randomise.any():
        candidates = np.setdiff1d(np.arange(cfg.vocab_size), np.asarray(cfg.special_ids))
        inputs[randomise] = rng.choice(candidates, size=int(randomise.sum()))
    return inputs, labels


class MLMStream(SampleStream):
    """Masked-LM samples: the packed tokens of ``stream`` masked with a generator seeded by
    (seed, g), so sample g is the same on any rank, worker or resumed run."""

    def __init__(self, stream: SampleStream, cfg: MLMConfig, seed: int) -> None:
        self.stream, self.cfg, self.seed = stream, cfg, seed

    @property
    def samples_per_epoch(self) -> int:
        return self.stream.samples_per_epoch

    def get(self, g: int) -> dict[str, np.ndarray]:
        sample = dict(self.stream.get(g))
        inputs, labels = mask_tokens(sample["input_ids"], self.cfg, np.random.default_rng([self.seed, g]))
        sample["input_ids"], sample["labels"] = inputs, labels
        return sample


class _StreamDataset(Dataset):
    def __init__(self, stream: SampleStream) -> None:
        self.stream = stream

    def __getitem__(self, g: int) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in self.stream.get(g).items()}


class RankSampler(Sampler[int]):
    """Global positions read by one rank: in each global step of ``micro_batch x world_size``
    samples, rank r reads the r-th contiguous slice of ``micro_batch``. Starts after ``start``
    samples consumed globally; endless unless ``num_batches`` is given."""

    def __init__(
        self, start: int, rank: int, world_size: int, micro_batch: int, num_batches: int | None = None
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of {world_size}")
        self.start, self.rank, self.world_size, self.micro_batch, self.num_batches = (
            start,
            rank,
            world_size,
            micro_batch,
            num_batches,
        )

    def __iter__(self) -> Iterator[int]:
        steps = itertools.count() if self.num_batches is None else range(self.num_batches)
        for k in steps:
            base = self.start + (k * self.world_size + self.rank) * self.micro_batch
            yield from range(base, base + self.micro_batch)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("an endless sampler has no length")
        return self.num_batches * self.micro_batch


WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker start-up: leave stop signals to the training process.

    Launchers (torchrun's shutdown, SLURM's scancel, Ctrl-C in a terminal) signal the whole
    process group. A worker killed by such a signal makes the trainer fail mid-step or mid-save
    instead of saving; ignoring it lets the trainer stop cleanly, and its workers end with it.
    """
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def make_loader(
    stream: SampleStream,
    *,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    consumed_samples: int = 0,
    num_batches: int | None = None,
    num_workers: int = 0,
    pin_memory: bool | None = None,
) -> DataLoader:
    """A DataLoader over this rank's slice of the global sample sequence.

    ``consumed_samples`` is the global count already read (the resume state). Pinned memory is
    on where CUDA is available. Workers ignore stop signals (:func:`ignore_stop_signals`).
    """
    if consumed_samples % (micro_batch * world_size):
        raise DataError(
            f"consumed_samples={consumed_samples} is not a whole number of global micro-steps of "
            f"{micro_batch} x {world_size} samples; resume from a step boundary"
        )
    sampler = RankSampler(consumed_samples, rank, world_size, micro_batch, num_batches)
    return DataLoader(
        _StreamDataset(stream),
        batch_size=micro_batch,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )
