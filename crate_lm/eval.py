"""Evaluation of trained runs (``crate-lm eval``) and what a run is (``crate-lm info``).

**Data.** Held-out tokens chosen as the analysis tools choose them
(``crate_lm.interp.extract.open_sequences``): the ``split`` of prepared shards (default the run's
own data, validation split), or a text file (lines encoded with their newlines, concatenated),
cut in order into non-overlapping sequences. A causal model reads sequences of T + 1 tokens
(T = the run's ``data.seq_len``, at most ``model.max_seq_len``) and predicts the last T of each;
a masked model reads T tokens masked as the trainer's validation masks them (``MLMStream``, seed
0, sequence g masked with the generator seeded (0, g), ``data.mlm_prob``) and is scored on the
masked positions. Runs trained with ``data.reset_at_documents`` get the same position ids and
document masks on shards, and targets across a document boundary are not scored.
``tokens`` (N) asks for ceil(N / T) sequences (fewer if the data runs out); None: all of it.

**Figures** (``evaluate`` returns them; ``--json`` prints them):

* ``loss``: mean cross-entropy in nats over the scored tokens; ``perplexity`` = exp(loss).
* ``bits_per_byte`` (causal models): total nats / ln 2 / ``bytes``, where ``bytes`` is the sum,
  over sequences, of the UTF-8 length of the text the sequence's scored target tokens decode to
  (decoded together, special tokens such as end-of-document left out: they are not text; their
  nats are kept). It compares models with different tokenizers on the same text.
* ``accuracy``: top-1 accuracy on the scored tokens (next token; masked tokens for BERT-style).
* ``tokens``: scored tokens; ``sequences``; ``world_size``.

**Several processes** (``torchrun --nproc_per_node G -m crate_lm.cli eval ...``): rank r scores
sequences r, r + G, ...; the sums (nats, tokens, correct, bytes, sequences) are added with
``torch.distributed.all_reduce`` (gloo on CPU) and rank 0 prints. The figures equal one
process's up to float summation order.

JSON (``crate-lm eval --json``): ``{"format": "crate_lm.eval.v1", "runs": [ROW, ...]}``, a ROW
per run with the keys of ``ROW_KEYS``.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from crate_lm.errors import CrateLMError

FORMAT = "crate_lm.eval.v1"
ROW_KEYS = ("run", "checkpoint", "step", "arch", "task", "params", "data", "data_kind", "split", "seq_len",
            "sequences", "tokens", "loss", "perplexity", "bits_per_byte", "bytes", "accuracy", "world_size")  # fmt: skip
IGNORE = -100
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
                      "I32": "int32", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
ALL = 10**15  # "all the data": open_sequences takes a token budget


class EvalError(CrateLMError):
    """A bad eval/info argument or input: the message names it and the fix."""


def check_tokens(tokens: Any) -> int | None:
    if tokens is None:
        return None
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise EvalError(f"--tokens must be a whole number >= 1 (or left out for all the data), got {tokens!r}")
    return tokens


def require_run(run: str) -> Path:
    path = Path(str(run)).expanduser()
    if not path.exists():
        raise EvalError(f"{run}: no such run or checkpoint folder")
    if not path.is_dir():
        raise EvalError(f"{run} is a file; pass a run folder or a checkpoint folder")
    if not (path / "checkpoints").is_dir() and not (path / "config.yaml").is_file():  # checked before torch loads
        raise EvalError(f"{path} is not a crate_lm checkpoint (needs config.yaml and weights) "
                        "nor a run folder (with checkpoints/)")  # fmt: skip
    return path


def _check_data_tokenizer(data: str | None, lm: Any, run: str) -> None:
    """Shards prepared with another tokenizer: their ids are other text to this model."""
    if data is None:
        return
    meta = Path(str(data)).expanduser() / "meta.json"
    if not meta.is_file():
        return
    try:
        found = json.loads(meta.read_text())["tokenizer"]
        theirs = str(found["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # TokenShards names what is wrong with it
    ours = lm.tokenizer.fingerprint
    if theirs != ours:
        raise EvalError(
            f"--data {data} was prepared with another tokenizer ({theirs}, {found.get('path')}) than {run} "
            f"was trained with ({ours}): its token ids mean other text to this model; pass shards prepared with "
            f"the run's tokenizer (tools/prepare_data.py --tokenizer {lm.path}/tokenizer) or a text file"
        )


def rank_and_world() -> tuple[int, int]:
    from crate_lm.interp.extract import rank_and_world as env_rank

    return env_rank()


def _process_group(world: int) -> bool:
    """Join the process group torchrun describes (gloo); True when this call created it."""
    import torch.distributed as dist

    if world == 1 or dist.is_initialized():
        return False
    dist.init_process_group("gloo")
    return True


def _trainer_state(folder: Path) -> dict:
    path = Path(folder) / "trainer_state.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _mlm_stream(lm: Any, rows: dict[int, Any]):
    """MLMStream (the trainer's validation masking, seed 0) over sequences by index."""
    from crate_lm.data.loader import MLMConfig, MLMStream, SampleStream

    class Rows(SampleStream):
        def get(self, g: int) -> dict[str, Any]:
            return {"input_ids": rows[g]}

        @property
        def samples_per_epoch(self) -> int:
            return len(rows)

    tok = lm.tokenizer
    cfg = MLMConfig(mask_id=tok.special_id("mask"), vocab_size=tok.vocab_size, special_ids=tok.all_special_ids,
                    mask_prob=lm.cfg.data.mlm_prob)  # fmt: skip
    return MLMStream(Rows(), cfg, seed=0)


def _batch_inputs(lm: Any, batch: list[tuple], reset: bool, device: Any) -> tuple[Any, Any, dict]:
    """(input ids, labels with -100 where unscored, extra model inputs) of a batch of sequences."""
    import numpy as np
    import torch

    from crate_lm.interp.extract import row_positions

    index = [b[0] for b in batch]
    tokens = np.stack([b[1] for b in batch]).astype(np.int64)
    doc = np.stack([b[2] for b in batch]).astype(np.int64)
    extra: dict[str, Any] = {}
    if lm.cfg.model.task == "masked":
        stream = _mlm_stream(lm, dict(zip(index, tokens)))
        samples = [stream.get(g) for g in index]
        inputs = np.stack([s["input_ids"] for s in samples])
        labels = np.stack([s["labels"] for s in samples])
        in_doc = doc
    else:
        inputs, labels = tokens[:, :-1], tokens[:, 1:].copy()
        in_doc = doc[:, :-1]
        if reset:
            labels[doc[:, 1:] != doc[:, :-1]] = IGNORE
    if reset:
        extra = {"position_ids": torch.from_numpy(row_positions(in_doc)).to(device),
                 "document_ids": torch.from_numpy(in_doc - in_doc[:, :1]).to(device)}  # fmt: skip
    as_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=torch.long)  # noqa: E731
    return as_tensor(inputs), as_tensor(labels), extra


