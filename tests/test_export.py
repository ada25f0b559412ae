"""Export (sharded safetensors + index, Hugging Face folder, from ZeRO-3 files offline), loading
from the meta device with memory-mapped weights, and ZeRO-3's partitioned construction.

Checkpoints are written by hand (tests/data_fixtures.write_checkpoint) except the ZeRO-3 ones,
which come from a real 2-rank run (gloo, CPU)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from crate_lm.checkpoint import INDEX, load, load_model
from crate_lm.config import RunConfig
from crate_lm.errors import run_cli
from crate_lm.export import export, parse_size
from crate_lm.model import build_model
from tests.conftest import small_config
from tests.data_fixtures import make_documents, write_checkpoint
from tests.test_train import corpus, env, free_port, pretrain  # noqa: F401

pytest_plugins = ["tests.data_fixtures"]
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [dict(ista="alpha"), dict(ista="overcomplete"), dict(ista="crate"), dict(arch="gpt"),
            dict(task="masked")]  # fmt: skip


def checkpoint(tmp_path: Path, tokenizer, name: str = "ckpt", **overrides) -> tuple[Path, torch.nn.Module]:
    cfg = RunConfig(model=small_config(vocab_size=tokenizer.vocab_size, **overrides))
    model = build_model(cfg.model).eval()
    return write_checkpoint(tmp_path / name / "step_00000001", cfg, model, tokenizer=tokenizer), model


def ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_export_round_trip_is_bit_exact(overrides, tmp_path, bpe_tokenizer):
    folder, model = checkpoint(tmp_path, bpe_tokenizer, **overrides)
    x = ids(bpe_tokenizer.vocab_size)
    out = export(folder, tmp_path / "fp32", max_shard_size="20KB")
    assert out["files"] > 1 and not list(tmp_path.glob(".fp32*"))
    lm = load(tmp_path / "fp32")
    assert torch.equal(lm.model(x).logits, model(x).logits)
    assert lm.tokenizer.fingerprint == bpe_tokenizer.fingerprint
    export(folder, tmp_path / "bf16", dtype="bf16")
    half = load(tmp_path / "bf16")
    assert half.model.tok_emb.weight.dtype == torch.bfloat16
    assert torch.equal(half.model(x).logits, model.to(torch.bfloat16)(x).logits)


def test_sharded_index(tmp_path, bpe_tokenizer):
    folder, model = checkpoint(tmp_path, bpe_tokenizer)
    limit = parse_size("30KB")
    export(folder, tmp_path / "out", max_shard_size="30KB")
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == files
    seen, total = {}, 0
    for name in files:
        with safe_open(str(tmp_path / "out" / name), framework="pt") as f:
            assert f.metadata()["crate_lm.model"]
            size = 0
            for key in f.keys():
                assert key not in seen, f"{key} in two files"
                seen[key] = name
                tensor = f.get_tensor(key)
                size += tensor.numel() * tensor.element_size()
                assert torch.equal(tensor, model.state_dict()[key])
            largest = max(f.get_tensor(k).numel() * 4 for k in f.keys())
            assert size <= limit or len(list(f.keys())) == 1 and largest > limit
            total += size
    assert seen == index["weight_map"] and set(seen) == set(model.state_dict())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("overrides", [dict(), dict(task="masked")], ids=["causal", "masked"])
def test_meta_mmap_load_equals_the_old_load(overrides, tmp_path, bpe_tokenizer):
    folder, _ = checkpoint(tmp_path, bpe_tokenizer, **overrides)
    from safetensors.torch import load_file

    model, cfg = load_model(folder)
    old = build_model(cfg.model)  # what load did before: build (with init), then copy the weights in
    old.load_state_dict(load_file(str(folder / "model.safetensors")))
    old.eval()
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    x = ids(bpe_tokenizer.vocab_size)
    assert torch.equal(model(x).logits, old(x).logits)
    assert set(model.state_dict()) == set(old.state_dict())


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from crate_lm import cli as module

    monkeypatch.setattr(sys, "argv", ["crate-lm", *args])
    code = run_cli(module._fire)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_export_and_bad_input(tmp_path, bpe_tokenizer, monkeypatch, capsys):
    folder, _ = checkpoint(tmp_path, bpe_tokenizer)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(folder, tmp_path / "run" / "checkpoints" / folder.name)
    run = str(tmp_path / "run")
    out = str(tmp_path / "out")
    code, stdout, _ = cli(monkeypatch, capsys, "export", run, "--out", out, "--max_shard_size", "50KB")
    assert code == 0 and "export:" in stdout and (tmp_path / "out" / INDEX).is_file()
    before = (tmp_path / "out" / INDEX).read_text()
    cases = [
        (["export", run, "--out", out], "exists; pass --overwrite"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")], "no such run"),
        (["export", run, "--out", str(tmp_path / "o3"), "--max_shard_size", "2XB"], "--max_shard_size"),
        (["export", run, "--out", str(tmp_path / "o4"), "--dtype", "int8"], "--dtype"),
        (["export", run, "--out", str(tmp_path / "o5"), "--format", "onnx"], "--format"),
    ]
    for args, needle in cases:
        code, stdout, stderr = cli(monkeypatch, capsys, *args)
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, stderr)
    assert (tmp_path / "out" / INDEX).read_text() == before
    assert not any((tmp_path / f"o{k}").exists() for k in range(2, 6))
    code, _, _ = cli(monkeypatch, capsys, "export", run, "--out", out, "--overwrite", "--dtype", "bf16")
    assert code == 0 and load(out).model.tok_emb.weight.dtype == torch.bfloat16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ---- Hugging Face ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [dict(), dict(arch="gpt"), dict(ista="crate"), dict(task="masked")],
                         ids=["crate", "gpt", "crate-ista", "masked"])  # fmt: skip
def test_hf_export_reloads_with_transformers(overrides, tmp_path, bpe_tokenizer, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers adds its modules folder
    folder, model = checkpoint(tmp_path, bpe_tokenizer, **overrides)
    out = tmp_path / "hf"
    export(folder, out, fmt="hf", max_shard_size="40KB")
    config = json.loads((out / "config.json").read_text())
    for name in ("modeling_crate.py", "configuration_crate.py"):
        source = (out / name).read_text()
        assert "import crate_lm" not in source and "from crate_lm" not in source
    auto = transformers.AutoModelForCausalLM if model.causal else transformers.AutoModelForMaskedLM
    assert any(k == auto.__name__ for k in config["auto_map"])
    hf = auto.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    x = ids(bpe_tokenizer.vocab_size)
    mask = torch.ones_like(x)
    mask[1, 15:] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            ours, theirs = model(x, **kwargs).logits, hf(x, **kwargs).logits
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    for text in make_documents(5, seed=4) + ["Café by the old bridge, 東京 at night! 🎉"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == bpe_tokenizer.encode(text)
        assert tok.decode(bpe_tokenizer.encode(text)) == bpe_tokenizer.decode(bpe_tokenizer.encode(text))
    assert tok.convert_tokens_to_ids(tok.eos_token) == bpe_tokenizer.eod_id


# ---- ZeRO-3 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero3_run(corpus, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("zero3") / "run"
    pretrain(corpus, out, "--deepspeed.zero_stage", "3", nproc=2)
    return out


def test_zero3_checkpoints_skip_the_consolidated_copy_and_export_offline(zero3_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = zero3_run / "checkpoints" / "step_00000006"
    assert (folder / "COMPLETE").is_file() and not (folder / "model.safetensors").exists()
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["weights_finite"] is True and state["sound"] is True and state["max_abs_weight"] > 0
    reference = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    reference = {k: v.contiguous() for k, v in reference.items()}
    # offline: no process group, no GPU, in a fresh process that never imports deepspeed's engine
    out = tmp_path / "export"
    code = ("import sys; from crate_lm.export import export; "
            f"print(export({str(zero3_run)!r}, {str(out)!r}, max_shard_size='30KB'))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env={**env(), "CUDA_VISIBLE_DEVICES": ""}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((out / INDEX).read_text())
    assert set(index["weight_map"]) == set(reference) and len(set(index["weight_map"].values())) > 1
    lm = load(out)
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    direct = load(zero3_run)  # load reads DeepSpeed's files when there is no model.safetensors
    x = ids(lm.cfg.model.vocab_size)
    assert torch.equal(direct.model(x).logits, lm.model(x).logits)
    model = build_model(lm.cfg.model)
    model.load_state_dict(reference)
    assert torch.equal(model.eval()(x).logits, lm.model(x).logits)


ZERO_INIT_SCRIPT = """
import json, os, sys
import torch
from crate_lm.config import RunConfig, run_config_from_dict
from crate_lm.model import build_model
from crate_lm.train.engine import construct_model, setup_distributed
import deepspeed, torch.distributed as dist

