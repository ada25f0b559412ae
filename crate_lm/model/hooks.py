"""Named hook points: identity modules placed where interpretability tools read or edit.

Each ``HookPoint`` is a submodule, so its stable name (``blocks.3.ista.hook_code``) comes from
the module tree and ordinary forward hooks attach to it. In normal training it returns its
input unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


class HookPoint(nn.Identity):
    """An identity function with a name in the module tree (``model.get_submodule(name)``)."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D401 - identity
        return x


def hook_point_names(model: nn.Module) -> list[str]:
    """The names of every hook point in ``model``, in forward order."""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]
