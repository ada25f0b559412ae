"""The ``crate-lm`` command line (python-fire): ``crate-lm --help`` lists the commands."""

from __future__ import annotations

import time

import fire

from crate_lm.config import ModelConfig, model_config_from_dict


class CrateLM:
    """crate_lm: pretrain and open up CRATE language models."""

    def presets(self) -> None:
        """Print every model preset with its exact parameter counts (the README's table)."""
        from crate_lm.model.size import preset_table

        print(preset_table())

    def size(self, preset: str = "tiny", **overrides) -> dict:
        """Parameters, training FLOPs per token and cache bytes of a model config.

        Example: crate-lm size --preset 7b --ista overcomplete
        """
        from crate_lm.model import cache_bytes_per_token, flops_per_token, param_count

        cfg = model_config_from_dict({"preset": preset, **overrides})
        return {
            "params": param_count(cfg),
            "non_embedding_params": param_count(cfg, embeddings=False),
            "train_flops_per_token": flops_per_token(cfg),
            "cache_bytes_per_token_bf16": cache_bytes_per_token(cfg),
        }

    def smoke(self, preset: str = "tiny", steps: int = 30, batch: int = 8, seq_len: int = 64, seed: int = 0) -> None:
        """Train a model for a few steps on a synthetic repeating sequence; the loss must fall."""
        import torch
        from tqdm import tqdm

        from crate_lm.model import build_model, param_count

        torch.manual_seed(seed)
        cfg = ModelConfig.from_preset(preset, max_seq_len=max(seq_len, 8))
        model = build_model(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        period = torch.randint(0, cfg.vocab_size, (17,))
        start = time.perf_counter()
        losses = []
        for _ in (bar := tqdm(range(steps), desc=f"smoke {preset}", unit="step")):
            offsets = torch.randint(0, 17, (batch,))
            idx = (offsets[:, None] + torch.arange(seq_len + 1)[None, :]) % 17
            tokens = period[idx]
            loss = model(tokens[:, :-1], tokens[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        print(
            f"smoke: {preset} CRATE-{cfg.ista} ({param_count(cfg) / 1e6:.2f}M params) trained {steps} steps in "
            f"{time.perf_counter() - start:.1f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        )
        if not losses[-1] < losses[0]:
            raise SystemExit("smoke: the loss did not fall")


def main() -> None:
    fire.Fire(CrateLM, name="crate-lm")


if __name__ == "__main__":
    main()
