"""What a config costs, computed from the config alone: parameters, FLOPs, cache bytes.

These are exact closed forms of the module tree in ``crate.py`` / ``gpt.py`` (tests compare
them with ``numel()``), so a 7B config is sized without building anything.
"""

from __future__ import annotations

from crate_lm.config import ModelConfig


def _block_params(cfg: ModelConfig) -> int:
    d, m = cfg.d_model, cfg.dict_width
    ln = 2 * d
    if cfg.arch == "gpt":
        h = cfg.mlp_mult * d
        attn = ln + (3 * d * d + 3 * d) + (d * d + d)
        mlp = ln + (d * h + h) + (h * d + d)
        return attn + mlp
    mssa = ln + d * d + (d * d + d)  # W_U (no bias), W_out + b_out
    ista = ln + d * m * (2 if cfg.ista == "alpha" else 1)  # D (and D_1)
    return mssa + ista


def param_count(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Exact number of parameters (the tied LM head counts once, with the token embedding)."""
    d = cfg.d_model
    total = cfg.n_layers * _block_params(cfg) + 2 * d  # blocks + final LN
    if cfg.task == "masked":
        total += (d * d + d) + 2 * d + cfg.vocab_size  # dense, LN, decoder bias
    if embeddings:
        total += cfg.vocab_size * d + cfg.max_seq_len * d
    return total


def _block_matmul_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates per token in one block's weight matrices (forward)."""
    d, m, s = cfg.d_model, cfg.dict_width, cfg.n_ista_steps
    if cfg.arch == "gpt":
        return 4 * d * d + 2 * d * cfg.mlp_mult * d
    mssa = 2 * d * d  # W_U, W_out
    if cfg.ista == "crate":
        ista = s * 2 * d * d  # each step: A D^T, then (Y - A D^T) D
    else:
        ista = d * m + (s - 1) * 2 * d * m + d * m  # Y D; later steps A D^T, (.) D; decode
    return mssa + ista


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, training: bool = True) -> int:
    """Model FLOPs per token: 2 per multiply-accumulate in every matmul (weights, attention
    scores and mixing over a context of ``seq_len``, LM/MLM head); x3 for training (forward +
    backward). Attention is counted over the full context, as in the PaLM/nanoGPT MFU convention."""
    t = seq_len or cfg.max_seq_len
    d = cfg.d_model
    macs = cfg.n_layers * (_block_matmul_macs(cfg) + 2 * t * d)  # + q k^T and A v
    macs += d * cfg.vocab_size + (d * d if cfg.task == "masked" else 0)
    return 2 * macs * (3 if training else 1)


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """Generation-cache bytes per token per sequence: one tensor per layer for CRATE, two for GPT."""
    return cfg.n_layers * (1 if cfg.arch == "crate" else 2) * cfg.d_model * bytes_per_value


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def preset_table() -> str:
    """The README's preset table (markdown): exact counts for every preset and variant."""
    from crate_lm.config import MODEL_PRESETS, ModelConfig

    lines = [
        "| preset | d | L | K | seq | params: alpha (default) | overcomplete | crate | GPT baseline "
        "| train GFLOP/token (alpha / GPT) | cache KiB/token bf16 (CRATE / GPT) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in MODEL_PRESETS:
        cfg = {v: ModelConfig.from_preset(name, ista=v) for v in ("alpha", "overcomplete", "crate")}
        gpt = ModelConfig.from_preset(name, arch="gpt")
        base = cfg["alpha"]
        lines.append(
            f"| {name} | {base.d_model} | {base.n_layers} | {base.n_heads} | {base.max_seq_len} "
            f"| {_human(param_count(cfg['alpha']))} | {_human(param_count(cfg['overcomplete']))} "
            f"| {_human(param_count(cfg['crate']))} | {_human(param_count(gpt))} "
            f"| {flops_per_token(base) / 1e9:.3g} / {flops_per_token(gpt) / 1e9:.3g} "
            f"| {cache_bytes_per_token(base) / 1024:.0f} / {cache_bytes_per_token(gpt) / 1024:.0f} |"
        )
    return "\n".join(lines)
