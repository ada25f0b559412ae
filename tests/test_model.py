"""Whole-model behaviour: masks, fast == reference path, gradients, checkpointing, bf16, init."""

import math

import pytest
import torch

from crate_lm.model import build_model
from tests.conftest import VARIANTS, small_config


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_causal_model_never_sees_the_future(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista)).eval()
    x = torch.randint(0, 97, (2, 20))
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, t] = (x2[:, t] + 1) % 97
        a, b = model(x).logits, model(x2).logits
        torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
        assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # the change is visible from t on


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_masked_model_ignores_padding(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista, task="masked")).eval()
    real = torch.randint(0, 97, (2, 11))
    short = torch.cat([real, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    long = torch.cat([real, torch.randint(0, 97, (2, 9))], dim=1)  # different pad length and ids
    mask_short = torch.cat([torch.ones(2, 11), torch.zeros(2, 3)], dim=1).long()
    mask_long = torch.cat([torch.ones(2, 11), torch.zeros(2, 9)], dim=1).long()
    a = model(short, attention_mask=mask_short).logits[:, :11]
    b = model(long, attention_mask=mask_long).logits[:, :11]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and the model really is bidirectional: a later real token changes earlier outputs
    changed = short.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 97
    c = model(changed, attention_mask=mask_short).logits[:, :10]
    assert (a[:, :10] - c).abs().max() > 1e-4


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_document_ids_block_attention_across_documents(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista)).eval()
    x = torch.randint(0, 97, (1, 16))
    docs = torch.tensor([[0] * 6 + [1] * 10])
    pos = torch.tensor([list(range(6)) + list(range(10))])
    packed = model(x, document_ids=docs, position_ids=pos).logits
    alone = model(x[:, 6:]).logits  # the second document on its own
    torch.testing.assert_close(packed[:, 6:], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["causal", "masked"])
@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_sdpa_equals_reference_path_and_gradients_reach_every_parameter(arch, ista, task):
    cfg = small_config(arch=arch, ista=ista, task=task)
    fast = build_model(cfg)
    ref = build_model(small_config(arch=arch, ista=ista, task=task, attn_impl="math"))
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, 97, (2, 32))  # full length, so every position embedding is used
    labels = torch.randint(0, 97, (2, 32))
    kwargs = {}
    if task == "masked":
        labels[:, ::3] = -100
        mask = torch.ones(2, 32, dtype=torch.long)
        mask[1, -5:] = 0
        kwargs["attention_mask"] = mask
    out_f, out_r = fast(x, labels, **kwargs), ref(x, labels, **kwargs)
    torch.testing.assert_close(out_f.logits, out_r.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_f.loss, out_r.loss, rtol=0, atol=1e-5)
    out_f.loss.backward()
    out_r.loss.backward()
    grads_r = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        torch.testing.assert_close(p.grad, grads_r[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_activation_checkpointing_gives_identical_loss_and_gradients(arch, ista):
    plain = build_model(small_config(arch=arch, ista=ista))
    ckpt = build_model(small_config(arch=arch, ista=ista, activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randint(0, 97, (2, 16))
    a, b = plain(x, x), ckpt(x, x)
    a.loss.backward()
    b.loss.backward()
    assert a.loss.item() == b.loss.item()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_bf16_forward(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista))
    x = torch.randint(0, 97, (2, 16))
    ref = model(x, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x, x)
    assert auto.logits.dtype == torch.bfloat16
    assert torch.isfinite(auto.loss) and abs(auto.loss.item() - ref.loss.item()) < 0.05
    pure = model.to(torch.bfloat16)(x, x)
    assert torch.isfinite(pure.loss) and abs(pure.loss.item() - ref.loss.item()) < 0.1
    pure.loss.backward()


def test_initialisation_follows_crate_md():
    cfg = small_config(d_model=256, n_layers=8, n_heads=4, ista="alpha", vocab_size=4096)
    model = build_model(cfg)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    assert abs(model.blocks[0].attn.proj_u.weight.std().item() - 0.02) < 0.002
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(model.blocks[0].attn.out.weight.std().item() - out_std) < 0.1 * out_std
    assert model.blocks[0].attn.out.bias.abs().max() == 0
    bound = math.sqrt(6 / cfg.dict_width)  # kaiming-uniform over (d, m)
    D = model.blocks[0].ista.dict
    assert D.abs().max() <= bound and D.abs().max() > 0.95 * bound
    assert model.blocks[0].ista.dict_out.abs().max() <= bound


def test_lm_head_is_tied_to_the_embedding():
    model = build_model(small_config())
    with torch.no_grad():
        model.tok_emb.weight[5].zero_()
    logits = model(torch.randint(0, 97, (1, 4))).logits
    assert (logits[..., 5] == 0).all()
    assert "lm_head.weight" not in model.state_dict()


def test_too_long_input_is_a_clear_error():
    model = build_model(small_config())
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
