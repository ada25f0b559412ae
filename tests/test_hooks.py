"""Hook points, run_with_cache / run_with_hooks and ActivationCache (TransformerLens conventions)."""

import math

import pytest
import torch
import torch.nn.functional as F

from crate_lm.model import ActivationCache, HookPoint, build_model, generate
from crate_lm.model.attention import build_attention_mask
from tests.conftest import VARIANTS, small_config

TASKS = ["causal", "masked"]
B, T = 2, 10


def make(arch, ista, task="causal", **overrides):
    return build_model(small_config(arch=arch, ista=ista, task=task, **overrides)).eval()


def tokens(b=B, t=T):
    return torch.randint(0, 97, (b, t))


def expected_names(arch, n_layers=2):
    per_block = ["hook_resid_pre"]
    if arch == "crate":
        per_block += ["attn.hook_q", "attn.hook_pattern", "attn.hook_out", "hook_resid_mid"]
        per_block += ["ista.hook_code", "ista.hook_out"]
    else:
        per_block += ["attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern", "attn.hook_out"]
        per_block += ["hook_resid_mid", "mlp.hook_post", "mlp.hook_out"]
    per_block += ["hook_resid_post"]
    names = ["hook_embed"] + [f"blocks.{i}.{s}" for i in range(n_layers) for s in per_block]
    return names + ["hook_final", "hook_logits"]


def hook_counts(model):
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) for name, m in model.hook_dict.items()}


def head(model, h):
    return F.linear(h, model.tok_emb.weight) if model.causal else model.mlm_head(h, model.tok_emb.weight)


