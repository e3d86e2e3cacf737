"""The sentiment evaluation's helpers: regrouping prompts by length, perplexity, the VADER gap, the intervals."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import EOT
from minprefix import Tokenizer
from minprefix.data import Example
from minprefix.evaluation import continue_prompts, distinct, evaluate_prefix, perplexity, split_prompt, wilson
from minprefix.generate import generate
from minprefix.prefix import KVPrefix


def test_continuations_come_back_in_prompt_order_as_if_decoded_alone(offline_model):
    """continue_prompts decodes prompts of equal token length together: the answer must still be in the
    prompts' order, each row what that prompt gives alone (greedy), under its own mixing weights."""
    tok = Tokenizer()
    torch.manual_seed(0)
    prefix = KVPrefix(offline_model.config, 2, 4)
    with torch.no_grad():
        prefix.table_.normal_(0, 0.5)
    prompts = ["The food", "I went to the labs", "The city", "Our mentor", "The food"]
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.0, 0.0], [0.0, 1.0]])
    outs = continue_prompts(offline_model, tok, prompts, weights, prefix, 12, seed=0, temperature=0)
    for prompt, w, out in zip(prompts, weights, outs):
        idx = torch.tensor([[tok.eot] + tok.encode(prompt)])
        alone = generate(offline_model, idx, 12, kv_cache=prefix.cache(offline_model, w[None]), temperature=0, eot=EOT)[0]
        assert out == tok.decode(alone)
    assert outs[0] != outs[4]  # the same prompt under the other label's prefix


def test_perplexity_is_exp_of_the_mean_continuation_loss(offline_model):
    tok = Tokenizer()
    prompts, conts = ["The food", "I liked"], [" was cold and late.", " the mentors a lot"]
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, c in zip(prompts, conts):
            head, new = [tok.eot] + tok.encode(p), tok.encode(c)
            logits = offline_model(torch.tensor([head + new]))[0]
            nll += F.cross_entropy(logits[len(head) - 1:-1], torch.tensor(new), reduction="sum").item()
            n += len(new)
    assert perplexity(offline_model, tok, prompts, conts) == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert math.isnan(perplexity(offline_model, tok, ["x"], [""]))


class WordJudge:
    """A stand-in for VADER: +1 for each 'good', -1 for each 'bad', clipped to [-1, 1]."""
    name = "VADER"

    def score(self, text):
        return max(-1.0, min(1.0, text.count("good") - text.count("bad")))

    def label(self, text):
        s = self.score(text)
        return "positive" if s >= 0.05 else "negative" if s <= -0.05 else "neutral"


def test_vader_gap_and_accuracies_follow_the_judge(offline_model, monkeypatch):
    """With the continuations fixed (intended prefix: 'good' for positive rows, 'bad' for negative ones; flipped:
    the opposite), the gap is +2 on the -1..1 scale's difference and every intended label is right."""
    import minprefix.evaluation as evaluation
    labels = ["positive", "negative"]
    examples = [Example("one two three four", "positive", "t:1"), Example("five six seven eight", "negative", "t:2")]

    def fake(model, tok, prompts, weights, prefix, max_new_tokens, seed, progress=None, **kw):
        return [" good" if (w[0] > 0.5) else " bad" for w in weights]
    monkeypatch.setattr(evaluation, "continue_prompts", fake)
    prefix = KVPrefix(offline_model.config, 2, 2)
    row = evaluate_prefix(offline_model, Tokenizer(), WordJudge(), examples, labels, prefix, n_samples=3,
                          sweep_samples=1, max_new_tokens=4)
    assert row["acc_intended"] == 1.0 and row["acc_flipped"] == 1.0 and row["vader_gap"] == pytest.approx(2.0)
    assert row["n_generations"] == 6 and row["acc_intended_ci"][0] > 0.5
    assert row["alpha_sweep"][1.0] == 1.0 and row["alpha_sweep"][0.0] == -1.0  # alpha 1 is all positive prefix
    ends = row["neutral"]["VADER"]  # from the neutral prompts: every alpha-1 text positive, every alpha-0 negative
    assert ends["positive"] == 1.0 and ends["negative"] == 1.0 and ends["positive_ci"][0] > 0.6


def test_wilson_interval():
    lo, hi = wilson(60, 120)  # p = 0.5, n = 120: about +/- 9 points
    assert lo == pytest.approx(0.4119, abs=1e-4) and hi == pytest.approx(0.5881, abs=1e-4)
    lo, hi = wilson(0, 10)  # never below 0, and not a zero-width interval at p = 0
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


def test_split_prompt_and_distinct():
    assert split_prompt("The labs were great fun", 3) == ("The labs were", "great fun")
    assert distinct(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct([""], 2) == 0.0
