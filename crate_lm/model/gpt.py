"""The baseline: a standard pre-LN transformer block, under the same config, embeddings and heads.

Z' = Z + Attn(LN1(Z))     with separate q, k, v projections
Z  = Z' + MLP(LN2(Z'))    hidden width mlp_mult * d, GELU
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from crate_lm.config import ModelConfig
from crate_lm.model.attention import AttentionMask, attend, merge_heads, split_heads
from crate_lm.model.hooks import HookPoint


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.attn_impl = cfg.attn_impl
        self.attn_dropout = cfg.attn_dropout
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.out.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_out = HookPoint()

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(self.ln(z)).chunk(3, dim=-1))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        h = attend(q, k, v, mask, dropout_p=self.attn_dropout if self.training else 0.0, impl=self.attn_impl)
        return z + self.drop(self.hook_out(self.out(merge_heads(h))))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)
        self.proj.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_hidden = HookPoint()

    def forward(self, z: Tensor) -> Tensor:
        return z + self.drop(self.proj(self.hook_hidden(F.gelu(self.fc(self.ln(z))))))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        z = self.hook_resid_mid(self.attn(self.hook_resid_pre(z), mask, cache, layer))
        return self.hook_resid_post(self.mlp(z))