# ------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_hook_names_are_the_listed_set_in_forward_order(arch, ista, task):
    model = make(arch, ista, task)
    assert model.hook_names() == expected_names(arch)
    fired = []
    model.run_with_hooks(tokens(), fwd_hooks=[(lambda name: True, lambda act, hook: fired.append(hook.name))])
    assert fired == model.hook_names()  # registration order is forward order
    for name, point in model.hook_dict.items():
        assert point.name == name and model.get_submodule(name) is point
        assert point.layer() == (int(name.split(".")[1]) if name.startswith("blocks.") else None)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_shapes_and_the_stream_adds_up(arch, ista, task):
    model = make(arch, ista, task)
    cfg = model.config
    out, cache = model.run_with_cache(tokens())
    assert list(cache) == model.hook_names()
    k, p, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    assert cache["q", 0].shape == (B, k, T, p)
    assert cache["pattern", 1].shape == (B, k, T, T)
    assert cache["logits"].shape == (B, T, cfg.vocab_size)
    torch.testing.assert_close(cache["logits"], out.logits, rtol=0, atol=0)
    torch.testing.assert_close(cache["embed"], cache["resid_pre", 0], rtol=0, atol=0)
    torch.testing.assert_close(cache["resid_post", 0], cache["resid_pre", 1], rtol=0, atol=0)
    torch.testing.assert_close(model.ln_f(cache["resid_post", 1]), cache["final"], rtol=0, atol=1e-6)
    for i in range(cfg.n_layers):
        mid, post = cache["resid_mid", i], cache["resid_post", i]
        torch.testing.assert_close(mid, cache["resid_pre", i] + cache["attn_out", i], rtol=0, atol=1e-6)
        if arch == "gpt":
            assert cache["post", i].shape == (B, T, cfg.mlp_mult * d)
            assert cache["k", i].shape == cache["v", i].shape == (B, k, T, p)
            torch.testing.assert_close(post, mid + cache["mlp_out", i], rtol=0, atol=1e-6)
            continue
        assert cache["code", i].shape == (B, T, cfg.dict_width)
        assert (cache["code", i] >= 0).all()
        if ista == "alpha":
            torch.testing.assert_close(post, mid + cache["ista_out", i], rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(post, cache["ista_out", i], rtol=0, atol=0)
        if ista == "crate":
            torch.testing.assert_close(cache["code", i], post, rtol=0, atol=0)


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_names_filter_forms_keep_exactly_those(arch, ista):
    model = make(arch, ista)
    x = tokens()
    names = model.hook_names()
    _, everything = model.run_with_cache(x)
    assert list(everything) == names
    one = "blocks.1.hook_resid_mid"
    _, cache = model.run_with_cache(x, names_filter=one)
    assert list(cache) == [one]
    some = ["hook_logits", "blocks.0.attn.hook_q", "blocks.1.hook_resid_post"]
    _, cache = model.run_with_cache(x, names_filter=some)
    assert set(cache) == set(some) and len(cache) == 3
    _, cache = model.run_with_cache(x, names_filter=lambda name: name.endswith("hook_resid_pre"))
    assert list(cache) == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    for name in cache:
        torch.testing.assert_close(cache[name], everything[name], rtol=0, atol=1e-6)  # SDPA vs explicit path
    assert not cache[name].requires_grad
    assert sum(hook_counts(model).values()) == 0


def test_run_with_cache_is_no_grad_unless_asked_and_moves_tensors():
    model = make("crate", "alpha")
    out, cache = model.run_with_cache(tokens(), names_filter="blocks.0.ista.hook_code")
    assert not out.logits.requires_grad
    out, cache = model.run_with_cache(tokens(), names_filter="blocks.0.ista.hook_code", grad=True)
    assert out.logits.requires_grad and not cache["code", 0].requires_grad
    _, cache = model.run_with_cache(tokens(), names_filter="blocks.0.ista.hook_code", device="meta")
    assert cache["code", 0].device.type == "meta"
    _, cache = model.run_with_cache(tokens(1), remove_batch_dim=True)
    assert cache["code", 1].shape == (T, model.config.dict_width)
    with pytest.raises(ValueError, match="batch size 1"):
        model.run_with_cache(tokens(2), names_filter="hook_embed", remove_batch_dim=True)


# ------------------------------------------------------------------------------------------
# stop_at_layer
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_stop_at_layer_returns_the_residual_and_runs_nothing_later(arch, ista, task):
    model = make(arch, ista, task, n_layers=3)
    x = tokens()
    _, full = model.run_with_cache(x)
    for k in range(4):
        later = [n for n in model.hook_names() if not n.startswith(tuple(f"blocks.{i}." for i in range(k)))]
        later.remove("hook_embed")
        fired = []
        with model.hooks(
            fwd_hooks=[(lambda n, later=later: n in later, lambda a, h, fired=fired: fired.append(h.name))]
        ):
            out, cache = model.run_with_cache(x, names_filter=lambda n: True, stop_at_layer=k)
        assert fired == [] and not set(cache) & set(later)
        expected = full["embed"] if k == 0 else full["resid_post", k - 1]
        assert out.shape == (B, T, model.config.d_model)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # SAELens' call: one hook, stop right after its block (compared with a run on the SDPA path)
    _, plain = model.run_with_cache(x, names_filter=lambda n: "pattern" not in n)
    out, cache = model.run_with_cache(x, names_filter=["blocks.1.hook_resid_mid"], stop_at_layer=2)
    assert list(cache) == ["blocks.1.hook_resid_mid"]
    torch.testing.assert_close(cache["resid_mid", 1], plain["resid_mid", 1], rtol=0, atol=0)
    torch.testing.assert_close(out, plain["resid_post", 1], rtol=0, atol=0)
    out, _ = model.run_with_cache(x, names_filter=[], stop_at_layer=-1)
    torch.testing.assert_close(out, plain["resid_post", 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model.run_with_cache(x, stop_at_layer=4)
    assert sum(hook_counts(model).values()) == 0


def test_stop_at_layer_sees_edits_made_by_hooks():
    model = make("crate", "alpha")
    out = model.run_with_hooks(
        tokens(), fwd_hooks=[("blocks.0.hook_resid_post", lambda a, h: torch.ones_like(a))], stop_at_layer=1
    )
    assert torch.equal(out, torch.ones_like(out))


# ------------------------------------------------------------------------------------------
# attention pattern
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_pattern_is_the_masked_softmax_and_does_not_change_logits(arch, ista, task):
    model = make(arch, ista, task)
    x = tokens()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, -3:] = 0
    kwargs = {} if task == "causal" else {"attention_mask": mask}
    plain = model(x, **kwargs).logits
    out, cache = model.run_with_cache(x, **kwargs)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)
    p = model.config.head_dim
    for i in range(model.config.n_layers):
        q = cache["q", i]
        k = q if arch == "crate" else cache["k", i]  # CRATE: q = k = v
        scores = q @ k.transpose(-2, -1) / math.sqrt(p)
        allowed = build_attention_mask(causal=model.causal, q_len=T, k_len=T, **kwargs).mask
        if allowed is None:
            allowed = torch.ones(T, T, dtype=torch.bool).tril()
        expected = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        pattern = cache["pattern", i]
        torch.testing.assert_close(pattern, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(B, model.config.n_heads, T), rtol=0, atol=1e-5)
        if task == "causal":
            assert (pattern.triu(1) == 0).all()
        else:
            assert (pattern[1, :, :, -3:] == 0).all()


@pytest.mark.parametrize("arch,ista", [("crate", "alpha"), ("gpt", "alpha")])
def test_pattern_is_computed_only_when_hooked(arch, ista, monkeypatch):
    import crate_lm.model.attention as attention_module

    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    real = attention_module.attention_pattern
    monkeypatch.setattr(attention_module, "attention_pattern", counting)
    model = make(arch, ista)
    model.run_with_cache(tokens(), names_filter=lambda n: "pattern" not in n)
    assert calls == []
    model.run_with_cache(tokens(), names_filter="blocks.1.attn.hook_pattern")
    assert calls == [1]  # that layer only


# ------------------------------------------------------------------------------------------
# editing hooks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_replacing_hooks_change_the_output(arch, ista, task):
    model = make(arch, ista, task)
    x = tokens()
    clean, full = model.run_with_cache(x)
    point = "blocks.0.ista.hook_code" if arch == "crate" else "blocks.0.mlp.hook_post"
    atom = int(full[point].flatten(0, 1).gt(0).sum(0).argmax())  # the unit active on most tokens
    seen = []

    def zero_atom(act, hook):
        seen.append((hook.name, hook.layer()))
        act = act.clone()
        act[..., atom] = 0
        return act

    with model.hooks(fwd_hooks=[(point, zero_atom)]):
        patched, cache = model.run_with_cache(x, names_filter=[point, "hook_logits"])
    assert seen == [(point, 0)]
    assert (cache[point][..., atom] == 0).all() and (full[point][..., atom] != 0).any()
    assert (patched.logits - clean.logits).abs().max() > 1e-5
    torch.testing.assert_close(cache["logits"], patched.logits, rtol=0, atol=0)

    # zeroing the residual after block 0 equals running block 1 on zeros
    zeroed = model.run_with_hooks(x, fwd_hooks=[("blocks.0.hook_resid_post", lambda a, h: torch.zeros_like(a))])
    mask = build_attention_mask(causal=model.causal, q_len=T, k_len=T)
    with torch.no_grad():
        z = model.blocks[1](torch.zeros(B, T, model.config.d_model), mask)
        expected = head(model, model.ln_f(z))
    torch.testing.assert_close(zeroed.logits, expected, rtol=0, atol=1e-5)
    # returning None keeps the activation
    kept = model.run_with_hooks(x, fwd_hooks=[(lambda n: True, lambda a, h: None)])
    torch.testing.assert_close(kept.logits, clean.logits, rtol=0, atol=1e-5)


def test_hooks_are_removed_after_runs_and_errors_but_outside_hooks_stay():
    model = make("crate", "alpha")
    x = tokens()
    clean = model(x).logits
    outside = []
    handle = model.blocks[1].ista.hook_code.register_forward_hook(lambda m, i, o: outside.append(1))
    before = hook_counts(model)
    model.run_with_hooks(x, fwd_hooks=[("blocks.1.ista.hook_code", lambda a, h: a * 0)])
    assert hook_counts(model) == before

    def boom(act, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        model.run_with_hooks(x, fwd_hooks=[("hook_embed", lambda a, h: a * 2), ("blocks.0.hook_resid_mid", boom)])
    assert hook_counts(model) == before
    with (
        pytest.raises(RuntimeError, match="inside a hook"),
        model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", boom)]),
    ):
        model.run_with_cache(x, names_filter=["blocks.0.hook_resid_mid", "blocks.1.attn.hook_pattern"])
    assert hook_counts(model) == before
    torch.testing.assert_close(model(x).logits, clean, rtol=0, atol=1e-6)
    n = len(outside)
    model(x)
    assert len(outside) == n + 1  # the outside hook still fires
    handle.remove()
    assert sum(hook_counts(model).values()) == 0


def test_context_manager_adds_and_removes_only_its_own_hooks():
    model = make("gpt", "alpha")
    x = tokens()
    clean = model(x).logits
    outside = model.hook_final.register_forward_hook(lambda m, i, o: None)
    kill = ("blocks.1.hook_resid_post", lambda a, h: torch.zeros_like(a))
    with model.hooks(fwd_hooks=[kill]) as hooked:
        assert hooked is model
        inside = model(x).logits
        with model.hooks(fwd_hooks=[("hook_logits", lambda a, h: a + 1)]):
            torch.testing.assert_close(model(x).logits, inside + 1, rtol=0, atol=0)
        torch.testing.assert_close(model(x).logits, inside, rtol=0, atol=0)
    assert (inside - clean).abs().max() > 1e-4
    torch.testing.assert_close(model(x).logits, clean, rtol=0, atol=0)
    with pytest.raises(KeyError), model.hooks(fwd_hooks=[kill]):
        raise KeyError("in the body")
    torch.testing.assert_close(model(x).logits, clean, rtol=0, atol=0)
    # reset_hooks_end=False keeps them until reset_hooks(), which leaves outside hooks alone
    model.run_with_hooks(x, fwd_hooks=[kill], reset_hooks_end=False)
    torch.testing.assert_close(model(x).logits, inside, rtol=0, atol=0)
    model.reset_hooks()
    torch.testing.assert_close(model(x).logits, clean, rtol=0, atol=0)
    assert list(model.hook_final._forward_hooks) == [outside.id]
    outside.remove()


def test_backward_hooks_see_the_gradient():
    model = make("crate", "overcomplete")
    grads = []
    out = model.run_with_hooks(
        tokens(), tokens(), bwd_hooks=[("blocks.0.ista.hook_code", lambda g, h: grads.append(g))]
    )
    out.loss.backward()
    assert len(grads) == 1 and grads[0].shape == (B, T, model.config.dict_width)
    assert sum(hook_counts(model).values()) == 0


# ------------------------------------------------------------------------------------------
# ActivationCache
# ------------------------------------------------------------------------------------------


def test_cache_shorthand_stack_and_to():
    model = make("crate", "alpha", n_layers=3)
    _, cache = model.run_with_cache(tokens())
    assert isinstance(cache, ActivationCache)
    assert cache["code", 2] is cache["blocks.2.ista.hook_code"]
    assert cache["resid_post", 0] is cache["blocks.0.hook_resid_post"]
    assert cache["pattern", 1] is cache["blocks.1.attn.hook_pattern"]
    assert cache["q", 0] is cache["blocks.0.attn.hook_q"]
    assert cache["embed"] is cache["hook_embed"] and cache["logits"] is cache["hook_logits"]
    assert cache["code", -1] is cache["code", 2]
    assert cache["ista.hook_code", 1] is cache["code", 1]
    assert "blocks.0.ista.hook_code" in cache and ("code", 0) in cache and "nonsense" not in cache
    assert len(cache) == len(model.hook_names()) == len(list(cache.keys())) == len(list(cache.values()))
    assert dict(cache.items()).keys() == set(model.hook_names())
    stacked = cache.stack("code")
    assert stacked.shape == (3, B, T, model.config.dict_width)
    assert torch.equal(stacked[1], cache["code", 1])
    assert torch.equal(cache.stack("blocks.0.hook_resid_post"), cache.stack("resid_post"))
    _, partial = model.run_with_cache(tokens(), names_filter=["blocks.0.ista.hook_code", "blocks.2.ista.hook_code"])
    values, layers = partial.stack("code", return_layers=True)
    assert values.shape[0] == 2 and layers == [0, 2]
    moved = partial.to("meta")
    assert isinstance(moved, ActivationCache) and moved["code", 2].device.type == "meta"
    assert partial["code", 2].device.type == "cpu"
    with pytest.raises(KeyError, match="blocks.0.ista.hook_code, blocks.2.ista.hook_code"):
        partial["code", 1]  # missing: the message lists what the cache holds
    with pytest.raises(KeyError, match="per-layer"):
        partial["code"]
    with pytest.raises(KeyError):
        partial.stack("pattern")


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_unknown_names_list_the_closest_valid_ones(arch, ista):
    model = make(arch, ista)
    x = tokens()
    good = "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=good):
        model.run_with_cache(x, names_filter=["blocks.0.hook_resid_pst"])
    with pytest.raises(ValueError, match=good):
        model.run_with_cache(x, names_filter="blocks.0.resid_post")
    with pytest.raises(ValueError, match="blocks.1.attn.hook_pattern"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_patern", lambda a, h: a)])
    assert sum(hook_counts(model).values()) == 0
    _, cache = model.run_with_cache(x, names_filter="hook_embed")
    with pytest.raises(KeyError, match="blocks.1.hook_resid_pre") as err:
        cache["blocks.1.hook_resid_pr"]
    assert "hook_embed" in str(err.value)  # and what the cache holds
    with pytest.raises(KeyError, match="resid_pre"):
        cache["resid_pr", 0]


# ------------------------------------------------------------------------------------------
# padded batches, dtypes, devices, generation
# ------------------------------------------------------------------------------------------


def token_slice(name, act, n):
    """The first n positions of an activation (B, ..., T, ...)."""
    if name.endswith(("attn.hook_q", "attn.hook_k", "attn.hook_v")):
        return act[:, :, :n]
    if name.endswith("attn.hook_pattern"):
        return act[:, :, :n, :n]
    return act[:, :n]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_padded_batch_matches_each_sequence_alone(arch, ista, task):
    model = make(arch, ista, task)
    long, short = tokens(1, 12), tokens(1, 7)
    ids = torch.cat([long, torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    out, batched = model.run_with_cache(ids, attention_mask=mask)
    assert out.logits.shape == (2, 12, 97)
    for row, seq in ((0, long), (1, short)):
        n = seq.shape[1]
        _, alone = model.run_with_cache(seq)
        for name in model.hook_names():
            got = token_slice(name, batched[name][row : row + 1], n)
            torch.testing.assert_close(got, alone[name], rtol=0, atol=2e-5, msg=name)
    pattern = batched["pattern", 0][1]
    assert (pattern[:, :, 7:] == 0).all()  # no query looks at padding


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_bf16_hooks(arch, ista, task):
    model = make(arch, ista, task)
    x = tokens()
    ref, ref_cache = model.run_with_cache(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, auto_cache = model.run_with_cache(x)
    assert auto_cache["logits"].dtype == torch.bfloat16
    model = model.to(torch.bfloat16)
    out, cache = model.run_with_cache(x)
    for name, act in cache.items():
        assert act.dtype == torch.bfloat16 and torch.isfinite(act).all(), name
    torch.testing.assert_close(cache["pattern", 1].float().sum(-1), torch.ones(B, 4, T), rtol=0, atol=2e-2)
    assert (out.logits.float() - ref.logits).abs().max() < 0.1
    assert (auto.logits.float() - ref.logits).abs().max() < 0.1
    point = "blocks.0.ista.hook_code" if arch == "crate" else "blocks.0.mlp.hook_post"
    with model.hooks(fwd_hooks=[(point, lambda a, h: torch.zeros_like(a))]):
        _, zeroed = model.run_with_cache(x, names_filter=point)
    assert (zeroed[point] == 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_hooks_on_gpu(arch, ista):
    model = make(arch, ista).cuda()
    x = tokens().cuda()
    plain = model(x).logits
    out, cache = model.run_with_cache(x, device="cpu")
    assert cache["pattern", 0].device.type == "cpu"
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, cache = model.run_with_cache(x, names_filter=lambda n: "pattern" in n or "resid_post" in n)
    assert torch.isfinite(cache.stack("pattern").float()).all()


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_generation_keeps_working(arch, ista):
    model = make(arch, ista)
    prompt = tokens(2, 5)
    reference = generate(model, prompt, 12, temperature=0, use_cache=False)
    model.run_with_cache(prompt)
    model.run_with_hooks(prompt, fwd_hooks=[(lambda n: True, lambda a, h: None)])
    assert sum(hook_counts(model).values()) == 0
    assert torch.equal(generate(model, prompt, 12, temperature=0), reference)
    # and with the explicit pattern path active on every layer (the KV cache feeds it)
    patterns = []
    with model.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda a, h: patterns.append(a.shape))]):
        assert torch.equal(generate(model, prompt, 12, temperature=0), reference)
    assert patterns[0][-2:] == (5, 5) and patterns[-1][-2:] == (1, 16)


def test_hook_point_is_identity_and_named():
    point = HookPoint()
    x = torch.randn(3)
    assert point(x) is x and point.name is None and point.layer() is None
    with pytest.raises(ValueError):
        point.add_hook(lambda a, h: a, dir="sideways")
