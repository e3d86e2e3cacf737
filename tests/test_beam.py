"""Beam search against HF transformers' (`generate(num_beams=5, do_sample=False)`, 5.x) on the same weights: every
finished hypothesis, its tokens and its score, on E2E tables as the prefix-tuning paper decodes them (beam 5, at
least 5 new tokens, no newlines, at most 40 here). The offline model is an IMDB LM (NOT GPT-2): on a table it
rarely writes <|endoftext|>, so beams run to max_new_tokens; with a bias on <|endoftext|>'s logit (EotBias, the
same in both models) beams end at many lengths, and the rules for ending are tested too."""
import gzip

import pytest
import torch

from conftest import EOT, SHARED, assert_near
from minprefix import Tokenizer
from minprefix.beam import beam_search, hypotheses
from minprefix.generate import generate, pad_left
from minprefix.prefix import KVPrefix, label_weights

BANNED = (198, 628)  # "\n" and "\n\n"
E2E_VALID = SHARED / "data" / "e2e" / "valid.txt.gz"


@pytest.fixture(scope="module")
def prompts():
    """E2E validation tables as the paper feeds them: the tokens of ` {table} ` and <|endoftext|>."""
    if not E2E_VALID.is_file():
        pytest.skip(f"no E2E data at {E2E_VALID}")
    tables = []
    with gzip.open(E2E_VALID, "rt") as f:
        for line in f:
            table = line.split("||")[0]
            if table not in tables:
                tables.append(table)
    tok = Tokenizer()
    return [tok.encode(f" {t} ") + [EOT] for t in tables[::50]]  # every 50th distinct table: 11 prompts of 17 to 42 tokens


class EotBias(torch.nn.Module):
    """Adds `bias` to <|endoftext|>'s logit of what it wraps: our model, or HF's lm_head (so both models agree)."""

    def __init__(self, inner, bias):
        super().__init__()
        self.inner, self.bias = inner, bias
        self.config = getattr(inner, "config", None)

    def forward(self, *args):
        logits = self.inner(*args).clone()
        logits[..., EOT] += self.bias
        return logits


@pytest.fixture
def biased(offline_model, offline_hf):
    """biased(bias) -> our model with that bias on eot's logit; HF's lm_head gets the same until the test ends."""
    head = offline_hf.lm_head

    def bias_both(bias):
        offline_hf.lm_head = EotBias(head, bias) if bias else head
        return EotBias(offline_model, bias) if bias else offline_model

    yield bias_both
    offline_hf.lm_head = head


def review_prefix(model, P=10, seed=0):
    """A K/V prefix of real words' keys and values plus noise: arbitrary, but it changes what the model writes."""
    torch.manual_seed(seed)
    prefix = KVPrefix(model.config, 1, P)
    words = Tokenizer().encode(" This movie was terrible. I gave it 1/10. Avoid it!")[:P]
    prefix.init_from_tokens(model, torch.tensor([words]))
    with torch.no_grad():
        prefix.table_.add_(0.3 * torch.randn_like(prefix.table_))
    return prefix


def hf_hypotheses(hf, idx, max_new_tokens, prefix_cache=None, num_beams=5, min_new_tokens=5, banned=BANNED,
                  **kw):
    """HF's num_beams finished hypotheses per row, best first: (score, new tokens up to and with the first eot)."""
    from transformers import DynamicCache
    B, T = idx.shape
    mask = torch.ones(B, T, dtype=torch.long)
    if prefix_cache is not None:
        # generate repeats input_ids and the attention mask for the beams, but not a cache handed to it (a Cache is
        # no tensor): it must come with B*num_beams rows, row b's beams together, as repeat_interleave makes them
        kw["cache"] = DynamicCache(ddp_cache_data=[(k.repeat_interleave(num_beams, 0), v.repeat_interleave(num_beams, 0))
                                                   for k, v in prefix_cache.layers])
        mask = torch.cat([torch.ones(B, prefix_cache.length, dtype=torch.long), mask], dim=1)  # P + T
    out = hf.generate(idx, attention_mask=mask, num_beams=num_beams, do_sample=False, min_new_tokens=min_new_tokens,
                      bad_words_ids=[[t] for t in banned] or None, eos_token_id=EOT, pad_token_id=EOT,
                      max_new_tokens=max_new_tokens, num_return_sequences=num_beams, output_scores=True,
                      return_dict_in_generate=True, **kw)
    seqs, scores = out.sequences[:, T:].tolist(), out.sequences_scores.tolist()
    cut = [s[:s.index(EOT) + 1] if EOT in s else s for s in seqs]
    return [[(scores[i], cut[i]) for i in range(b * num_beams, (b + 1) * num_beams)] for b in range(B)]


