"""CRATE language models: MSSA (compress) and ISTA (sparsify) blocks, causal and masked LMs.

Notation follows CRATE.md: tokens are rows Z in R^{N x d}; K heads; p = d / K; LN is LayerNorm
with affine. Each block is one step on the sparse rate reduction objective:

    Z'     = Z + MSSA(LN1(Z))          (compress against K subspaces U_k)
    Z_next = ISTA(LN2(Z'))             (sparsify against a dictionary D)

The same module tree hosts the baseline transformer (``arch: gpt``), whose blocks come from
``gpt.py``; embeddings, final LN, heads, masks and the generation cache are shared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from crate_lm.config import ModelConfig
from crate_lm.model.attention import (
    AttentionMask,
    attend_or_expose,
    build_attention_mask,
    merge_heads,
    split_heads,
)
from crate_lm.model.hooks import HookedModelMixin, HookPoint

IGNORE_INDEX = -100


class MSSA(nn.Module):
    """Multi-head subspace self-attention with one projection serving as q = k = v.

    Y   = LN1(Z)
    Q_k = Y U_k                                   (N x p)
    H_k = softmax(mask(Q_k Q_k^T / sqrt(p))) Q_k
    Z'  = Z + concat_k(H_k) W_out^T + b_out

    Hooks: ``hook_q`` (Q, (B, K, T, p)), ``hook_pattern`` (A_k, (B, K, T, T): computed, by the
    explicit path, only when hooked; otherwise SDPA), ``hook_out`` (what is added to Z).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.attn_impl = cfg.attn_impl
        self.attn_dropout = cfg.attn_dropout
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.proj_u = nn.Linear(d, d, bias=False)  # W_U in R^{(K p) x d}; rows of head k are U_k^T
        self.out = nn.Linear(d, d, bias=True)  # W_out, b_out
        self.out.is_output_proj = True
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_q = HookPoint()  # (B, K, T, p): the per-head subspace coordinates Q_k
        self.hook_pattern = HookPoint()  # (B, K, T, T_k): softmax(mask(Q_k Q_k^T / sqrt(p))), only when hooked
        self.hook_out = HookPoint()  # (B, T, d): the MSSA update added to the stream

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        y = self.ln(z)
        q = self.hook_q(split_heads(self.proj_u(y), self.n_heads))
        kv = cache.update(layer, q)[0] if cache is not None else q  # q = k = v: one cached tensor
        dropout_p = self.attn_dropout if self.training else 0.0
        h = attend_or_expose(q, kv, kv, mask, self.hook_pattern, dropout_p, self.attn_impl)
        return z + self.hook_out(self.drop(self.out(merge_heads(h))))


class ISTA(nn.Module):
    """One or more ISTA steps on the LASSO objective against dictionary D (rows = tokens).

    ``crate``:        A_0 = Y, A_{s+1} = ReLU(A_s + eta (Y - A_s D^T) D - eta lambda), Z_next = A_S
    ``overcomplete``: A_0 = 0, same update with D in R^{d x m},                          Z_next = A_S D^T
    ``alpha``:        as overcomplete, decoding with its own D_1 and a residual,         Z_next = Z' + A_S D_1^T

    For column vectors the update reads A + eta D^T (Y - D A) - eta lambda, as in CRATE.md.
    The sparse code A_S is exposed at ``hook_code`` (B, T, m); ``hook_out`` is what the step adds
    to the stream ('alpha': A_S D_1^T) or puts in it ('crate': A_S, 'overcomplete': A_S D^T).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.dict_width
        self.variant = cfg.ista
        self.steps = cfg.n_ista_steps
        self.eta = cfg.ista_eta
        self.lam = cfg.ista_lambda
        self.ln = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.dict = nn.Parameter(torch.empty(d, m))  # D
        self.dict_out = nn.Parameter(torch.empty(d, m)) if cfg.ista == "alpha" else None  # D_1
        self.drop = nn.Dropout(cfg.dropout) if cfg.ista == "alpha" else nn.Identity()
        self.hook_code = HookPoint()  # (B, T, m): the nonnegative sparse code
        self.hook_out = HookPoint()  # (B, T, d): the update ('alpha') or the new stream ('crate', 'overcomplete')
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The dictionaries keep the reference init: kaiming-uniform over a (d, m) matrix.
        nn.init.kaiming_uniform_(self.dict)
        if self.dict_out is not None:
            nn.init.kaiming_uniform_(self.dict_out)

    def _step(self, a: Tensor, y: Tensor, dictionary: Tensor, eta_dictionary: Tensor) -> Tensor:
        """ReLU(A + eta (Y - A D^T) D - eta lambda). eta is folded into the (small) d x m matrix
        rather than applied to (tokens x m) activations and their gradients."""
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
            return self.hook_out(self.hook_code(a.view(shape)))
        a = F.relu(torch.addmm(y.new_full((1,), -self.eta * self.lam), y, eta_dictionary))  # from A_0 = 0
        for _ in range(self.steps - 1):
            a = self._step(a, y, dictionary, eta_dictionary)
        code = self.hook_code(a.view(*shape[:-1], -1))
        if self.variant == "overcomplete":
            return self.hook_out(code @ dictionary.t())
        return z + self.hook_out(self.drop(code @ self.dict_out.t()))


class CrateBlock(nn.Module):
    """Z -> Z' = Z + MSSA(LN1 Z) -> ISTA(LN2 Z')."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        # registered in forward order, so the hook names list in that order
        self.hook_resid_pre = HookPoint()
        self.attn = MSSA(cfg)
        self.hook_resid_mid = HookPoint()
        self.ista = ISTA(cfg)
        self.hook_resid_post = HookPoint()

    def forward(self, z: Tensor, mask: AttentionMask, cache=None, layer: int = 0) -> Tensor:
        z = self.hook_resid_mid(self.attn(self.hook_resid_pre(z), mask, cache, layer))
        return self.hook_resid_post(self.ista(z))


