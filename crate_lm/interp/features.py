"""Feature statistics of a trained model's units: ``crate-lm features RUN [--layer L | --hook GLOBS]``.

A *unit* is one coordinate of a hook point's per-token vector (B, T, m): for CRATE the atoms of
the ISTA code ``blocks.{l}.ista.hook_code`` (atom j of layer l is feature j), for the GPT
baseline the MLP neurons ``blocks.{l}.mlp.hook_post``, or the coordinates of any other hook
point with one vector per token (``blocks.2.hook_resid_post``). Head-major hook points
(``attn.hook_q``, ``attn.hook_pattern``) are refused. Definitions follow SAELens and
sae-dashboard (INTERP.md):

* **active**: value > ``threshold`` (default 0). For the ReLU codes of ISTA that is exactly
  "nonzero". GELU neurons are nonzero almost everywhere; with threshold 0 they count as active
  when positive.
* **density** of a unit: its active tokens / N (N = the tokens analysed); **L0** of a token: its
  number of active units (mean, std and a small histogram over tokens); **dead**: never active
  in the N tokens; **dense**: density > 0.5. Plots show log10(density + 1e-10).
* **mean** over all N tokens, **mean_active** over the unit's active tokens, **max** over all.
* **quantiles** of a unit's active values come from a uniform random sample, without
  replacement, of up to ``reservoir`` of them (bottom-k sampling: every active (row, unit) gets
  a pseudo-random key, a hash of (row, unit, seed); the sample keeps the smallest keys. The keys
  depend on nothing else, so the sample, like every statistic here, is the same however the
  tokens are cut into chunks).
* **top contexts**: the ``top_k`` rows of largest value (sae-dashboard: 20); **quantile
  examples**: 10 equal intervals between 0 and the unit's max, a few sampled rows from each.
  A context is the token at the row and ``window`` tokens either side within its sequence, each
  piece decoded on its own (so the marked piece is known; newlines shown as ↵).
* **logit effect** of a unit whose output direction in the residual stream is v
  (``unit_directions``): W_U (g * (v - mean(v))), with g the final LayerNorm's scale and W_U the
  tied unembedding; LayerNorm's 1/sigma is a positive scale per token and leaves the ranking
  alone. It is the *direct path* only: for layers before the last the later blocks are skipped,
  and for 'crate' / 'overcomplete' (no residual around ISTA) the code replaces the stream rather
  than adding to it. Masked models' MLM head is nonlinear: no logit effects for them.
* **geometry** of a layer: pairwise cosines of its unit vectors (CRATE: the dictionary D and,
  for 'alpha', the decoder D_1; GPT: the neurons' input and output directions) against random
  directions in d dimensions, E|cos| = Gamma(d/2) / (sqrt(pi) Gamma((d + 1) / 2)); m > d vectors
  cannot be orthogonal (max |cos| >= the Welch bound sqrt((m - d) / (d (m - 1)))). And the
  principal-angle cosines between the K attention subspaces U_k (GPT: the query heads' row
  spaces) against random p-dimensional subspaces.

Memory: the statistics keep O(m (top_k + reservoir)) numbers per hook whatever N is; contexts
are read in a second pass over the token ids of only the sequences they need.
"""

from __future__ import annotations

import functools
import html
import itertools
import math
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_savefig, atomic_write_bytes, atomic_write_json

FORMAT = "crate_lm.features.v1"
ORDERS = ("max", "density", "mean")
UNIT_HOOK = {"crate": "ista.hook_code", "gpt": "mlp.hook_post"}
"""The default units of each architecture, per layer."""
QUANTILE_LEVELS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
QUANTILE_BINS = 10
PER_BIN = 2
RESERVOIR = 256
DENSE_DENSITY = 0.5
LOG_EPS = 1e-10
LOGIT_TOKENS = 10
CLOSEST_PAIRS = 10
L0_BINS = 20
DENSITY_EDGES = np.linspace(-10.0, 0.0, 41)  # a quarter decade per bin; dead units sit at -10
BLOCK_ELEMENTS = 1 << 22
"""Units are updated in column blocks of about this many (tokens x units) entries: bounded scratch."""
STREAM_HOOKS = re.compile(
    r"^(hook_embed|blocks\.\d+\.(hook_resid_pre|hook_resid_mid|hook_resid_post"
    r"|attn\.hook_out|ista\.hook_out|mlp\.hook_out))$"
)
"""Hook points living in the residual stream's basis: unit j is coordinate j, its direction e_j."""
VISIBLE = str.maketrans({chr(c): chr(0x2400 + c) for c in range(32)} | {"\n": "↵", "\t": "⇥", "\x7f": "␡"})
"""Control characters drawn visibly: newline ↵, tab ⇥, the rest as Unicode control pictures (␍, ␀, ...)."""


class FeaturesError(CrateLMError):
    """The feature statistics cannot be computed as asked; the message says why."""


# ---- streaming statistics ----------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_ROUNDS = ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB), (31, 0))
"""splitmix64's finaliser: z ^= z >> shift, then z *= factor (none in the last round)."""
HASH_PIECE = 1 << 16
"""The numpy hash works through ids in pieces of this many, its two scratch arrays kept in cache."""
CACHE_ELEMENTS = 1 << 17
"""On the CPU the masks of a column block are read in pieces of about this many (tokens x units) entries."""
TRANSPOSE_TILE = 128
"""Tokens per tile when the CPU copies a block of units to (units, tokens) for the float64 sums."""
TOP_SPARSE = 64
"""A unit with fewer than top_k values so far and more active ones in a chunk takes torch.topk over them."""


def _signed(c: int) -> int:
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (products wrap around, as the hash wants)."""
    for shift, factor in _ROUNDS:
        z = z ^ _shr(z, shift)
        if factor:
            z = z * _signed(factor)
    return z


@functools.lru_cache(maxsize=256)
def _salt(seed: int) -> int:
    return int(_mix(torch.tensor([_signed(seed * _GOLDEN + 0x632BE59BD9B4E019)]))[0].item())


def _hash_numpy(ids: np.ndarray, salt: int) -> np.ndarray:
    """``hash_uniform`` of a CPU int64 array, bit for bit: numpy has logical shifts and wrapping
    products on uint64, many times faster than torch's int64 ops, and works here in cached pieces."""
    a = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1).view(np.uint64)
    out = np.empty(a.shape, dtype=np.float64)
    z = np.empty(min(len(a), HASH_PIECE), dtype=np.uint64)
    t = np.empty_like(z)
    golden, salt_u = np.uint64(_GOLDEN), np.uint64(salt & _MASK64)
    rounds = [(np.uint64(s), np.uint64(f) if f else None) for s, f in _ROUNDS]
    for i in range(0, len(a), HASH_PIECE):
        k = min(HASH_PIECE, len(a) - i)
        zz, tt = z[:k], t[:k]
        np.multiply(a[i : i + k], golden, out=zz)
        zz ^= salt_u
        for shift, factor in rounds:
            np.right_shift(zz, shift, out=tt)
            zz ^= tt
            if factor is not None:
                zz *= factor
        zz >>= np.uint64(11)
        np.multiply(zz, 2.0**-53, out=out[i : i + k], casting="unsafe")  # < 2^53: exact in float64
    return out.reshape(ids.shape)


def hash_uniform(ids: Tensor, seed: int = 0) -> Tensor:
    """A pseudo-random float64 in [0, 1) for each int64 id, a fixed function of (id, seed)."""
    salt = _salt(seed)
    if ids.device.type == "cpu" and ids.dtype == torch.int64:
        return torch.from_numpy(_hash_numpy(ids.detach().numpy(), salt))
    z = _mix(ids * _signed(_GOLDEN) ^ salt)
    return _shr(z, 11).double() * 2.0**-53


_SCRATCH = threading.local()


