"""Named hook points, activation caches and hooked runs (TransformerLens conventions).

A ``HookPoint`` is an identity module placed where interpretability tools read or edit the
forward pass. Its dotted name comes from the module tree (``blocks.3.ista.hook_code``) and is
stored on it as ``.name``. A hook function is ``fn(activation, hook) -> Tensor | None``: a
returned tensor replaces the activation. ``HookedModelMixin`` gives every model
``hook_names()``, ``run_with_cache``, ``run_with_hooks`` and the ``hooks(...)`` context manager,
and ``ActivationCache`` holds what a cached run kept, with the shorthand ``cache["code", 2]``.

Names (i = block index; shapes with B batch, T tokens, d width, K heads, p = d / K, m atoms):

    hook_embed                  (B, T, d)     token + position embeddings = resid_pre of block 0
    blocks.i.hook_resid_pre     (B, T, d)     Z entering block i
    blocks.i.attn.hook_q        (B, K, T, p)  Q_k = LN1(Z) U_k (CRATE: q = k = v); GPT also hook_k, hook_v
    blocks.i.attn.hook_pattern  (B, K, T, T)  softmax(mask(Q_k Q_k^T / sqrt(p))); only computed when hooked
    blocks.i.attn.hook_out      (B, T, d)     what attention adds to the stream
    blocks.i.hook_resid_mid     (B, T, d)     Z'
    blocks.i.ista.hook_code     (B, T, m)     CRATE: the sparse code A
    blocks.i.ista.hook_out      (B, T, d)     CRATE: ISTA's update ('alpha') or its output ('crate', 'overcomplete')
    blocks.i.mlp.hook_post      (B, T, 4d)    GPT: the GELU hidden neurons
    blocks.i.mlp.hook_out       (B, T, d)     GPT: what the MLP adds to the stream
    blocks.i.hook_resid_post    (B, T, d)     Z_next
    hook_final                  (B, T, d)     after the final LayerNorm
    hook_logits                 (B, T, V)
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

HookFn = Callable[[Tensor, "HookPoint"], "Tensor | None"]
NameFilter = str | Sequence[str] | Callable[[str], bool] | None
HookTarget = str | Callable[[str], bool]

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")

# cache["<short>", i] -> blocks.i.<suffix>
LAYER_SHORTHAND: dict[str, str] = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "pattern": "attn.hook_pattern",
    "attn": "attn.hook_pattern",
    "attn_out": "attn.hook_out",
    "code": "ista.hook_code",
    "ista_out": "ista.hook_out",
    "post": "mlp.hook_post",
    "mlp_post": "mlp.hook_post",
    "mlp_out": "mlp.hook_out",
}
# cache["<short>"] -> model-level name
GLOBAL_SHORTHAND: dict[str, str] = {
    "embed": "hook_embed",
    "final": "hook_final",
    "ln_final": "hook_final",
    "ln_final.hook_normalized": "hook_final",
    "logits": "hook_logits",
}


def _closest(name: str, choices: Iterable[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, list(choices), n=n, cutoff=0.0)


def unknown_name_message(name: str, valid: Iterable[str]) -> str:
    """'unknown hook point X; closest: ...' for error messages."""
    close = _closest(str(name), valid)
    return f"unknown hook point {name!r}; closest valid names: {', '.join(close)} (see model.hook_names())"


class HookPoint(nn.Identity):
    """An identity function with a dotted name in the module tree; hooks attach to it.

    ``name`` is set by the model (``blocks.1.ista.hook_code``); ``layer()`` parses the block index.
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def forward(self, x: Tensor) -> Tensor:  # noqa: D401 - identity
        return x

    def layer(self) -> int | None:
        """The block index i of ``blocks.i.*``, or None for model-level points."""
        match = _LAYER_RE.match(self.name or "")
        return int(match.group(1)) if match else None

    @property
    def has_hooks(self) -> bool:
        """Whether any hook is attached (lets a layer compute an activation only when it is wanted)."""
        return bool(self._forward_hooks or self._forward_pre_hooks)

    def add_hook(self, fn: HookFn, dir: str = "fwd", prepend: bool = False) -> RemovableHandle:
        """Attach ``fn(activation, hook)``; 'fwd' sees (and may replace) the activation, 'bwd' its gradient."""
        if dir == "fwd":

            def forward_hook(module: nn.Module, _inputs: Any, output: Tensor) -> Tensor | None:
                return fn(output, module)

            return self.register_forward_hook(forward_hook, prepend=prepend)
        if dir == "bwd":

            def backward_hook(module: nn.Module, _inputs: Any, output: Tensor) -> None:
                if isinstance(output, Tensor) and output.requires_grad:
                    output.register_hook(lambda grad: fn(grad, module))

            return self.register_forward_hook(backward_hook, prepend=prepend)
        raise ValueError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")

    def extra_repr(self) -> str:
        return repr(self.name) if self.name else ""


