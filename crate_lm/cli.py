"""The ``crate-lm`` command line (python-fire): ``crate-lm --help`` lists the commands.

User errors (a bad path, preset or argument) print one ``error: ...`` line on stderr and exit
with code 2 (see :mod:`crate_lm.errors`).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import fire

from crate_lm.config import model_config_from_dict
from crate_lm.errors import CrateLMError, run_cli

_ESCAPE = re.compile(r"\\([\\nt])")
_ESCAPES = {"\\": "\\", "n": "\n", "t": "\t"}


def unescape_prompt(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` in ``text`` as newline, tab and one backslash; other text as is."""
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(1)], text)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_generate_args(max_new_tokens: Any, temperature: Any, top_k: Any, seed: Any) -> None:
    """Reject impossible sampling arguments before anything is loaded."""
    if not _is_int(max_new_tokens) or max_new_tokens <= 0:
        raise CrateLMError(f"--max_new_tokens must be a whole number > 0, got {max_new_tokens!r}")
    if not (_is_int(temperature) or isinstance(temperature, float)) or not math.isfinite(temperature):
        raise CrateLMError(f"--temperature must be a number >= 0 (0: greedy), got {temperature!r}")
    if temperature < 0:
        raise CrateLMError(f"--temperature must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not _is_int(top_k) or top_k <= 0):
        raise CrateLMError(f"--top_k must be a whole number > 0, or None for no top-k, got {top_k!r}")
    if not _is_int(seed):
        raise CrateLMError(f"--seed must be a whole number, got {seed!r}")


def _load_for_generation(run: str, tokenizer: str | None = None):
    """The ``LoadedModel`` (model, run config, tokenizer) of a run folder or checkpoint folder,
    from any working directory, or a CrateLMError."""
    path = Path(run)  # checked before torch is imported
    if not path.exists():
        raise CrateLMError(f"{run}: no such run or checkpoint folder")
    if not path.is_dir():
        raise CrateLMError(f"{run} is a file; pass a run folder or a checkpoint folder")
    if tokenizer is not None and not Path(tokenizer).exists():
        raise CrateLMError(f"--tokenizer {tokenizer}: no such tokenizer file or folder")
    from crate_lm.checkpoint import CheckpointError, load

    lm = load(path, tokenizer=tokenizer)
    if lm.cfg.model.task != "causal":
        raise CheckpointError(f"{lm.path} holds a {lm.cfg.model.task} model; generate needs model.task: causal")
    return lm


class CrateLM:
    """crate_lm: pretrain and open up CRATE language models."""

    def presets(self) -> None:
        """Print every model preset with its exact parameter counts (the README's table)."""
        from crate_lm.model.size import preset_table

        print(preset_table())

    def size(self, preset: str = "tiny", **overrides: Any) -> dict:
        """Parameters, training FLOPs per token and cache bytes of a model config.

        Example: crate-lm size --preset 7b --ista overcomplete
        """
        cfg = model_config_from_dict({"preset": preset, **overrides})  # checked before torch is imported
        from crate_lm.model import cache_bytes_per_token, flops_per_token, param_count

        return {
            "params": param_count(cfg),
            "non_embedding_params": param_count(cfg, embeddings=False),
            "train_flops_per_token": flops_per_token(cfg),
            "cache_bytes_per_token_bf16": cache_bytes_per_token(cfg),
        }

    @fire.decorators.SetParseFns(run=str, prompt=str, tokenizer=str)
    def generate(
        self,
        run: str,
        prompt: str = "",
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        tokenizer: str | None = None,
    ) -> str:
        r"""Continue a prompt with a trained causal model (a run folder or a checkpoint folder).

        Works from any directory, and on a run folder copied or moved anywhere: checkpoints carry
        their tokenizer. For older checkpoints without one, the run's tokenizer is looked for
        from the current directory and the folders above the run; --tokenizer PATH names it.

        The prompt is always text; in it ``\n`` is a newline, ``\t`` a tab and ``\\`` one
        backslash. Generation stops at the model's context (model.max_seq_len), with a note on
        stderr when that cuts it short. temperature 0 is greedy; top_k None samples from the
        whole vocabulary.

        Example: crate-lm generate runs/default --prompt "ROMEO\n" --max_new_tokens 200
        """
        _check_generate_args(max_new_tokens, temperature, top_k, seed)
        prompt = unescape_prompt(prompt)
        lm = _load_for_generation(run, tokenizer)
        model, cfg, tokenizer = lm.model, lm.cfg, lm.tokenizer

        import torch

        from crate_lm.model import generate

        context = cfg.model.max_seq_len
        ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
        if len(ids) >= context:
            raise CrateLMError(
                f"the prompt is {len(ids)} tokens, but the model's context (model.max_seq_len) is {context} "
                f"tokens; shorten the prompt to at most {context - 1} tokens"
            )
        new = min(max_new_tokens, context - len(ids))
        if new < max_new_tokens:
            print(f"note: stopped after {new} new tokens: the model's context is {context} tokens", file=sys.stderr)
        generator = torch.Generator().manual_seed(seed)
        out = generate(model, torch.tensor([ids]), new, temperature=temperature, top_k=top_k, generator=generator)
        return tokenizer.decode(out[0].tolist())

    @fire.decorators.SetParseFns(run=str, data=str, out=str)
    def whitebox(
        self,
        run: str,
        data: str | None = None,
        tokens: int = 20_000,
        compare_init: bool = False,
        out: str | None = None,
        device: str = "cpu",
    ) -> None:
        """Per layer: coding rate R(Z), compression R^c(Z | U_[K]) against the layer's own subspaces,
        sparsity of the ISTA code and the LASSO objective before and after the ISTA step, on held-out
        tokens (default: the run's own validation split; --data takes prepared shards or a text
        file). --compare_init puts the same model at initialisation beside it. Writes whitebox.json
        and whitebox.png to --out (default: <checkpoint>/whitebox).

        Example: crate-lm whitebox runs/default --compare_init
        """
        from crate_lm.interp.whitebox import whitebox

        if isinstance(tokens, bool) or not isinstance(tokens, int):
            raise CrateLMError(f"--tokens must be a whole number, got {tokens!r}")
        _require_folder(run)
        report = whitebox(run, data=data, tokens=tokens, compare_init=compare_init, out=out, device=device)
        _print_whitebox(report)

    @fire.decorators.SetParseFns(run=str, data=str, out=str, hooks=str, split=str, dtype=str, sparse=str)
    def extract(
        self,
        run: str,
        data: str | None = None,
        hooks: str = "blocks.*.ista.hook_code",
        tokens: int = 100_000,
        out: str | None = None,
        split: str = "validation",
        batch_size: int = 8,
        seq_len: int | None = None,
        dtype: str = "float16",
        device: str = "cpu",
        sparse: str = "*.ista.hook_code",
    ) -> None:
        """Stream held-out tokens through the model and write the activations at --hooks (glob
        patterns, comma-separated) to --out (default <checkpoint>/activations) in chunks: ISTA
        codes sparse (CSR), other hook points dense in --dtype, with every token's id, document
        and position. --data takes prepared shards (--split) or a text file; default: the run's
        own data. Interrupted runs never look complete and rerunning finishes them; under torchrun
        each process writes its own part. Read with crate_lm.interp.store.ActivationStore.

        Example: crate-lm extract runs/default --hooks 'blocks.*.ista.hook_code' --tokens 100000 --out acts/
        """
        from crate_lm.interp.extract import extract

        _require_folder(run)
        extract(run, data=data, hooks=hooks, tokens=tokens, out=out, split=split, batch_size=batch_size,
                seq_len=seq_len, dtype=dtype, device=device, sparse=sparse)  # fmt: skip


def _require_folder(run: str) -> None:
    path = Path(run)
    if not path.exists():
        raise CrateLMError(f"{run}: no such run or checkpoint folder")
    if not path.is_dir():
        raise CrateLMError(f"{run} is a file; pass a run folder or a checkpoint folder")


def _print_whitebox(report: dict) -> None:
    """A table per layer and the one-line summary."""
    rows = report["trained"]
    init = report.get("init") or [{}] * len(rows)
    keys = [k for k in ("coding_rate", "compression", "zero_fraction", "mean_l0", "lasso_before", "lasso_after")
            if k in rows[0]]  # fmt: skip
    print("layer " + " ".join(f"{k:>14}" for k in keys) + ("   (init in brackets)" if report.get("init") else ""))
    for row, first in zip(rows, init):
        cells = []
        for k in keys:
            cell = f"{row[k]:.4g}" + (f" [{first[k]:.4g}]" if k in first else "")
            cells.append(f"{cell:>14}")
        print(f"{row['layer']:>5} " + " ".join(cells))
    print(f"whitebox: {len(rows)} layers on {report['tokens']:,} held-out tokens -> {report['out']}")


def _check_arguments(argv: list[str]) -> None:
    """Unknown commands and options as one-line errors (fire would print its usage page)."""
    import difflib
    import inspect

    commands = sorted(n for n in dir(CrateLM) if not n.startswith("_"))
    if not argv or argv[0].startswith("-"):
        return
    command = argv[0]
    if command not in commands:
        close = difflib.get_close_matches(command, commands, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise CrateLMError(f"unknown command {command!r}{hint}; commands: {', '.join(commands)}")
    params = inspect.signature(getattr(CrateLM, command)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    options = [n for n in params if n != "self"]
    for arg in argv[1:]:
        if arg == "--":
            break
        if arg.startswith("--") and len(arg) > 2:
            name = arg[2:].split("=", 1)[0].replace("-", "_")
            if name not in options and name not in ("help", "h"):
                close = difflib.get_close_matches(name, options, n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise CrateLMError(
                    f"unknown option --{name} for crate-lm {command}{hint}; options: "
                    + ", ".join(f"--{o}" for o in options)
                )


def _fire() -> int:
    _check_arguments(sys.argv[1:])
    fire.Fire(CrateLM(), name="crate-lm")
    return 0


def main() -> None:
    sys.exit(run_cli(_fire))


if __name__ == "__main__":
    main()