def assert_same(ours, theirs, what):
    same = [[t for _, t in o] == [t for _, t in h] for o, h in zip(ours, theirs)]
    lengths = [[len(t) for _, t in o] for o in ours]
    print(f"{what}: hypotheses' tokens equal to HF's per row {same}, lengths {lengths}")
    assert all(same) and len(ours) == len(theirs)
    # length-normalised sums of float32 log-probs, ours and HF's log_softmax over other kernels: rounding only
    assert_near([a for o in ours for a, _ in o], [b for h in theirs for b, _ in h], 1e-5, f"{what}: scores")


@pytest.mark.slow
@pytest.mark.parametrize("bias", [0.0, 4.0])
def test_same_hypotheses_as_hf(offline_model, offline_hf, prompts, biased, bias):
    """bias 0: the offline model as it is; the best beam never writes eot, HF's fallback keeps the N best at
    max_new_tokens. bias 4: beams finish at several lengths while the others go on, and the best is not the first
    to finish."""
    model = biased(bias)
    n = 40
    for p in prompts[:2]:
        idx = torch.tensor([p])
        ours, theirs = hypotheses(model, idx, 5, n, 5, BANNED, eot=EOT), hf_hypotheses(offline_hf, idx, n)
        assert_same(ours, theirs, f"eot bias {bias}, prompt of {len(p)} tokens")
        if p is prompts[0]:  # beam_search answers with the best, its eot cut off
            assert beam_search(model, idx, 5, n, 5, BANNED, eot=EOT) == [[t for t in ours[0][0][1] if t != EOT]]
        ended = [t[-1] == EOT for _, t in ours[0]]
        if bias == 0:  # max_new_tokens reached without eot
            assert not ended[0] and len(ours[0][0][1]) == n
        else:  # the best ended with eot after others had ended sooner
            assert all(ended) and len(ours[0][0][1]) > min(len(t) for _, t in ours[0])


@pytest.mark.slow
def test_prefix_as_hf_cache(offline_model, offline_hf, prompts):
    """The prefix rides in our KVCache; HF gets the same keys and values as a DynamicCache, expanded for the
    beams, with an attention mask of P + T ones (its positions then start at P, as ours)."""
    from transformers import DynamicCache
    prefix = review_prefix(offline_model)
    cache = prefix.cache(offline_model, label_weights(1, label=0))
    n, changed = 40, 0
    for p in prompts[:2]:
        idx = torch.tensor([p])
        ours = hypotheses(offline_model, idx, 5, n, 5, BANNED, kv_cache=cache, eot=EOT)
        assert_same(ours, hf_hypotheses(offline_hf, idx, n, prefix_cache=cache), f"prefix, prompt of {len(p)} tokens")
        changed += ours[0][0][1] != hypotheses(offline_model, idx, 5, n, 5, BANNED, eot=EOT)[0][0][1]
    assert changed  # the prefix mattered
    with pytest.raises(RuntimeError):  # HF does not expand a cache handed to generate for the beams
        unexpanded = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in cache.layers])
        idx = torch.tensor([prompts[0]])
        offline_hf.generate(idx, attention_mask=torch.ones(1, cache.length + idx.size(1), dtype=torch.long),
                            cache=unexpanded, num_beams=5, do_sample=False, max_new_tokens=3, pad_token_id=EOT)


