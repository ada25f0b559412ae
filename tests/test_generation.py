import pytest
import torch

from crate_lm.model import GenerationCache, build_model, generate
from crate_lm.model.generation import sample_next
from tests.conftest import VARIANTS, small_config


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_cached_generation_equals_uncached_greedy(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista))
    prompt = torch.randint(0, 97, (3, 5))
    cached = generate(model, prompt, 20, temperature=0)
    uncached = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (3, 25)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch,ista", VARIANTS)
def test_cached_logits_equal_full_forward(arch, ista):
    model = build_model(small_config(arch=arch, ista=ista)).eval()
    x = torch.randint(0, 97, (2, 12))
    full = model(x).logits
    cache = GenerationCache.for_model(model, 2, 12)
    parts = [model(x[:, :5], cache=cache).logits, model(x[:, 5:9], cache=cache).logits]
    parts += [model(x[:, t : t + 1], cache=cache).logits for t in range(9, 12)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=0, atol=1e-5)


def test_crate_cache_is_exactly_half_of_gpt():
    crate = build_model(small_config(arch="crate"))
    gpt = build_model(small_config(arch="gpt"))
    a = GenerationCache.for_model(crate, 4, 32)
    b = GenerationCache.for_model(gpt, 4, 32)
    assert 2 * a.nbytes() == b.nbytes()
    assert a.nbytes() == 2 * 4 * 32 * 32 * 4  # layers * batch * tokens * d * fp32
    assert all(len(layer) == 1 for layer in a.buffers)


def test_sampling_respects_top_k_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(200, 1)
    picks = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(picks.tolist()) <= {1, 2} and len(set(picks.tolist())) == 2
    again = sample_next(logits, temperature=1.0, top_k=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(picks, again)
    assert sample_next(logits[:1], temperature=0).item() == 1


def test_eos_stops_rows_and_generation():
    model = build_model(small_config())
    prompt = torch.randint(0, 97, (1, 4))
    greedy = generate(model, prompt, 6, temperature=0)
    eos = greedy[0, 5].item()  # the second generated token
    out = generate(model, prompt, 6, temperature=0, eos_token_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item() + 4
    assert out.shape[1] == first + 1  # stopped right after the first end-of-document


def test_generation_errors():
    model = build_model(small_config())
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        generate(model, torch.zeros(1, 30, dtype=torch.long), 5)
    with pytest.raises(TypeError, match="causal"):
        generate(build_model(small_config(task="masked")), torch.zeros(1, 3, dtype=torch.long), 2)
