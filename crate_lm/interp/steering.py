"""Activation steering: add a direction to the residual stream, or set a code atom, and measure it.

``crate-lm steer build|apply|sweep`` and ``crate-lm generate --steer``. Definitions (h(x) is the
activation at the vector's hook point, ``blocks.{l}.hook_resid_post`` unless asked otherwise, read
at a text's last token (``position="last"``) or averaged over its tokens (``"mean"``); the N
contrast pairs (x_i^+, x_i^-) give the differences delta_i = h(x_i^+) - h(x_i^-)):

- ``mean_diff``: v = mean_i delta_i (steering-vectors' mean aggregator, ActAdd / CAA);
- ``pca``: u = the first principal component of the differences (centred, as repeng's
  ``pca_diff`` with sklearn's PCA); v = (u . m) u with m the mean difference, i.e. the mean
  difference projected on u: its sign follows m and its length is what m puts along u, so a
  coefficient means about the same for every method;
- ``logistic``: u = w / |w| for the weight w of a logistic regression separating h(x^+) (label 1)
  from h(x^-) (label 0), fitted on standardised features and mapped back (w = w_std / sigma);
  v = (u . m) u as for pca.

Applying adds ``coefficient * v`` to the hook's activation at every position t >= from_position
(absolute positions: with the generation cache, a step's positions start at ``cache.length``).
A :class:`CodeIntervention` sets (``clamp``) or shifts (``add``) one atom j of the CRATE sparse
code A at ``blocks.{l}.ista.hook_code``, so the change reaches the stream through the ISTA decoder;
its coefficient is the value written (clamp) or added (add).

:func:`evaluate` measures, against the unsteered model:

- effect: mean over prompts of log p_steered(y | x) - log p_base(y | x), with log p(y | x) the sum
  over the target continuation's tokens (``effect_per_token``: each change divided by len(y)); or,
  with a target token set S, of log sum_{s in S} p(s | x) at the position after the prompt;
- side effect: ``kl`` = mean over the positions of neutral held-out text of
  KL(p_base || p_steered) of the next-token distributions, and ``ppl_ratio`` = exp(mean NLL steered
  - mean NLL base) = perplexity steered / base on that text (ActAdd's measures).

:func:`sweep` fills layers x coefficients grids of both and, for each KL budget, the cell with the
largest effect whose KL stays within it. It writes ``sweep.json`` and ``sweep.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from crate_lm.errors import CrateLMError
from crate_lm.fsutil import atomic_savefig

FORMAT = "crate_lm.steering.v1"
METHODS = ("mean_diff", "pca", "logistic")
POSITIONS = ("last", "mean")
MODES = ("clamp", "add")
DEFAULT_HOOK = "blocks.{layer}.hook_resid_post"
CODE_HOOK = "blocks.{layer}.ista.hook_code"
KL_BUDGETS = (0.01, 0.05, 0.1, 0.5)
"""Default KL budgets (nats per position) for which a sweep reports its best cell."""
NEUTRAL_TOKENS = 2048
FINGERPRINT_FIELDS = ("arch", "ista", "d_model", "n_layers", "n_heads", "vocab_size", "dict_width")
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


class SteeringError(CrateLMError):
    """Steering cannot run as asked; the message says why and what to do."""


# ---- contrast pairs ---------------------------------------------------------------------------


def read_pairs(pairs: str | Path | Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Contrast pairs from a list of (positive, negative) texts or a JSONL file with one
    ``{"positive": ..., "negative": ...}`` per line (blank lines skipped)."""
    if isinstance(pairs, (str, Path)):
        path = Path(pairs).expanduser()
        if not path.is_file():
            raise SteeringError(f"--pairs {pairs}: no such file; pass a JSONL file of "
                                '{"positive": ..., "negative": ...} lines')  # fmt: skip
        out = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SteeringError(f"{path} line {number}: not JSON ({err.msg}); each line is "
                                    '{"positive": "...", "negative": "..."}') from None  # fmt: skip
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("positive", "negative")):
                raise SteeringError(f'{path} line {number}: needs "positive" and "negative" strings, got {line.strip()[:80]}')
            out.append((row["positive"], row["negative"]))
        where = str(path)
    else:
        out = [tuple(p) for p in pairs]
        if not all(len(p) == 2 and all(isinstance(s, str) for s in p) for p in out):
            raise SteeringError("pairs must be (positive_text, negative_text) string pairs")
        where = "the pairs"
    if not out:
        raise SteeringError(f"{where} holds no contrast pairs; give at least one (two or more for pca and logistic)")
    if any(not p or not n for p, n in out):
        raise SteeringError(f"{where}: a contrast pair has an empty text; every text needs at least one token")
    return out  # type: ignore[return-value]


# ---- the model ----------------------------------------------------------------------------------


def _unwrap(model_or_loaded: Any) -> tuple[Any, Any, str]:
    """(model, its ModelConfig, where it came from) of a LoadedModel or a bare model."""
    model = getattr(model_or_loaded, "model", model_or_loaded)
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise SteeringError("steering needs a crate_lm model or the LoadedModel of crate_lm.load")
    return model, cfg, str(getattr(model_or_loaded, "path", ""))