@pytest.mark.slow
@pytest.mark.parametrize("bias,with_prefix", [(0.0, False), (4.0, True)])
def test_left_padded_batch(offline_model, offline_hf, prompts, biased, bias, with_prefix):
    """Rows of different lengths, padded on the left, in one search: each row as it would be alone, and as HF's.
    With bias 4 the rows finish at different steps: a row that is done waits for the others unchanged."""
    model = biased(bias)
    rows = [prompts[2], prompts[0], prompts[7]]  # 32, 17 and 42 tokens
    idx, real = pad_left(rows, EOT)
    assert len(set(real.sum(1).tolist())) == 3
    prefix = review_prefix(offline_model)

    def cache(B):  # the prefix for B rows, or none
        return prefix.cache(offline_model, label_weights(1, label=0).repeat(B, 1)) if with_prefix else None

    n = 40
    batched = hypotheses(model, idx, 5, n, 5, BANNED, kv_cache=cache(3), real=real, eot=EOT)
    alone = [hypotheses(model, torch.tensor([p]), 5, n, 5, BANNED, kv_cache=cache(1), eot=EOT)[0] for p in rows]
    assert_same(batched, [hf_hypotheses(offline_hf, torch.tensor([p]), n, prefix_cache=cache(1))[0] for p in rows],
                f"batch of 3 left-padded (eot bias {bias}, prefix {with_prefix})")
    assert [[t for _, t in h] for h in batched] == [[t for _, t in h] for h in alone]
    assert_near([a for h in batched for a, _ in h], [b for h in alone for b, _ in h], 1e-5, "batched against alone")


def scripted(step, V=50257):
    """Log-probs of a chosen next token distribution. Step 0: A .40, B .30, C .15, eot .10: eot is 4th, outside the
    first N=2 ranks, and [eot] would score log .10 = -2.30. Later: A .05, B .04, C .035, D .03, eot .025: four
    tokens then score about (log .40 + 3 log .05) / 4 = -2.48, worse."""
    probs = {0: {100: .40, 200: .30, 300: .15, EOT: .10}}.get(step, {100: .05, 200: .04, 300: .035, 400: .03, EOT: .025})
    p = torch.full((V,), (1 - sum(probs.values())) / (V - len(probs)))
    p[list(probs)] = torch.tensor(list(probs.values()))
    return p.log().log_softmax(-1)  # exactly what our search's own log_softmax turns it into