def _scratch64(rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float64 array kept for reuse by this thread (one, as large as the largest
    asked for): a fresh one that size would be mapped and faulted in page by page every time."""
    buf = getattr(_SCRATCH, "f64", None)
    if buf is None or buf.size < rows * cols:
        buf = _SCRATCH.f64 = np.empty(rows * cols, dtype=np.float64)
    return buf[: rows * cols].reshape(rows, cols)


def _flatnonzero(mask: Any) -> Any:
    """Flat indices of the True entries (numpy array or tensor), ascending."""
    if isinstance(mask, np.ndarray):
        return np.flatnonzero(mask)
    return mask.reshape(-1).nonzero().flatten()


def _tensor(a: Any, device: torch.device) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a.to(device)


def _group(unit: Tensor, n_units: int) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """Entries grouped by unit: (order, a stable sort of the entries by unit; the units that have
    any; for each sorted entry the index of its unit among those and its position within it; the
    most entries of one unit)."""
    unit, order = torch.sort(unit, stable=True)
    counts = torch.bincount(unit, minlength=n_units)
    slot = torch.cumsum(counts > 0, 0) - 1
    pos = torch.arange(len(unit), device=unit.device) - (torch.cumsum(counts, 0) - counts)[unit]
    return order, (counts > 0).nonzero().flatten(), slot[unit], pos, int(counts.max())


class FeatureStats:
    """Streaming statistics of the m units of one hook point (module docstring: definitions).

    ``update(acts (n, m), rows (n,))`` with global token row ids, chunk after chunk, in any
    chunking; the state is O(m (top_k + reservoir)) numbers whatever the number of tokens.
    float16 / bfloat16 input is computed in float32; a sparse CSR chunk is made dense.
    """

    def __init__(
        self,
        width: int,
        *,
        threshold: float = 0.0,
        top_k: int = 20,
        reservoir: int = RESERVOIR,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        if width < 1 or top_k < 1 or reservoir < 1:
            raise ValueError(f"width, top_k and reservoir must be >= 1, got {width}, {top_k}, {reservoir}")
        self.width, self.threshold, self.seed = width, float(threshold), seed
        self._thr32 = float(torch.tensor(self.threshold, dtype=torch.float32))  # what x > threshold compares with
        self.top_k, self.reservoir = top_k, reservoir
        self.device = torch.device(device)
        m, dev = width, self.device
        self.tokens = 0
        self.count = torch.zeros(m, dtype=torch.int64, device=dev)
        self.total = torch.zeros(m, dtype=torch.float64, device=dev)
        self.total_active = torch.zeros(m, dtype=torch.float64, device=dev)
        self.max = torch.full((m,), -math.inf, dtype=torch.float32, device=dev)
        self.l0_hist = torch.zeros(m + 1, dtype=torch.int64, device=dev)  # tokens with L0 = 0, 1, ..., m
        self.top_values = torch.full((m, top_k), -math.inf, dtype=torch.float32, device=dev)  # descending
        self.top_rows = torch.full((m, top_k), -1, dtype=torch.int64, device=dev)
        self.sample_keys = torch.full((m, reservoir), math.inf, dtype=torch.float64, device=dev)  # ascending
        self.sample_values = torch.full((m, reservoir), math.nan, dtype=torch.float32, device=dev)
        self.sample_rows = torch.full((m, reservoir), -1, dtype=torch.int64, device=dev)

    def state_numel(self) -> int:
        """Numbers held in the state (it does not grow with the tokens seen)."""
        return sum(t.numel() for t in vars(self).values() if isinstance(t, Tensor))

    # ---- updating ---------------------------------------------------------------------------
    def update(self, acts: Tensor, rows: Tensor | Sequence[int]) -> None:
        """Add n tokens: ``acts`` (n, m) activations, ``rows`` (n,) their global token row ids."""
        if acts.layout != torch.strided:
            acts = acts.to_dense()
        if acts.ndim != 2 or acts.shape[1] != self.width:
            raise ValueError(f"acts must be (n, {self.width}), got {tuple(acts.shape)}")
        rows = torch.as_tensor(rows, dtype=torch.int64).to(self.device)
        n = acts.shape[0]
        if rows.shape != (n,):
            raise ValueError(f"rows must be ({n},), got {tuple(rows.shape)}")
        if n == 0:
            return
        acts = acts.to(device=self.device, dtype=torch.float32)
        if n > 1 and not bool((rows[1:] >= rows[:-1]).all()):
            order = torch.argsort(rows, stable=True)
            acts, rows = acts[order], rows[order]
        l0 = torch.zeros(n, dtype=torch.int64, device=self.device)
        step = max(1, BLOCK_ELEMENTS // n)
        for j0 in range(0, self.width, step):
            self._update_block(acts[:, j0 : j0 + step], rows, j0, l0)
        self.l0_hist += torch.bincount(l0, minlength=self.width + 1)
        self.tokens += n

    def _update_block(self, a: Tensor, rows: Tensor, j0: int, l0: Tensor) -> None:
        """Units [j0, j0 + units) of the chunk, ``a`` (tokens, units). The float64 sums run over
        each unit's values made contiguous, as ever (their rounding depends on the order); the
        rest reads ``a`` as it lies, on the CPU with numpy (faster here for masks, counts, nonzero
        and the integer hash, and it needs none of torch's threads)."""
        j1, dev = j0 + a.shape[1], self.device
        cpu = dev.type == "cpu"
        xa = a.numpy() if cpu else a
        xp: Any = np if cpu else torch
        if cpu:  # numpy's copy in tiles beats torch's here, and a reused buffer skips faulting in fresh pages
            x64 = _scratch64(*a.shape[::-1])
            for t0 in range(0, a.shape[0], TRANSPOSE_TILE):
                x64[:, t0 : t0 + TRANSPOSE_TILE] = xa[t0 : t0 + TRANSPOSE_TILE].T
            x64 = torch.from_numpy(x64)
        else:
            x64 = a.t().to(torch.float64, memory_format=torch.contiguous_format)
        total = x64.sum(1)  # (units, tokens) contiguous, as the sums always ran: the rounding depends on the order
        self.total[j0:j1] += total
        active = xa > self._thr32  # float32 > float32, as torch compares a float32 tensor with a number
        count = _tensor(xp.count_nonzero(active, axis=0), dev)
        l0 += _tensor(xp.count_nonzero(active, axis=1), dev)
        self.count[j0:j1] += count
        if self._thr32 != 0 or not bool((xp.amin(xa, 0) >= 0).all()):  # else (ReLU) every inactive entry is 0
            total = x64.masked_fill_(~(x64 > self._thr32), 0.0).sum(1)
        self.total_active[j0:j1] += total
        self.max[j0:j1] = torch.maximum(self.max[j0:j1], _tensor(xp.amax(xa, 0), dev))
        if bool(count.any()):
            self._merge_top(j0, xa, active, count, rows)
            self._merge_sample(j0, xa, active, count, rows)

    def _pieces(self, n: int, units: int) -> range:
        """Starts of the pieces of tokens the masks are read in: on the CPU about CACHE_ELEMENTS."""
        return range(0, n, n if self.device.type != "cpu" else max(1, CACHE_ELEMENTS // units))

    def _merge_top(self, j0: int, xa: Any, active: Any, count: Tensor, rows: Tensor) -> None:
        """Keep the top_k active values of each unit (``xa``, ``active``: (tokens, units) from unit
        j0 on); equal values: the earlier row first, so that the result does not depend on the
        chunking (rows arrive sorted, see ``update``). Only values >= the unit's k-th so far can
        enter (ties are settled in ``_keep_top``): after the first chunks few, taken one by one. A
        unit with fewer than top_k so far and many active values takes torch.topk over them."""
        n, units = active.shape
        dev, cpu = self.device, isinstance(xa, np.ndarray)
        kth = self.top_values[j0 : j0 + units, -1]
        many = (kth == -math.inf) & (count > TOP_SPARSE)
        if bool(many.any()):
            d = many.nonzero().flatten()
            dx = d.numpy() if cpu else d
            masked = torch.where(_tensor(active[:, dx], dev), _tensor(xa[:, dx], dev), -math.inf)
            self._keep_top(d + j0, *self._chunk_top(masked.t(), rows))
        bar = torch.where(many, math.nan, kth)  # NaN: nothing is >= it (those units are done)
        bar = bar.numpy() if cpu else bar
        pieces = self._pieces(n, units)
        flat = [_flatnonzero((xa[t0 : t0 + pieces.step] >= bar) & active[t0 : t0 + pieces.step]) + t0 * units
                for t0 in pieces]  # fmt: skip
        f = np.concatenate(flat) if cpu else torch.cat(flat)
        if not len(f):
            return
        tok, unit = f // units, f % units
        values = _tensor(xa[tok, unit], dev)
        tok, unit = _tensor(tok, dev), _tensor(unit, dev)
        order, has, slot, pos, width = _group(unit, units)
        cand_v = torch.full((len(has), width), -math.inf, dtype=torch.float32, device=dev)
        cand_r = torch.full((len(has), width), -1, dtype=torch.int64, device=dev)
        cand_v[slot, pos] = values[order]
        cand_r[slot, pos] = rows[tok[order]]
        self._keep_top(has + j0, cand_v, cand_r)

    def _chunk_top(self, masked: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(values, rows) of the top_k of each row of ``masked`` (units, tokens; -inf: inactive),
        equal values the earlier rows."""
        k = min(self.top_k, masked.shape[1])
        index = torch.topk(masked, k, dim=1).indices
        kth = masked.gather(1, index[:, -1:])  # the k-th largest value per unit
        above = (masked > kth).sum(1)
        tied = (masked == kth).sum(1)
        unsure = ((above + tied > k) & (kth[:, 0] > -math.inf)).nonzero().flatten()
        if len(unsure):  # ties at the k-th value: topk picked some of them; take the earliest rows
            m, kv = masked[unsure], kth[unsure]
            eq = m == kv
            chosen = (m > kv) | (eq & (eq.cumsum(1) <= k - above[unsure, None]))
            index[unsure] = torch.topk(chosen.to(torch.uint8), k, dim=1).indices  # exactly k chosen
        return masked.gather(1, index), rows[index]

    def _keep_top(self, units: Tensor, values: Tensor, kept: Tensor) -> None:
        """Merge candidates (values, rows; -inf: none) into the units' top_k: by value, descending,
        equal values by row."""
        cand_v = torch.cat([self.top_values[units], values], 1)
        cand_r = torch.cat([self.top_rows[units], kept], 1)
        by_row = torch.sort(cand_r, dim=1, stable=True).indices
        cand_v, cand_r = cand_v.gather(1, by_row), cand_r.gather(1, by_row)
        best = torch.sort(cand_v, dim=1, descending=True, stable=True).indices[:, : self.top_k]
        values, kept = cand_v.gather(1, best), cand_r.gather(1, best)
        self.top_values[units] = values
        self.top_rows[units] = torch.where(values == -math.inf, -1, kept)

    def _merge_sample(self, j0: int, xa: Any, active: Any, count: Tensor, rows: Tensor) -> None:
        """Bottom-k sampling: the reservoir smallest keys among the stored sample and this chunk's
        active entries (``active``: (tokens, units) from unit j0 on). Only keys below a unit's cut
        are taken: its largest kept key once its sample is full (no other can enter), and at most
        where about reservoir + a margin of its active keys are expected (they are uniform). A cut
        below the largest kept key stands if at least reservoir keys, kept or new, lie below it
        (then the smallest all do); else that unit takes everything below its largest kept key."""
        n, units = active.shape
        size, dev = self.reservoir, self.device
        stored = self.sample_keys[j0 : j0 + units]
        bound = stored[:, -1]  # inf until the unit's sample is full
        want = size + 4 * math.isqrt(size) + 16  # expected below the cut; fewer than size: > 4 sigma off
        cut = torch.minimum(bound, want / count.clamp(min=1))
        f, keys = self._sample_candidates(j0, active, rows, cut)
        unit = f % units
        kept = torch.bincount(unit, minlength=units) + (stored < cut[:, None]).sum(1)
        short = (cut < bound) & (kept < size)
        if bool(short.any()):
            cut = torch.where(short, bound, cut)
            f, keys = self._sample_candidates(j0, active, rows, cut)
            unit = f % units
        if not len(f):
            return
        order, has, slot, pos, width = _group(unit, units)
        f, keys = f[order], keys[order]
        units_ = has + j0
        shape = (len(has), size + width)
        cand_k = torch.full(shape, math.inf, dtype=torch.float64, device=dev)
        cand_v = torch.full(shape, math.nan, dtype=torch.float32, device=dev)
        cand_r = torch.full(shape, -1, dtype=torch.int64, device=dev)
        cand_k[:, :size] = self.sample_keys[units_]
        cand_v[:, :size] = self.sample_values[units_]
        cand_r[:, :size] = self.sample_rows[units_]
        tok = f // units
        pos += size
        cand_k[slot, pos] = keys
        cand_v[slot, pos] = _tensor(xa[tok.numpy(), (f - tok * units).numpy()], dev) if isinstance(xa, np.ndarray) \
            else xa[tok, f - tok * units]
        cand_r[slot, pos] = rows[tok]
        keys, best = torch.topk(cand_k, size, dim=1, largest=False)
        empty = keys == math.inf
        self.sample_keys[units_] = keys
        self.sample_values[units_] = torch.where(empty, math.nan, cand_v.gather(1, best))
        self.sample_rows[units_] = torch.where(empty, -1, cand_r.gather(1, best))

    def _sample_candidates(self, j0: int, active: Any, rows: Tensor, cut: Tensor) -> tuple[Tensor, Tensor]:
        """The flat indices (token * units + unit) of the active entries whose key is below their
        unit's ``cut``, and those keys; read in pieces (the cut tiled over a piece's tokens)."""
        n, units = active.shape
        cpu = isinstance(active, np.ndarray)
        pieces = self._pieces(n, units)
        p = pieces.step
        start = rows * self.width + j0 - torch.arange(n, device=rows.device) * units  # id: start[token] + flat
        same = bool((start == start[0]).all())  # consecutive rows over all units: ids are flat + a constant
        if cpu:
            start, cut = start.numpy(), cut.numpy()
        tiled = np.tile(cut, min(p, n)) if cpu else cut.repeat(min(p, n))
        found: list[tuple[Any, Any]] = []
        for t0 in pieces:
            flat = _flatnonzero(active[t0 : t0 + p])
            if same:
                ids = flat + _signed(int(start[0]) + t0 * units)
            else:
                ids = start[t0 + flat // units] + (flat + t0 * units)
            keys = hash_uniform(ids, self.seed) if not cpu else _hash_numpy(ids, _salt(self.seed))
            sel = _flatnonzero(keys < tiled[flat])
            found.append((flat[sel] + t0 * units, keys[sel]))
        cat: Any = np.concatenate if cpu else torch.cat
        dev = self.device
        return _tensor(cat([f for f, _ in found]), dev), _tensor(cat([k for _, k in found]), dev)

    # ---- results ----------------------------------------------------------------------------
    def density(self) -> Tensor:
        return self.count.cpu().double() / max(self.tokens, 1)

    def mean(self) -> Tensor:
        return self.total.cpu() / max(self.tokens, 1)

    def mean_active(self) -> Tensor:
        """Mean over the unit's active tokens (NaN for a dead unit)."""
        count = self.count.cpu()
        return torch.where(count > 0, self.total_active.cpu() / count.clamp(min=1), math.nan)

    def maximum(self) -> Tensor:
        return self.max.cpu().double()

    def top(self, unit: int) -> list[tuple[float, int]]:
        """(value, row) of the unit's top activations, largest first (only active ones)."""
        rows = self.top_rows[unit].cpu()
        values = self.top_values[unit].cpu()
        return [(float(v), int(r)) for v, r in zip(values, rows) if r >= 0]

    def sample(self, unit: int) -> tuple[Tensor, Tensor]:
        """(values, rows) of the unit's sample of active values, in (random) key order."""
        rows = self.sample_rows[unit].cpu()
        keep = rows >= 0
        return self.sample_values[unit].cpu()[keep], rows[keep]

    def quantiles(self, levels: Sequence[float] = QUANTILE_LEVELS) -> Tensor:
        """(m, len(levels)) quantiles of each unit's active values, from its sample (NaN: dead)."""
        q = torch.tensor(list(levels), dtype=torch.float64)
        out = torch.full((self.width, len(q)), math.nan, dtype=torch.float64)
        values = self.sample_values.cpu().double()
        step = max(1, (1 << 23) // self.reservoir)  # torch.quantile takes up to 2^24 numbers
        for j0 in range(0, self.width, step):
            out[j0 : j0 + step] = torch.nanquantile(values[j0 : j0 + step], q, dim=1).t()
        return out

    def quantile_examples(self, unit: int, bins: int = QUANTILE_BINS, per_bin: int = PER_BIN) -> list[dict]:
        """Per interval of [min(0, threshold), max] cut in ``bins`` equal parts, up to ``per_bin``
        sampled (value, row) falling in it (the first in the sample's random order)."""
        values, rows = self.sample(unit)
        lo, hi = min(0.0, self.threshold), float(self.max[unit])
        if not len(values) or not hi > lo:
            return []
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        edges[-1] = hi  # exactly the max: it belongs to the last bin
        which = (torch.searchsorted(edges, values.double(), right=True) - 1).clamp(0, bins - 1)
        out = []
        for b in range(bins):
            picked = (which == b).nonzero().flatten()[:per_bin]
            out.append({"bin": b, "lo": float(edges[b]), "hi": float(edges[b + 1]),
                        "examples": [(float(values[i]), int(rows[i])) for i in picked]})  # fmt: skip
        return out

    def l0_summary(self) -> dict:
        """Mean and std of L0 over tokens, and a histogram of at most ``L0_BINS`` bins over [0, m]."""
        hist = self.l0_hist.cpu().double()
        k = torch.arange(self.width + 1, dtype=torch.float64)
        n = max(self.tokens, 1)
        mean = float((hist * k).sum() / n)
        std = math.sqrt(max(float((hist * (k - mean) ** 2).sum() / n), 0.0))
        bins = min(L0_BINS, self.width + 1)
        edges = np.linspace(0, self.width + 1, bins + 1)
        counts = np.histogram(np.arange(self.width + 1), bins=edges, weights=hist.numpy())[0]
        return {"mean": mean, "std": std, "hist": {"edges": edges.tolist(), "counts": counts.astype(np.int64).tolist()}}

    def summary(self) -> dict:
        """The hook's summary: N, L0, log10-density histogram, dead and dense units."""
        density = self.density()
        log_density = np.clip(np.log10(density.numpy() + LOG_EPS), DENSITY_EDGES[0], DENSITY_EDGES[-1])
        dead = (self.count.cpu() == 0).nonzero().flatten().tolist()
        dense = (density > DENSE_DENSITY).nonzero().flatten().tolist()
        return {
            "tokens": self.tokens,
            "width": self.width,
            "l0": self.l0_summary(),
            "log10_density_hist": {"edges": DENSITY_EDGES.tolist(),
                                   "counts": np.histogram(log_density, bins=DENSITY_EDGES)[0].tolist()},
            "dead": {"count": len(dead), "fraction": len(dead) / self.width, "ids": dead},
            "dense": {"count": len(dense), "fraction": len(dense) / self.width, "ids": dense},
        }  # fmt: skip

    def unit_arrays(self) -> dict:
        """Per-unit lists for every unit (None where undefined, e.g. mean_active of a dead unit)."""
        quantiles = self.quantiles()
        return {
            "count": self.count.cpu().tolist(),
            "density": self.density().tolist(),
            "mean": self.mean().tolist(),
            "mean_active": _floats(self.mean_active()),
            "max": _floats(self.maximum()),
            "quantiles": {"levels": list(QUANTILE_LEVELS), "values": [_floats(row) for row in quantiles]},
        }


def _floats(x: Tensor) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in x.tolist()]


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


# ---- output directions and logit effects -------------------------------------------------------


def unit_directions(model: Any, hook: str) -> Tensor | None:
    """(m, d): the direction in the residual stream each unit of ``hook`` writes, or None when it
    has none. ISTA code: 'alpha' the columns of D_1 (``ista.dict_out``), 'overcomplete' the
    columns of D (``ista.dict``), 'crate' the identity (the code is the stream); GPT
    ``mlp.hook_post``: the columns of ``mlp.proj.weight``; hook points in the stream's basis
    (``hook_embed``, ``hook_resid_*``, ``*.hook_out``): the identity."""
    d = model.config.d_model
    weight = model.tok_emb.weight
    if STREAM_HOOKS.match(hook):
        return torch.eye(d, dtype=weight.dtype, device=weight.device)
    found = re.match(r"^blocks\.(\d+)\.(ista\.hook_code|mlp\.hook_post)$", hook)
    if not found or int(found.group(1)) >= len(model.blocks):
        return None
    block = model.blocks[int(found.group(1))]
    if found.group(2) == "ista.hook_code" and hasattr(block, "ista"):
        ista = block.ista
        if ista.variant == "crate":
            return torch.eye(d, dtype=weight.dtype, device=weight.device)
        return (ista.dict_out if ista.variant == "alpha" else ista.dict).detach().t()
    if found.group(2) == "mlp.hook_post" and hasattr(block, "mlp"):
        return block.mlp.proj.weight.detach().t()
    return None


def logit_effects(model: Any, directions: Tensor) -> Tensor | None:
    """(m, V): W_U (g * (v - mean(v))) for each direction v (rows of ``directions``), with g the
    final LayerNorm's scale and W_U the tied unembedding (``tok_emb.weight``): the change in the
    logits per unit of v along the direct path, up to LayerNorm's positive 1/sigma. None for a
    masked model (its MLM head is nonlinear). Pass only the directions needed: m x V numbers."""
    if getattr(model.config, "task", "causal") == "masked":
        return None
    unembed = model.tok_emb.weight.detach().float()
    v = directions.detach().to(device=unembed.device, dtype=torch.float32)
    centered = v - v.mean(-1, keepdim=True)
    return (centered * model.ln_f.weight.detach().float()) @ unembed.t()


# ---- geometry ----------------------------------------------------------------------------------


def random_abs_cos(d: int) -> float:
    """E|cos| between two independent uniformly random directions in d dimensions:
    Gamma(d/2) / (sqrt(pi) Gamma((d + 1)/2)) (2/pi for d = 2, ~ sqrt(2 / (pi d)) for large d)."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)


def cosine_summary(
    w: Tensor,
    *,
    closest: int = CLOSEST_PAIRS,
    exact_pairs: int = 2_000_000,
    samples: int = 200_000,
    seed: int = 0,
    block_rows: int | None = None,
) -> dict:
    """Pairwise cosine similarities of the rows of ``w`` (m, d), off the diagonal: mean, median,
    0.99 quantile and max of |cos|, the ``closest`` pairs (i < j, signed cos), the random
    baseline E|cos| in d dimensions, m/d and the Welch bound. Computed by blocks of rows (no
    m x m matrix); the median and quantile are exact up to ``exact_pairs`` pairs, else from a
    seeded random sample of ``samples`` pairs. A zero row counts as orthogonal to everything."""
    m, d = w.shape
    dtype = torch.float64 if m * m <= 1 << 24 else torch.float32
    u = torch.nn.functional.normalize(w.detach().to(dtype), dim=1)
    pairs = m * (m - 1) // 2
    out: dict[str, Any] = {"units": m, "dim": d, "m_over_d": m / d, "pairs": pairs,
                           "random_mean_abs": random_abs_cos(d),
                           "welch_bound": math.sqrt((m - d) / (d * (m - 1))) if m > d else 0.0}  # fmt: skip
    if m > d:
        out["note"] = (f"{m} vectors in {d} dimensions (m/d = {m / d:g}) cannot be orthogonal: "
                       f"max |cos| is at least the Welch bound {out['welch_bound']:.3f}")  # fmt: skip
    if pairs == 0:
        return out | {"mean_abs": None, "median_abs": None, "q99_abs": None, "max_abs": None, "closest": []}
    block = block_rows or max(1, (1 << 24) // m)
    total, top_v, top_i, top_j = 0.0, [], [], []
    exact = [] if pairs <= exact_pairs else None
    cols = torch.arange(m, device=u.device)
    for i0 in range(0, m, block):
        i1 = min(m, i0 + block)
        g = u[i0:i1] @ u.t()
        upper = cols[None, :] > torch.arange(i0, i1, device=u.device)[:, None]
        a = g.abs().masked_fill(~upper, -1.0)
        total += float(a.clamp(min=0).sum(dtype=torch.float64))
        if exact is not None:
            exact.append(a[upper].double().cpu())
        k = min(closest, int(upper.sum()))
        if k:
            _, flat = torch.topk(a.reshape(-1), k)
            r, c = flat // m, flat % m
            top_v.append(g[r, c].double().cpu())
            top_i.append((r + i0).cpu())
            top_j.append(c.cpu())
    values, rows_i, rows_j = torch.cat(top_v), torch.cat(top_i), torch.cat(top_j)
    order = torch.sort(values.abs(), descending=True, stable=True).indices[:closest]
    if exact is not None:
        pool, source = torch.cat(exact), "all pairs"
    else:
        gen = torch.Generator().manual_seed(seed)
        i = torch.randint(0, m, (samples,), generator=gen)
        j = (i + torch.randint(1, m, (samples,), generator=gen)) % m
        pool = torch.cat([(u[i[s : s + 65536]] * u[j[s : s + 65536]]).sum(1).abs().double().cpu()
                          for s in range(0, samples, 65536)])  # fmt: skip
        source = f"a random sample of {samples:,} pairs"
    median, q99 = torch.quantile(pool, torch.tensor([0.5, 0.99], dtype=torch.float64)).tolist()
    return out | {
        "mean_abs": total / pairs,
        "median_abs": median,
        "q99_abs": q99,
        "max_abs": float(values.abs().max()),
        "quantiles_from": source,
        "closest": [{"i": int(rows_i[k]), "j": int(rows_j[k]), "cos": float(values[k])} for k in order],
    }


def principal_cosines(a: Tensor, b: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spaces of ``a`` (..., d, p) and ``b``
    (..., d, q): the singular values of Q_a^T Q_b (Q: orthonormal bases from QR), largest first.
    Batched over leading dimensions (one LAPACK call for many pairs)."""
    qa = torch.linalg.qr(a.detach().double()).Q
    qb = torch.linalg.qr(b.detach().double()).Q
    return torch.linalg.svdvals(qa.transpose(-2, -1) @ qb).clamp(0.0, 1.0)


def head_bases(model: Any, layer: int) -> tuple[Tensor, str]:
    """The K heads' subspaces of a layer as bases (K, d, p), and what they are."""
    cfg = model.config
    k, p, d = cfg.n_heads, cfg.d_model // cfg.n_heads, cfg.d_model
    block = model.blocks[layer]
    if cfg.arch == "crate":
        weight = block.attn.proj_u.weight.detach()
        what = "MSSA subspaces U_k (U_k^T = rows k*p:(k+1)*p of attn.proj_u.weight)"
    else:
        weight = block.attn.qkv.weight.detach()[:d]
        what = "query heads' row spaces (rows k*p:(k+1)*p of W_Q, the first d rows of attn.qkv.weight)"
    return weight.reshape(k, p, d).transpose(1, 2), what


def subspace_summary(model: Any, layer: int, *, draws: int = 20, seed: int = 0) -> dict:
    """Principal-angle cosines between every pair of the layer's K head subspaces (CRATE: U_k;
    GPT: the query heads, labelled so): per pair mean and max, overall mean and max, and the
    same for random p-dimensional subspaces of R^d (``draws`` seeded Monte Carlo pairs)."""
    bases, what = head_bases(model, layer)
    k, d, p = bases.shape
    pairs = []
    if k > 1:
        i, j = torch.triu_indices(k, k, offset=1)
        cos = principal_cosines(bases[i], bases[j])  # (pairs, p)
        pairs = [{"i": int(a), "j": int(b), "mean": float(c.mean()), "max": float(c.max())}
                 for a, b, c in zip(i, j, cos)]  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    random = torch.randn(draws, 2, d, p, generator=gen, dtype=torch.float64)
    random_cos = principal_cosines(random[:, 0], random[:, 1])  # (draws, p)
    return {
        "what": what,
        "heads": k,
        "dim": p,
        "d": d,
        "pairs": pairs,
        "mean": sum(q["mean"] for q in pairs) / len(pairs) if pairs else None,
        "max": max((q["max"] for q in pairs), default=None),
        "random_mean": float(random_cos.mean()),
        "random_max": float(random_cos.amax(1).mean()),
        "random_draws": draws,
    }


def layer_geometry(model: Any, layer: int) -> dict:
    """Cosine summaries of the layer's unit vectors and its heads' subspace summary."""
    block = model.blocks[layer]
    if model.config.arch == "crate":
        matrices = [("D", "encoding dictionary: columns of ista.dict", block.ista.dict.detach().t())]
        if block.ista.dict_out is not None:
            matrices.append(("D_1", "decoder: columns of ista.dict_out", block.ista.dict_out.detach().t()))
    else:
        matrices = [("W_in", "neuron input directions: rows of mlp.fc.weight", block.mlp.fc.weight.detach()),
                    ("W_out", "neuron output directions: columns of mlp.proj.weight",
                     block.mlp.proj.weight.detach().t())]  # fmt: skip
    return {
        "layer": layer,
        "matrices": [{"name": name, "what": what, **cosine_summary(w)} for name, what, w in matrices],
        "heads": subspace_summary(model, layer),
    }


# ---- arguments ---------------------------------------------------------------------------------


def _int(value: Any, flag: str, minimum: int = 1) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, float) and value.is_integer():
        value, ok = int(value), True
    if not ok or value < minimum:
        raise FeaturesError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _int_list(value: Any, flag: str, example: str) -> list[int]:
    """Ints from an int, a comma-separated string or a sequence (fire turns '1,2' into a tuple)."""
    items = str(value).split(",") if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
    out = []
    for item in items:
        text = str(item).strip()
        if isinstance(item, bool) or not re.fullmatch(r"\d+", text):
            raise FeaturesError(f"{flag} takes non-negative integer ids such as {example}, got {value!r}")
        out.append(int(text))
    if not out:
        raise FeaturesError(f"{flag} is empty; give ids such as {example}")
    return out


def parse_layers(layer: int | str | Sequence[int] | None) -> list[int] | None:
    """None (all layers), or the requested layer indices (range checked later)."""
    if layer is None or (isinstance(layer, str) and layer.strip().lower() == "all"):
        return None
    return sorted(set(_int_list(layer, "--layer", "2, 0,3 or all")))


def parse_atoms(atoms: str | Sequence[int] | int | None) -> list[int] | None:
    if atoms is None:
        return None
    return list(dict.fromkeys(_int_list(atoms, "--atoms", "17 or 3,40,112")))


def check_arguments(**kw: Any) -> dict:
    """Every argument checked before anything is loaded or written; normalised values."""
    out = {name: _int(kw[name], f"--{name}") for name in ("tokens", "cards", "top_k", "batch_size")}
    out["window"] = _int(kw["window"], "--window", minimum=0)
    if kw["order"] not in ORDERS:
        raise FeaturesError(f"--order must be one of {', '.join(ORDERS)} (or give --atoms), got {kw['order']!r}")
    try:
        threshold = float(kw["threshold"])
    except (TypeError, ValueError):
        threshold = math.nan
    if isinstance(kw["threshold"], bool) or not math.isfinite(threshold):
        raise FeaturesError(f"--threshold must be a finite number, got {kw['threshold']!r}")
    out["threshold"] = threshold
    if not isinstance(kw["split"], str) or not kw["split"]:
        raise FeaturesError(f"--split must be a split name such as validation or train, got {kw['split']!r}")
    out["layers"] = parse_layers(kw["layer"])
    out["atoms"] = parse_atoms(kw["atoms"])
    if kw["out"] is not None:
        target = Path(str(kw["out"])).expanduser()
        if target.exists() and not target.is_dir():
            raise FeaturesError(f"--out {target} is a file; choose a folder")
    return out


def choose_hooks(model: Any, hook: str | Sequence[str] | None, layers: list[int] | None) -> list[str]:
    """``hook`` (glob patterns) wins; else the architecture's unit hook at ``layers`` (None: all)."""
    from crate_lm.interp.extract import ExtractError, select_hooks, split_patterns

    names = list(model.hook_names())
    if hook is not None:
        if not split_patterns(hook):
            raise FeaturesError("--hook is empty; give a hook point or glob patterns such as 'blocks.*.ista.hook_code'")
        try:
            return select_hooks(names, hook)
        except ExtractError as err:
            raise FeaturesError(str(err).replace("--hooks", "--hook", 1)) from None
    n = len(model.blocks)
    bad = [i for i in layers or [] if not 0 <= i < n]
    if bad:
        raise FeaturesError(f"--layer {bad[0]} is out of range: this model has {n} blocks, layers 0-{n - 1} "
                            "(or --layer all)")  # fmt: skip
    suffix = UNIT_HOOK[model.config.arch]
    return [f"blocks.{i}.{suffix}" for i in (range(n) if layers is None else layers)]


def hook_widths(model: Any, hooks: list[str]) -> dict[str, int]:
    """m of each hook, from a one-token forward; a hook without one vector per token is refused."""
    from crate_lm.interp.extract import forward_stop

    device = next(model.parameters()).device
    stop = forward_stop(hooks, len(model.blocks))
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    with torch.inference_mode():
        kwargs = {"stop_at_layer": stop} if stop is not None else {}
        _, cache = model.run_with_cache(ids, names_filter=hooks, **kwargs)
    widths = {}
    for name in hooks:
        shape = tuple(cache[name].shape)
        if len(shape) != 3 or shape[:2] != (1, 1):
            kind = "per head (B, K, T, ...)" if len(shape) == 4 else f"of shape {shape} for one token"
            raise FeaturesError(f"hook point {name} is {kind}, not one vector per token; features takes hook "
                                "points of shape (B, T, m) such as blocks.0.ista.hook_code, blocks.0.mlp.hook_post "
                                "or blocks.0.hook_resid_post")  # fmt: skip
        widths[name] = shape[2]
    return widths


# ---- sources -----------------------------------------------------------------------------------


@dataclass
class Source:
    """Where the activations come from: an activation store or a direct run over sequences."""

    kind: str  # "store" or "model"
    seq_len: int
    planned_tokens: int
    store: Any = None
    sequences: Any = None
    reset: bool = False
    limit_sequences: int = 0

    def describe(self) -> dict:
        if self.kind == "store":
            settings = self.store.settings
            return {"kind": "store", "path": str(self.store.root), "data": settings.get("data"),
                    "split": settings.get("split"), "seq_len": self.seq_len}  # fmt: skip
        seqs = self.sequences
        return {"kind": seqs.kind, "path": str(seqs.path), "split": seqs.split, "seq_len": self.seq_len,
                "reset_at_documents": self.reset}  # fmt: skip


def open_store(path: str, loaded: Any, hooks: list[str], tokens: int, run: str) -> Source:
    """A complete store made from this checkpoint holding ``hooks``; refused otherwise."""
    import json

    from crate_lm.config import to_dict
    from crate_lm.interp.store import ActivationStore

    store = ActivationStore(Path(str(path)).expanduser())
    settings = store.settings
    mine = {"checkpoint": str(Path(loaded.path).resolve()), "tokenizer_fingerprint": loaded.tokenizer.fingerprint,
            "model": json.loads(json.dumps(to_dict(loaded.cfg.model)))}  # fmt: skip
    differ = [key for key, value in mine.items() if settings.get(key) != value]
    if differ:
        raise FeaturesError(f"store {store.root} was made from another checkpoint (differs in {', '.join(differ)}: "
                            f"it was extracted from {settings.get('checkpoint')}, this run is {mine['checkpoint']}); "
                            f"pass that run, or extract this one: crate-lm extract {run} --out NEW_DIR")  # fmt: skip
    missing = [h for h in hooks if h not in store.hooks]
    if missing:
        raise FeaturesError(f"store {store.root} holds {', '.join(store.hooks)}, not {', '.join(missing)}; run "
                            f"crate-lm extract {run} --hooks '{','.join(hooks)}' --out NEW_DIR, "
                            "or pick held hooks")  # fmt: skip
    seq = store.seq_len
    limit = math.ceil(tokens / seq)
    planned = min(store.num_tokens, limit * seq)
    return Source("store", seq, planned, store=store, limit_sequences=limit)


def open_model_source(loaded: Any, data: str | None, split: str, tokens: int) -> Source:
    from crate_lm.interp.extract import open_sequences

    cfg = loaded.cfg
    limit = cfg.model.max_seq_len
    seq = min(cfg.data.seq_len or limit, limit)
    sequences = open_sequences(loaded, data, split, seq, tokens)
    reset = bool(cfg.data.reset_at_documents) and sequences.kind == "shards"
    return Source("model", seq, sequences.planned * seq, sequences=sequences, reset=reset,
                  limit_sequences=sequences.planned)  # fmt: skip


def stream(source: Source, model: Any, hooks: list[str], batch_size: int) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
    """(rows (n,), {hook: (n, m)}) batches; rows are global token rows in streaming order
    (row r = position r % seq_len of the (r // seq_len)-th sequence streamed)."""
    seq = source.seq_len
    if source.kind == "store":
        at = 0
        end = source.limit_sequences * seq
        for chunk in source.store.iter_chunks(hooks, format="torch"):
            n = min(len(chunk["tokens"]), end - at)
            if n <= 0:
                return
            acts = {}
            for h in hooks:
                x = chunk[h]
                x = x.to_dense() if x.layout != torch.strided else x
                acts[h] = x[:n].reshape(n, -1)
            yield torch.arange(at, at + n), acts
            at += n
        return
    from crate_lm.interp.extract import forward_cache, forward_stop, row_positions

    device = next(model.parameters()).device
    stop = forward_stop(hooks, len(model.blocks))
    items = source.sequences.iter()
    while batch := list(itertools.islice(items, batch_size)):
        index = torch.tensor([b[0] for b in batch], dtype=torch.int64)
        tokens, doc = np.stack([b[1] for b in batch]), np.stack([b[2] for b in batch])
        ids = torch.from_numpy(tokens).to(device=device, dtype=torch.long)
        inputs = None
        if source.reset:  # as the run trained: positions and attention restart at documents
            inputs = {"position_ids": torch.from_numpy(row_positions(doc)).to(device),
                      "document_ids": torch.from_numpy(doc - doc[:, :1]).to(device)}  # fmt: skip
        with torch.inference_mode():
            cache = forward_cache(model, ids, hooks, stop, inputs)
        rows = (index[:, None] * seq + torch.arange(seq)).reshape(-1)
        yield rows, {h: cache[h].reshape(rows.numel(), -1) for h in hooks}


def sequence_tokens(source: Source, wanted: set[int]) -> dict[int, np.ndarray]:
    """The token ids of the wanted sequences (by streaming index), from a second pass over token
    ids only: the store's index arrays, or the data re-read without running the model."""
    found: dict[int, np.ndarray] = {}
    if not wanted:
        return found
    seq, last = source.seq_len, max(wanted)
    if source.kind == "store":
        at = 0
        for chunk in source.store.iter_chunks([], format="torch"):
            tokens = np.asarray(chunk["tokens"])
            first = at // seq
            for s in range(first, first + len(tokens) // seq):
                if s in wanted:
                    found[s] = tokens[(s - first) * seq : (s - first + 1) * seq].astype(np.int64)
            at += len(tokens)
            if at // seq > last:
                break
        return found
    for i, tokens, _, _ in source.sequences.iter():
        if i in wanted:
            found[i] = np.asarray(tokens, dtype=np.int64)
        if i >= last:
            break
    return found


# ---- cards -------------------------------------------------------------------------------------


def rank_units(stats: FeatureStats, order: str, cards: int) -> list[int]:
    """The ``cards`` live units of largest max / density / mean (ties: lower id first)."""
    key = {"max": stats.maximum, "density": stats.density, "mean": stats.mean}[order]().double()
    alive = stats.count.cpu() > 0
    key = torch.where(alive, key, -math.inf)
    ranked = torch.sort(key, descending=True, stable=True).indices
    return [int(j) for j in ranked[: int(alive.sum())][:cards]]


class Pieces:
    """Token id -> its piece decoded on its own, newlines and other control characters made visible.
    A byte-level piece holding part of a multi-byte character decodes to U+FFFD on its own."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        if token not in self.cache:
            self.cache[token] = self.tokenizer.decode([token]).translate(VISIBLE)
        return self.cache[token]


def make_context(
    value: float, row: int, seq_len: int, tokens: dict[int, np.ndarray], window: int, piece: Pieces
) -> dict:
    """The token at ``row`` with ``window`` tokens either side within its sequence."""
    s, pos = divmod(row, seq_len)
    ids = tokens[s]
    lo, hi = max(0, pos - window), min(len(ids), pos + window + 1)
    left = [piece(int(t)) for t in ids[lo:pos]]
    right = [piece(int(t)) for t in ids[pos + 1 : hi]]
    token = piece(int(ids[pos]))
    return {"value": value, "row": row, "sequence": s, "position": pos, "token_id": int(ids[pos]), "token": token,
            "left": left, "right": right, "ids": ids[lo:hi].tolist(),
            "text": "".join(left) + "⟦" + token + "⟧" + "".join(right)}  # fmt: skip


def token_list(values: Tensor, ids: Tensor, piece: Pieces) -> list[dict]:
    return [{"id": int(i), "token": piece(int(i)), "value": float(v)} for v, i in zip(values, ids)]


def build_cards(
    stats: FeatureStats,
    units: list[int],
    tokens: dict[int, np.ndarray],
    seq_len: int,
    window: int,
    piece: Pieces,
    effects: Tensor | None,
    vocab: int,
) -> list[dict]:
    quantiles = stats.quantiles()
    density, mean, mean_active, maximum = stats.density(), stats.mean(), stats.mean_active(), stats.maximum()
    cards = []
    for k, j in enumerate(units):
        card = {
            "unit": j,
            "count": int(stats.count[j]),
            "density": float(density[j]),
            "mean": float(mean[j]),
            "mean_active": _num(mean_active[j]),
            "max": _num(maximum[j]),
            "quantiles": {f"{q:g}": _num(v) for q, v in zip(QUANTILE_LEVELS, quantiles[j].tolist())},
            "top": [make_context(v, r, seq_len, tokens, window, piece) for v, r in stats.top(j)],
            "quantile_examples": [
                {"bin": b["bin"], "lo": b["lo"], "hi": b["hi"],
                 "examples": [make_context(v, r, seq_len, tokens, window, piece) for v, r in b["examples"]]}
                for b in stats.quantile_examples(j)
            ],
        }  # fmt: skip
        if effects is not None:
            row = effects[k, :vocab].cpu()
            n = min(LOGIT_TOKENS, len(row))
            up, down = torch.topk(row, n), torch.topk(row, n, largest=False)
            card["promoted"] = token_list(up.values, up.indices, piece)
            card["suppressed"] = token_list(down.values, down.indices, piece)
        cards.append(card)
    return cards


def logit_note(cfg: Any, hook: str) -> str:
    """What the logit effects of ``hook``'s units mean, with the caveats that apply."""
    note = ("W_U (g * (v - mean v)): each unit's output direction v through the final LayerNorm's scale g and the "
            "tied unembedding W_U (LayerNorm's 1/sigma, a positive scale per token, left out)")  # fmt: skip
    found = re.match(r"^blocks\.(\d+)\.", hook)
    first = int(found.group(1)) + 1 if found else 0  # the first block the direct path skips (hook_embed: all)
    if first < cfg.n_layers:
        skipped = f"block {first}" if first == cfg.n_layers - 1 else f"blocks {first}-{cfg.n_layers - 1}"
        note += f"; direct path only: {skipped} skipped"
    if hook.endswith("ista.hook_code") and cfg.ista in ("crate", "overcomplete"):
        note += f"; '{cfg.ista}' ISTA has no residual: the code replaces the stream rather than adding to it"
    return note


def needed_rows(stats: FeatureStats, units: list[int]) -> set[int]:
    rows = {r for j in units for _, r in stats.top(j)}
    rows |= {r for j in units for b in stats.quantile_examples(j) for _, r in b["examples"]}
    return rows


# ---- report ------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _context_line(ctx: dict, lead: str = "") -> str:
    return f"{lead}{ctx['value']:>9.4g}  {html.escape(ctx['text'])}"


def render_markdown(report: dict) -> str:
    """One browsable page: a summary table, the density figure, then a card per carded unit."""
    src = report["source"]
    lines = [
        f"# Features of {report['checkpoint']}",
        "",
        f"{report['model']}; {report['tokens']:,} tokens from {src['kind']} {src['path']}"
        + (f" ({src['split']} split)" if src.get("split") else "")
        + f", sequences of {src['seq_len']}. Active means value > {report['threshold']:g}"
        + ("" if report["arch"] == "crate" else " (GELU neurons: positive)")
        + f"; dense means density > {DENSE_DENSITY:g}. Cards: {report['selection']}.",
        "",
        "| hook | units | N | mean L0 (std) | dead | dense | mean abs cos (random) | head principal cos (random) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in report["hooks"]:
        h = report["per_hook"][name]
        s = h["summary"]
        geo = h.get("geometry")
        cos = heads = "–"
        if geo:
            first = geo["matrices"][0]
            cos = f"{first['name']} {_fmt(first['mean_abs'])} ({_fmt(first['random_mean_abs'])})"
            hs = geo["heads"]
            heads = f"{_fmt(hs['mean'])} ({_fmt(hs['random_mean'])})"
        lines.append(f"| `{name}` | {s['width']} | {s['tokens']:,} | {s['l0']['mean']:.1f} ({s['l0']['std']:.1f}) | "
                     f"{s['dead']['count']} | {s['dense']['count']} | {cos} | {heads} |")  # fmt: skip
    lines += ["", f"![log10 density per hook]({report['figure']})", ""]
    for name in report["hooks"]:
        h = report["per_hook"][name]
        lines += [f"## {name}", ""]
        geo = h.get("geometry")
        if geo:
            for mat in geo["matrices"]:
                lines.append(f"- {mat['name']} ({mat['what']}, {mat['units']} x {mat['dim']}): mean |cos| "
                             f"{_fmt(mat['mean_abs'])} vs random {_fmt(mat['random_mean_abs'])}, median "
                             f"{_fmt(mat['median_abs'])}, 0.99 quantile {_fmt(mat['q99_abs'])}, max "
                             f"{_fmt(mat['max_abs'])}" + (f". {mat['note']}" if mat.get("note") else ""))  # fmt: skip
            hs = geo["heads"]
            lines.append(f"- heads: {hs['what']}: mean principal cosine {_fmt(hs['mean'])}, max {_fmt(hs['max'])}; "
                         f"random {hs['dim']}-dim subspaces of R^{hs['d']}: {_fmt(hs['random_mean'])}, "
                         f"max {_fmt(hs['random_max'])}")  # fmt: skip
        lines += [f"- logit effects: {h['logit_effects']['note']}", ""]
        for card in h["cards"]:
            lines += render_card(card)
    return "\n".join(lines) + "\n"


def render_card(card: dict) -> list[str]:
    quant = " · ".join(f"p{float(q) * 100:g} {_fmt(v)}" for q, v in card["quantiles"].items())
    out = [
        f"### unit {card['unit']}",
        "",
        f"density {card['density']:.4g} ({card['count']:,} tokens) · mean {card['mean']:.4g} · mean active "
        f"{_fmt(card['mean_active'], '.4g')} · max {_fmt(card['max'], '.4g')}",
        "",
        f"quantiles of active values: {quant}",
        "",
        "Top contexts:",
        "",
        "<pre>",
        *(_context_line(c) for c in card["top"]),
        "</pre>",
        "",
    ]
    examples = [(b, c) for b in card["quantile_examples"] for c in b["examples"]]
    if examples:
        out += ["Quantile examples:", "", "<pre>"]
        out += [_context_line(c, f"[{b['lo']:.3g}, {b['hi']:.3g}] ") for b, c in examples]
        out += ["</pre>", ""]
    if "promoted" in card:
        for key, title in (("promoted", "Promotes"), ("suppressed", "Suppresses")):
            out.append(f"{title}: " + ", ".join(f"{_code(t['token'])} {t['value']:+.3g}" for t in card[key]))
            out.append("")
    return out


def plot_density(report: dict, path: Path) -> None:
    """A panel per hook: histogram of log10(density + 1e-10), the dense line at log10 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["hooks"]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        s = report["per_hook"][name]["summary"]
        hist = s["log10_density_hist"]
        edges, counts = np.asarray(hist["edges"]), np.asarray(hist["counts"])
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", alpha=0.8)
        ax.axvline(math.log10(DENSE_DENSITY), color="tab:red", lw=1, ls="--")
        ax.set_title(f"{name}\ndead {s['dead']['count']}, dense {s['dense']['count']} of {s['width']}", fontsize=8)
        ax.set_xlabel("log10(density + 1e-10)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{report['tokens']:,} tokens", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)


def summary_line(report: dict) -> str:
    def span(values: list[float], spec: str) -> str:
        lo, hi = min(values), max(values)
        return format(lo, spec) if format(lo, spec) == format(hi, spec) else f"{format(lo, spec)}-{format(hi, spec)}"

    sums = [report["per_hook"][h]["summary"] for h in report["hooks"]]
    widths = [s["width"] for s in sums]
    n = len(sums)
    units = f"{widths[0]} units" if len(set(widths)) == 1 else f"{span(widths, 'd')} units"
    of = f" of {widths[0]}" if len(set(widths)) == 1 else ""
    return (f"features: {n} hook{'s' if n > 1 else ''} x {units} on {report['tokens']:,} tokens -> {report['out']} "
            f"(mean L0 {span([s['l0']['mean'] for s in sums], '.1f')}{of}; "
            f"dead {span([s['dead']['count'] for s in sums], 'd')}; "
            f"dense {span([s['dense']['count'] for s in sums], 'd')})")  # fmt: skip


# ---- the entry point ---------------------------------------------------------------------------


def features(
    run: str,
    layer: int | str | None = None,
    hook: str | None = None,
    data: str | None = None,
    store: str | None = None,
    split: str = "validation",
    tokens: int = 100_000,
    out: str | None = None,
    order: str = "max",
    atoms: str | Sequence[int] | None = None,
    cards: int = 16,
    top_k: int = 20,
    window: int = 5,
    threshold: float = 0.0,
    batch_size: int = 8,
    device: str = "cpu",
    show_progress: bool = True,
    quiet: bool = False,
) -> dict:
    """Feature statistics of the units of the model at ``run``; writes ``features.json``,
    ``report.md`` and ``density.png`` to ``out`` (default ``<checkpoint>/features``), prints a
    one-line summary (unless ``quiet``) and returns the report.

    Hooks: ``hook`` (a name or comma-separated glob patterns) wins; else the architecture's units
    (CRATE ``ista.hook_code``, GPT ``mlp.hook_post``) at ``layer`` (an int, comma-separated ints,
    or 'all'; default all). Source: ``store`` (an activation store of this checkpoint from
    ``crate-lm extract``; its first ``tokens`` tokens, in whole sequences), else a direct run over
    about ``tokens`` tokens of ``data`` (default the run's data, ``split``), as extraction picks
    them. Cards (contexts, quantile examples, logit effects): the ``cards`` live units of largest
    ``order`` (max, density or mean) per hook, or the ``atoms`` ids. Everything is checked before
    anything heavy runs, and nothing is written before the statistics are done."""
    args = check_arguments(tokens=tokens, cards=cards, top_k=top_k, batch_size=batch_size, window=window, order=order,
                           threshold=threshold, split=split, layer=layer, atoms=atoms, out=out)  # fmt: skip
    from tqdm import tqdm

    from crate_lm.checkpoint import load

    loaded = load(run, device=device)
    model, cfg = loaded.model, loaded.cfg.model
    hooks = choose_hooks(model, hook, args["layers"])
    widths = hook_widths(model, hooks)
    if args["atoms"] is not None:
        for name in hooks:
            bad = [a for a in args["atoms"] if a >= widths[name]]
            if bad:
                raise FeaturesError(f"--atoms {bad[0]} is out of range for {name}, which has {widths[name]} units "
                                    f"(ids 0-{widths[name] - 1})")  # fmt: skip
    if store is not None:
        source = open_store(store, loaded, hooks, args["tokens"], run)
    else:
        source = open_model_source(loaded, data, split, args["tokens"])
    folder = (Path(str(out)) if out is not None else Path(loaded.path) / "features").expanduser().absolute()

    stat_device = next(model.parameters()).device  # with --device cuda the statistics run there too
    stats = {h: FeatureStats(widths[h], threshold=args["threshold"], top_k=args["top_k"], device=stat_device)
             for h in hooks}  # fmt: skip
    with tqdm(total=source.planned_tokens, unit="tok", unit_scale=True, desc="features",
              disable=not show_progress) as bar:  # fmt: skip
        for rows, acts in stream(source, model, hooks, args["batch_size"]):
            for name in hooks:
                stats[name].update(acts[name], rows)
            bar.update(rows.numel())

    chosen = {h: args["atoms"] if args["atoms"] is not None else rank_units(stats[h], order, args["cards"])
              for h in hooks}  # fmt: skip
    wanted = {r // source.seq_len for h in hooks for r in needed_rows(stats[h], chosen[h])}
    seq_tokens = sequence_tokens(source, wanted)
    piece = Pieces(loaded.tokenizer)
    vocab = min(loaded.tokenizer.vocab_size, cfg.vocab_size)  # rows past the tokenizer's are padding
    geometry: dict[int, dict] = {}
    per_hook = {}
    for name in hooks:
        directions = unit_directions(model, name)
        effects = None
        if directions is None:
            note = f"not available: {name} has no output direction in the residual stream"
        elif cfg.task == "masked":
            note = "not available: the masked model's MLM head is nonlinear (dense, GELU, LayerNorm)"
        else:
            index = torch.tensor(chosen[name], dtype=torch.long, device=directions.device)
            effects = logit_effects(model, directions[index])
            note = logit_note(cfg, name)
        found = re.match(r"^blocks\.(\d+)\.", name)
        layer_geo = None
        if found:
            i = int(found.group(1))
            if i not in geometry:
                geometry[i] = layer_geometry(model, i)
            layer_geo = geometry[i]
        summary = stats[name].summary()
        per_hook[name] = {
            "layer": int(found.group(1)) if found else None,
            "summary": summary,
            "geometry": layer_geo,
            "logit_effects": {"available": effects is not None, "note": note},
            "carded": chosen[name],
            "units": stats[name].unit_arrays(),
            "cards": build_cards(stats[name], chosen[name], seq_tokens, source.seq_len, args["window"], piece,
                                 effects, vocab),  # fmt: skip
        }
    n_tokens = stats[hooks[0]].tokens
    variant = f" {cfg.ista}" if cfg.arch == "crate" else ""
    report = {
        "format": FORMAT,
        "run": str(run),
        "checkpoint": str(loaded.path),
        "arch": cfg.arch,
        "ista": cfg.ista if cfg.arch == "crate" else None,
        "task": cfg.task,
        "model": f"{cfg.arch}{variant} {cfg.task} d{cfg.d_model} L{cfg.n_layers} K{cfg.n_heads}",
        "source": source.describe(),
        "tokens": n_tokens,
        "threshold": args["threshold"],
        "order": order if args["atoms"] is None else "atoms",
        "selection": (f"atoms {', '.join(map(str, args['atoms']))}" if args["atoms"] is not None
                      else f"the {args['cards']} live units of largest {order}"),  # fmt: skip
        "top_k": args["top_k"],
        "window": args["window"],
        "reservoir": RESERVOIR,
        "quantile_bins": QUANTILE_BINS,
        "hooks": hooks,
        "per_hook": per_hook,
        "out": str(folder),
        "figure": "density.png",
    }
    report["line"] = summary_line(report)
    folder.mkdir(parents=True, exist_ok=True)
    plot_density(report, folder / report["figure"])
    atomic_write_bytes(folder / "report.md", render_markdown(report).encode("utf-8"))
    atomic_write_json(folder / "features.json", report)
    if not quiet:
        print(report["line"], flush=True)
    return report