def model_fingerprint(model_or_loaded: Any) -> dict[str, Any]:
    """What a vector must match: architecture, ISTA variant, widths, depth, heads, vocabulary,
    and (for the record, not compared) the checkpoint folder it was read from."""
    _, cfg, path = _unwrap(model_or_loaded)
    print_ = {k: getattr(cfg, k) for k in FINGERPRINT_FIELDS}
    print_["checkpoint"] = path
    return print_


def _mismatch(recorded: dict[str, Any], model_or_loaded: Any) -> list[str]:
    now = model_fingerprint(model_or_loaded)
    fields = [k for k in FINGERPRINT_FIELDS if not (k in ("ista", "dict_width") and now["arch"] == "gpt")]
    return [f"{k} {recorded.get(k)!r} vs {now[k]!r}" for k in fields if recorded.get(k) != now[k]]


def _check_layers(layers: Any, n_layers: int, what: str = "layer") -> list[int]:
    """Whole numbers in [0, n_layers), or 'all'."""
    if isinstance(layers, str):
        if layers.strip() == "all":
            return list(range(n_layers))
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise SteeringError(f"--{what} must be 'all' or comma-separated block numbers, got {layers!r}") from None
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    layers = list(layers)
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise SteeringError(f"--{what} must be block numbers in 0..{n_layers - 1} or 'all', got {layers!r}")
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad:
        raise SteeringError(f"--{what} {bad[0]} is out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    return layers


def parse_coefficients(coefficients: Any) -> list[float]:
    """Finite numbers from a list, one number or a comma-separated string ('-4,0,4')."""
    if isinstance(coefficients, str):
        try:
            coefficients = [float(x) for x in coefficients.split(",") if x.strip()]
        except ValueError:
            raise SteeringError(f"--coefficients must be comma-separated numbers like -4,0,4, got {coefficients!r}") from None
    elif isinstance(coefficients, (int, float)) and not isinstance(coefficients, bool):
        coefficients = [coefficients]
    values = list(coefficients) if isinstance(coefficients, (list, tuple)) else None
    if not values or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in values):
        raise SteeringError(f"--coefficients must be finite numbers like -4,0,4, got {coefficients!r}")
    return [float(c) for c in values]


def _template(hook: str | None) -> tuple[str, int | None]:
    """A hook template with '{layer}' and the layer a full name fixes ('blocks.2.x' -> 'blocks.{layer}.x', 2)."""
    if hook is None:
        return DEFAULT_HOOK, None
    if "{layer}" in hook:
        return hook, None
    match = _BLOCK.match(hook)
    if not match:
        raise SteeringError(f"--hook {hook!r} is not a block hook point; use e.g. {DEFAULT_HOOK} or blocks.2.hook_resid_mid")
    return f"blocks.{{layer}}.{match.group(2)}", int(match.group(1))


def _check_hook(model: Any, name: str) -> None:
    if name not in model.hook_dict:
        from crate_lm.model.hooks import unknown_name_message

        raise SteeringError(unknown_name_message(name, model.hook_names()))


@contextlib.contextmanager
def positioned_hooks(model: Any, edits: list[tuple[str, Callable[[Tensor], Tensor]]], from_position: int) -> Iterator[Any]:
    """Attach ``edit(activation[:, t0:])`` (returning the new slice) at each hook name, for the
    absolute positions t >= from_position: a forward pre-hook on the model reads the generation
    cache's length (the positions already processed), so cached steps count from there. On exit,
    also after an exception, exactly these hooks go (``model.hooks`` and the two handles)."""
    if not isinstance(from_position, int) or isinstance(from_position, bool) or from_position < 0:
        raise SteeringError(f"--from_position must be a whole number >= 0, got {from_position!r}")
    offset = [0]

    def before(_module: Any, _args: Any, kwargs: dict) -> None:
        cache = kwargs.get("cache")
        offset[0] = cache.length if cache is not None else 0

    def after(_module: Any, _args: Any, _kwargs: dict, _output: Any) -> None:
        offset[0] = 0  # a later direct call of encode() without a cache starts at 0

    def hook_fn(edit: Callable[[Tensor], Tensor]) -> Callable:
        def fn(activation: Tensor, hook: Any) -> Tensor | None:
            start = max(from_position - offset[0], 0)
            if start >= activation.shape[1]:
                return None
            out = activation.clone()  # the original may be saved for backward or cached by another hook
            out[:, start:] = edit(out[:, start:])
            return out

        return fn

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    try:
        with model.hooks(fwd_hooks=[(name, hook_fn(edit)) for name, edit in edits]):
            yield model
    finally:
        for handle in handles:
            handle.remove()


# ---- steering vectors ---------------------------------------------------------------------------


