"""Sampling, the reference: the distributions it draws from, seeding, stopping, the context's end, a prefix
riding in the cache, and prompts of different lengths in one batch."""
import pytest
import torch

from conftest import EOT
from minprefix import Tokenizer
from minprefix.generate import generate, pad_left, sample
from minprefix.prefix import KVPrefix, label_weights


def frequencies(logits, n=20000, **kw):
    """Draws' frequencies. Not a float tolerance: with 20,000 draws a frequency's standard error is at most
    sqrt(0.25 / 20000) = 0.0035, so the tests' 0.015 is over 4 standard errors (a seeded generator: no flakes)."""
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(n, -1), generator=g, **kw)[:, 0]
    return torch.bincount(draws, minlength=logits.size(-1)).float() / n


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    for t in (1.0, 0.5):
        f = frequencies(logits, temperature=t)
        assert (f - (logits[0] / t).softmax(-1)).abs().max() < 0.015


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # probs .64 .23 .09 .03 .01
    f = frequencies(logits, top_k=2)
    assert f[2:].sum() == 0 and abs(f[0] - 0.731) < 0.015  # renormalised over the two kept
    f = frequencies(logits, top_p=0.8)  # .64 < .8, .64+.23 >= .8: the nucleus is the first two
    assert f[2:].sum() == 0 and abs(f[0] - 0.731) < 0.015
    f = frequencies(logits, top_p=0.5)  # the likeliest alone already reaches .5
    assert f[0] == 1.0
    f = frequencies(logits, top_p=1e-9)  # a tiny nucleus is the likeliest token, never an empty set
    assert f[0] == 1.0


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Ties at the k-th logit: all tied tokens stay in the support (HF's rule), so top_k=2 on [3, 1, 1, 1, 0]
    draws the three tied tokens too, equally often; dropping ties would leave token 0 alone with token 1."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    f = frequencies(logits, top_k=2, n=20000)
    p = torch.tensor([3.0, 1.0, 1.0, 1.0]).softmax(-1)  # renormalised over token 0 and the three tied ones
    assert f[4] == 0 and (f[1:4] > 0).all()
    assert torch.allclose(f[:4], p, atol=0.015)


@pytest.mark.slow
def test_top_k_then_top_p_on_a_flat_distribution():
    """top-k first, then the nucleus of what is left, renormalised (HF's order). On a nearly flat distribution
    the nucleus is large: every one of its tokens must be drawable, and none outside it."""
    logits = torch.linspace(0, -1, 4000)[None]
    kept = logits[0, :3000].softmax(-1)  # top_k=3000 keeps the first 3000; renormalised
    size = int((kept.cumsum(0) - kept < 0.5).sum())  # the nucleus of mass 0.5 within them
    f = frequencies(logits, top_k=3000, top_p=0.5, n=30000)  # ~24 draws per nucleus token
    assert size == 1226
    assert f[size:].sum() == 0 and (f[:size] > 0).all()  # the whole nucleus, nothing more


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_are_refused(offline_model, bad):
    with pytest.raises(ValueError, match=list(bad)[0]):
        generate(offline_model, torch.tensor([[EOT]]), 3, eot=EOT, **bad)


def test_greedy_and_seeded(offline_model):
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("The lectures were")] * 3)
    a = generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=7, eot=EOT)
    assert a == generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=7, eot=EOT)
    assert a != generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=8, eot=EOT)
    assert len({tuple(r) for r in a}) > 1  # rows draw independently
    g = generate(offline_model, idx, 12, temperature=0, eot=EOT)
    assert g[0] == g[1] == g[2]


class EndsAt(torch.nn.Module):
    """The offline model, but row r is forced to write <|endoftext|> at its step stop[r] (and token 11 before)."""

    def __init__(self, model, stop):
        super().__init__()
        self.model, self.stop, self.step = model, stop, 0
        self.config = model.config

    def forward(self, idx, kv_cache=None, real=None):
        logits = self.model(idx, kv_cache, real)
        for row, s in enumerate(self.stop):
            logits[row, -1] = -1e4
            logits[row, -1, 50256 if self.step >= s else 11] = 1e4
        self.step += 1
        return logits


def test_rows_stop_at_their_own_end_of_text(offline_model):
    out = generate(EndsAt(offline_model, [0, 3, 6, 100]), torch.tensor([[50256, 464]] * 4), 8, temperature=1.0, seed=0,
                   eot=EOT)
    assert out == [[], [11] * 3, [11] * 6, [11] * 8]


