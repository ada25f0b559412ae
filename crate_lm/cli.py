"""The ``crate-lm`` command line (python-fire): ``crate-lm --help`` lists the commands."""

from __future__ import annotations

import fire

from crate_lm.config import model_config_from_dict


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

    def generate(
        self,
        run: str,
        prompt: str = "",
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> str:
        """Continue a prompt with a trained causal model (a run folder or a checkpoint folder).

        Example: crate-lm generate runs/default --prompt "ROMEO\n" --max_new_tokens 200
        """
        import torch

        from crate_lm.checkpoint import load_model, load_run_tokenizer
        from crate_lm.model import generate

        model, cfg = load_model(run)
        tokenizer = load_run_tokenizer(run, cfg)
        ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
        new = min(max_new_tokens, cfg.model.max_seq_len - len(ids))
        generator = torch.Generator().manual_seed(seed)
        out = generate(model, torch.tensor([ids]), new, temperature=temperature, top_k=top_k, generator=generator)
        return tokenizer.decode(out[0].tolist())


def main() -> None:
    fire.Fire(CrateLM, name="crate-lm")


if __name__ == "__main__":
    main()