@dataclass
class SteeringVector:
    """A direction v (d,) read at ``hook.format(layer=layer)`` from ``n_pairs`` contrast pairs
    with ``method`` at ``position``, and the fingerprint of the model it belongs to."""

    vector: Tensor
    hook: str
    layer: int
    method: str
    position: str
    n_pairs: int
    model: dict[str, Any] = field(default_factory=dict)

    def hook_name(self, layer: int | None = None) -> str:
        return self.hook.format(layer=self.layer if layer is None else layer)

    def check_model(self, model_or_loaded: Any) -> None:
        """Refuse a model of another architecture or shape than the one the vector was read from."""
        diff = _mismatch(self.model, model_or_loaded)
        if diff:
            raise SteeringError(
                f"this steering vector was built on another model ({'; '.join(diff)}; vector from "
                f"{self.model.get('checkpoint') or 'unknown'}); build one on this model with crate-lm steer build RUN --pairs ..."
            )

    def apply(
        self, model_or_loaded: Any, coefficient: float, layers: int | Sequence[int] | None = None, from_position: int = 0
    ) -> contextlib.AbstractContextManager:
        """Context manager adding ``coefficient * v`` at the vector's hook of each layer (default:
        the layer it was read at) for positions >= from_position, in every forward inside it."""
        model, cfg, _ = _unwrap(model_or_loaded)
        self.check_model(model_or_loaded)
        if not isinstance(coefficient, (int, float)) or isinstance(coefficient, bool) or not math.isfinite(coefficient):
            raise SteeringError(f"--coefficient must be a finite number, got {coefficient!r}")
        chosen = _check_layers(self.layer if layers is None else layers, cfg.n_layers, "layers")
        names = [self.hook_name(layer) for layer in chosen]
        for name in names:
            _check_hook(model, name)
        delta = float(coefficient) * self.vector

        def add(x: Tensor) -> Tensor:
            if x.shape[-1] != delta.shape[0]:
                raise SteeringError(f"the steering vector has width {delta.shape[0]}, the activation {x.shape[-1]}")
            return x + delta.to(x.device, x.dtype)

        return positioned_hooks(model, [(name, add) for name in names], from_position)

    def save(self, path: str | Path) -> Path:
        """A safetensors file: the vector and string metadata (written to a temporary name, then renamed)."""
        from safetensors.torch import save

        from crate_lm.fsutil import atomic_write_bytes

        meta = {"format": FORMAT, "hook": self.hook, "layer": str(self.layer), "method": self.method,
                "position": self.position, "n_pairs": str(self.n_pairs),
                "model": json.dumps(self.model, sort_keys=True)}  # fmt: skip
        path = Path(path).expanduser()
        if path.parent and not path.parent.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({"vector": self.vector.detach().float().contiguous().cpu()}, metadata=meta))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SteeringVector:
        """Read a vector saved by :meth:`save` (safetensors: no code runs)."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise SteeringError(f"{path}: no such steering vector file; make one with crate-lm steer build")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                vector = f.get_tensor("vector")
            if meta.get("format") != FORMAT:
                raise KeyError("format")
            return cls(vector=vector, hook=meta["hook"], layer=int(meta["layer"]), method=meta["method"],
                       position=meta["position"], n_pairs=int(meta["n_pairs"]), model=json.loads(meta["model"]))  # fmt: skip
        except SteeringError:
            raise
        except Exception as err:  # safetensors raises its own types for a bad header
            raise SteeringError(f"{path} is not a steering vector file ({type(err).__name__}: {err}); "
                                "make one with crate-lm steer build") from None  # fmt: skip


def pair_activations(
    loaded: Any, pairs: Sequence[tuple[str, str]], hooks: Sequence[str], position: str = "last", batch_size: int = 16
) -> dict[str, tuple[Tensor, Tensor]]:
    """hook -> (H+, H-), each (N, width) float64: the activation of each text at its last real
    token, or its mean over the text's tokens (batches right-padded, with attention masks)."""
    if position not in POSITIONS:
        raise SteeringError(f"--position must be one of {', '.join(POSITIONS)}, got {position!r}")
    model, cfg, _ = _unwrap(loaded)
    for name in hooks:
        _check_hook(model, name)
    texts = [p for p, _ in pairs] + [n for _, n in pairs]
    rows: dict[str, list[Tensor]] = {h: [] for h in hooks}
    stop = max(int(_BLOCK.match(h).group(1)) for h in hooks) + 1  # type: ignore[union-attr]
    for start in range(0, len(texts), batch_size):
        ids, mask = loaded.to_tokens(texts[start : start + batch_size], return_mask=True)
        if ids.shape[1] > cfg.max_seq_len:
            raise SteeringError(f"a contrast text is {ids.shape[1]} tokens, longer than the model's context "
                                f"({cfg.max_seq_len}); shorten it")  # fmt: skip
        with torch.no_grad():
            _, cache = model.run_with_cache(ids, names_filter=list(hooks), attention_mask=mask,
                                            stop_at_layer=stop if stop < cfg.n_layers else None)  # fmt: skip
        weights = mask.double()
        if position == "last":
            last = mask.sum(1) - 1  # right-padded: the last real token of each row
            weights = torch.zeros_like(weights)
            weights[torch.arange(len(last)), last] = 1.0
        weights = weights / weights.sum(1, keepdim=True)
        for h in hooks:
            rows[h].append(torch.einsum("bt,btd->bd", weights, cache[h].double()))
    n = len(pairs)
    return {h: (torch.cat(r)[:n], torch.cat(r)[n:]) for h, r in rows.items()}


