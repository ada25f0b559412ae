"""The CRATE model family (and the GPT baseline) behind one constructor."""

from __future__ import annotations

import torch

from crate_lm.config import ModelConfig
from crate_lm.model.crate import CrateForCausalLM, CrateForMaskedLM, CrateLMBase, LMOutput
from crate_lm.model.generation import GenerationCache, generate
from crate_lm.model.hooks import ActivationCache, HookedModelMixin, HookPoint, act_name, hook_point_names
from crate_lm.model.size import cache_bytes_per_token, flops_per_token, param_count


def build_model(cfg: ModelConfig, *, device: torch.device | str | None = None) -> CrateLMBase:
    """The model ``cfg`` describes: causal or masked LM, CRATE or GPT blocks.

    ``device="meta"`` builds the module tree without allocating memory (for sizing, or before
    loading sharded weights).
    """
    cls = CrateForCausalLM if cfg.task == "causal" else CrateForMaskedLM
    if device is None:
        return cls(cfg)
    with torch.device(device):
        return cls(cfg)


__all__ = [
    "ActivationCache",
    "CrateForCausalLM",
    "CrateForMaskedLM",
    "CrateLMBase",
    "GenerationCache",
    "HookPoint",
    "HookedModelMixin",
    "LMOutput",
    "ModelConfig",
    "act_name",
    "build_model",
    "cache_bytes_per_token",
    "flops_per_token",
    "generate",
    "hook_point_names",
    "param_count",
]
