"""The data path: text -> tokenizer -> token shards -> packed, ordered, per-rank batches."""

from crate_lm.data.errors import DataError
from crate_lm.data.loader import (
    BlendedStream,
    MLMConfig,
    MLMStream,
    PackedTokenDataset,
    PermutedOrder,
    RankSampler,
    SampleStream,
    ShuffledStream,
    make_loader,
    mask_tokens,
)
from crate_lm.data.prepare import prepare_corpus
from crate_lm.data.shards import TokenShards, read_meta
from crate_lm.data.sources import SourceSpec, builtin_corpus
from crate_lm.data.tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "SPECIAL_TOKENS",
    "BlendedStream",
    "DataError",
    "MLMConfig",
    "MLMStream",
    "PackedTokenDataset",
    "PermutedOrder",
    "RankSampler",
    "SampleStream",
    "ShuffledStream",
    "SourceSpec",
    "TokenShards",
    "Tokenizer",
    "builtin_corpus",
    "load_tokenizer",
    "make_loader",
    "mask_tokens",
    "prepare_corpus",
    "read_meta",
    "train_tokenizer",
]
