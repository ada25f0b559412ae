"""Hugging Face model classes of a CRATE (or GPT-baseline) language model exported by crate_lm.

Written by ``crate-lm export --format hf`` next to the weights; self-contained (torch and
transformers only): a plain-torch re-implementation of crate_lm/model/crate.py and gpt.py with
the same module names (so the weights load as they are) and the same operations in the same
order (so the logits equal crate_lm's). CRATE.md's notation: tokens are rows Z; K heads;
p = d / K.

    Z'     = Z + MSSA(LN1(Z)),  MSSA: Q_k = Y U_k, H_k = softmax(mask(Q_k Q_k^T / sqrt(p))) Q_k
    Z_next = ISTA(LN2(Z'))      (crate: no residual; overcomplete: A D^T; alpha: Z' + A D_1^T)

``CrateForCausalLM`` takes HF-style ``labels`` (the input ids: shifted inside, -100 ignored);
``CrateForMaskedLM`` takes labels at the masked positions (-100 elsewhere). No key/value cache:
generation recomputes the whole prefix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from .configuration_crate import CrateConfig


def _attention_mask(causal: bool, t: int, attention_mask: Tensor | None, device) -> tuple[Tensor | None, bool]:
    """(bool mask broadcastable to (B, K, T, T), is_causal), as crate_lm builds it."""
    if attention_mask is None:
        return None, causal
    mask = torch.ones(1, 1, t, t, dtype=torch.bool, device=device)
    if causal:
        pos = torch.arange(t, device=device)
        mask = mask & (pos[None, :] <= pos[:, None])
    return mask & attention_mask.bool()[:, None, None, :], False


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float, impl: str) -> Tensor:
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    allowed = mask
    if causal:
        allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1)
    if allowed is not None and mask is not None:
        probs = probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    probs = probs.to(q.dtype)
    if dropout_p:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _split(x: Tensor, n_heads: int) -> Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n_heads, -1).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)


class MSSA(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.attn_impl, self.attn_dropout = cfg.n_heads, cfg.attn_impl, cfg.attn_dropout
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.proj_u = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=True)
        self.out.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, z: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        q = _split(self.proj_u(self.ln(z)), self.n_heads)
        h = _attend(q, q, q, mask, causal, self.attn_dropout if self.training else 0.0, self.attn_impl)
        return z + self.drop(self.out(_merge(h)))


class ISTA(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.dictionary_width
        self.variant, self.steps, self.eta, self.lam = cfg.ista, cfg.ista_iterations, cfg.ista_eta, cfg.ista_lambda
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.dict = nn.Parameter(torch.empty(d, m))
        self.dict_out = nn.Parameter(torch.empty(d, m)) if cfg.ista == "alpha" else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.ista == "alpha" else nn.Identity()

    def _step(self, a: Tensor, y: Tensor, dictionary: Tensor, eta_dictionary: Tensor) -> Tensor:
        residual = y - a @ dictionary.t()
        return F.relu(torch.addmm(a - self.eta * self.lam, residual, eta_dictionary))

    def forward(self, z: Tensor) -> Tensor:
        shape = z.shape
        y = self.ln(z).reshape(-1, shape[-1])
        dictionary = self.dict
        eta_dictionary = self.eta * dictionary
        if self.variant == "crate":
            a = y
            for _ in range(self.steps):
                a = self._step(a, y, dictionary, eta_dictionary)
            return a.view(shape)
        a = F.relu(torch.addmm(y.new_full((1,), -self.eta * self.lam), y, eta_dictionary))
        for _ in range(self.steps - 1):
            a = self._step(a, y, dictionary, eta_dictionary)
        code = a.view(*shape[:-1], -1)
        if self.variant == "overcomplete":
            return code @ dictionary.t()
        return z + self.drop(code @ self.dict_out.t())


class CrateBlock(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        self.attn = MSSA(cfg)
        self.ista = ISTA(cfg)

    def forward(self, z: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        return self.ista(self.attn(z, mask, causal))


class SelfAttention(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.attn_impl, self.attn_dropout = cfg.n_heads, cfg.attn_impl, cfg.attn_dropout
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.out.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, z: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        q, k, v = (_split(t, self.n_heads) for t in self.qkv(self.ln(z)).chunk(3, dim=-1))
        h = _attend(q, k, v, mask, causal, self.attn_dropout if self.training else 0.0, self.attn_impl)
        return z + self.drop(self.out(_merge(h)))


class MLP(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_mult * cfg.d_model)
        self.proj = nn.Linear(cfg.mlp_mult * cfg.d_model, cfg.d_model)
        self.proj.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.drop(self.proj(F.gelu(self.fc(self.ln(z)))))


class GPTBlock(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, z: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        return self.mlp(self.attn(z, mask, causal))


class MLMHead(nn.Module):
    def __init__(self, cfg: CrateConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h))), embedding, self.bias)


class CratePreTrainedModel(PreTrainedModel):
    config_class = CrateConfig
    base_model_prefix = "crate"
    _no_split_modules = ["CrateBlock", "GPTBlock"]
    causal = True

    def __init__(self, config: CrateConfig) -> None:
        super().__init__(config)
        block = CrateBlock if config.arch == "crate" else GPTBlock
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(block(config) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.ln_eps)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """crate_lm's init, for weights a checkpoint does not provide (ones it loaded are kept)."""
        def fresh(t: Tensor | None) -> bool:
            return t is not None and not getattr(t, "_is_hf_initialized", False)

        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if isinstance(module, nn.Linear):
            if fresh(module.weight):
                module.weight.normal_(0.0, out_std if getattr(module, "is_output_proj", False) else std)
            if fresh(module.bias):
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            if fresh(module.weight):
                module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            if fresh(module.weight):
                module.weight.fill_(1.0)
            if fresh(module.bias):
                module.bias.zero_()
        elif isinstance(module, ISTA):
            for t in (module.dict, module.dict_out):
                if fresh(t):
                    nn.init.kaiming_uniform_(t)
        elif isinstance(module, MLMHead) and fresh(module.bias):
            module.bias.zero_()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok_emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.tok_emb = value

    def get_output_embeddings(self) -> None:
        return None  # the head reads tok_emb.weight directly

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               position_ids: Tensor | None = None) -> Tensor:  # fmt: skip
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device)
        mask, causal = _attention_mask(self.causal, t, attention_mask, input_ids.device)
        z = self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids))
        for block in self.blocks:
            z = block(z, mask, causal)
        return self.ln_f(z)


class CrateForCausalLM(CratePreTrainedModel):
    causal = True

    def __init__(self, config: CrateConfig) -> None:
        super().__init__(config)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None, **kwargs) -> CausalLMOutput:  # fmt: skip
        h = self.encode(input_ids, attention_mask, position_ids)
        logits = F.linear(h, self.tok_emb.weight)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].float()
            loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()


class CrateForMaskedLM(CratePreTrainedModel):
    causal = False

    def __init__(self, config: CrateConfig) -> None:
        super().__init__(config)
        self.mlm_head = MLMHead(config)
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                labels: Tensor | None = None, return_dict: bool | None = None, **kwargs) -> MaskedLMOutput:  # fmt: skip
        h = self.encode(input_ids, attention_mask, position_ids)
        logits = self.mlm_head(h, self.tok_emb.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        out = MaskedLMOutput(loss=loss, logits=logits)
        return out if return_dict is not False else out.to_tuple()
