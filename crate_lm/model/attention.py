"""Attention arithmetic shared by CRATE's MSSA and the GPT baseline: masks and the two paths.

``attend`` computes softmax(mask(q k^T / sqrt(p))) v either with
``torch.nn.functional.scaled_dot_product_attention`` (the fast path: flash / memory-efficient
kernels on GPU) or with explicit matrix products (the reference path used to check it).
``attention_pattern`` is that path's probabilities, for layers whose ``hook_pattern`` is hooked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttentionMask:
    """Which keys each query may see. ``mask`` (bool, True = attend, broadcastable to
    (B, heads, T_q, T_k)) when one is needed; otherwise ``causal`` says whether the plain
    lower-triangular mask applies (so SDPA can use its ``is_causal`` kernels)."""

    mask: Tensor | None
    causal: bool


def build_attention_mask(
    *,
    causal: bool,
    q_len: int,
    k_len: int,
    offset: int = 0,
    attention_mask: Tensor | None = None,
    document_ids: Tensor | None = None,
    device: torch.device | None = None,
) -> AttentionMask:
    """Combine the causal rule, key padding and document boundaries into one mask.

    ``offset`` is the absolute position of the first query (tokens already in a generation
    cache). ``attention_mask`` (B, T_k) marks real tokens with 1 and padding with 0.
    ``document_ids`` (B, T) gives each packed token its document; tokens attend only within
    their own document.
    """
    if attention_mask is None and document_ids is None:
        if not causal or q_len == 1:
            return AttentionMask(None, False)  # one new query sees every cached key
        if offset == 0 and q_len == k_len:
            return AttentionMask(None, True)
    mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        q_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        mask = mask & (k_pos <= q_pos)
    if attention_mask is not None:
        if attention_mask.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions but there are {k_len} keys")
        mask = mask & attention_mask.bool()[:, None, None, :]
    if document_ids is not None:
        if offset or q_len != k_len:
            raise ValueError("document_ids cannot be combined with a generation cache")
        mask = mask & (document_ids[:, None, :, None] == document_ids[:, None, None, :])
    return AttentionMask(mask, False)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask,
    *,
    dropout_p: float = 0.0,
    impl: str = "sdpa",
) -> Tensor:
    """softmax(mask(q k^T / sqrt(p))) v for (B, heads, T, p) tensors."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, dropout_p=dropout_p, is_causal=mask.causal)
    probs = attention_pattern(q, k, mask)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def attention_pattern(q: Tensor, k: Tensor, mask: AttentionMask) -> Tensor:
    """The attention probabilities softmax(mask(q k^T / sqrt(p))), (B, heads, T_q, T_k).

    The softmax runs in fp32; a query that may see no key gets a row of zeros (as SDPA does).
    """
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = mask.mask
    if mask.causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    if allowed is not None and mask.mask is not None:
        probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return probs.to(q.dtype)


def attend_or_expose(
    q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask, hook_pattern, dropout_p: float, impl: str
) -> Tensor:
    """``attend``, or, when something hooks ``hook_pattern``, the explicit path that computes the
    attention probabilities and passes them through it (the same result; SDPA never forms them)."""
    if hook_pattern.has_hooks:
        probs = hook_pattern(attention_pattern(q, k, mask))
        return (F.dropout(probs, p=dropout_p) if dropout_p else probs) @ v
    return attend(q, k, v, mask, dropout_p=dropout_p, impl=impl)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, K p) -> (B, K, T, p)."""
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, K, T, p) -> (B, T, K p)."""
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)
