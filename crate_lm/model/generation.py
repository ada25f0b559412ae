"""Autoregressive generation with a preallocated cache.

MSSA uses one projection as q = k = v, so a CRATE layer caches ONE tensor (its Q) where a GPT
layer caches two (K and V): at equal width and depth the CRATE cache holds half the bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crate_lm.model.crate import CrateForCausalLM


class GenerationCache:
    """Per-layer buffers of shape (B, K, max_len, p); ``length`` tokens are filled."""

    def __init__(
        self,
        n_layers: int,
        tensors_per_layer: int,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch_size, n_heads, max_len, head_dim)
        self.buffers = [
            [torch.empty(shape, dtype=dtype, device=device) for _ in range(tensors_per_layer)] for _ in range(n_layers)
        ]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: CrateForCausalLM, batch_size: int, max_len: int) -> GenerationCache:
        """A cache sized for ``model``: one tensor per layer for CRATE, two (K, V) for GPT."""
        cfg = model.config
        param = model.tok_emb.weight
        return cls(
            cfg.n_layers,
            1 if cfg.arch == "crate" else 2,
            batch_size,
            cfg.n_heads,
            max_len,
            cfg.head_dim,
            dtype=param.dtype,
            device=param.device,
        )

    def update(self, layer: int, *new: Tensor) -> list[Tensor]:
        """Write this step's tensors after the cached ones; return the filled prefix of each."""
        end = self.length + new[0].shape[2]
        if end > self.max_len:
            raise ValueError(f"generation cache is full ({self.max_len} positions)")
        out = []
        for buffer, tensor in zip(self.buffers[layer], new):
            buffer[:, :, self.length : end] = tensor
            out.append(buffer[:, :, :end])
        return out

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has written its ``n`` new positions."""
        self.length += n

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.buffers for t in layer)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator=None) -> Tensor:
    """Pick one token per row from (B, V) logits; temperature 0 means greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: CrateForCausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Continue each prompt row by ``max_new_tokens`` tokens (B, T0) -> (B, T0 + new).

    Rows that emit ``eos_token_id`` keep emitting it; generation stops once all rows have.
    ``use_cache=False`` recomputes the whole prefix every step (the reference).
    """
    if not isinstance(model, CrateForCausalLM):
        raise TypeError("generation needs a causal model (model.task: causal)")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError("input_ids must be a non-empty (batch, tokens) tensor")
    total = input_ids.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len ({model.config.max_seq_len}); generate fewer tokens"
        )
    was_training = model.training
    model.eval()
    cache = GenerationCache.for_model(model, input_ids.shape[0], total) if use_cache else None
    out = input_ids
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    logits = model(input_ids, cache=cache).logits[:, -1]
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        if eos_token_id is not None:
            token = token.masked_fill(done, eos_token_id)
            done |= token == eos_token_id
        out = torch.cat([out, token[:, None]], dim=1)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = (model(token[:, None], cache=cache) if use_cache else model(out)).logits[:, -1]
    model.train(was_training)
    return out