setup_distributed()
cfg = run_config_from_dict({"model": json.loads(sys.argv[1]), "deepspeed": {"zero_stage": 3, "zero_init": True},
                            "train": {"micro_batch": 1, "global_batch": 2}})
torch.manual_seed(7)
model = construct_model(cfg, dist.get_world_size())
mine = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
torch.manual_seed(7)
whole = build_model(cfg.model)
total = sum(p.numel() * p.element_size() for p in whole.parameters())
same = True
for (name, p), (_, q) in zip(model.named_parameters(), whole.named_parameters()):
    with deepspeed.zero.GatheredParameters([p]):
        same = same and torch.equal(p.data, q.data)
out = {"rank": dist.get_rank(), "mine": mine, "total": total, "same": same}
open(os.path.join(sys.argv[2], f"rank{dist.get_rank()}.json"), "w").write(json.dumps(out))
dist.barrier()
dist.destroy_process_group()
"""


def test_zero3_construction_is_partitioned_and_equals_the_whole_build(tmp_path):
    script = tmp_path / "zero_init.py"
    script.write_text(ZERO_INIT_SCRIPT)
    model = {"vocab_size": 101, "max_seq_len": 32, "d_model": 64, "n_layers": 2, "n_heads": 4}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), json.dumps(model), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env={**env(), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=180)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)
               if (tmp_path / f"rank{r}.json").is_file()]  # fmt: skip
    assert len(results) == 2, proc.stderr[-3000:]
    for r in results:
        assert r["same"], "the partitioned build's weights differ from the whole build's"
        assert abs(r["mine"] - r["total"] / 2) <= 0.01 * r["total"], r  # half, up to per-tensor padding
