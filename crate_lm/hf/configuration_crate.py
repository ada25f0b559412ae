"""Hugging Face config of a CRATE (or GPT-baseline) language model exported by crate_lm.

Written by ``crate-lm export --format hf`` next to the weights; self-contained (transformers
only), so the folder loads without crate_lm installed.
"""

from __future__ import annotations

try:
    from transformers import PreTrainedConfig as _Base
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as _Base


class CrateConfig(_Base):
    """The architecture fields of crate_lm's ``ModelConfig`` (see its documentation there)."""

    model_type = "crate_lm"

    def __init__(
        self,
        arch: str = "crate",
        task: str = "causal",
        vocab_size: int = 8192,
        max_seq_len: int = 256,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        ista: str = "alpha",
        ista_steps: int | None = None,
        ista_dict_mult: int = 4,
        ista_eta: float = 0.1,
        ista_lambda: float = 0.1,
        mlp_mult: int = 4,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        init_std: float = 0.02,
        ln_eps: float = 1e-5,
        attn_impl: str = "sdpa",
        **kwargs,
    ) -> None:
        self.arch, self.task = arch, task
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.ista, self.ista_steps, self.ista_dict_mult = ista, ista_steps, ista_dict_mult
        self.ista_eta, self.ista_lambda, self.mlp_mult = ista_eta, ista_lambda, mlp_mult
        self.dropout, self.attn_dropout, self.init_std = dropout, attn_dropout, init_std
        self.ln_eps, self.attn_impl = ln_eps, attn_impl
        # standard names other tools look for
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = d_model, n_layers, n_heads
        self.max_position_embeddings = max_seq_len
        kwargs.setdefault("tie_word_embeddings", False)  # the head reads tok_emb.weight: nothing to tie
        super().__init__(**kwargs)

    @property
    def subspace_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ista_iterations(self) -> int:
        return self.ista_steps if self.ista_steps is not None else (1 if self.ista == "crate" else 2)

    @property
    def dictionary_width(self) -> int:
        return self.d_model if self.ista == "crate" else self.ista_dict_mult * self.d_model