def hook_point_names(model: nn.Module) -> list[str]:
    """The names of every hook point in ``model``, in forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


def act_name(short: str, layer: int | None = None) -> str:
    """Shorthand -> full name: ``act_name("code", 2) == "blocks.2.ista.hook_code"``."""
    if layer is None:
        return GLOBAL_SHORTHAND.get(short, short)
    suffix = LAYER_SHORTHAND.get(short, short)
    return f"blocks.{layer}.{suffix}"


class ActivationCache(Mapping[str, Tensor]):
    """Activations kept by ``run_with_cache``: a mapping of hook name -> tensor, in forward order.

    Besides full names it accepts TransformerLens shorthand: ``cache["code", 2]``,
    ``cache["resid_post", 0]``, ``cache["pattern", 1]``, ``cache["q", 0]``, ``cache["embed"]``,
    ``cache["logits"]``; negative layers count from the end.
    """

    def __init__(
        self,
        activations: Mapping[str, Tensor],
        *,
        n_layers: int | None = None,
        valid_names: Sequence[str] | None = None,
    ) -> None:
        self._data: dict[str, Tensor] = dict(activations)
        self.n_layers = n_layers
        self.valid_names = list(valid_names) if valid_names is not None else None

    # --- name resolution -----------------------------------------------------------------
    def resolve(self, key: str | tuple) -> str:
        """The full hook name a key (full name or shorthand) stands for."""
        if isinstance(key, str):
            if key in self._data:
                return key
            if key in GLOBAL_SHORTHAND:
                return GLOBAL_SHORTHAND[key]
            if key in LAYER_SHORTHAND:
                raise KeyError(f"{key!r} is a per-layer name: index it with a layer, cache[{key!r}, i]")
            return key
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int):
            short, layer = key
            if layer < 0:
                if self.n_layers is None:
                    raise KeyError(f"cannot resolve negative layer {layer}: the cache does not know n_layers")
                layer += self.n_layers
            if short not in LAYER_SHORTHAND and "hook_" not in short:
                close = _closest(short, LAYER_SHORTHAND, n=3)
                raise KeyError(f"unknown shorthand {short!r}; closest: {', '.join(close)}")
            return act_name(short, layer)
        raise KeyError(f"cannot look up {key!r}: use a hook name or (shorthand, layer)")

    def _missing(self, name: str) -> KeyError:
        held = list(self._data)
        shown = ", ".join(held[:40]) + (f", ... ({len(held)} in all)" if len(held) > 40 else "")
        message = f"{name!r} is not in this cache; it holds: {shown or 'nothing'}"
        if self.valid_names is not None and name not in self.valid_names:
            message += f". {unknown_name_message(name, self.valid_names)}"
        elif held:
            message += f"; closest held: {', '.join(_closest(name, held, n=3))}"
        return KeyError(message)

    def __getitem__(self, key: str | tuple) -> Tensor:
        name = self.resolve(key)
        try:
            return self._data[name]
        except KeyError:
            raise self._missing(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self._data)} activations: {', '.join(self._data)})"

    # --- helpers -------------------------------------------------------------------------
    def _suffix(self, key: str) -> str:
        """The per-layer part of a name: 'code' / 'ista.hook_code' / 'blocks.3.ista.hook_code' -> 'ista.hook_code'."""
        match = _LAYER_RE.match(key)
        if match:
            return match.group(2)
        if key in LAYER_SHORTHAND:
            return LAYER_SHORTHAND[key]
        if "hook_" in key and key not in GLOBAL_SHORTHAND.values():
            return key
        raise KeyError(f"{key!r} is not a per-layer activation; try one of: {', '.join(LAYER_SHORTHAND)}")

    def layers(self, key: str) -> list[int]:
        """The block indices for which ``key`` (shorthand or name) is cached, in order."""
        suffix = self._suffix(key)
        found = []
        for name in self._data:
            match = _LAYER_RE.match(name)
            if match and match.group(2) == suffix:
                found.append(int(match.group(1)))
        return sorted(found)

    def stack(self, key: str, *, return_layers: bool = False) -> Tensor | tuple[Tensor, list[int]]:
        """Stack one activation over the layers present: (L_present, ...); ``cache.stack("code")``."""
        suffix = self._suffix(key)
        layers = self.layers(key)
        if not layers:
            raise self._missing(f"blocks.*.{suffix}")
        stacked = torch.stack([self._data[f"blocks.{i}.{suffix}"] for i in layers])
        return (stacked, layers) if return_layers else stacked

    def to(self, device: torch.device | str) -> ActivationCache:
        """A cache whose tensors live on ``device``."""
        moved = {name: t.to(device) for name, t in self._data.items()}
        return ActivationCache(moved, n_layers=self.n_layers, valid_names=self.valid_names)


class _StopForward(Exception):
    """Raised by the stop hook of ``stop_at_layer``; carries the residual stream."""

    def __init__(self, residual: Tensor) -> None:
        super().__init__("stop_at_layer reached")
        self.residual = residual


class HookedModelMixin:
    """TransformerLens-style hook API for a module tree with ``HookPoint`` submodules and ``blocks``.

    Every hook added through this API is tracked, so contexts and ``reset_hooks`` remove only
    those; hooks registered directly with ``register_forward_hook`` stay.
    """

    # --- names ---------------------------------------------------------------------------
    def setup_hooks(self) -> None:
        """Name every HookPoint after its place in the module tree."""
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, HookPoint):
                module.name = name

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Name -> HookPoint, in forward order."""
        points = {}
        for name, module in self.named_modules():  # type: ignore[attr-defined]
            if isinstance(module, HookPoint):
                module.name = name
                points[name] = module
        return points

    def hook_names(self) -> list[str]:
        """Every hook point name, in forward order."""
        return list(self.hook_dict)

    @property
    def n_hooked_layers(self) -> int:
        return len(self.blocks)  # type: ignore[attr-defined]

    def _select(self, names_filter: NameFilter, points: dict[str, HookPoint]) -> list[str]:
        if names_filter is None:
            return list(points)
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [name for name in points if names_filter(name)]
        wanted = set()
        for name in names_filter:
            if name not in points:
                raise ValueError(unknown_name_message(name, points))
            wanted.add(name)
        return [name for name in points if name in wanted]

    def _targets(self, target: HookTarget, points: dict[str, HookPoint]) -> list[HookPoint]:
        if isinstance(target, str):
            if target not in points:
                raise ValueError(unknown_name_message(target, points))
            return [points[target]]
        if callable(target):
            return [point for name, point in points.items() if target(name)]
        raise TypeError(f"a hook target is a name or a callable name -> bool, got {target!r}")

    # --- hooks ---------------------------------------------------------------------------
    def _api_handles(self) -> list[RemovableHandle]:
        handles = self.__dict__.get("_hook_api_handles")
        if handles is None:
            handles = self.__dict__["_hook_api_handles"] = []
        return handles

    def reset_hooks(self) -> None:
        """Remove every hook added through this API (hooks registered by other code stay)."""
        handles = self._api_handles()
        for handle in handles:
            handle.remove()
        handles.clear()

    @contextlib.contextmanager
    def hooks(
        self,
        fwd_hooks: Iterable[tuple[HookTarget, HookFn]] | None = (),
        bwd_hooks: Iterable[tuple[HookTarget, HookFn]] | None = (),
        reset_hooks_end: bool = True,
    ) -> Iterator[Any]:
        """Context manager: attach ``fn(activation, hook)`` at each named (or filtered) point;
        on exit, also after an exception, remove exactly the hooks it added."""
        points = self.hook_dict
        plan = [(point, fn, "fwd") for target, fn in fwd_hooks or () for point in self._targets(target, points)]
        plan += [(point, fn, "bwd") for target, fn in bwd_hooks or () for point in self._targets(target, points)]
        handles: list[RemovableHandle] = []
        registry = self._api_handles()
        try:
            for point, fn, direction in plan:
                handles.append(point.add_hook(fn, dir=direction))
                registry.append(handles[-1])
            yield self
        finally:
            if reset_hooks_end:
                for handle in handles:
                    handle.remove()
                ids = {id(h) for h in handles}
                registry[:] = [h for h in registry if id(h) not in ids]

    def _stop_point(self, stop_at_layer: int) -> str:
        n = self.n_hooked_layers
        k = stop_at_layer + n if stop_at_layer < 0 else stop_at_layer
        if not 0 <= k <= n:
            raise ValueError(f"stop_at_layer must be in [-{n}, {n}] for a model with {n} blocks, got {stop_at_layer}")
        return "hook_embed" if k == 0 else f"blocks.{k - 1}.hook_resid_post"

    def _forward_with_stop(self, stop_at_layer: int | None, hooks: list, args: tuple, kwargs: dict) -> Any:
        if stop_at_layer is not None:

            def stop(activation: Tensor, hook: HookPoint) -> None:
                raise _StopForward(activation)

            hooks = [*hooks, (self._stop_point(stop_at_layer), stop)]  # last: sees every other hook's edit
        with self.hooks(fwd_hooks=hooks):
            try:
                return self(*args, **kwargs)  # type: ignore[operator]
            except _StopForward as stopped:
                return stopped.residual

    def run_with_hooks(
        self,
        input_ids: Tensor,
        *args: Any,
        fwd_hooks: Iterable[tuple[HookTarget, HookFn]] | None = (),
        bwd_hooks: Iterable[tuple[HookTarget, HookFn]] | None = (),
        reset_hooks_end: bool = True,
        stop_at_layer: int | None = None,
        **forward_kwargs: Any,
    ) -> Any:
        """The model's forward with ``fwd_hooks = [(name_or_filter, fn)]`` attached; ``fn(act, hook)``
        may return a replacement. ``reset_hooks_end=False`` leaves them on (``reset_hooks()``)."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, reset_hooks_end=reset_hooks_end):
            return self._forward_with_stop(stop_at_layer, [], (input_ids, *args), forward_kwargs)

    def run_with_cache(
        self,
        input_ids: Tensor,
        *args: Any,
        names_filter: NameFilter = None,
        stop_at_layer: int | None = None,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        grad: bool = False,
        **forward_kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """Forward pass keeping the activations ``names_filter`` selects (detached, moved to ``device``).

        ``names_filter``: None (all), a name, a list of names, or a callable name -> bool.
        ``stop_at_layer=k`` runs the embedding and blocks 0..k-1 only and returns the residual
        stream after them (B, T, d) instead of the model's output. Runs under ``torch.no_grad``
        unless ``grad=True``. ``remove_batch_dim`` drops the leading batch dim (batch size 1).
        """
        points = self.hook_dict
        names = self._select(names_filter, points)
        store: dict[str, Tensor] = {}

        def make_saver(name: str) -> HookFn:
            def save(activation: Tensor, hook: HookPoint) -> None:
                kept = activation.detach()
                if remove_batch_dim:
                    if kept.shape[0] != 1:
                        raise ValueError(f"remove_batch_dim needs batch size 1, {name} has {kept.shape[0]}")
                    kept = kept[0]
                store[name] = kept.to(device) if device is not None else kept

            return save

        savers = [(name, make_saver(name)) for name in names]
        grad_mode = contextlib.nullcontext() if grad else torch.no_grad()
        with grad_mode:
            output = self._forward_with_stop(stop_at_layer, savers, (input_ids, *args), forward_kwargs)
        ordered = {name: store[name] for name in points if name in store}
        return output, ActivationCache(ordered, n_layers=self.n_hooked_layers, valid_names=list(points))
