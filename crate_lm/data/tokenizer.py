"""Tokenizers: train a byte-level BPE (``tokenizers``) or a unigram / BPE model (``sentencepiece``),
and load either, or a file a user already has, as one uniform :class:`Tokenizer`.

Trained tokenizers reserve the special tokens every model here needs, at the lowest ids:
end-of-document, pad, mask, cls, sep (``SPECIAL_TOKENS``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from crate_lm.data.errors import DataError
from crate_lm.fsutil import atomic_write_bytes

SPECIAL_TOKENS = {
    "eod": "<|endoftext|>",
    "pad": "<|pad|>",
    "mask": "<|mask|>",
    "cls": "<|cls|>",
    "sep": "<|sep|>",
}
# Names other tokenizers use for the same roles, tried when loading a tokenizer we did not train.
_ALIASES = {
    "eod": ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]"],
    "pad": ["<|pad|>", "<pad>", "[PAD]"],
    "mask": ["<|mask|>", "<mask>", "[MASK]"],
    "cls": ["<|cls|>", "<s>", "[CLS]", "<bos>"],
    "sep": ["<|sep|>", "</s>", "[SEP]"],
}
KINDS = ("bpe", "unigram", "sp-bpe")


class Tokenizer:
    """Text <-> token ids, whichever library is underneath.

    ``fingerprint`` identifies the exact vocabulary and merges (a hash of the saved file); shards
    record it, so data and models can be checked against the tokenizer they were made with.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        self.path = path
        self.kind = "sentencepiece" if path.suffix == ".model" else "huggingface"
        data = path.read_bytes()
        self._data = data  # the exact bytes fingerprinted, for ``save``
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        if self.kind == "huggingface":
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_str(data.decode("utf-8"))
            except Exception as err:  # the library raises a bare Exception on bad JSON
                raise DataError(
                    f"{path}: not a valid tokenizers file ({err}); pass a tokenizer.json or .model"
                ) from None
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
            lookup = self._hf.token_to_id
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor()
            try:
                self._sp.LoadFromSerializedProto(data)
            except (RuntimeError, OSError) as err:
                raise DataError(f"{path}: not a valid sentencepiece model ({err})") from None
            self.vocab_size = self._sp.get_piece_size()
            unk = self._sp.unk_id()

            def lookup(piece: str) -> int | None:
                i = self._sp.piece_to_id(piece)
                return None if i == unk and piece != self._sp.id_to_piece(unk) else i

        self.specials: dict[str, int | None] = {}
        for role, names in _ALIASES.items():
            self.specials[role] = next((i for i in map(lookup, names) if i is not None), None)
        if self.kind == "sentencepiece" and self.specials["eod"] is None and self._sp.eos_id() >= 0:
            self.specials["eod"] = self._sp.eos_id()

    # ---- ids of the special roles -------------------------------------------------------
    def special_id(self, role: str) -> int:
        """The id of a special role; a clear error when this tokenizer lacks it."""
        i = self.specials.get(role)
        if i is None:
            raise DataError(
                f"tokenizer {self.path} has no {role} token ({' / '.join(_ALIASES[role])}); "
                "train one with tools/train_tokenizer.py, which reserves all special tokens"
            )
        return i

    @property
    def eod_id(self) -> int:
        return self.special_id("eod")

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({i for i in self.specials.values() if i is not None})

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.kind == "huggingface":
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "huggingface":
            return [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        return self._sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "huggingface":
            return self._hf.decode(ids, skip_special_tokens=False)
        # sentencepiece renders control symbols as "": spell the special tokens out, as tokenizers does
        specials = set(self.all_special_ids)
        parts, run = [], []
        for i in ids:
            if i in specials:
                parts += [self._sp.decode(run), self._sp.id_to_piece(i)]
                run = []
            else:
                run.append(i)
        return "".join(parts + [self._sp.decode(run)])

    # ---- files ------------------------------------------------------------------------------
    @property
    def filename(self) -> str:
        """The name ``load_tokenizer`` looks for in a folder: tokenizer.json or tokenizer.model."""
        return "tokenizer.json" if self.kind == "huggingface" else "tokenizer.model"

    def save(self, folder: str | Path) -> Path:
        """Write this tokenizer into ``folder`` (created) so that ``load_tokenizer(folder)`` gives it
        back with the same fingerprint: the exact bytes it was loaded from, as ``filename`` (the
        special tokens live in that file), plus ``tokenizer_info.json`` describing it. Returns the
        tokenizer file's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self.filename
        atomic_write_bytes(target, self._data)
        info = {**self.describe(), "path": self.filename, "copied_from": str(self.path)}
        atomic_write_bytes(folder / "tokenizer_info.json", json.dumps(info, indent=2).encode())
        return target

    def describe(self) -> dict:
        """What shards and checkpoints record about the tokenizer."""
        return {
            "fingerprint": self.fingerprint,
            "path": str(self.path),
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "specials": self.specials,
        }

    def __repr__(self) -> str:
        return f"Tokenizer({self.path}, kind={self.kind}, vocab={self.vocab_size}, fingerprint={self.fingerprint})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` (tokenizers), a ``.model`` (sentencepiece), or a directory holding one."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return Tokenizer(path / name)
        models = sorted(path.glob("*.model"))
        if models:
            return Tokenizer(models[0])
        raise DataError(f"no tokenizer.json or .model file in {path}; train one with tools/train_tokenizer.py")
    if not path.is_file():
        raise DataError(f"tokenizer not found: {path}; train one with tools/train_tokenizer.py or fix the path")
    if path.suffix not in (".json", ".model"):
        raise DataError(f"{path}: expected a tokenizer.json (tokenizers) or a .model (sentencepiece) file")
    return Tokenizer(path)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    *,
    kind: str = "bpe",
    vocab_size: int = 8192,
    min_frequency: int = 2,
) -> Tokenizer:
    """Train a tokenizer on an iterable of documents and save it into ``out_dir``.

    ``bpe``: byte-level BPE with ``tokenizers`` (every byte sequence encodable) -> tokenizer.json.
    ``unigram`` / ``sp-bpe``: ``sentencepiece`` with byte fallback and identity normalisation (so
    decoding gives back the exact text) -> tokenizer.model.
    """
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer kind '{kind}'; choose one of {', '.join(KINDS)}")
    if vocab_size < 300:
        raise DataError(f"vocab_size {vocab_size} is too small: byte-level models need at least 300")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counted = _Counted(texts)
    if kind == "bpe":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS.values()),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=True,
        )
        tok.train_from_iterator(counted, trainer)
        tok.encode_special_tokens = True  # a literal "<|endoftext|>" in text stays text, never an id
        if counted.n == 0:
            raise DataError("the tokenizer corpus is empty: no documents were read")
        target = out_dir / "tokenizer.json"
        atomic_write_bytes(target, tok.to_str(pretty=False).encode("utf-8"))
    else:
        import sentencepiece as spm

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_lines(counted),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="unigram" if kind == "unigram" else "bpe",
                control_symbols=list(SPECIAL_TOKENS.values()),  # never produced from text
                unk_id=0,
                bos_id=-1,
                eos_id=-1,
                pad_id=-1,
                byte_fallback=True,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                split_digits=True,
                hard_vocab_limit=False,
                input_sentence_size=5_000_000,
                shuffle_input_sentence=True,
                max_sentence_length=16384,
                minloglevel=2,
            )
        except RuntimeError as err:
            if counted.n == 0 or "sentences_.empty()" in str(err):
                raise DataError("the tokenizer corpus is empty: no documents were read") from None
            raise DataError(f"sentencepiece training failed: {str(err).splitlines()[-1]}") from None
        target = out_dir / "tokenizer.model"
        atomic_write_bytes(target, model.getvalue())
    tokenizer = Tokenizer(target)
    atomic_write_bytes(
        out_dir / "tokenizer_info.json",
        json.dumps({**tokenizer.describe(), "trained_on_documents": counted.n}, indent=2).encode(),
    )
    print(f"tokenizer: trained {kind} with {tokenizer.vocab_size} tokens on {counted.n} documents -> {target}")
    return tokenizer


class _Counted:
    """Iterate texts once, counting them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self._texts = texts
        self.n = 0

    def __iter__(self) -> Iterator[str]:
        for text in self._texts:
            if text.strip():
                self.n += 1
                yield text


def _lines(texts: Iterable[str]) -> Iterator[str]:
    """sentencepiece trains on sentences: feed each non-empty line of each document."""
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line