def steering_direction(pos: Tensor, neg: Tensor, method: str = "mean_diff", seed: int = 0) -> Tensor:
    """The steering vector of paired activations ``pos``, ``neg`` (N, d); see the module docstring."""
    if method not in METHODS:
        raise SteeringError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    pos, neg = pos.double(), neg.double()
    diffs = pos - neg
    mean = diffs.mean(0)
    if method == "mean_diff":
        return mean
    if len(diffs) < 2:
        raise SteeringError(f"--method {method} needs at least 2 contrast pairs, got {len(diffs)}")
    if method == "pca":
        centred = diffs - mean
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        unit = vh[0]
    else:
        from sklearn.linear_model import LogisticRegression

        x = torch.cat([pos, neg]).numpy()
        y = [1] * len(pos) + [0] * len(neg)
        centre, scale = x.mean(0), x.std(0) + 1e-12
        fit = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit((x - centre) / scale, y)
        w = torch.from_numpy(fit.coef_[0] / scale)
        unit = w / w.norm().clamp_min(1e-300)
    return (unit @ mean) * unit  # the mean difference along the unit direction: its sign and its scale


def build_vector(
    loaded: Any,
    pairs: str | Path | Sequence[tuple[str, str]],
    layer: int,
    method: str = "mean_diff",
    position: str = "last",
    hook: str | None = None,
    batch_size: int = 16,
) -> SteeringVector:
    """A :class:`SteeringVector` from contrast pairs read at ``hook`` (a template with '{layer}',
    default ``blocks.{layer}.hook_resid_post``) of block ``layer``."""
    return build_vectors(loaded, pairs, [layer], method, position, hook, batch_size)[layer]


def build_vectors(
    loaded: Any,
    pairs: str | Path | Sequence[tuple[str, str]],
    layers: Any,
    method: str = "mean_diff",
    position: str = "last",
    hook: str | None = None,
    batch_size: int = 16,
) -> dict[int, SteeringVector]:
    """One vector per layer from one pass over the pairs (see :func:`build_vector`)."""
    if method not in METHODS:
        raise SteeringError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    _, cfg, _ = _unwrap(loaded)
    template, fixed = _template(hook)
    if layers is None:
        layers = fixed
    if layers is None:
        raise SteeringError("give the layer to read the vector at: --layer N")
    chosen = _check_layers(layers, cfg.n_layers)
    rows = read_pairs(pairs)
    acts = pair_activations(loaded, rows, [template.format(layer=layer) for layer in chosen], position, batch_size)
    out = {}
    for layer in chosen:
        pos, neg = acts[template.format(layer=layer)]
        vector = steering_direction(pos, neg, method).float()
        out[layer] = SteeringVector(vector, template, layer, method, position, len(rows), model_fingerprint(loaded))
    return out


# ---- code-space steering ------------------------------------------------------------------------


@dataclass
class CodeIntervention:
    """Set (``clamp``) or shift (``add``) atom ``atom`` of the CRATE sparse code at
    ``blocks.{layer}.ista.hook_code``. ``value`` is the default coefficient; ``apply``'s
    coefficient, when given, is the value written (clamp) or added (add) instead."""

    layer: int
    atom: int
    value: float = 0.0
    mode: str = "clamp"

    def check_model(self, model_or_loaded: Any, layers: Sequence[int] | None = None) -> list[int]:
        _, cfg, _ = _unwrap(model_or_loaded)
        if cfg.arch != "crate":
            raise SteeringError(f"code steering (--atom) needs a CRATE model; this one is {cfg.arch!r} "
                                "(steer its residual stream with a vector instead)")  # fmt: skip
        if self.mode not in MODES:
            raise SteeringError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        m = cfg.dict_width
        if isinstance(self.atom, bool) or not isinstance(self.atom, int) or not 0 <= self.atom < m:
            raise SteeringError(f"--atom {self.atom!r} is out of range: the code has {m} atoms (0..{m - 1})")
        return _check_layers(self.layer if layers is None else layers, cfg.n_layers)

    def apply(
        self,
        model_or_loaded: Any,
        coefficient: float | None = None,
        layers: int | Sequence[int] | None = None,
        from_position: int = 0,
    ) -> contextlib.AbstractContextManager:
        """Context manager: A[..., atom] = value (clamp) or A[..., atom] += value (add) at each
        layer (default: ``self.layer``) for positions >= from_position; value = coefficient if given."""
        model, _, _ = _unwrap(model_or_loaded)
        chosen = self.check_model(model_or_loaded, layers)
        value = self.value if coefficient is None else coefficient
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise SteeringError(f"--coefficient must be a finite number, got {value!r}")
        atom, clamp = self.atom, self.mode == "clamp"

        def edit(a: Tensor) -> Tensor:
            a[..., atom] = value if clamp else a[..., atom] + value
            return a

        return positioned_hooks(model, [(CODE_HOOK.format(layer=layer), edit) for layer in chosen], from_position)


