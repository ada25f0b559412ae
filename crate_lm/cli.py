"""The ``crate-lm`` command line (python-fire): ``crate-lm --help`` lists the commands.

User errors (a bad path, preset or argument) print one ``error: ...`` line on stderr and exit
with code 2 (see :mod:`crate_lm.errors`).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import fire

from crate_lm.config import model_config_from_dict
from crate_lm.errors import CrateLMError, run_cli
from crate_lm.prompts import read_prompt_lines, unescape_prompt


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


class Steer:
    """Activation steering: build a vector from contrast pairs, apply it (or clamp a CRATE code
    atom) and measure the effect and the side effect, sweep layers x coefficients."""

    @fire.decorators.SetParseFns(run=str, pairs=str, out=str, method=str, position=str, hook=str)
    def build(
        self,
        run: str,
        pairs: str | None = None,
        layer: int | None = None,
        out: str | None = None,
        method: str = "mean_diff",
        position: str = "last",
        hook: str | None = None,
    ) -> None:
        """A steering vector from contrast pairs (--pairs: JSONL lines {"positive": ..., "negative": ...})
        read at block --layer (hook --hook, default blocks.{layer}.hook_resid_post) at each text's last
        token or averaged over it (--position last|mean), by --method mean_diff, pca or logistic.
        Writes a safetensors file (--out).

        Example: crate-lm steer build runs/default --pairs love_hate.jsonl --layer 2 --out love.safetensors
        """
        from crate_lm.interp.steering import SteeringError, build_vector

        if pairs is None or out is None:
            raise SteeringError("give --pairs FILE.jsonl and --out FILE.safetensors (and --layer N)")
        _require_folder(run)
        lm = _load_for_generation(run)
        vector = build_vector(lm, pairs, layer, method=method, position=position, hook=hook)  # type: ignore[arg-type]
        path = vector.save(out)
        print(f"steer build: {vector.method} vector from {vector.n_pairs} pairs at {vector.hook_name()} "
              f"({vector.position} token), norm {float(vector.vector.norm()):.4g} -> {path}")  # fmt: skip

    @fire.decorators.SetParseFns(run=str, vector=str, prompts=str, prompt=str, targets=str, target=str,
                                 target_tokens=str, neutral=str, mode=str)  # fmt: skip
    def apply(
        self,
        run: str,
        vector: str | None = None,
        coefficient: float = 4.0,
        prompts: str | None = None,
        prompt: str | None = None,
        targets: str | None = None,
        target: str | None = None,
        target_tokens: str | None = None,
        neutral: str | None = None,
        layers: int | str | None = None,
        from_position: int = 0,
        atom: int | None = None,
        layer: int | None = None,
        mode: str = "clamp",
        neutral_tokens: int = 2048,
        max_new_tokens: int = 40,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        json: bool = False,
    ) -> None:
        r"""Steer with a saved --vector times --coefficient (at the layer it was read at, or
        --layers), or clamp/add CRATE code atom --atom at --layer (--mode clamp|add; the coefficient
        is the value), and print the effect on --prompts FILE (a prompt per line, \n escapes) or
        --prompt TEXT: change in log p of --targets FILE / --target TEXT after each prompt, or of the
        next-token set --target_tokens ' love,love'; the KL and perplexity side effects on neutral
        text (--neutral shards or text file, default the run's validation split); and the first
        prompt's unsteered and steered generations (same seed). --json prints the evaluation as JSON.

        Example: crate-lm steer apply runs/default --vector love.safetensors --coefficient 4 --prompt "ROMEO:\n" --target_tokens ' love'
        """
        import json as json_module

        from crate_lm.interp.steering import describe, evaluate, format_evaluation, steered_generation

        _check_generate_args(max_new_tokens, temperature, top_k, seed)
        lm, intervention, texts, goal = _steer_inputs(run, vector, atom, layer, mode, prompts, prompt, targets, target)
        result = evaluate(lm, intervention, coefficient, texts, targets=goal, target_tokens=target_tokens,
                          neutral=neutral, layers=layers, from_position=from_position, neutral_tokens=neutral_tokens)  # fmt: skip
        base, steered = steered_generation(lm, intervention, coefficient, texts[0], layers=layers,
                                           from_position=from_position, max_new_tokens=max_new_tokens,
                                           temperature=temperature, top_k=top_k, seed=seed)  # fmt: skip
        if json:
            print(json_module.dumps({**result, "unsteered": base, "steered": steered}, indent=2))
            return
        print(f"steer apply: {describe(intervention, coefficient, layers)}")
        print(format_evaluation(result))
        print(f"=== unsteered (seed {seed}) ===\n{base}\n=== steered: {describe(intervention, coefficient, layers)} ===\n{steered}")

    @fire.decorators.SetParseFns(run=str, pairs=str, vector=str, prompts=str, prompt=str, targets=str, target=str,
                                 target_tokens=str, neutral=str, out=str, method=str, position=str, hook=str,
                                 mode=str)  # fmt: skip
    def sweep(
        self,
        run: str,
        pairs: str | None = None,
        vector: str | None = None,
        layers: int | str = "all",
        coefficients: str | float = "-8,-4,-2,0,2,4,8",
        prompts: str | None = None,
        prompt: str | None = None,
        targets: str | None = None,
        target: str | None = None,
        target_tokens: str | None = None,
        neutral: str | None = None,
        out: str | None = None,
        method: str = "mean_diff",
        position: str = "last",
        hook: str | None = None,
        from_position: int = 0,
        atom: int | None = None,
        layer: int | None = None,
        mode: str = "clamp",
        neutral_tokens: int = 2048,
    ) -> None:
        """Effect and KL side effect over --layers (all, or 0,2) x --coefficients (-8,-4,0,4,8): with
        --pairs a vector is built at each layer (--method, --position, --hook); a saved --vector is
        applied at each layer; --atom J --layer L sweeps the code value at layer L (or --layers).
        Prompts and targets as in steer apply. Writes sweep.json and sweep.png (heatmaps, and the best
        layer and coefficient by effect within each KL budget) to --out (default <checkpoint>/steer).

        Example: crate-lm steer sweep runs/default --pairs love_hate.jsonl --layers all --coefficients=-8,-4,0,4,8 --prompts prompts.txt --target_tokens ' love' --out sweep/
        """
        from crate_lm.interp.steering import SteeringError
        from crate_lm.interp.steering import sweep as run_sweep

        if sum(x is not None for x in (pairs, vector, atom)) != 1:
            raise SteeringError("give one of --pairs FILE.jsonl, --vector FILE.safetensors or --atom J --layer L")
        if pairs is not None:
            _require_folder(run)
            from crate_lm.interp.steering import read_pairs

            source: Any = read_pairs(pairs)
            lm, _, texts, goal = _steer_inputs(run, None, None, None, mode, prompts, prompt, targets, target, need=False)
        else:
            lm, source, texts, goal = _steer_inputs(run, vector, atom, layer, mode, prompts, prompt, targets, target)
            if atom is not None and layers == "all":
                layers = layer  # type: ignore[assignment]
        run_sweep(lm, source, layers, coefficients, texts, targets=goal, target_tokens=target_tokens, neutral=neutral,
                  method=method, position=position, hook=hook, from_position=from_position,
                  neutral_tokens=neutral_tokens, out=out)  # fmt: skip


class CrateLM:
    """crate_lm: pretrain and open up CRATE language models."""

    steer = Steer

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

    @fire.decorators.SetParseFns(run=str, out=str, dtype=str, max_shard_size=str, format=str)
    def export(
        self,
        run: str,
        out: str | None = None,
        dtype: str | None = None,
        max_shard_size: str = "2GB",
        format: str = "native",
        overwrite: bool = False,
    ) -> None:
        """Write a run's weights as sharded safetensors (model-0000k-of-0000N.safetensors and
        model.safetensors.index.json) with its config.yaml and tokenizer into --out; --dtype
        fp32|bf16|fp16 casts them, --format hf also writes a Hugging Face folder (config.json,
        modeling code, tokenizer.json) for AutoModelForCausalLM.from_pretrained(DIR,
        trust_remote_code=True). Reads ZeRO-3 checkpoints offline, one parameter at a time.

        Example: crate-lm export runs/default --out exported/ --dtype bf16 --format hf
        """
        from crate_lm.export import ExportError, export, parse_dtype, parse_size

        if out is None:
            raise ExportError("give --out DIR, the folder to write the export into")
        parse_size(max_shard_size), parse_dtype(dtype)  # checked before anything is read
        if format not in ("native", "hf"):
            raise ExportError(f"--format must be native or hf, got {format!r}")
        _require_folder(run)
        summary = export(run, out, dtype=dtype, max_shard_size=max_shard_size, fmt=format, overwrite=bool(overwrite))
        print(f"export: {summary['tensors']} tensors, {summary['total_size'] / 1e6:,.1f} MB {summary['dtype']} "
              f"in {summary['files']} file(s) ({summary['format']}) from {summary['source']} -> {summary['out']}")  # fmt: skip

    @fire.decorators.SetParseFns(data=str, split=str, device=str)
    def eval(
        self,
        *runs: str,
        data: str | None = None,
        split: str = "validation",
        tokens: int | None = None,
        batch_size: int = 8,
        seq_len: int | None = None,
        device: str = "cpu",
        json: bool = False,
    ) -> None:
        """Loss, perplexity, bits per byte (total nats / ln 2 / UTF-8 bytes of the scored tokens'
        text: comparable across tokenizers), top-1 accuracy and tokens scored, on held-out data:
        --data prepared shards (--split) or a text file; default each run's own validation split.
        BERT-style runs are masked as their validation was (15%, fixed seed) and scored on the
        masked tokens. --tokens N scores about N tokens (default: all). Several runs: one row each.
        Under torchrun the processes split the sequences and add their sums; rank 0 prints.
        --json prints {"format": "crate_lm.eval.v1", "runs": [...]} (keys: crate_lm.eval.ROW_KEYS).

        Example: crate-lm eval runs/default runs/study/gpt --tokens 20000
        """
        import json as json_module

        from crate_lm.eval import evaluate, format_eval, rank_and_world

        if not runs:
            raise CrateLMError("give at least one run or checkpoint folder: crate-lm eval RUN [RUN ...]")
        result = evaluate([str(r) for r in runs], data, split=split, tokens=tokens, batch_size=batch_size,
                          seq_len=seq_len, device=device)  # fmt: skip
        if rank_and_world()[0] == 0:
            print(json_module.dumps(result, indent=2) if json else format_eval(result))

    @fire.decorators.SetParseFns(run=str)
    def info(self, run: str, json: bool = False) -> None:
        """What a run or checkpoint folder holds: architecture, parameter counts, training steps and
        tokens, the last validation figures (metrics.jsonl), the tokenizer and the weights file.

        Example: crate-lm info runs/default --json
        """
        import json as json_module

        from crate_lm.eval import format_info
        from crate_lm.eval import info as run_info

        result = run_info(run)
        print(json_module.dumps(result, indent=2) if json else format_info(result))

    @fire.decorators.SetParseFns(preset=str, offload=str, arch=str, ista=str, precision=str)
    def plan(
        self,
        preset: str = "7b",
        zero_stage: int = 3,
        gpus: int = 64,
        micro_batch: int = 1,
        seq_len: int | None = None,
        activation_checkpointing: bool = False,
        offload: str | None = None,
        arch: str = "crate",
        ista: str = "alpha",
        precision: str = "bf16",
        gpu_memory: float = 80.0,
        gpus_per_node: int = 8,
        json: bool = False,
    ) -> None:
        """Per-GPU memory of a training run in GiB: parameters, gradients and optimizer state as
        DeepSpeed ZeRO partitions them (with DeepSpeed's own estimator beside), activations of
        the micro batch (with or without activation checkpointing), communication buffers; whether
        it fits --gpu_memory GiB and the largest micro batch that does. See crate_lm/plan.py.

        Example: crate-lm plan --preset 7b --zero_stage 3 --gpus 64 --micro_batch 1 --seq_len 2048 --activation_checkpointing
        """
        import json as json_module

        from crate_lm.plan import PlanRequest, format_plan
        from crate_lm.plan import plan as make_plan

        result = make_plan(PlanRequest(preset=preset, zero_stage=zero_stage, gpus=gpus, micro_batch=micro_batch,
                                       seq_len=seq_len, activation_checkpointing=activation_checkpointing,
                                       offload=offload, arch=arch, ista=ista, precision=precision,
                                       gpu_memory=gpu_memory, gpus_per_node=gpus_per_node))  # fmt: skip
        print(json_module.dumps(result, indent=2) if json else format_plan(result))

    @fire.decorators.SetParseFns(run=str, prompt=str, tokenizer=str, steer=str, prompts_file=str)
    def generate(
        self,
        run: str,
        prompt: str = "",
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
        tokenizer: str | None = None,
        steer: str | None = None,
        coefficient: float = 4.0,
        steer_layers: int | str | None = None,
        prompts_file: str | None = None,
    ) -> str:
        r"""Continue a prompt with a trained causal model (a run folder or a checkpoint folder).

        Works from any directory, and on a run folder copied or moved anywhere: checkpoints carry
        their tokenizer. For older checkpoints without one, the run's tokenizer is looked for
        from the current directory and the folders above the run; --tokenizer PATH names it.

        The prompt is always text; in it ``\n`` is a newline, ``\t`` a tab and ``\\`` one
        backslash. Generation stops at the model's context (model.max_seq_len), with a note on
        stderr when that cuts it short, and at the end of a document (the tokenizer's
        end-of-document token, not printed). temperature 0 is greedy; top_k None samples from the
        whole vocabulary. --seed makes it deterministic: each prompt is sampled with its own
        generator seeded with --seed, so a prompt gives the same text alone or in a batch.

        --prompts_file FILE: one prompt per line (escapes as in --prompt); each continuation is
        printed under a line ``=== prompt N ===``.

        --steer VECTOR.safetensors (from crate-lm steer build) prints the unsteered text, then the
        text with --coefficient times the vector added at the layer it was read at (or
        --steer_layers 1,2), sampled with the same seed.

        Example: crate-lm generate runs/default --prompt "ROMEO\n" --max_new_tokens 200
        """
        _check_generate_args(max_new_tokens, temperature, top_k, seed)
        prompt = unescape_prompt(prompt)
        prompts = _read_prompts_file(prompts_file, prompt) if prompts_file is not None else None
        if prompts is not None and steer is not None:
            raise CrateLMError("--steer takes one --prompt, not --prompts_file")
        if steer is not None:
            return _steered_generate(run, tokenizer, steer, coefficient, steer_layers, prompt=prompt,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)  # fmt: skip
        lm = _load_for_generation(run, tokenizer)
        if prompts is None:
            return _sample(lm, prompt, max_new_tokens, temperature, top_k, seed)
        return "\n".join(f"=== prompt {i + 1} ===\n{_sample(lm, text, max_new_tokens, temperature, top_k, seed, i + 1)}"
                         for i, text in enumerate(prompts))  # fmt: skip

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


    @fire.decorators.SetParseFns(run=str, hook=str, data=str, store=str, out=str, split=str, order=str, device=str)
    def features(
        self,
        run: str,
        layer: int | str | None = None,
        hook: str | None = None,
        data: str | None = None,
        store: str | None = None,
        split: str = "validation",
        tokens: int = 100_000,
        out: str | None = None,
        order: str = "max",
        atoms: str | None = None,
        cards: int = 16,
        top_k: int = 20,
        window: int = 5,
        threshold: float = 0.0,
        batch_size: int = 8,
        device: str = "cpu",
    ) -> None:
        """Feature statistics of a layer's units: the ISTA code's atoms (CRATE) or the MLP neurons (GPT
        baseline), or any hook point (--hook): per unit density, mean, max and quantiles, top-k
        contexts and examples from activation quantiles, the direct logit effect (top and bottom
        promoted tokens); per layer mean L0, the log-density histogram, dead and dense units, and the
        geometry (cosines between atoms, principal angles between attention subspaces). --layer: a
        number, comma-separated numbers or all (default all). Streams over held-out tokens (default:
        the run's own validation split; --data takes shards or a text file) or over an activation
        store from crate-lm extract (--store). Cards for --cards units by --order (max, density,
        mean) or for --atoms 3,17. Writes features.json, report.md and density PNGs to --out
        (default <checkpoint>/features).

        Example: crate-lm features runs/default --layer 2 --tokens 50000 --out features/
        """
        from crate_lm.interp.features import features

        _require_folder(run)
        features(run, layer=layer, hook=hook, data=data, store=store, split=split, tokens=tokens, out=out, order=order,
                 atoms=atoms, cards=cards, top_k=top_k, window=window, threshold=threshold, batch_size=batch_size,
                 device=device)  # fmt: skip

    @fire.decorators.SetParseFns(data=str, out=str, split=str, method=str, device=str)
    def probe(
        self,
        *runs: str,
        label: str = "line_start",
        layer: int | str | None = None,
        data: str | None = None,
        split: str = "validation",
        tokens: int = 60_000,
        out: str | None = None,
        ks: str = "1,2,4,8,16,32",
        method: str = "mean_diff",
        test_fraction: float = 0.3,
        representations: str | None = None,
        batch_size: int = 8,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        """k-sparse probing (Gurnee et al. 2023): token-level binary labels (--label: line_start,
        speaker, punctuation, digit, capitalized, several comma-separated, or module:function /
        file.py:function for your own), units ranked on a training split by the difference of class
        means (--method f_stat: the F statistic), class-balanced logistic regression on the top-k
        units for each k in --ks and on all units, scored on held-out documents (F1, AUROC, balanced
        accuracy). Representations per layer: CRATE's ISTA code and residual stream, the GPT
        baseline's MLP neurons and residual stream. Give several runs to put them side by side.
        Writes probe.json and probe_<label>.png to --out (default <first run's checkpoint>/probe).

        Example: crate-lm probe runs/default runs/gpt --label speaker,line_start --layer all
        """
        from crate_lm.interp.probe import probe

        if not runs:
            raise CrateLMError("give at least one run or checkpoint folder: crate-lm probe RUN [RUN ...] --label NAME")
        for run in runs:
            _require_folder(str(run))
        probe([str(r) for r in runs], label=label, layer=layer, data=data, split=split, tokens=tokens, out=out,
              ks=ks, method=method, test_fraction=test_fraction, representations=representations,
              batch_size=batch_size, device=device, seed=seed)  # fmt: skip

    @fire.decorators.SetParseFns(run=str, data=str, out=str, templates=str, token=str, device=str)
    def elk(
        self,
        run: str,
        data: str | None = None,
        out: str | None = None,
        templates: str | None = None,
        token: str = "last",
        test_fraction: float = 0.4,
        restarts: int = 10,
        batch_size: int = 32,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        """Eliciting latent knowledge (Burns et al. 2022): contrast pairs from --data (JSONL of
        {"text", "label"[, "group"]} statements rendered through templates, or explicit
        {"positive", "negative", "label"} pairs), hidden states of every layer at the last token
        (--token mean: averaged from the statement on), per layer CCS, logistic regression and the
        mass-mean probe, and logistic regression after LEACE erased the label; test accuracy and
        AUROC with bootstrap intervals (split by statement group), template transfer, and the
        model's own behavioural accuracy on the facts. --templates: a file with one template a
        line, e.g. '{statement} Is this true? {yes|no}'. Writes elk.json and elk.png to --out
        (default <checkpoint>/elk).

        Example: crate-lm elk runs/truth_crate --data data/truth/statements.jsonl
        """
        from crate_lm.interp.elk import elk

        _require_folder(run)
        elk(run, data=data, out=out, templates=templates, token=token, test_fraction=test_fraction,
            restarts=restarts, batch_size=batch_size, seed=seed, device=device)  # fmt: skip

def _require_folder(run: str) -> None:
    path = Path(run)
    if not path.exists():
        raise CrateLMError(f"{run}: no such run or checkpoint folder")
    if not path.is_dir():
        raise CrateLMError(f"{run} is a file; pass a run folder or a checkpoint folder")


def _steer_inputs(
    run: str, vector: str | None, atom: int | None, layer: int | None, mode: str, prompts: str | None,
    prompt: str | None, targets: str | None, target: str | None, need: bool = True,
) -> tuple[Any, Any, list[str], list[str] | None]:
    """(loaded model, intervention, prompts, targets) of a steer command, each checked."""
    from crate_lm.interp.steering import SteeringError, open_intervention

    _require_folder(run)
    if (prompts is None) == (prompt is None):
        raise SteeringError("give the prompts: --prompts FILE (one per line) or --prompt TEXT")
    if targets is not None and target is not None:
        raise SteeringError("give --targets FILE or --target TEXT, not both")
    texts = read_prompt_lines(prompts, "--prompts") if prompts is not None else [unescape_prompt(str(prompt))]
    goal = read_prompt_lines(targets, "--targets") if targets is not None else None
    if target is not None:
        goal = [unescape_prompt(str(target))]
    lm = _load_for_generation(run)
    intervention = open_intervention(lm, vector, atom, layer, mode) if need else None
    return lm, intervention, texts, goal


def _read_prompts_file(path: str, prompt: str) -> list[str]:
    """--prompts_file: one prompt per line, each unescaped as --prompt is; blank lines skipped."""
    if prompt:
        raise CrateLMError("give --prompt TEXT or --prompts_file FILE, not both")
    return read_prompt_lines(path, "--prompts_file")


def _sample(lm: Any, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
            number: int | None = None) -> str:  # fmt: skip
    """One prompt continued with its own generator (seeded with ``seed``), stopping at the
    model's context or at the end-of-document token (not returned)."""
    import torch

    from crate_lm.model import generate

    tokenizer, context = lm.tokenizer, lm.cfg.model.max_seq_len
    which = "the prompt" if number is None else f"prompt {number}"
    ids = tokenizer.encode(prompt) or [tokenizer.eod_id]
    if len(ids) >= context:
        raise CrateLMError(
            f"{which} is {len(ids)} tokens, but the model's context (model.max_seq_len) is {context} "
            f"tokens; shorten it to at most {context - 1} tokens"
        )
    new = min(max_new_tokens, context - len(ids))
    generator = torch.Generator().manual_seed(seed)
    eod = tokenizer.eod_id
    out = generate(lm.model, torch.tensor([ids]), new, temperature=temperature, top_k=top_k, eos_token_id=eod,
                   generator=generator)[0].tolist()  # fmt: skip
    made = out[len(ids):]
    ended = eod in made
    if ended:
        made = made[: made.index(eod)]
    elif new < max_new_tokens:
        print(f"note: stopped after {new} new tokens: the model's context is {context} tokens", file=sys.stderr)
    return tokenizer.decode(ids + made if prompt else made)  # an empty prompt starts at a document start


def _steered_generate(run: str, tokenizer: str | None, steer: str, coefficient: Any, layers: Any, **kwargs: Any) -> str:
    """generate --steer: the unsteered and the steered text, one after the other."""
    from crate_lm.interp.steering import SteeringVector, describe, steered_generation

    if isinstance(coefficient, bool) or not isinstance(coefficient, (int, float)) or not math.isfinite(coefficient):
        raise CrateLMError(f"--coefficient must be a finite number, got {coefficient!r}")
    lm = _load_for_generation(run, tokenizer)
    vector = SteeringVector.load(steer)
    vector.check_model(lm)
    base, steered = steered_generation(lm, vector, coefficient, kwargs.pop("prompt"), layers=layers, **kwargs)
    return f"=== unsteered ===\n{base}\n=== steered: {describe(vector, coefficient, layers)} ===\n{steered}"


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
    target = getattr(CrateLM, command)
    rest = argv[1:]
    if inspect.isclass(target):  # a command group (crate-lm steer build ...): check the subcommand
        subcommands = sorted(n for n in dir(target) if not n.startswith("_"))
        if not rest or rest[0] in ("--help", "-h"):
            if not rest:
                raise CrateLMError(f"crate-lm {command} needs a subcommand: {', '.join(subcommands)}")
            return
        if rest[0] not in subcommands:
            close = difflib.get_close_matches(rest[0], subcommands, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise CrateLMError(f"unknown subcommand {rest[0]!r} of crate-lm {command}{hint}; "
                               f"subcommands: {', '.join(subcommands)}")  # fmt: skip
        target, command, rest = getattr(target, rest[0]), f"{command} {rest[0]}", rest[1:]
    params = inspect.signature(target).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    options = [n for n in params if n != "self"]
    for arg in rest:
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
