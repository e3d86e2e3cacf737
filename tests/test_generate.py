"""Sampling: the distributions it draws from, seeding, stopping, and a prefix riding in the cache."""
import torch

from minprefix import Tokenizer, generate
from minprefix.generate import pick
from minprefix.prefix import KVPrefix, label_weights


def frequencies(logits, n=20000, **kw):
    g = torch.Generator().manual_seed(0)
    draws = pick(logits.expand(n, -1), generator=g, **kw)[:, 0]
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
    assert f[2:].sum() == 0 and f[1] > 0.2
    f = frequencies(logits, top_p=0.5)  # the likeliest alone already reaches .5
    assert f[0] == 1.0


def test_top_p_on_a_flat_distribution_falls_back_to_the_full_sort():
    logits = torch.linspace(0, -1, 4000)[None]  # nearly flat: the nucleus holds far more than 1024 tokens
    probs = logits.softmax(-1)[0]
    size = int((probs.cumsum(0) - probs < 0.5).sum())
    f = frequencies(logits, top_p=0.5, n=20000)
    assert size > 1024 and f[size:].sum() == 0 and f[1024:size].sum() > 0.2


def test_greedy_and_seeded(offline_model):
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("The lectures were")] * 3)
    a = generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=7)
    assert a == generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=7)
    assert a != generate(offline_model, idx, 12, temperature=0.9, top_p=0.9, seed=8)
    g = generate(offline_model, idx, 12, temperature=0)
    assert g[0] == g[1] == g[2]


def test_stops_at_end_of_text(offline_model):
    # a prefix that makes <|endoftext|> certain: every sample stops at once and returns no tokens
    class Stop(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, idx, kv_cache=None, last_only=False):
            logits = self.model(idx, kv_cache, last_only)
            logits[..., 50256] = 1e4
            return logits

        @property
        def config(self):
            return self.model.config

    out = generate(Stop(offline_model), torch.tensor([[50256, 464]] * 2), 10, temperature=1.0, seed=0)
    assert out == [[], []]


def test_prefix_rides_in_the_cache(offline_model):
    torch.manual_seed(0)
    prefix = KVPrefix(offline_model.config, 2, 5)
    with torch.no_grad():
        prefix.table_.normal_()
    idx = torch.tensor([[50256, 464, 3290]])
    cache = prefix.cache(offline_model, label_weights(2, label=0))
    assert cache.length == 5
    out = generate(offline_model, idx, 8, kv_cache=cache, temperature=0, eot=-1)
    assert cache.length == 5 + 3 + 7  # the prefix, the prompt, and every sampled token but the last
    # and the prefix is in the cache only once: the same tokens as the one-shot forward of prompt + samples
    with torch.no_grad():
        full = offline_model(torch.tensor([idx[0].tolist() + out[0]]), prefix.cache(offline_model, label_weights(2, label=0)))
    assert full[0, 2:2 + 8].argmax(-1).tolist() == out[0]