Intervention = SteeringVector | CodeIntervention


# ---- evaluation ---------------------------------------------------------------------------------


def _as_texts(value: str | Sequence[str] | None, what: str) -> list[str] | None:
    if value is None:
        return None
    texts = [value] if isinstance(value, str) else list(value)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise SteeringError(f"{what} must be a text or a non-empty list of texts")
    return texts


def token_ids(tokenizer: Any, target_tokens: str | Sequence[str | int]) -> list[int]:
    """Token ids of a comma-separated string or a list of texts / ids; each text must be one token."""
    items = target_tokens.split(",") if isinstance(target_tokens, str) else list(target_tokens)
    ids = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < tokenizer.vocab_size:
                raise SteeringError(f"target token id {item} is out of range (vocabulary of {tokenizer.vocab_size})")
            ids.append(item)
            continue
        encoded = tokenizer.encode(str(item))
        if len(encoded) != 1:
            pieces = [tokenizer.decode([i]) for i in encoded]
            raise SteeringError(f"target token {item!r} is {len(encoded)} tokens {pieces}; give single tokens "
                                "(note the leading space: ' love')")  # fmt: skip
        ids.append(encoded[0])
    if not ids:
        raise SteeringError("--target_tokens is empty; give comma-separated single tokens like ' love,love'")
    return sorted(set(ids))


def _pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


class Evaluator:
    """The prompts, targets and neutral text of :func:`evaluate`, tokenised once, with the
    unsteered model's numbers computed once; :meth:`measure` runs one intervention."""

    def __init__(
        self,
        loaded: Any,
        prompts: str | Sequence[str],
        targets: str | Sequence[str] | None = None,
        target_tokens: str | Sequence[str | int] | None = None,
        neutral: Any = None,
        neutral_tokens: int = NEUTRAL_TOKENS,
        batch_size: int = 8,
    ) -> None:
        self.loaded, self.batch_size = loaded, batch_size
        self.model, cfg, _ = _unwrap(loaded)
        tokenizer = loaded.tokenizer
        self.prompts = _as_texts(prompts, "prompts") or []
        targets = _as_texts(targets, "targets")
        if targets is not None and target_tokens is not None:
            raise SteeringError("give --targets (continuations) or --target_tokens (a next-token set), not both")
        if targets is not None and len(targets) not in (1, len(self.prompts)):
            raise SteeringError(f"{len(targets)} targets for {len(self.prompts)} prompts; give one target, or one per prompt")
        prompt_ids = [tokenizer.encode(p) or [tokenizer.eod_id] for p in self.prompts]
        self.kind = "targets" if targets is not None else "target_tokens" if target_tokens is not None else None
        if targets is not None:
            target_ids = [tokenizer.encode(t) for t in (targets * len(self.prompts) if len(targets) == 1 else targets)]
            if any(not t for t in target_ids):
                raise SteeringError("a target continuation is empty; every target needs at least one token")
            rows = [p + t for p, t in zip(prompt_ids, target_ids)]
            self.spans = [(len(p), len(p) + len(t)) for p, t in zip(prompt_ids, target_ids)]
        else:
            rows = prompt_ids
            self.spans = [(len(p), len(p)) for p in prompt_ids]
        self.token_set = token_ids(tokenizer, target_tokens) if target_tokens is not None else None
        if max(len(r) for r in rows) > cfg.max_seq_len:
            raise SteeringError(f"a prompt (with its target) is longer than the model's context ({cfg.max_seq_len} tokens)")
        self.prompt_batch = _pad(rows, loaded.pad_id)
        self.neutral = self._neutral(neutral, neutral_tokens, cfg.max_seq_len)
        with torch.no_grad():
            self.base_prompt = self._prompt_scores()
            self.base_neutral = self._neutral_logprobs()

    def _neutral(self, neutral: Any, tokens: int, context: int) -> tuple[Tensor, Tensor]:
        """(ids, mask) of the neutral text: the run's validation split (None), a shards folder or
        text file (a path), texts (a list of strings) or token ids (a 2-D tensor)."""
        if isinstance(neutral, Tensor):
            return neutral.long(), torch.ones_like(neutral, dtype=torch.bool)
        if isinstance(neutral, (list, tuple)):
            texts = _as_texts(neutral, "neutral")
            rows = [r[:context] for r in self.loaded.tokenizer.encode_batch(texts)]
            if any(len(r) < 2 for r in rows):
                raise SteeringError("a neutral text is shorter than 2 tokens; give longer held-out text")
            return _pad(rows, self.loaded.pad_id)
        import numpy as np

        from crate_lm.interp.extract import open_sequences

        seq_len = min(context, tokens)
        data = None if neutral is None else str(neutral)
        seqs = open_sequences(self.loaded, data, "validation", seq_len, tokens)
        ids = torch.from_numpy(np.stack([t.astype(np.int64) for _, t, _, _ in seqs.iter()]))
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def _logits(self, ids: Tensor, mask: Tensor, dtype: torch.dtype = torch.float64) -> Iterator[tuple[slice, Tensor]]:
        """(rows, log-probabilities) per batch."""
        device = self.loaded.device if hasattr(self.loaded, "device") else ids.device
        for start in range(0, len(ids), self.batch_size):
            part = slice(start, start + self.batch_size)
            out = self.model(ids[part].to(device), attention_mask=mask[part].to(device))
            yield part, torch.log_softmax(out.logits.to(dtype), -1).cpu()

    def _prompt_scores(self) -> Tensor:
        """Per prompt: log p(target | prompt) summed over its tokens, or log p(token set) next."""
        ids, mask = self.prompt_batch
        if self.kind is None:
            return torch.zeros(len(ids), dtype=torch.float64)
        scores = torch.zeros(len(ids), dtype=torch.float64)
        for part, logp in self._logits(ids, mask):
            for i, row in zip(range(part.start, part.start + len(logp)), logp):
                first, stop = self.spans[i]
                if self.kind == "targets":  # position t predicts token t + 1
                    scores[i] = row[first - 1 : stop - 1].gather(1, ids[i, first:stop, None]).sum()
                else:
                    scores[i] = torch.logsumexp(row[first - 1, self.token_set], 0)
        return scores

    def _neutral_logprobs(self) -> list[Tensor]:
        ids, mask = self.neutral
        return [logp for _, logp in self._logits(ids, mask, torch.float32)]  # thousands x V: float32 halves the cost

    def measure(self, intervention: Intervention, coefficient: float, layers: Any = None, from_position: int = 0) -> dict:
        """Effect and side effects of ``intervention`` at ``coefficient`` (see the module docstring)."""
        with torch.no_grad(), intervention.apply(self.loaded, coefficient, layers=layers, from_position=from_position):
            steered = self._prompt_scores()
            steered_neutral = self._neutral_logprobs()
        ids, mask = self.neutral
        kl_sum = nll_base = nll_steered = 0.0
        positions = predictions = 0
        for start, (base, new) in enumerate(zip(self.base_neutral, steered_neutral)):
            part = slice(start * self.batch_size, start * self.batch_size + len(base))
            real = mask[part]
            kl = (base.exp() * (base - new)).sum(-1)  # KL(base || steered) at every position
            kl_sum += float(kl[real].double().sum())
            positions += int(real.sum())
            nxt = ids[part, 1:, None]
            follows = real[:, 1:]  # position t predicts the real token t + 1
            nll_base -= float(base[:, :-1].gather(2, nxt).squeeze(2)[follows].double().sum())
            nll_steered -= float(new[:, :-1].gather(2, nxt).squeeze(2)[follows].double().sum())
            predictions += int(follows.sum())
        change = steered - self.base_prompt
        lengths = torch.tensor([max(stop - first, 1) for first, stop in self.spans], dtype=torch.float64)
        chosen = layers if layers is not None else intervention.layer
        result = {
            "coefficient": float(coefficient),
            "layers": [chosen] if isinstance(chosen, int) else list(chosen),
            "kind": self.kind,
            "effect": float(change.mean()) if self.kind else None,
            "effect_per_token": float((change / lengths).mean()) if self.kind == "targets" else None,
            "base_logprob": float(self.base_prompt.mean()) if self.kind else None,
            "steered_logprob": float(steered.mean()) if self.kind else None,
            "kl": kl_sum / max(positions, 1),
            "ppl_base": math.exp(nll_base / max(predictions, 1)),
            "ppl_steered": math.exp(nll_steered / max(predictions, 1)),
            "ppl_ratio": math.exp((nll_steered - nll_base) / max(predictions, 1)),
            "n_prompts": len(self.prompts),
            "neutral_tokens": positions,
        }
        return result