@dataclass
class LMOutput:
    """What a language model returns: logits (B, T, V) and, given labels, the mean loss."""

    logits: Tensor
    loss: Tensor | None = None


class CrateLMBase(HookedModelMixin, nn.Module):
    """Token + learned position embeddings, L blocks, final LayerNorm. Subclasses add a head.

    Hook points (``hook_names()``, ``run_with_cache``, ``run_with_hooks``: see ``hooks.py``):
    ``hook_embed``, ``blocks.i.*``, ``hook_final`` (after ``ln_f``), ``hook_logits``.
    """

    causal: bool = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from crate_lm.model.gpt import GPTBlock  # the baseline shares everything but the block

        self.config = cfg
        block = CrateBlock if cfg.arch == "crate" else GPTBlock
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.hook_embed = HookPoint()  # registered in forward order (HookPoints hold no parameters)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.hook_final = HookPoint()
        self.hook_logits = HookPoint()
        self.setup_hooks()

    def init_weights(self) -> None:
        """N(0, 0.02) everywhere, N(0, 0.02 / sqrt(2L)) for output projections, zero biases;
        LayerNorms at identity; dictionaries keep their own (kaiming-uniform) init."""
        for module in self.modules():
            self.init_module(module)

    def init_module(self, module: nn.Module) -> None:
        """``init_weights`` for one module's own parameters (a partitioned build, ZeRO-3's
        ``zero.Init``, gathers them module by module and calls this in the same order)."""
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, out_std if getattr(module, "is_output_proj", False) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ISTA):
            module.reset_parameters()

    def encode(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache=None,
    ) -> Tensor:
        """Final hidden states (B, T, d) after ``ln_f``."""
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if offset + t > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {offset + t} tokens exceeds model.max_seq_len={self.config.max_seq_len}; "
                "shorten the input or use a model with more positions"
            )
        if position_ids is None:
            position_ids = torch.arange(offset, offset + t, device=input_ids.device)
        mask = build_attention_mask(
            causal=self.causal,
            q_len=t,
            k_len=offset + t,
            offset=offset,
            attention_mask=attention_mask,
            document_ids=document_ids,
            device=input_ids.device,
        )
        z = self.hook_embed(self.drop(self.tok_emb(input_ids) + self.pos_emb(position_ids)))
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                z = checkpoint(block, z, mask, None, i, use_reentrant=False)
            else:
                z = block(z, mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.hook_final(self.ln_f(z))

    @staticmethod
    def _loss(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class CrateForCausalLM(CrateLMBase):
    """Decoder-only LM: causal mask, LM head tied to the token embedding (no bias).

    ``labels[b, t]`` is the token that should follow position t (already shifted), or -100.
    """

    causal = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
        cache=None,
    ) -> LMOutput:
        h = self.encode(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            document_ids=document_ids,
            cache=cache,
        )
        logits = self.hook_logits(F.linear(h, self.tok_emb.weight))
        return LMOutput(logits, self._loss(logits, labels) if labels is not None else None)


class MLMHead(nn.Module):
    """dense -> GELU -> LN -> decoder tied to the token embedding, with its own bias."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor, embedding: Tensor) -> Tensor:
        return F.linear(self.ln(F.gelu(self.dense(h))), embedding, self.bias)


class CrateForMaskedLM(CrateLMBase):
    """BERT-style LM: bidirectional attention with a padding mask, MLM head, loss on masked
    positions only (``labels`` is -100 everywhere else)."""

    causal = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.mlm_head = MLMHead(cfg)
        self.init_weights()

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        document_ids: Tensor | None = None,
    ) -> LMOutput:
        h = self.encode(input_ids, attention_mask=attention_mask, position_ids=position_ids, document_ids=document_ids)
        logits = self.hook_logits(self.mlm_head(h, self.tok_emb.weight))
        return LMOutput(logits, self._loss(logits, labels) if labels is not None else None)
