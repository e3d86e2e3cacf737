"""Does the text carry the sentiment asked for? Continuations of held-out texts, scored by our BLEU/ROUGE,
judged by VADER (a lexicon judge nobody here trained), plus fluency, diversity and an alpha sweep."""
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from minprefix import fast
from minprefix.generate import generate
from minprefix.metrics import corpus_bleu, rouge_l, rouge_n
from minprefix.prefix import label_weights

NEUTRAL_PROMPTS = ["The summer school", "The lectures", "The food", "Our mentor", "The labs", "The city",
                   "The housing", "The organisers", "The poster session", "The last day"]


class Judge:
    """VADER's compound score in [-1, 1]; its documented thresholds: >= 0.05 positive, <= -0.05 negative."""

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.vader = SentimentIntensityAnalyzer()

    def score(self, text):
        return self.vader.polarity_scores(text)["compound"]

    def label(self, text):
        s = self.score(text)
        return "positive" if s >= 0.05 else "negative" if s <= -0.05 else "neutral"


def split_prompt(text, n_words):
    """-> (the first n_words words, the rest): the prompt, and the reference its continuation is scored against."""
    words = text.split()
    return " ".join(words[:n_words]), " ".join(words[n_words:])


def continue_prompts(model, tok, prompts, weights, prefix, max_new_tokens, seed, **sampling):
    """One continuation per (prompt, weights row); prompts of equal token length are decoded together.
    weights: (N, n_labels) mixing weights per prompt, or None for the base model without a prefix."""
    device = next(model.parameters()).device
    encoded = [[tok.eot] + tok.encode(p) for p in prompts]
    groups = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    outs = [None] * len(prompts)
    for length in sorted(groups):
        rows = groups[length]
        idx = torch.tensor([encoded[i] for i in rows], device=device)
        cache = None if prefix is None else prefix.cache(model, weights[rows].to(device))
        decode = fast.generate if fast.enabled() else generate
        for i, new in zip(rows, decode(model, idx, max_new_tokens, kv_cache=cache, seed=seed + length, **sampling)):
            outs[i] = tok.decode(new)
    return outs


@torch.no_grad()
def perplexity(model, tok, prompts, continuations):
    """exp(mean NLL) of the continuation tokens under the frozen base model with no prefix, given the prompt."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for prompt, cont in zip(prompts, continuations):
        head, new = [tok.eot] + tok.encode(prompt), tok.encode(cont)
        if not new:
            continue
        ids = torch.tensor([head + new], device=device)
        logits = model(ids[:, :-1])[0, len(head) - 1:]  # the predictions of the continuation tokens
        nll += F.cross_entropy(logits, ids[0, len(head):], reduction="sum").item()
        count += len(new)
    return math.exp(nll / count) if count else float("nan")


def distinct(texts, n):
    """Distinct-n (Li et al., 2016): unique n-grams / all n-grams, over every generation together."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def evaluate_prefix(model, tok, judge, examples, labels, prefix, n_words=3, n_samples=1, max_new_tokens=40,
                    seed=0, sweep_samples=8, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), **sampling):
    """One row of the table. prefix None: the base model, whose 'intended' label is the held-out text's own."""
    prompts, refs, want = [], [], []
    for e in examples:
        prompt, rest = split_prompt(e.text, n_words)
        for _ in range(n_samples):
            prompts.append(prompt)
            refs.append(rest)
            want.append(labels.index(e.label))
    want = torch.tensor(want)
    flipped = (want + 1) % len(labels)  # with two labels: the other one
    onehot = lambda y: F.one_hot(y, len(labels)).float()
    outs = continue_prompts(model, tok, prompts, onehot(want), prefix, max_new_tokens, seed, **sampling)
    outs_flipped = (outs if prefix is None else
                    continue_prompts(model, tok, prompts, onehot(flipped), prefix, max_new_tokens, seed, **sampling))
    intended = [judge.label(o) == labels[y] for o, y in zip(outs, want.tolist())]
    flipped_ok = [judge.label(o) == labels[y] for o, y in zip(outs_flipped, flipped.tolist())]
    row = {
        "bleu": corpus_bleu(outs, [[r] for r in refs]),
        "rouge1": mean(rouge_n(o, r, 1).fmeasure for o, r in zip(outs, refs)),
        "rouge2": mean(rouge_n(o, r, 2).fmeasure for o, r in zip(outs, refs)),
        "rougeL": mean(rouge_l(o, r).fmeasure for o, r in zip(outs, refs)),
        "acc_intended": mean(intended), "acc_intended_ci": wilson(sum(intended), len(intended)),
        "acc_flipped": mean(flipped_ok), "acc_flipped_ci": wilson(sum(flipped_ok), len(flipped_ok)),
        # how far the prefix moves the judge toward the intended label, against the flipped prefix on the same
        # prompt: +1 steers fully, 0 not at all (the base model, by construction)
        "vader_gap": mean((judge.score(o) - judge.score(f)) * (1 if labels[y] == "positive" else -1)
                          for o, f, y in zip(outs, outs_flipped, want.tolist())) if len(labels) == 2 else float("nan"),
        "perplexity": perplexity(model, tok, prompts, outs),
        "distinct1": distinct(outs, 1),
        "distinct2": distinct(outs, 2),
        "n_generations": len(outs),
    }
    if prefix is not None and len(labels) == 2:
        sweep = {}
        for a in alphas:
            p = [q for q in NEUTRAL_PROMPTS for _ in range(sweep_samples)]
            w = label_weights(2, alpha=a).repeat(len(p), 1)
            sweep[a] = mean(judge.score(o) for o in continue_prompts(model, tok, p, w, prefix, max_new_tokens, seed, **sampling))
        row["alpha_sweep"] = sweep
    row["samples"] = [{"prompt": p, "intended": labels[y], "text": o, "flipped": f}
                      for p, y, o, f in list(zip(prompts, want.tolist(), outs, outs_flipped))[:6]]
    return row


def evaluate_reference(model, tok, judge, examples, n_words=3):
    """The held-out texts' own continuations, scored like a generation: how often the judge agrees with the
    human label on human text (not a ceiling: a prefix can write more plainly than people do), and the base
    model's perplexity and the diversity of real reviews."""
    prompts, rests = zip(*(split_prompt(e.text, n_words) for e in examples))
    agree = [judge.label(r) == e.label for r, e in zip(rests, examples)]
    return {"acc_intended": mean(agree), "acc_intended_ci": wilson(sum(agree), len(agree)),
            "perplexity": perplexity(model, tok, prompts, [" " + r for r in rests]),
            "distinct1": distinct(rests, 1), "distinct2": distinct(rests, 2), "n_generations": len(rests)}


def wilson(k, n, z=1.96):
    """The Wilson score interval of a proportion k/n at 95% (z = 1.96): (low, high). Better than p +/- z*se
    near 0 and 1 and for small n; with n = 120 and p = 0.5 it is about +/- 9 points."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
