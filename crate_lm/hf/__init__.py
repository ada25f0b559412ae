"""Hugging Face interop: what ``crate-lm export --format hf`` adds to an exported folder.

``configuration_crate.py`` and ``modeling_crate.py`` in this package are templates copied
verbatim into the folder: they import only torch and transformers (the folder's user may not
have crate_lm), re-implement crate_lm/model/crate.py and gpt.py with the same parameter names,
and are registered through ``config.json``'s ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (``AutoModelForMaskedLM``
for BERT-style runs) gives crate_lm's logits. The tokenizer becomes ``tokenizer.json`` +
``tokenizer_config.json`` (``PreTrainedTokenizerFast``, loadable by ``AutoTokenizer``) with its
special tokens. Sentencepiece-kind tokenizers are copied as ``tokenizer.model`` only: transformers
has no tokenizer class that reproduces crate_lm's plain sentencepiece encoding (no BOS, no
prefix rules), so ``AutoTokenizer`` is not offered for them; use sentencepiece on that file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from crate_lm.checkpoint import architecture
from crate_lm.config import RunConfig
from crate_lm.fsutil import atomic_write_bytes, atomic_write_json

TEMPLATES = ("configuration_crate.py", "modeling_crate.py")
_ROLES = {"eod": "eos_token", "pad": "pad_token", "mask": "mask_token", "cls": "cls_token", "sep": "sep_token"}


def hf_config(cfg: RunConfig, dtype: torch.dtype = torch.float32) -> dict:
    """config.json: the architecture fields, auto_map to the copied modules, and the dtype."""
    model = cfg.model
    name = "CrateForCausalLM" if model.task == "causal" else "CrateForMaskedLM"
    auto = "AutoModelForCausalLM" if model.task == "causal" else "AutoModelForMaskedLM"
    fields = {k: v for k, v in architecture(model).items()}
    fields.update(attn_impl=model.attn_impl, init_std=model.init_std, dropout=0.0, attn_dropout=0.0)
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": [name],
        "model_type": "crate_lm",
        "auto_map": {"AutoConfig": "configuration_crate.CrateConfig", auto: f"modeling_crate.{name}"},
        **fields,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
    }


def write_hf_files(folder: str | Path, cfg: RunConfig, tokenizer, *, dtype: torch.dtype = torch.float32) -> None:
    """config.json, the two modules and the tokenizer files into ``folder`` (which holds the
    sharded weights and their index already)."""
    folder = Path(folder)
    here = Path(__file__).resolve().parent
    for name in TEMPLATES:
        shutil.copyfile(here / name, folder / name)
    config = hf_config(cfg, dtype)
    specials = {}
    if tokenizer.kind == "huggingface":
        atomic_write_bytes(folder / "tokenizer.json", tokenizer._data)
        for role, key in _ROLES.items():
            i = tokenizer.specials.get(role)
            if i is not None:
                specials[key] = tokenizer._hf.id_to_token(i)
        atomic_write_json(folder / "special_tokens_map.json", specials)
        atomic_write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.model.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **specials,
        })  # fmt: skip
    else:
        atomic_write_bytes(folder / "tokenizer.model", tokenizer._data)
    for role, key in (("eod", "eos_token_id"), ("pad", "pad_token_id")):
        if tokenizer.specials.get(role) is not None:
            config[key] = tokenizer.specials[role]
    atomic_write_bytes(folder / "config.json", (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


__all__ = ["TEMPLATES", "hf_config", "write_hf_files"]
