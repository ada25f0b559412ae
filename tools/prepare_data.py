"""Turn a corpus into token shards (see README, "Data").

    python tools/prepare_data.py --builtin --out data/shakespeare/shards        # built-in corpus
    python tools/prepare_data.py --inputs 'corpus/**/*.jsonl' --tokenizer tok/ --out shards/ --num_proc 16
    python tools/prepare_data.py --dataset my_saved_dataset --tokenizer tok/tokenizer.json --out shards/

Multi-node: run one worker per node with --worker i --num_workers n (or --worker auto, which
reads SLURM_PROCID / SLURM_NTASKS, else RANK / WORLD_SIZE); each writes only its part and the
last one to finish writes meta.json. Running again over finished output does nothing.
With --builtin and no --tokenizer, a byte-level BPE of 8192 tokens is trained next to the shards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from crate_lm.data.errors import DataError
from crate_lm.data.prepare import prepare_corpus
from crate_lm.data.sources import add_source_arguments, iter_all_documents, source_spec_from_args
from crate_lm.data.tokenizer import load_tokenizer, train_tokenizer
from crate_lm.errors import run_cli


def resolve_worker(worker: str, num_workers: int | None) -> tuple[int, int]:
    if worker != "auto":
        return int(worker), num_workers or 1
    for rank_var, size_var in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, num_workers or 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="folder for the shards and meta.json")
    parser.add_argument("--tokenizer", help="tokenizer.json, .model, or a folder holding one")
    parser.add_argument("--val_fraction", type=float, default=0.01, help="share of documents held out for validation")
    parser.add_argument("--num_proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--worker", default="0", help="this worker's index, or 'auto'")
    parser.add_argument("--num_workers", type=int, help="how many workers (nodes) share the corpus")
    parser.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file (about)")
    parser.add_argument("--vocab_size", type=int, default=8192, help="with --builtin and no --tokenizer")
    args = parser.parse_args(argv)
    return run_cli(prepare, args)


def prepare(args: argparse.Namespace) -> None:
    """Prepare this worker's part of the corpus; user errors raise a CrateLMError."""
    spec = source_spec_from_args(args)
    tokenizer = args.tokenizer
    if tokenizer is None:
        if not args.builtin:
            raise DataError("--tokenizer is required (train one with tools/train_tokenizer.py)")
        tokenizer = Path(args.out).parent / "tokenizer"
        if not (tokenizer / "tokenizer.json").is_file():
            train_tokenizer(iter_all_documents(spec), tokenizer, vocab_size=args.vocab_size)
    load_tokenizer(tokenizer)  # a bad path fails here, before any work
    worker, num_workers = resolve_worker(args.worker, args.num_workers)
    prepare_corpus(
        spec,
        tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        num_proc=args.num_proc,
        worker=worker,
        num_workers=num_workers,
        shard_tokens=args.shard_tokens,
    )


if __name__ == "__main__":
    sys.exit(main())
