"""Train a tokenizer that reserves the special tokens crate_lm's models need.

    python tools/train_tokenizer.py --builtin --out data/shakespeare/tokenizer --vocab_size 8192
    python tools/train_tokenizer.py --inputs corpus/ --kind unigram --vocab_size 32000 --out tok/
    python tools/train_tokenizer.py --dataset my_dataset_dir --text_field content --out tok/

Kinds: bpe (byte-level BPE, tokenizers -> tokenizer.json), unigram and sp-bpe (sentencepiece
with byte fallback -> tokenizer.model). Special tokens: <|endoftext|> <|pad|> <|mask|> <|cls|> <|sep|>.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from crate_lm.data.sources import add_source_arguments, iter_all_documents, source_spec_from_args
from crate_lm.data.tokenizer import KINDS, train_tokenizer
from crate_lm.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--out", required=True, help="folder to write the tokenizer into")
    parser.add_argument("--kind", choices=KINDS, default="bpe")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--min_frequency", type=int, default=2, help="bpe: merges seen fewer times are not learned")
    parser.add_argument("--max_documents", type=int, help="train on at most this many documents")
    args = parser.parse_args(argv)
    return run_cli(train, args)


def train(args: argparse.Namespace) -> None:
    """Train and save the tokenizer; user errors raise a CrateLMError."""
    docs = iter_all_documents(source_spec_from_args(args))
    if args.max_documents:
        docs = itertools.islice(docs, args.max_documents)
    train_tokenizer(docs, args.out, kind=args.kind, vocab_size=args.vocab_size, min_frequency=args.min_frequency)


if __name__ == "__main__":
    sys.exit(main())