def evaluate(
    loaded: Any,
    intervention: Intervention,
    coefficient: float,
    prompts: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    target_tokens: str | Sequence[str | int] | None = None,
    neutral: Any = None,
    layers: Any = None,
    from_position: int = 0,
    neutral_tokens: int = NEUTRAL_TOKENS,
    batch_size: int = 8,
) -> dict:
    """Effect of ``intervention`` at ``coefficient`` on the prompts' targets, and its side effects
    on neutral text (default: the run's validation split, ``neutral_tokens`` tokens). Keys:
    coefficient, layers, kind, effect, effect_per_token, base_logprob, steered_logprob, kl,
    ppl_base, ppl_steered, ppl_ratio, n_prompts, neutral_tokens."""
    evaluator = Evaluator(loaded, prompts, targets, target_tokens, neutral, neutral_tokens, batch_size)
    return evaluator.measure(intervention, coefficient, layers, from_position)


# ---- sweeps -------------------------------------------------------------------------------------


def _num(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def best_within(cells: list[dict], budgets: Sequence[float]) -> list[dict]:
    """For each KL budget, the cell with the largest effect whose KL is within it (None: none is)."""
    out = []
    for budget in budgets:
        fits = [c for c in cells if c["effect"] is not None and c["kl"] <= budget]
        best = max(fits, key=lambda c: c["effect"], default=None)
        out.append({"kl_budget": budget, "best": None if best is None else {
            k: best[k] for k in ("layer", "coefficient", "effect", "kl", "ppl_ratio")}})  # fmt: skip
    return out


def sweep(
    loaded: Any,
    source: Any,
    layers: Any,
    coefficients: Any,
    prompts: str | Sequence[str],
    targets: str | Sequence[str] | None = None,
    target_tokens: str | Sequence[str | int] | None = None,
    neutral: Any = None,
    *,
    method: str = "mean_diff",
    position: str = "last",
    hook: str | None = None,
    from_position: int = 0,
    budgets: Sequence[float] = KL_BUDGETS,
    neutral_tokens: int = NEUTRAL_TOKENS,
    out: str | Path | None = None,
    show_progress: bool = True,
    quiet: bool = False,
) -> dict:
    """Effect and KL over layers x coefficients. ``source``: contrast pairs (a list or a JSONL
    path; a vector is built at each layer with ``method``), a :class:`SteeringVector` or the path of
    a saved one (applied at each layer), or a :class:`CodeIntervention` (coefficients are its values).
    Writes ``sweep.json`` (keys: format, checkpoint, source, method, layers, coefficients, kind,
    effect, effect_per_token, kl, ppl_ratio (grids [layer][coefficient]), cells, best, out) and
    ``sweep.png`` to ``out`` (default ``<checkpoint>/steer``); prints a one-line summary."""
    from tqdm import tqdm

    from crate_lm.fsutil import atomic_write_json

    _, cfg, path = _unwrap(loaded)
    values = parse_coefficients(coefficients)
    if isinstance(source, (str, Path)) and str(source).endswith(".safetensors"):
        source = SteeringVector.load(source)
    if isinstance(source, CodeIntervention):
        chosen = source.check_model(loaded, None if layers is None else _check_layers(layers, cfg.n_layers, "layers"))
        per_layer: dict[int, Intervention] = dict.fromkeys(chosen, source)
        described = f"atom {source.atom} ({source.mode})"
    elif isinstance(source, SteeringVector):
        source.check_model(loaded)
        chosen = _check_layers(source.layer if layers is None else layers, cfg.n_layers, "layers")
        per_layer = dict.fromkeys(chosen, source)
        described = f"vector ({source.method}, read at layer {source.layer})"
    else:
        chosen = _check_layers("all" if layers is None else layers, cfg.n_layers, "layers")
        per_layer = dict(build_vectors(loaded, source, chosen, method, position, hook))
        described = f"pairs ({method}, built at each layer)"
    evaluator = Evaluator(loaded, prompts, targets, target_tokens, neutral, neutral_tokens)
    cells = []
    with tqdm(total=len(chosen) * len(values), desc="steer sweep", disable=not show_progress, file=sys.stderr) as bar:
        for layer in chosen:
            for c in values:
                r = evaluator.measure(per_layer[layer], c, [layer], from_position)
                cells.append({"layer": layer, **{k: r[k] for k in ("coefficient", "effect", "effect_per_token", "kl",
                                                                   "ppl_ratio")}})  # fmt: skip
                bar.update(1)

    def grid(key: str) -> list[list[float | None]]:
        return [[_num(c[key]) if c[key] is not None else None for c in cells if c["layer"] == layer] for layer in chosen]

    folder = Path(out).expanduser() if out is not None else Path(path or ".") / "steer"
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "format": "crate_lm.steering.sweep.v1",
        "checkpoint": path,
        "source": described,
        "method": getattr(next(iter(per_layer.values())), "method", None),
        "layers": chosen,
        "coefficients": values,
        "kind": evaluator.kind,
        "effect": grid("effect"),
        "effect_per_token": grid("effect_per_token"),
        "kl": grid("kl"),
        "ppl_ratio": grid("ppl_ratio"),
        "cells": [{k: _num(v) if isinstance(v, float) else v for k, v in c.items()} for c in cells],
        "best": best_within(cells, budgets),
        "n_prompts": len(evaluator.prompts),
        "neutral_tokens": int(evaluator.neutral[1].sum()),
        "out": str(folder),
    }
    atomic_write_json(folder / "sweep.json", report)
    plot_sweep(report, folder / "sweep.png")
    if not quiet:
        print(summary_line(report))
    return report


