"""The baseline: a standard pre-LN transformer block, under the same config, embeddings and heads.

Z' = Z + Attn(LN1(Z))     with separate q, k, v projections
Z  = Z' + MLP(LN2(Z'))    hidden width mlp_mult * d, GELU

Hooks: ``attn.hook_q|hook_k|hook_v`` (B, K, T, p), ``attn.hook_pattern`` (B, K, T, T; only when
hooked), ``attn.hook_out``, ``mlp.hook_post`` (the GELU neurons, (B, T, mlp_mult d)), ``mlp.hook_out``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from crate_lm.config import ModelConfig
from crate_lm.model.attention import AttentionMask, attend_or_expose, merge_heads, split_heads
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
        self.hook_q = HookPoint()
        self.hook_k = HookPoint()
        self.hook_v = HookPoint()
        self.hook_pattern = HookPoint()
        self.hook_out = HookPoint()

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        q, k, v = (split_heads(t, self.n_heads) for t in self.qkv(self.ln(z)).chunk(3, dim=-1))
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        h = attend_or_expose(q, k, v, mask, self.hook_pattern, dropout_p, self.attn_impl)
        return z + self.hook_out(self.drop(self.out(merge_heads(h))))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)
        self.proj.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_post = HookPoint()  # (B, T, mlp_mult d): the GELU hidden neurons
        self.hook_out = HookPoint()  # (B, T, d): what the MLP adds to the stream

    def forward(self, z: Tensor) -> Tensor:
        return z + self.hook_out(self.drop(self.proj(self.hook_post(F.gelu(self.fc(self.ln(z)))))))


class GPTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # registered in forward order, so the hook names list in that order
        self.hook_resid_pre = HookPoint()
        self.attn = SelfAttention(cfg)
        self.hook_resid_mid = HookPoint()
        self.mlp = MLP(cfg)
        self.hook_resid_post = HookPoint()

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        z = self.hook_resid_mid(self.attn(self.hook_resid_pre(z), mask, cache, layer))
        return self.hook_resid_post(self.mlp(z))