class Scripted(torch.nn.Module):
    """Our model, its cache kept as usual, but each step's next token follows scripted(step)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.step = model, model.config, 0

    def forward(self, idx, kv_cache=None, real=None):
        logits = self.model(idx, kv_cache, real).clone()
        logits[:, -1] = scripted(self.step)
        self.step += 1
        return logits


def test_eot_ends_a_hypothesis_only_within_the_first_num_beams_ranks(offline_model, offline_hf, prompts):
    """An eot among the 2N candidates but below rank N is dropped, as in HF, however well it would score: the
    same scripted distribution in both (ours through the model, HF's through a logits processor)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Script(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scripted(input_ids.size(1) - idx.size(1)).expand_as(scores)

    idx = torch.tensor([prompts[0]])
    ours = hypotheses(Scripted(offline_model), idx, 2, 4, eot=EOT)
    theirs = hf_hypotheses(offline_hf, idx, 4, num_beams=2, min_new_tokens=0, banned=(),
                           logits_processor=LogitsProcessorList([Script()]))
    assert_same(ours, theirs, "scripted distribution, eot at rank 4 of 4 at the first step")
    four_a = (torch.tensor(0.4).log() + 3 * torch.tensor(0.05).log()).item() / 4
    assert ours[0][0] == (pytest.approx(four_a, abs=1e-3), [100] * 4)
    assert beam_search(Scripted(offline_model), idx, 2, 4, eot=EOT) == [[100] * 4]  # not [], which [eot] at -2.30 would give


def test_min_new_tokens_holds_eot_back(offline_model, prompts):
    model = EotBias(offline_model, 20.0)  # eot is then by far the likeliest token, at every step
    idx = torch.tensor([prompts[0]])
    assert beam_search(model, idx, 5, 40, 0, BANNED, eot=EOT) == [[]]
    assert beam_search(model, idx, 5, 40, 0, (EOT,), eot=EOT) == [[]]  # as HF's bad_words_ids, banned never holds eot back
    for m in (3, 5):
        hyps = hypotheses(model, idx, 5, 40, m, BANNED, eot=EOT)[0]
        assert all(t[-1] == EOT and EOT not in t[:-1] for _, t in hyps)  # all ended, none before m tokens
        assert min(len(t) for _, t in hyps) == m + 1 and len(beam_search(model, idx, 5, 40, m, BANNED, eot=EOT)[0]) >= m


def test_banned_tokens_never_appear(offline_model, prompts):
    idx = torch.tensor([prompts[1]])
    free = beam_search(offline_model, idx, 5, 20, 5, eot=EOT)[0]
    banned = tuple(sorted(set(free))[:3])  # the tokens it writes when free to
    hyps = hypotheses(offline_model, idx, 5, 20, 5, banned, eot=EOT)[0]
    assert hyps[0][1] != free and not any(set(t) & set(banned) for _, t in hyps)


def test_max_new_tokens_and_the_context_end(offline_model):
    idx = torch.tensor([[EOT] + Tokenizer().encode(" I loved it. 10/10")])
    hyps = hypotheses(offline_model, idx, 5, 12, eot=None)[0]
    assert all(len(t) == 12 for _, t in hyps)  # with no eot every hypothesis runs to max_new_tokens
    assert beam_search(offline_model, idx, 5, 0, eot=EOT) == [[]]
    # a prefix of 10 and a prompt that leave 4 positions: 4 fed back + the last one picked = 5 tokens, and asking
    # for 50 is refused (beam search stops at the context's end), not cut
    cache = review_prefix(offline_model).cache(offline_model, label_weights(1, label=0))
    long = torch.randint(0, EOT, (1, offline_model.config.n_positions - 10 - 4))
    assert len(beam_search(offline_model, long, 3, 5, kv_cache=cache, eot=None)[0]) == 5
    with pytest.raises(ValueError, match="leave room for 5 new tokens, and 50 were asked for"):
        beam_search(offline_model, long, 3, 50, kv_cache=cache, eot=None)


def test_callers_cache_is_left_unchanged(offline_model, prompts):
    cache = review_prefix(offline_model).cache(offline_model, label_weights(1, label=0))
    before = [(k.clone(), v.clone()) for k, v in cache.layers]
    idx = torch.tensor([prompts[0]])
    out = beam_search(offline_model, idx, 5, 10, 5, BANNED, kv_cache=cache, eot=EOT)
    assert cache.length == 10 and cache.real is None
    assert all(torch.equal(k, k0) and torch.equal(v, v0) for (k, v), (k0, v0) in zip(cache.layers, before))
    assert beam_search(offline_model, idx, 5, 10, 5, BANNED, kv_cache=cache, eot=EOT) == out  # reusable
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(offline_model, idx, 0, eot=EOT)


@pytest.mark.parametrize("bias", [0.0, 6.0])
def test_one_beam_is_greedy(offline_model, offline_hf, prompts, biased, bias):
    """HF's generate(num_beams=1) is greedy search; our beam search with one beam is too: its eot at rank 0 ends
    the only hypothesis, and the live runner-up, scored over the same length, can never beat it."""
    model = biased(bias)
    for p in prompts[:2]:
        idx = torch.tensor([p])
        greedy = generate(model, idx, 30, temperature=0, eot=EOT)
        assert beam_search(model, idx, 1, 30, eot=EOT) == greedy
        hf = offline_hf.generate(idx, attention_mask=torch.ones_like(idx), num_beams=1, do_sample=False,
                                 min_new_tokens=5, bad_words_ids=[[t] for t in BANNED], eos_token_id=EOT,
                                 pad_token_id=EOT, max_new_tokens=30)[0, idx.size(1):].tolist()
        hf = hf[:hf.index(EOT)] if EOT in hf else hf
        ours = beam_search(model, idx, 1, 30, 5, BANNED, eot=EOT)
        print(f"one beam, eot bias {bias}: {len(ours[0])} tokens, equal to HF greedy: {ours[0] == hf}")
        assert ours == [hf]
    if bias:
        assert len(greedy[0]) < 30  # it did end with eot