def summary_line(report: dict) -> str:
    """'sweep: L layers x C coefficients ...; best effect within KL <= b: ... -> out'."""
    head = (f"sweep: {len(report['layers'])} layers x {len(report['coefficients'])} coefficients, "
            f"{report['n_prompts']} prompts, {report['neutral_tokens']:,} neutral tokens")  # fmt: skip
    picks = [b for b in report["best"] if b["best"] is not None]
    if report["kind"] is None or not picks:
        return f"{head}; no target given or no cell within the KL budgets -> {report['out']}"
    b = picks[len(picks) // 2]
    best = b["best"]
    return (f"{head}; best within KL <= {b['kl_budget']:g}: layer {best['layer']}, coefficient {best['coefficient']:g}, "
            f"effect {best['effect']:+.3f} nats (KL {best['kl']:.4f}, ppl x{best['ppl_ratio']:.3f}) -> {report['out']}")  # fmt: skip


def plot_sweep(report: dict, out_png: Path) -> None:
    """Two heatmaps, layers x coefficients: the effect and the KL side effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(report["coefficients"]), 1.5 + 0.6 * len(report["layers"])))
    for ax, key, title, cmap in ((axes[0], "effect", "effect (nats)", "RdBu_r"), (axes[1], "kl", "KL(base || steered)", "viridis")):
        grid = np.array([[np.nan if v is None else v for v in row] for row in report[key]], dtype=float)
        if key == "effect":
            limit = float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 1.0
            image = ax.imshow(grid, cmap=cmap, vmin=-limit or -1, vmax=limit or 1, aspect="auto")
        else:
            image = ax.imshow(grid, cmap=cmap, aspect="auto")
        ax.set_xticks(range(len(report["coefficients"])), [f"{c:g}" for c in report["coefficients"]])
        ax.set_yticks(range(len(report["layers"])), [str(layer) for layer in report["layers"]])
        ax.set_xlabel("coefficient")
        ax.set_ylabel("layer")
        ax.set_title(title if report["kind"] or key == "kl" else f"{title}: no target given")
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"steering sweep: {report['source']}", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=100)


# ---- command-line helpers -----------------------------------------------------------------------


def open_intervention(
    loaded: Any, vector: str | None, atom: int | None, layer: int | None, mode: str, value: float = 0.0
) -> Intervention:
    """A saved vector (``--vector``) or a code intervention (``--atom`` at ``--layer``), checked against the model."""
    if (vector is None) == (atom is None):
        raise SteeringError("give either --vector FILE (a saved steering vector) or --atom J --layer L (code steering)")
    if vector is not None:
        loaded_vector = SteeringVector.load(vector)
        loaded_vector.check_model(loaded)
        return loaded_vector
    if layer is None:
        raise SteeringError("code steering needs the block: --atom J --layer L")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SteeringError(f"--layer must be a block number, got {layer!r}")
    code = CodeIntervention(layer, atom, value, mode)  # type: ignore[arg-type]
    code.check_model(loaded)
    return code


def steered_generation(
    loaded: Any,
    intervention: Intervention,
    coefficient: float,
    prompt: str,
    *,
    layers: Any = None,
    from_position: int = 0,
    max_new_tokens: int = 40,
    temperature: float = 0.8,
    top_k: int | None = 50,
    seed: int = 0,
) -> tuple[str, str]:
    """(unsteered, steered) continuations of ``prompt`` sampled with the same seed."""
    from crate_lm.model import generate

    cfg = loaded.cfg.model
    ids = loaded.tokenizer.encode(prompt) or [loaded.tokenizer.eod_id]
    if len(ids) >= cfg.max_seq_len:
        raise SteeringError(f"the prompt is {len(ids)} tokens; the model's context is {cfg.max_seq_len}")
    new = min(max_new_tokens, cfg.max_seq_len - len(ids))
    texts = []
    for steer in (False, True):
        context = intervention.apply(loaded, coefficient, layers=layers, from_position=from_position) if steer \
            else contextlib.nullcontext()  # fmt: skip
        with context:
            out = generate(loaded.model, torch.tensor([ids], device=loaded.device), new, temperature=temperature,
                           top_k=top_k, generator=torch.Generator(device=loaded.device).manual_seed(seed))  # fmt: skip
        texts.append(loaded.tokenizer.decode(out[0].tolist()))
    return texts[0], texts[1]


def describe(intervention: Intervention, coefficient: float, layers: Any = None) -> str:
    """'vector mean_diff (read at layer 2) x 4 at layer 2' / 'atom 17 clamped to 3 at layer 1'."""
    if isinstance(intervention, CodeIntervention):
        where = intervention.layer if layers is None else layers
        verb = "clamped to" if intervention.mode == "clamp" else "plus"
        return f"atom {intervention.atom} {verb} {coefficient:g} at layer {where}"
    where = intervention.layer if layers is None else layers
    return f"{intervention.method} vector (read at layer {intervention.layer}) x {coefficient:g} at layer {where}"


def format_evaluation(result: dict) -> str:
    """The evaluation as a few aligned lines."""
    lines = []
    if result["kind"] == "targets":
        lines.append(f"effect            {result['effect']:+.4f} nats (log p(target | prompt): "
                     f"{result['base_logprob']:.4f} -> {result['steered_logprob']:.4f}; "
                     f"{result['effect_per_token']:+.4f} per token) over {result['n_prompts']} prompts")  # fmt: skip
    elif result["kind"] == "target_tokens":
        lines.append(f"effect            {result['effect']:+.4f} nats (log p(target tokens next): "
                     f"{result['base_logprob']:.4f} -> {result['steered_logprob']:.4f}) over {result['n_prompts']} prompts")  # fmt: skip
    lines.append(f"KL(base||steered) {result['kl']:.5f} nats per position on {result['neutral_tokens']:,} neutral tokens")
    lines.append(f"perplexity        {result['ppl_base']:.3f} -> {result['ppl_steered']:.3f} (x{result['ppl_ratio']:.4f})")
    return "\n".join(lines)
