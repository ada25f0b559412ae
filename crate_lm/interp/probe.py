"""k-sparse probing (Gurnee et al. 2023): how few units of a representation carry a property?

``crate-lm probe RUN [RUN ...] --label line_start --layer all``. For each run (a CRATE run and
the GPT baseline trained on the same data, say), each layer l and each representation
(``REPRESENTATIONS``: CRATE's ISTA code A and residual stream; GPT's MLP neurons and residual
stream), on held-out tokens:

1. label every token with a labeler computed from the text (:mod:`crate_lm.interp.labels`), so
   runs with different tokenizers are labelled by one definition, each on its own tokens;
2. split the tokens by document (:func:`split_by_document`): no text is in both halves;
3. rank the units on the training half by |mean(x | y) - mean(x | not y)| (or the ANOVA F
   statistic), :func:`rank_units`;
4. for k = 1, 2, 4, ... fit an L2, class-balanced logistic regression on the top-k units
   (standardised with the training mean and std) and on all units, and score it on the test
   half: F1 of the positive class, AUROC, balanced accuracy (:func:`fit_k_sparse`).

A property one unit carries shows up as a high F1 at k = 1; one spread over many units needs
large k; "all" is the dense linear probe, an upper reference. ``f1_chance`` = 2p / (1 + p) for a
test positive rate p is what predicting every token positive scores.

Writes ``probe.json`` and one ``probe_<label>.png`` per label (F1 against k, one panel per layer)
to ``out`` (default ``<first run's checkpoint>/probe``).
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_savefig
from crate_lm.interp.labels import Labeler, label_sequence, resolve_labeler

REPRESENTATIONS: dict[str, dict[str, str]] = {
    "crate": {"code": "blocks.{l}.ista.hook_code", "resid": "blocks.{l}.hook_resid_post"},
    "gpt": {"mlp": "blocks.{l}.mlp.hook_post", "resid": "blocks.{l}.hook_resid_post"},
}
"""Per architecture (``cfg.model.arch``): representation name -> hook point of layer l."""
METHODS = ("mean_diff", "f_stat")
UNITS_LISTED = 32  # unit ids are reported for k up to this
MEMORY_BUDGET_BYTES = 4 * 2**30
"""Activations held at once per run (float32); more layers than fit are collected in several passes."""
FORMAT = "crate_lm.probe.v1"
HEAD_MAJOR = re.compile(r"\.attn\.hook_(q|k|v|pattern)$")


class ProbeError(CrateLMError):
    """The probe cannot run as asked; the message says why and what to do."""


# ---- ranking, splitting, fitting ---------------------------------------------------------------


def rank_units(X: np.ndarray, y: np.ndarray, method: str = "mean_diff") -> np.ndarray:
    """Unit indices, best first. ``mean_diff``: |mean(X[y]) - mean(X[~y])| (the class means'
    difference, in the units' own scale); ``f_stat``: the ANOVA F statistic (NaN, for a constant
    unit, counts as 0). Ties keep the lower index first. Call it on the training split only."""
    y = np.asarray(y, dtype=bool)
    if method == "mean_diff":
        pos = X[y].mean(axis=0, dtype=np.float64)
        neg = X[~y].mean(axis=0, dtype=np.float64)
        score = np.abs(pos - neg)
    elif method == "f_stat":
        from sklearn.feature_selection import f_classif

        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            warnings.simplefilter("ignore")
            score = np.nan_to_num(f_classif(X, y)[0].astype(np.float64), nan=0.0, posinf=np.finfo(np.float64).max)
    else:
        raise ProbeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return np.argsort(-score, kind="stable")


def split_by_document(doc: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """A bool mask of the test rows: round(test_fraction x documents) documents, chosen by a
    permutation seeded with ``seed``, go to the test side with every one of their rows; at least
    one document on each side."""
    if not 0 < test_fraction < 1:
        raise ProbeError(f"--test_fraction must be between 0 and 1 (exclusive), got {test_fraction!r}")
    doc = np.asarray(doc).reshape(-1)
    documents = np.unique(doc)
    if len(documents) < 2:
        raise ProbeError(f"the tokens come from {len(documents)} document(s); a train/test split by document needs "
                         "at least 2: probe more --tokens or data with more documents")  # fmt: skip
    n_test = min(max(round(test_fraction * len(documents)), 1), len(documents) - 1)
    chosen = np.random.default_rng(seed).permutation(documents)[:n_test]
    return np.isin(doc, chosen)


def _split_sizes(y: np.ndarray) -> dict:
    return {"tokens": int(len(y)), "positive_rate": float(y.mean()) if len(y) else 0.0}


def check_split(y_train: np.ndarray, y_test: np.ndarray, label: str = "label") -> None:
    """Both classes on both sides, or a one-line error naming the label."""
    for side, y in (("training", y_train), ("test", y_test)):
        positives = int(np.sum(y))
        if positives == 0 or positives == len(y):
            missing = "positive" if positives == 0 else "negative"
            raise ProbeError(f"label '{label}': the {side} split holds no {missing} tokens ({positives:,} of "
                             f"{len(y):,} positive); probe more --tokens (or data where '{label}' occurs, "
                             "or another label)")  # fmt: skip


def chance_f1(positive_rate: float) -> float:
    """F1 of predicting every token positive at a positive rate p: 2p / (1 + p)."""
    return 2 * positive_rate / (1 + positive_rate) if positive_rate > 0 else 0.0


def _scores(model: Any, X: np.ndarray, y: np.ndarray) -> dict:
    from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

    predicted = model.predict(X)
    return {
        "f1": float(f1_score(y, predicted, zero_division=0)),
        "auroc": float(roc_auc_score(y, model.decision_function(X))),
        "balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
    }


def _fit(X: np.ndarray, y: np.ndarray, C: float, seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(),  # the training mean and std: units of different scales compare
        LogisticRegression(C=C, class_weight="balanced", max_iter=1000, random_state=seed),  # L2 by default
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(X, y)


def parse_ks(ks: str | int | Sequence[int]) -> list[int]:
    """``"1,2,4"`` / ``8`` / ``[1, 2]`` as a list of distinct positive ints in increasing order."""
    items = ks.split(",") if isinstance(ks, str) else [ks] if isinstance(ks, int) else list(ks)
    out = []
    for item in items:
        value = item.strip() if isinstance(item, str) else item
        try:
            number = int(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or number < 1 or (isinstance(value, float) and not value.is_integer()):
            raise ProbeError(f"--ks must be positive integers such as 1,2,4,8, got {ks!r}")
        out.append(number)
    if not out:
        raise ProbeError("--ks is empty; give positive integers such as 1,2,4,8")
    return sorted(set(out))


def fit_k_sparse(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    method: str = "mean_diff",
    include_all: bool = True,
    C: float = 1.0,
    seed: int = 0,
    *,
    label: str = "label",
) -> dict:
    """k-sparse probes of one representation: rank the units on the training rows
    (:func:`rank_units`), fit a class-balanced L2 logistic regression (features standardised with
    the training mean and std) on the top-k units for each k (capped at the width, duplicates
    dropped) and, with ``include_all``, on every unit; score each on the test rows.

    Returns ``{"width", "method", "train": {tokens, positive_rate}, "test": {...}, "f1_chance",
    "k": {"1": {f1, auroc, balanced_accuracy, units}, ...}, "all": {f1, auroc, balanced_accuracy}}``;
    ``units`` (the unit ids used, best first) only for k <= 32. A split missing a class is a
    :class:`ProbeError` naming ``label``."""
    y_train = np.asarray(y_train, dtype=bool)
    y_test = np.asarray(y_test, dtype=bool)
    check_split(y_train, y_test, label)
    width = X_train.shape[1]
    order = rank_units(X_train, y_train, method)
    capped = sorted({min(int(k), width) for k in parse_ks(list(ks))})
    result: dict[str, Any] = {
        "width": int(width),
        "method": method,
        "train": _split_sizes(y_train),
        "test": _split_sizes(y_test),
        "f1_chance": chance_f1(float(y_test.mean())),
        "k": {},
    }
    for k in capped:
        units = order[:k]
        model = _fit(X_train[:, units], y_train, C, seed)
        scores = _scores(model, X_test[:, units], y_test)
        if k <= UNITS_LISTED:
            scores["units"] = [int(u) for u in units]
        result["k"][str(k)] = scores
    if include_all:
        result["all"] = _scores(_fit(X_train, y_train, C, seed), X_test, y_test)
    return result


# ---- activations and labels ----------------------------------------------------------------------


def _labelers(labeler: Any) -> list[Labeler] | None:
    if labeler is None:
        return None
    items = labeler if isinstance(labeler, (list, tuple)) else [labeler]
    return [resolve_labeler(x) for x in items]


def collect(
    loaded: Any,
    sequences: Any,
    hooks: Sequence[str],
    labeler: Any,
    batch_size: int = 8,
    show_progress: bool = True,
    *,
    desc: str = "probe",
) -> tuple[dict[str, np.ndarray], np.ndarray | None, np.ndarray]:
    """Run the model over ``sequences`` (``open_sequences``) and keep, per token, the activations
    of ``hooks``, the labels and the document number.

    Returns ``(acts, labels, doc)``: ``acts[hook]`` float32 (N, width); ``labels`` bool (N,) for
    one labeler, (N, L) for a list of L, None for None (each sequence is labelled on its own
    tokens with :func:`label_sequence`); ``doc`` (N,) int64, the document of each token. The
    forward stops after the last block the hooks need, runs under ``torch.inference_mode``, and
    restarts positions and attention at documents when the run trained that way
    (``data.reset_at_documents``, shards only), as ``crate-lm extract`` does.

    Memory: N x (sum of the hooks' widths) x 4 bytes, allocated up front for the planned
    tokens; 60,000 tokens of a 3,072-wide code plus a 768-wide residual stream at 12 layers is
    11 GB, so :func:`probe` collects a few layers at a time (``MEMORY_BUDGET_BYTES``).
    Head-major hooks (``attn.hook_q``, ``attn.hook_pattern``: one vector per head) are refused."""
    from tqdm import tqdm

    hooks = list(hooks)
    head_major = [h for h in hooks if HEAD_MAJOR.search(h)]
    if head_major:
        raise ProbeError(f"cannot probe head-major hook points ({', '.join(head_major)}): probe the residual "
                         "stream, the ISTA code or the MLP neurons (one vector per token)")  # fmt: skip
    labelers = _labelers(labeler)
    capacity = sequences.planned * sequences.seq_len
    state = _Collected(loaded, hooks, capacity, labelers, sequences.kind == "shards")
    with tqdm(total=capacity, unit="tok", unit_scale=True, desc=desc, disable=not show_progress) as bar:
        with torch.inference_mode():
            batch: list[tuple] = []
            for item in sequences.iter():
                batch.append(item)
                if len(batch) == batch_size:
                    bar.update(state.add(batch))
                    batch = []
            if batch:
                bar.update(state.add(batch))
    n = state.n
    acts = {h: state.acts[h][:n] for h in hooks} if n else {h: np.zeros((0, 0), dtype=np.float32) for h in hooks}
    labels = None
    if state.labels is not None:
        labels = state.labels[:n] if isinstance(labeler, (list, tuple)) else state.labels[:n, 0]
    return acts, labels, state.doc[:n]


class _Collected:
    """The rows ``collect`` has gathered so far, in arrays allocated for the planned tokens."""

    def __init__(self, loaded: Any, hooks: list[str], capacity: int, labelers: list[Labeler] | None,
                 shards: bool) -> None:  # fmt: skip
        from crate_lm.interp.extract import forward_stop

        self.model, self.tokenizer, self.hooks, self.labelers = loaded.model, loaded.tokenizer, hooks, labelers
        self.device = next(self.model.parameters()).device
        self.stop = forward_stop(hooks, len(self.model.blocks)) if hasattr(self.model, "blocks") else None
        self.reset = bool(loaded.cfg.data.reset_at_documents) and shards
        self.capacity, self.n = capacity, 0
        self.acts: dict[str, np.ndarray] = {}
        self.labels = np.zeros((capacity, len(labelers)), dtype=bool) if labelers is not None else None
        self.doc = np.zeros(capacity, dtype=np.int64)

    def add(self, batch: list[tuple]) -> int:
        """One batch of (sequence index, tokens, doc, pos): forward, store, label; returns its tokens."""
        from crate_lm.interp.extract import forward_cache, row_positions

        tokens, docs = np.stack([b[1] for b in batch]), np.stack([b[2] for b in batch])
        ids = torch.from_numpy(tokens).to(device=self.device, dtype=torch.long)
        inputs = None
        if self.reset:  # as the run trained: positions and attention restart at documents
            inputs = {"position_ids": torch.from_numpy(row_positions(docs)).to(self.device),
                      "document_ids": torch.from_numpy(docs - docs[:, :1]).to(self.device)}  # fmt: skip
        cache = forward_cache(self.model, ids, self.hooks, self.stop, inputs)
        start, rows = self.n, tokens.size
        for name in self.hooks:
            value = cache[name]
            if value.dim() != 3:
                raise ProbeError(f"{name} gives shape {tuple(value.shape)}, not (batch, tokens, width); probe hook "
                                 "points with one vector per token")  # fmt: skip
            if name not in self.acts:
                self.acts[name] = np.empty((self.capacity, value.shape[-1]), dtype=np.float32)
            self.acts[name][start : start + rows] = value.reshape(rows, -1).float().cpu().numpy()
        self.doc[start : start + rows] = docs.reshape(-1)
        if self.labels is not None:
            for i, row in enumerate(tokens):
                at = start + i * tokens.shape[1]
                for j, labeler in enumerate(self.labelers):
                    self.labels[at : at + len(row), j] = label_sequence(labeler, self.tokenizer, row)
        self.n += rows
        return rows


# ---- the probe command ----------------------------------------------------------------------------


class _Run:
    """One run to probe, checked before anything is loaded."""

    def __init__(self, given: str, folder: Path, cfg: Any, layers: list[int], reps: dict[str, str]) -> None:
        self.given, self.folder, self.cfg, self.layers, self.reps = given, folder, cfg, layers, reps
        self.arch = cfg.model.arch
        self.name = self.arch


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (list, tuple)):
        return [v.strip() if isinstance(v, str) else v for v in value if not (isinstance(v, str) and not v.strip())]
    return [value]


def _positive_int(value: Any, flag: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProbeError(f"{flag} must be a positive integer, got {value!r}")
    return value


def _layers(layer: Any, n_layers: int, run: str) -> list[int]:
    """--layer as block indices of a model of ``n_layers`` blocks (negative ones count from the end)."""
    if layer is None or (isinstance(layer, str) and layer.strip().lower() == "all"):
        return list(range(n_layers))
    items = _as_list(layer)
    if not items:
        raise ProbeError(f"--layer is empty; give a block index, several (1,3) or 'all', got {layer!r}")
    out = []
    for item in items:
        try:
            index = int(item) if not isinstance(item, bool) and float(item) == int(float(item)) else None
        except (TypeError, ValueError):
            index = None
        if index is None:
            raise ProbeError(f"--layer must be block indices (0,2), 'all' or nothing, got {layer!r}")
        if not -n_layers <= index < n_layers:
            raise ProbeError(f"--layer {index} is out of range for {run}, which has {n_layers} blocks "
                             f"(0 to {n_layers - 1}); pick layers in range or 'all'")  # fmt: skip
        out.append(index % n_layers)
    return sorted(set(out))


def _labels(label: Any) -> list[Labeler]:
    items = [label] if callable(label) or isinstance(label, Labeler) else _as_list(label)
    if not items:
        raise ProbeError("--label is empty; give a built-in label such as line_start, or 'package.module:function'")
    labelers = [resolve_labeler(item) for item in items]
    names = [lab.name for lab in labelers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ProbeError(f"--label names {', '.join(twice)} more than once; give each label once")
    return labelers


def _plan_runs(runs: Any, layer: Any, representations: Any) -> list[_Run]:
    from crate_lm.checkpoint import check_model_folder, read_checkpoint_config, resolve_checkpoint

    given = [str(r) for r in _as_list(runs)]
    if not given:
        raise ProbeError("no run given; pass one or more run or checkpoint folders")
    wanted = _as_list(representations)
    known = sorted({name for reps in REPRESENTATIONS.values() for name in reps})
    unknown = [w for w in wanted if w not in known]
    if unknown:
        choices = "; ".join(f"{arch}: {', '.join(reps)}" for arch, reps in REPRESENTATIONS.items())
        raise ProbeError(f"--representations {', '.join(map(str, unknown))} unknown; choose from {choices}")
    planned = []
    for run in given:
        path = Path(run).expanduser()
        if not path.exists():
            raise ProbeError(f"{path}: no such run or checkpoint folder")
        folder = resolve_checkpoint(path)
        check_model_folder(folder)
        cfg = read_checkpoint_config(folder)
        arch = cfg.model.arch
        if arch not in REPRESENTATIONS:
            raise ProbeError(f"{run}: cannot probe architecture '{arch}' (known: {', '.join(REPRESENTATIONS)})")
        reps = {r: t for r, t in REPRESENTATIONS[arch].items() if not wanted or r in wanted}
        if not reps:
            raise ProbeError(f"--representations {', '.join(wanted)} do not apply to {run} ({arch}); add one of "
                             f"{', '.join(REPRESENTATIONS[arch])}")  # fmt: skip
        planned.append(_Run(run, folder, cfg, _layers(layer, cfg.model.n_layers, run), reps))
    for w in wanted:
        if not any(w in p.reps for p in planned):
            raise ProbeError(
                f"--representations {w} applies to none of the runs ({', '.join(p.arch for p in planned)})"
            )
    archs = [p.arch for p in planned]
    for p in planned:  # runs of one architecture are told apart by their run folder's name
        if archs.count(p.arch) > 1:
            p.name = f"{p.arch} {run_name(p.folder)}"
    names = [p.name for p in planned]
    seen: dict[str, int] = {}
    for p in planned:
        if names.count(p.name) > 1:
            seen[p.name] = seen.get(p.name, 0) + 1
            p.name = f"{p.name}#{seen[p.name]}"
    return planned


def run_name(folder: Path) -> str:
    """The run folder's name of a checkpoint folder (``runs/x/checkpoints/step_N`` -> ``x``), else its own."""
    folder = Path(folder)
    if folder.parent.name == "checkpoints":
        return folder.parent.parent.name
    return folder.name


def _layer_groups(widths: dict[tuple[str, int], int], layers: list[int], tokens: int) -> list[list[int]]:
    """Layers in groups whose activations (float32) fit ``MEMORY_BUDGET_BYTES`` (one layer at least)."""
    groups: list[list[int]] = [[]]
    used = 0
    for layer in layers:
        size = tokens * 4 * sum(w for (_, l), w in widths.items() if l == layer)
        if groups[-1] and used + size > MEMORY_BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(layer)
        used += size
    return groups


def _probe_run(
    plan: _Run,
    labelers: list[Labeler],
    *,
    data: str | None,
    split: str,
    tokens: int,
    ks: list[int],
    method: str,
    test_fraction: float,
    batch_size: int,
    device: str,
    seed: int,
    show_progress: bool,
    quiet: bool,
    include_all: bool = True,
) -> dict:
    from tqdm import tqdm

    from crate_lm.checkpoint import load
    from crate_lm.interp.extract import open_sequences

    loaded = load(plan.folder, device=device)
    cfg = loaded.cfg
    seq_len = min(cfg.data.seq_len or cfg.model.max_seq_len, cfg.model.max_seq_len)
    sequences = open_sequences(loaded, data, split, seq_len, tokens)
    if not quiet and sequences.available is not None and sequences.available * seq_len < tokens:
        print(f"note: the {split} split of {sequences.path} holds {sequences.available * seq_len:,} tokens in whole "
              f"sequences of {seq_len}, fewer than --tokens {tokens:,}; probing them all", file=sys.stderr)  # fmt: skip
    hooks = {(rep, l): template.format(l=l) for l in plan.layers for rep, template in plan.reps.items()}
    with torch.inference_mode():  # the widths, from a two-token forward
        probe_ids = torch.zeros((1, 2), dtype=torch.long, device=next(loaded.model.parameters()).device)
        _, cache = loaded.model.run_with_cache(probe_ids, names_filter=list(hooks.values()))
    widths = {key: int(cache[name].shape[-1]) for key, name in hooks.items()}
    groups = _layer_groups(widths, plan.layers, sequences.planned * seq_len)
    per_label: dict[str, dict] = {}
    labels = doc = test = None
    for group in groups:
        names = [hooks[rep, l] for l in group for rep in plan.reps]
        where = f" layers {group[0]}-{group[-1]}" if len(groups) > 1 else ""
        acts, got, got_doc = collect(loaded, sequences, names, labelers if labels is None else None, batch_size,
                                     show_progress, desc=f"probe {plan.name}{where}")  # fmt: skip
        if labels is None:
            labels, doc = got, got_doc
            test = split_by_document(doc, test_fraction, seed)
            for j, labeler in enumerate(labelers):
                y = labels[:, j]
                check_split(y[~test], y[test], labeler.name)
                per_label[labeler.name] = {
                    "positive_rate": float(y.mean()),
                    "train": _split_sizes(y[~test]) | {"documents": int(len(np.unique(doc[~test])))},
                    "test": _split_sizes(y[test]) | {"documents": int(len(np.unique(doc[test])))},
                    "f1_chance": chance_f1(float(y[test].mean())),
                    "layers": {},
                }
        elif len(got_doc) != len(doc) or not np.array_equal(got_doc, doc):
            raise ProbeError(f"{sequences.path} gave other tokens on a second pass; probe data that does not change")
        fits = [(labeler, l, rep) for labeler in labelers for l in group for rep in plan.reps]
        for labeler, l, rep in tqdm(fits, desc=f"fit {plan.name}", disable=not show_progress):
            y = labels[:, labelers.index(labeler)]
            X = acts[hooks[rep, l]]
            fitted = fit_k_sparse(X[~test], y[~test], X[test], y[test], ks, method, include_all, 1.0, seed,
                                  label=labeler.name)
            entry = {"hook": hooks[rep, l], "width": fitted["width"], "k": fitted["k"], "all": fitted.get("all")}
            per_label[labeler.name]["layers"].setdefault(str(l), {})[rep] = entry
        del acts
    return {
        "name": plan.name,
        "checkpoint": str(Path(loaded.path).resolve()),
        "arch": plan.arch,
        "model": {"d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers, "n_heads": cfg.model.n_heads}
        | ({"ista": cfg.model.ista} if plan.arch == "crate" else {}),
        "tokenizer_fingerprint": loaded.tokenizer.fingerprint,
        "data": {"path": str(sequences.path), "kind": sequences.kind, "split": sequences.split},
        "seq_len": seq_len,
        "tokens": int(len(doc)),
        "documents": int(len(np.unique(doc))),
        "layers": plan.layers,
        "representations": plan.reps,
        "passes": len(groups),
        "labels": per_label,
    }


def probe(
    runs: str | Sequence[str],
    label: str | Callable = "line_start",
    layer: int | str | None = None,
    data: str | None = None,
    split: str = "validation",
    tokens: int = 60_000,
    out: str | None = None,
    ks: str | Sequence[int] = (1, 2, 4, 8, 16, 32),
    method: str = "mean_diff",
    test_fraction: float = 0.3,
    representations: str | Sequence[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    seed: int = 0,
    show_progress: bool = True,
    quiet: bool = False,
    include_all: bool = True,
) -> dict:
    """k-sparse probes of each run's representations for each label; writes ``probe.json`` and
    ``probe_<label>.png`` to ``out`` (default ``<first run's checkpoint>/probe``) and returns the
    report, whose ``line`` (printed unless ``quiet``) sums it up.

    ``runs``: one or several run or checkpoint folders (a list, or comma-separated). ``label``: a
    labeler (:func:`crate_lm.interp.labels.resolve_labeler`: a built-in name, a callable,
    'package.module:function' or 'path/to/file.py:function'), or several comma-separated.
    ``layer``: a block index, several (``"0,2"``), ``"all"`` or None (every layer of each run).
    ``data``/``split``/``tokens``: as ``crate-lm extract`` (default the run's own validation
    split; a text file works too; each run tokenizes it itself). ``ks``: the k of the k-sparse
    probes (capped at each representation's width). ``method``: unit ranking, mean_diff or
    f_stat. ``test_fraction``: the share of documents held out. ``representations``: names from
    ``REPRESENTATIONS`` (default all that apply to each run). Every argument is checked before a
    model is loaded or a file written."""
    ks_list = parse_ks(ks)
    if method not in METHODS:
        raise ProbeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise ProbeError(f"--test_fraction must be between 0 and 1 (exclusive), e.g. 0.3, got {test_fraction!r}")
    tokens = _positive_int(tokens, "--tokens")
    batch_size = _positive_int(batch_size, "--batch_size")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ProbeError(f"--seed must be an integer, got {seed!r}")
    if not isinstance(split, str) or not split:
        raise ProbeError(f"--split must be a split name such as validation or train, got {split!r}")
    labelers = _labels(label)
    plans = _plan_runs(runs, layer, representations)
    if data is not None and not Path(str(data)).expanduser().exists():
        raise ProbeError(f"--data {data}: no such file or folder; pass a prepared shards folder or a text file")
    folder = Path(out) if out is not None else plans[0].folder / "probe"
    folder = folder.expanduser().absolute()
    if folder.exists() and not folder.is_dir():
        raise ProbeError(f"--out {folder} is a file; choose a folder")

    results = [
        _probe_run(plan, labelers, data=data, split=split, tokens=tokens, ks=ks_list, method=method,
                   test_fraction=float(test_fraction), batch_size=batch_size, device=str(device), seed=seed,
                   show_progress=show_progress, quiet=quiet, include_all=include_all)
        for plan in plans
    ]  # fmt: skip
    report = {
        "format": FORMAT,
        "out": str(folder),
        "method": method,
        "ks": ks_list,
        "test_fraction": float(test_fraction),
        "seed": seed,
        "C": 1.0,
        "include_all": bool(include_all),
        "labels": {lab.name: lab.description for lab in labelers},
        "runs": results,
        "plots": {lab.name: f"probe_{plot_name(lab.name)}.png" for lab in labelers},
    }
    report["line"] = summary_line(report)
    from crate_lm.fsutil import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "probe.json", report)
    for lab in labelers:
        plot(report, lab.name, folder / report["plots"][lab.name])
    if not quiet:
        print(report["line"], flush=True)
    return report


# ---- reporting ------------------------------------------------------------------------------------


def plot_name(label: str) -> str:
    """A label name made safe for a file name."""
    return re.sub(r"[^\w.-]+", "_", label)


def _series(report: dict, label: str):
    """(layer, run name, representation, entry, f1_chance) for every probe of ``label``."""
    for run in report["runs"]:
        block = run["labels"][label]
        for layer, reps in block["layers"].items():
            for rep, entry in reps.items():
                yield int(layer), run["name"], rep, entry, block["f1_chance"]


def summary_line(report: dict) -> str:
    """'probe: LABEL on N tokens (P% positive), L layers x R representations -> DIR; best F1 at k=1: ...'."""
    runs, labels = report["runs"], list(report["labels"])
    counts = sorted({r["tokens"] for r in runs})
    tokens = f"{counts[0]:,}" if len(counts) == 1 else " / ".join(f"{r['tokens']:,}" for r in runs)

    def rates(name: str) -> str:
        values = [f"{100 * r['labels'][name]['positive_rate']:.1f}%" for r in runs]
        return ", ".join(dict.fromkeys(values))

    layers = len({layer for r in runs for layer in r["layers"]})
    reps = sum(len(r["representations"]) for r in runs)
    k1 = str(min(report["ks"]))
    bests = []
    for name in labels:
        best: dict[tuple[str, str], tuple[float, int]] = {}
        for layer, run, rep, entry, _ in _series(report, name):
            f1 = entry["k"][k1]["f1"] if k1 in entry["k"] else entry["k"][min(entry["k"], key=int)]["f1"]
            if (run, rep) not in best or f1 > best[run, rep][0]:
                best[run, rep] = (f1, layer)
        shown = ", ".join(f"{run} {rep} L{layer} {f1:.2f}" for (run, rep), (f1, layer) in best.items())
        bests.append(f"{name}: {shown}" if len(labels) > 1 else shown)
    if len(labels) == 1:
        what = f"{labels[0]} on {tokens} tokens ({rates(labels[0])} positive)"
    else:
        what = f"{', '.join(f'{n} ({rates(n)})' for n in labels)} on {tokens} tokens"
    return (f"probe: {what}, {layers} layer{'s' * (layers != 1)} x {reps} representation{'s' * (reps != 1)} -> "
            f"{report['out']}; best F1 at k={k1}: {'; '.join(bests)}")  # fmt: skip


def summary_table(report: dict) -> str:
    """A markdown table of the report: one row per label, run, representation and layer; F1 at
    k = 1, k = 8 and with all units, and AUROC at k = 1 ('-' where a k was not probed)."""

    def cell(entry: dict, k: str, key: str) -> str:
        found = entry.get("all") if k == "all" else entry["k"].get(k)
        return f"{found[key]:.3f}" if found else "-"

    rows = ["| label | run | representation | layer | F1 k=1 | F1 k=8 | F1 all | AUROC k=1 |",
            "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in report["labels"]:
        for layer, run, rep, entry, _ in sorted(_series(report, name), key=lambda s: (s[1], s[2], s[0])):
            rows.append(f"| {name} | {run} | {rep} | {layer} | {cell(entry, '1', 'f1')} | {cell(entry, '8', 'f1')} | "
                        f"{cell(entry, 'all', 'f1')} | {cell(entry, '1', 'auroc')} |")  # fmt: skip
    return "\n".join(rows)


def plot(report: dict, label: str, out_png: Path) -> None:
    """F1 against k (log2 axis) for one label: one panel per layer, one line per run and
    representation ("crate code L2"); the dense probe on all units as a diamond at 'all' on the
    right, and the F1 of predicting every token positive as a dotted grey line. The legend sits
    to the right of the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(_series(report, label))
    layers = sorted({s[0] for s in series})
    keys = list(dict.fromkeys((s[1], s[2]) for s in series))
    colors = {key: plt.get_cmap("tab10")(i % 10) for i, key in enumerate(keys)}
    run_names = list(dict.fromkeys(s[1] for s in series))
    styles = {name: ("-", "--", "-.", ":")[i % 4] for i, name in enumerate(run_names)}
    all_ks = sorted({int(k) for s in series for k in s[3]["k"]})
    x_all = 2.0 * max(all_ks)
    cols = min(len(layers), 4)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols + 2.2, 3.2 * rows), squeeze=False, sharey=True)
    handles: dict[str, Any] = {}
    for ax, layer in zip(axes.flat, layers):
        chances = set()
        for lay, run, rep, entry, chance in series:
            if lay != layer:
                continue
            xs = sorted(int(k) for k in entry["k"])
            ys = [entry["k"][str(k)]["f1"] for k in xs]
            name = f"{run} {rep} L{layer}" if len(layers) == 1 else f"{run} {rep}"
            (line,) = ax.plot(xs, ys, styles[run], marker="o", ms=4, color=colors[run, rep])
            if entry.get("all"):
                ax.plot([x_all], [entry["all"]["f1"]], marker="D", ms=6, color=colors[run, rep], linestyle="none")
            handles.setdefault(name, line)
            if round(chance, 4) not in chances:
                chances.add(round(chance, 4))
                handles.setdefault("F1 if all positive", ax.axhline(chance, color="0.5", linestyle=":", linewidth=1))
        ax.set_xscale("log", base=2)
        with_all = report.get("include_all", True)
        ax.set_xticks(all_ks + [x_all] if with_all else all_ks)
        ax.set_xticklabels([str(k) for k in all_ks] + (["all"] if with_all else []))
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("k (units)")
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(layers) :]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("test F1")
    order = [n for n in handles if n != "F1 if all positive"] + ["F1 if all positive"]
    fig.legend([handles[n] for n in order], order, loc="center right", fontsize=8, frameon=False)
    tokens = ", ".join(f"{r['name']} {r['tokens']:,}" for r in report["runs"])
    fig.suptitle(f"k-sparse probes of '{label}': held-out F1\n{report['method']} ranking; tokens: {tokens}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (3.8 * cols + 2.2), 1))
    atomic_savefig(fig, out_png, dpi=110)


__all__ = [
    "MEMORY_BUDGET_BYTES",
    "REPRESENTATIONS",
    "ProbeError",
    "chance_f1",
    "check_split",
    "collect",
    "fit_k_sparse",
    "parse_ks",
    "plot",
    "probe",
    "rank_units",
    "split_by_document",
    "summary_line",
    "summary_table",
]