def scored_bytes(tokenizer: Any, labels: Any) -> int:
    """UTF-8 bytes of the text each row's scored, non-special target tokens decode to."""
    special = set(tokenizer.all_special_ids)
    total = 0
    for row in labels:
        ids = [int(i) for i in row if i != IGNORE and int(i) not in special]
        if ids:
            total += len(tokenizer.decode(ids).encode("utf-8"))
    return total


def evaluate_loaded(
    lm: Any,
    data: str | None = None,
    *,
    split: str = "validation",
    tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    run: str | None = None,
) -> dict[str, Any]:
    """The figures of one loaded model (``crate_lm.checkpoint.load``) on held-out data, summed
    across the processes of a torchrun launch (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from crate_lm.interp.extract import open_sequences
    from crate_lm.model import param_count

    tokens = check_tokens(tokens)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EvalError(f"--batch_size must be a whole number >= 1, got {batch_size!r}")
    cfg = lm.cfg
    limit = cfg.model.max_seq_len
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= limit):
        raise EvalError(f"--seq_len must be a whole number in 2..{limit} (model.max_seq_len), got {seq_len!r}")
    context = seq_len or min(cfg.data.seq_len or limit, limit)
    causal = cfg.model.task == "causal"
    width = context + 1 if causal else context
    _check_data_tokenizer(data, lm, run or str(lm.path))
    budget = ALL if tokens is None else math.ceil(tokens / context) * width
    sequences = open_sequences(lm, data, split, width, budget)
    reset = bool(cfg.data.reset_at_documents) and sequences.kind == "shards"
    rank, world = rank_and_world()
    created = _process_group(world)
    device = lm.device
    totals = torch.zeros(5, dtype=torch.float64)  # nats, tokens, correct, bytes, sequences
    items = sequences.iter(rank, world)
    with torch.inference_mode():
        while batch := list(itertools.islice(items, batch_size)):
            inputs, labels, extra = _batch_inputs(lm, batch, reset, device)
            logits = lm.model(inputs, **extra).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                                  reduction="none")  # fmt: skip
            scored = labels.reshape(-1) != IGNORE
            totals[0] += nll.double().sum().cpu()
            totals[1] += int(scored.sum())
            totals[2] += int(((logits.argmax(-1).reshape(-1) == labels.reshape(-1)) & scored).sum())
            if causal:
                totals[3] += scored_bytes(lm.tokenizer, labels.cpu().numpy())
            totals[4] += len(batch)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
        if created:
            dist.barrier()
            dist.destroy_process_group()
    nats, count, correct, nbytes, nseq = totals.tolist()
    if count == 0:
        raise EvalError(f"no token of {sequences.path} could be scored; pass more data")
    loss = nats / count
    return {
        "run": run or str(lm.path),
        "checkpoint": str(lm.path),
        "step": _trainer_state(lm.path).get("step"),
        "arch": cfg.model.arch,
        "task": cfg.model.task,
        "params": param_count(cfg.model),
        "data": str(sequences.path),
        "data_kind": sequences.kind,
        "split": sequences.split,
        "seq_len": context,
        "sequences": int(nseq),
        "tokens": int(count),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nats / math.log(2) / nbytes if causal and nbytes > 0 else None,
        "bytes": int(nbytes) if causal else None,
        "accuracy": correct / count,
        "world_size": world,
    }


def evaluate(
    runs: list[str] | str,
    data: str | None = None,
    *,
    split: str = "validation",
    tokens: int | None = None,
    batch_size: int = 8,
    seq_len: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """``{"format": FORMAT, "runs": [row, ...]}``: each run (a run or checkpoint folder) on ``data``
    (default: each run's own data)."""
    from crate_lm.checkpoint import load
    from crate_lm.interp.extract import process_device

    runs = [runs] if isinstance(runs, str) else [str(r) for r in runs]
    if not runs:
        raise EvalError("give at least one run or checkpoint folder: crate-lm eval RUN [RUN ...]")
    check_tokens(tokens)
    paths = [require_run(r) for r in runs]
    if data is not None and not Path(str(data)).expanduser().exists():
        raise EvalError(f"--data {data}: no such file or folder; pass a prepared shards folder or a text file")
    _, world = rank_and_world()
    rows = []
    for run, path in zip(runs, paths):
        lm = load(path, device=process_device(device, world))
        rows.append(evaluate_loaded(lm, data, split=split, tokens=tokens, batch_size=batch_size, seq_len=seq_len,
                                    run=run))  # fmt: skip
    return {"format": FORMAT, "runs": rows}


def format_eval(result: dict[str, Any]) -> str:
    """One row per run: loss, perplexity, bits per byte, accuracy, tokens."""
    rows = result["runs"]
    name = max(12, *(len(r["run"]) for r in rows))
    lines = [f"{'run':<{name}} {'step':>6} {'task':>7} {'loss':>8} {'ppl':>10} {'bpb':>7} {'acc':>7} {'tokens':>10}"]
    for r in rows:
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "-"
        lines.append(f"{r['run']:<{name}} {r['step'] if r['step'] is not None else '-':>6} {r['task']:>7} "
                     f"{r['loss']:8.4f} {r['perplexity']:10.2f} {bpb:>7} {r['accuracy']:7.4f} {r['tokens']:>10,}")  # fmt: skip
    first = rows[0]
    where = f"{first['data']}" + (f" ({first['split']} split)" if first["split"] else "")
    lines.append(f"eval: {first['sequences']:,} sequences of {first['seq_len']} from {where}"
                 + (f", {first['world_size']} processes" if first["world_size"] > 1 else ""))  # fmt: skip
    return "\n".join(lines)


# ---- info -----------------------------------------------------------------------------------------


def _last_validation(run_folder: Path) -> dict | None:
    path = run_folder / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "val_loss" in record:
                last = record
    return last


def info(run: str) -> dict[str, Any]:
    """What a run or checkpoint folder holds: architecture, parameter counts, training progress,
    the last validation figures, the tokenizer and the weights file."""
    from crate_lm.checkpoint import check_model_folder, load_run_tokenizer, read_checkpoint_config, resolve_checkpoint
    from crate_lm.config import to_dict
    from crate_lm.model import flops_per_token, param_count

    path = require_run(run)
    folder = resolve_checkpoint(path)
    check_model_folder(folder)
    cfg = read_checkpoint_config(folder)
    state = _trainer_state(folder)
    run_folder = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    try:
        tok = load_run_tokenizer(folder, cfg)
        tokenizer = {"kind": tok.kind, "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
                     "path": str(tok.path), "specials": tok.specials}  # fmt: skip
    except CrateLMError as err:
        tokenizer = {"error": str(err), "fingerprint": state.get("tokenizer_fingerprint")}
    weights = _weights_info(folder)
    val = _last_validation(run_folder)
    return {
        "run": str(run),
        "checkpoint": str(folder),
        "model": to_dict(cfg.model),
        "params": param_count(cfg.model),
        "non_embedding_params": param_count(cfg.model, embeddings=False),
        "train_flops_per_token": flops_per_token(cfg.model),
        "training": {"step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
                     "consumed_samples": state.get("consumed_samples"), "world_size": state.get("world_size"),
                     "sound": state.get("sound"), "zero_stage": cfg.deepspeed.zero_stage,
                     "precision": cfg.deepspeed.precision},  # fmt: skip
        "validation": None if val is None else {k: v for k, v in val.items() if k == "step" or k.startswith("val_")},
        "tokenizer": tokenizer,
        "weights": weights,
    }


def _weights_info(folder: Path) -> dict[str, Any]:
    """Where the weights of a checkpoint folder are: consolidated or sharded safetensors (files,
    bytes, dtypes, what the metadata says they hold), or only DeepSpeed's partitioned files."""
    from safetensors import safe_open

    from crate_lm.checkpoint import CheckpointError, weight_files

    files = weight_files(folder)
    if not files:  # a ZeRO-3 checkpoint saved without a consolidated copy
        parts = sorted(folder.glob("*/*model_states.pt"))
        return {"file": str(parts[0].parent) if parts else str(folder), "files": [str(p) for p in parts],
                "bytes": sum(p.stat().st_size for p in parts), "dtype": None, "stored": "deepspeed",
                "tensor_dtypes": []}  # fmt: skip
    metadata: dict[str, str] = {}
    dtypes: set[str] = set()
    for weights in files:
        try:
            with safe_open(str(weights), "pt") as f:
                metadata = metadata or (f.metadata() or {})
                dtypes |= {SAFETENSORS_DTYPES.get(str(f.get_slice(k).get_dtype()), str(f.get_slice(k).get_dtype()))
                           for k in f.keys()}  # fmt: skip
        except Exception as err:  # safetensors raises its own error types for a bad file
            raise CheckpointError(f"{weights}: not a readable safetensors file ({err}); it is truncated or corrupt") from None
    return {"file": str(files[0]) if len(files) == 1 else str(folder), "files": [str(p) for p in files],
            "bytes": sum(p.stat().st_size for p in files), "dtype": metadata.get("crate_lm.dtype") or ",".join(sorted(dtypes)),
            "stored": metadata.get("crate_lm.weights"), "tensor_dtypes": sorted(dtypes)}  # fmt: skip


def format_info(result: dict[str, Any]) -> str:
    m, t, w, tok = result["model"], result["training"], result["weights"], result["tokenizer"]
    arch = f"{m['arch']}" + (f" (ista {m['ista']}, {m['ista_steps'] or ('1' if m['ista'] == 'crate' else '2')} steps)"
                             if m["arch"] == "crate" else "")  # fmt: skip
    lines = [
        f"checkpoint   {result['checkpoint']}",
        f"model        {arch}, {m['task']}: d={m['d_model']} L={m['n_layers']} K={m['n_heads']} "
        f"vocab={m['vocab_size']} context={m['max_seq_len']}",
        f"parameters   {result['params']:,} ({result['non_embedding_params']:,} without embeddings)",
        f"training     step {t['step']}, {t['tokens_seen'] or 0:,} tokens, {t['world_size']} process(es), "
        f"ZeRO-{t['zero_stage']} {t['precision']}" if t["step"] is not None else
        f"training     (no trainer_state.json: not a training checkpoint); ZeRO-{t['zero_stage']} {t['precision']}",
    ]
    val = result["validation"]
    if val:
        figures = ", ".join(f"{k.removeprefix('val_')} {v:.4g}" for k, v in val.items() if k != "step")
        lines.append(f"validation   step {val.get('step')}: {figures}")
    else:
        lines.append("validation   (no metrics.jsonl with validation records)")
    if "error" in tok:
        lines.append(f"tokenizer    fingerprint {tok['fingerprint']} (not found: {tok['error']})")
    else:
        lines.append(f"tokenizer    {tok['kind']}, vocab {tok['vocab_size']:,}, fingerprint {tok['fingerprint']}")
    if w["stored"] == "deepspeed":
        lines.append(f"weights      DeepSpeed's partitioned files in {w['file']} ({len(w['files'])} model-state files, "
                     f"{w['bytes'] / 2**20:.1f} MiB; crate-lm export writes safetensors)")  # fmt: skip
    else:
        shards = f", {len(w['files'])} shards" if len(w["files"]) > 1 else ""
        lines.append(f"weights      {w['file']} ({w['dtype']}{shards}, {w['bytes'] / 2**20:.1f} MiB)")
    return "\n".join(lines)