def test_max_new_tokens_zero_and_the_context_end(offline_model):
    """max_new_tokens means what it says: past the context's end the text goes on (tests/test_long.py says how);
    only a prompt that does not fit is refused."""
    n = offline_model.config.n_positions
    assert generate(offline_model, torch.tensor([[50256, 464]]), 0, eot=EOT) == [[]]
    idx = torch.randint(0, 50257, (1, n - 5))  # room for 5 positions, and 12 tokens asked for
    assert len(generate(offline_model, idx, 12, temperature=0, eot=None)[0]) == 12
    full = torch.randint(0, 50257, (1, n))  # filling the context: re-encoded from the first token fed back on
    assert len(generate(offline_model, full, 3, temperature=0, eot=None)[0]) == 3
    with pytest.raises(ValueError, match="exceed the context"):
        generate(offline_model, torch.randint(0, 50257, (1, n + 1)), 5, eot=EOT)


def test_prefix_rides_in_the_cache_and_is_left_as_it_was(offline_model):
    torch.manual_seed(0)
    prefix = KVPrefix(offline_model.config, 2, 5)
    with torch.no_grad():
        prefix.table_.normal_()
    idx = torch.tensor([[50256, 464, 3290]])
    cache = prefix.cache(offline_model, label_weights(2, label=0))
    k0 = cache.layers[0][0].clone()
    out = generate(offline_model, idx, 8, kv_cache=cache, temperature=0, eot=None)
    assert cache.length == 5 and torch.equal(cache.layers[0][0], k0) and cache.real is None  # untouched
    assert generate(offline_model, idx, 8, kv_cache=cache, temperature=0, eot=None) == out  # reusable
    # and the prefix is in the cache only once: the same tokens as the one-shot forward of prompt + samples
    with torch.no_grad():
        full = offline_model(torch.tensor([idx[0].tolist() + out[0]]), prefix.cache(offline_model, label_weights(2, label=0)))
    assert full[0, 2:2 + 8].argmax(-1).tolist() == out[0]
    assert out != generate(offline_model, idx, 8, temperature=0, eot=None)  # the prefix changed the text


def test_prompts_of_different_lengths_decode_as_they_would_alone(offline_model):
    tok = Tokenizer()
    prompts = [[tok.eot] + tok.encode(p) for p in ("The food", "I went to see this film because it", "")]
    idx, real = pad_left(prompts, EOT)
    assert real.sum(1).tolist() == [len(p) for p in prompts]
    batched = generate(offline_model, idx, 30, real=real, temperature=0, eot=None)
    assert batched == [generate(offline_model, torch.tensor([p]), 30, temperature=0, eot=None)[0] for p in prompts]


def test_beam_search_through_generate_on_both_paths_and_sampling_flags_refused(offline_model):
    """generate(..., num_beams=3) is beam search on the reference and the fast path alike; the sampling
    settings, which beam search cannot use, are refused by name rather than failing with a TypeError."""
    from minprefix import fast
    from minprefix.beam import beam_search
    idx = torch.tensor([[50256, 464, 2646]])
    want = beam_search(offline_model, idx, 3, 8, eot=EOT)
    assert generate(offline_model, idx, 8, num_beams=3, eot=EOT) == want == \
        fast.generate(offline_model, idx, 8, num_beams=3, eot=EOT)
    for bad in (dict(temperature=0.7), dict(seed=1), dict(top_k=5), dict(top_p=0.5)):
        for decode in (generate, fast.generate):
            with pytest.raises(ValueError, match=f"{list(bad)[0]}= does not apply to beam search"):
                decode(offline_model, idx, 8, num_beams=3, eot=EOT, **bad)


def test_an_empty_prompt_is_a_clear_error_on_both_paths(offline_model):
    from minprefix import fast
    from minprefix.prefix import KVPrefix
    prefix = KVPrefix(offline_model.config, 2, 3)
    cache = prefix.cache(offline_model, label_weights(2, label=0))
    empty = torch.zeros(1, 0, dtype=torch.long)
    for decode in (generate, fast.generate):
        for kv in (None, cache):
            with pytest.raises(ValueError, match="a prompt has no tokens"):
                decode(offline_model, empty, 5, kv_cache=kv, eot=EOT)
    idx, real = pad_left([[]], EOT)
    assert idx.dtype == torch.long and real.dtype == torch.bool and idx.shape == (1, 0)
    idx, real = pad_left([[50256, 11], []], EOT)  # one row empty, padded all the way: refused too
    with pytest.raises(ValueError, match="a prompt has no tokens"):
        generate(offline_model, idx, 5, real=real, eot=EOT)
