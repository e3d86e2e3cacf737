"""Does the text carry the sentiment asked for? Continuations of held-out texts, scored by our BLEU/ROUGE,
judged by VADER (a lexicon judge nobody here trained), plus fluency, diversity and an alpha sweep; and, as
controlled-generation papers report it, from neutral prompts: the share of continuations with the tone asked for
at each end of the dial, judged by VADER and by a second lexicon (AFINN), beside the bare model's own share, and
the continuations' perplexity under the bare model beside that of its own samples."""
import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from minprefix import fast
from minprefix.generate import KEEP, Window, generate
from minprefix.guidance import DEFAULT_ANCHOR, guide
from minprefix.metrics import corpus_bleu, rouge_l, rouge_n
from minprefix.prefix import mix_weights

NEUTRAL_PROMPTS = ["The summer school", "The lectures", "The food", "Our mentor", "The labs", "The city",
                   "The housing", "The organisers", "The poster session", "The last day"]


class Judge:
    """VADER's compound score in [-1, 1]; its documented thresholds: >= 0.05 positive, <= -0.05 negative."""
    name = "VADER"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        self.vader = SentimentIntensityAnalyzer()

    def score(self, text):
        return self.vader.polarity_scores(text)["compound"]

    def label(self, text):
        s = self.score(text)
        return "positive" if s >= 0.05 else "negative" if s <= -0.05 else "neutral"


class AfinnJudge:
    """The second judge: AFINN (Nielsen 2011), 3,382 English words each rated -5..5 by a person, shipped with its
    package; a text's score is the sum of its words' ratings: > 0 positive, < 0 negative. Another lexicon and
    another rule than VADER's (no boosters, no negation handling), so a gain both see is not one lexicon's quirk."""
    name = "AFINN"

    def __init__(self):
        from afinn import Afinn
        self.afinn = Afinn(language="en")

    def score(self, text):
        return self.afinn.score(text)

    def label(self, text):
        s = self.score(text)
        return "positive" if s > 0 else "negative" if s < 0 else "neutral"


@torch.no_grad()
def prefix_attention(model, prefix, prompt, new, keep=KEEP, heads=False):
    """The share of attention that each layer gives the prefix (the quantity DTPA reports, Yang et al. 2025), for
    each token a text wrote: prompt and new token lists, prefix the KVCache the text was written from. The text is
    read again window by window, as generate.Window showed it while writing, one forward pass a window: a query
    sees the same keys at the same positions as when it was written. -> (len(new), n_layer): at row i, the
    attention of the query that wrote new token i (the prompt's last, then new token i - 1) on the prefix's
    positions, a mean over the heads (heads=True: each head's, (len(new), n_layer, n_head))."""
    P = prefix.length
    shares = []

    def hook(attn, args, output):  # args as CausalSelfAttention.forward's: x (1, T, C), mask, cache, layer
        x, mask, cache, layer = args
        B, T, C = x.shape
        H = attn.n_head
        q = attn.c_attn(x)[..., :C].view(B, T, H, C // H).transpose(1, 2)  # (1, H, T, D)
        k = cache.layers[layer][0]  # (1, H, S+T, D), this pass's keys appended
        scores = q @ k.transpose(-1, -2) * (C // H) ** -0.5  # (1, H, T, S+T)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        share = scores.float().softmax(-1)[..., :P].sum(-1)[0].t()  # (T, H)
        found[layer] = share if heads else share.mean(1)

    window = Window(model, prefix, torch.tensor([prompt]), None, keep)
    # each pass: the tokens it reads (a prompt or a re-encoded last part, then the tokens fed after it) and its
    # first query that wrote a token (the prompt's or the part's last; the queries before it wrote nothing)
    passes, tokens, first = [], list(prompt), len(prompt) - 1
    for t in new[:-1]:
        tail = window.push(torch.tensor([[t]]))
        if tail is None:
            tokens.append(t)
            continue
        passes.append((tokens, first))
        tokens = tail[0][0].tolist()
        first = len(tokens) - 1
    passes.append((tokens, first))
    handles = [block.attn.register_forward_hook(hook) for block in model.h]
    try:
        for tokens, first in passes:
            found = {}
            model.hidden(model.wte(torch.tensor([tokens], device=model.device)), prefix.copy())
            shares.append(torch.stack([found[i] for i in range(len(model.h))], dim=1)[first:])  # (T - first, L)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(shares)[:len(new)]


def split_prompt(text, n_words):
    """-> (the first n_words words, the rest): the prompt, and the reference its continuation is scored against."""
    words = text.split()
    return " ".join(words[:n_words]), " ".join(words[n_words:])


def continue_prompts(model, tok, prompts, weights, method, max_new_tokens, seed, progress=None, guidance=0.0,
                     anchor=DEFAULT_ANCHOR, **sampling):
    """One continuation per (prompt, weights row); prompts of equal token length are decoded together.
    weights: (N, n_labels) mixing weights per prompt; method None: the base model alone (weights ignored).
    progress: a tqdm bar, moved on by each prompt decoded. guidance, anchor: guidance at the logits (guidance.py)."""
    device = next(model.parameters()).device
    encoded = [[tok.eot] + tok.encode(p) for p in prompts]
    groups = defaultdict(list)
    for i, ids in enumerate(encoded):
        groups[len(ids)].append(i)
    outs = [None] * len(prompts)
    decode = fast.generate if fast.enabled() else generate
    for length in sorted(groups):
        rows = groups[length]
        idx = torch.tensor([encoded[i] for i in rows], device=device)
        run, cache = (model, None) if method is None else guide(method, model, weights[rows].to(device), guidance, anchor, tok.eot)
        for i, new in zip(rows, decode(run, idx, max_new_tokens, kv_cache=cache, seed=seed + length, eot=tok.eot,
                                       **sampling)):
            outs[i] = tok.decode(new)
        if progress is not None:
            progress.update(len(rows))
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


def evaluate_prefix(model, tok, judge, examples, labels, method, n_words=3, n_samples=1, max_new_tokens=40,
                    seed=0, sweep_samples=8, alphas=(0.0, 0.25, 0.5, 0.75, 1.0), sweep_prompts=NEUTRAL_PROMPTS,
                    progress=None, second=None, guidance=0.0, anchor=DEFAULT_ANCHOR, **sampling):
    """One row of the table. method None: the base model, whose 'intended' label is the held-out text's own.
    progress: a tqdm bar over every continuation this row writes (see n_continuations). second: a second judge
    for the neutral prompts' shares (AfinnJudge); guidance, anchor: guidance at the logits, every continuation."""
    go = lambda p, w: continue_prompts(model, tok, p, w, method, max_new_tokens, seed, progress, guidance=guidance,
                                       anchor=anchor, **sampling)
    row = {}
    if n_samples:  # 0: the neutral prompts only
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
        outs = go(prompts, onehot(want))
        outs_flipped = outs if method is None else go(prompts, onehot(flipped))
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
            "samples": [{"prompt": q, "intended": labels[y], "text": o, "flipped": f}
                        for q, y, o, f in list(zip(prompts, want.tolist(), outs, outs_flipped))[:6]],
        }
    judges = [judge] + ([second] if second is not None else [])
    p = [q for q in sweep_prompts for _ in range(sweep_samples)]
    if method is None:  # the bare model's own samples from the neutral prompts: what the dial's ends are held to
        own = go(p, None)
        row["neutral"] = from_neutral(model, tok, judges, p, own, own)
    elif method.mixes and len(labels) == 2:
        sweep, scores, texts = {}, {}, {}
        for a in alphas:
            w = mix_weights(labels, alpha=a).repeat(len(p), 1)
            texts[a] = go(p, w)
            scores[a] = [judge.score(o) for o in texts[a]]
            sweep[a] = mean(scores[a])
        row["alpha_sweep"] = sweep
        row["alpha_sweep_ci"] = {a: mean_interval(scores[a]) for a in alphas}
        row.update(dial(scores))
        if min(alphas) == 0.0 and max(alphas) == 1.0:
            row["neutral"] = from_neutral(model, tok, judges, p, texts[1.0], texts[0.0])
    return row


def from_neutral(model, tok, judges, prompts, at_1, at_0):
    """The dial's ends as controlled-generation papers report them, from neutral prompts: per judge, the share of
    the alpha-1 continuations (at_1) judged positive and of the alpha-0 ones (at_0) judged negative, with Wilson
    95% intervals; the perplexity of both ends' continuations under the bare model (model: no prefix); distinct-2
    and distinct-3 over both. For the bare model itself at_1 and at_0 are its own samples."""
    out = {"n": len(at_1)}
    for j in judges:
        pos = [j.label(o) == "positive" for o in at_1]
        neg = [j.label(o) == "negative" for o in at_0]
        out[j.name] = {"positive": mean(pos), "positive_ci": wilson(sum(pos), len(pos)),
                       "negative": mean(neg), "negative_ci": wilson(sum(neg), len(neg))}
    same = at_1 is at_0
    both = at_1 if same else at_1 + at_0
    out["perplexity"] = perplexity(model, tok, prompts if same else prompts + prompts, both)
    out["distinct2"], out["distinct3"] = distinct(both, 2), distinct(both, 3)
    return out


def n_continuations(method, n_examples, n_samples, sweep_samples, n_alphas, n_sweep_prompts):
    """How many continuations evaluate_prefix writes: the progress bar's total."""
    if method is None:
        return n_examples * n_samples + n_sweep_prompts * sweep_samples
    sweep = n_alphas * n_sweep_prompts * sweep_samples if method.mixes and method.n_labels == 2 else 0
    return 2 * n_examples * n_samples + sweep


def dial(scores):
    """The alpha sweep as a dial: {alpha: [VADER scores]} -> its least-squares slope (VADER per unit of alpha) with
    a 95% interval, whether the means rise monotonically, and whether the two ends' 95% intervals are apart."""
    alphas = sorted(scores)
    xs = [a for a in alphas for _ in scores[a]]
    ys = [y for a in alphas for y in scores[a]]
    mx, my = mean(xs), mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    resid = sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys)) / max(1, len(xs) - 2)
    half = 1.96 * math.sqrt(resid / sxx)
    means = [mean(scores[a]) for a in alphas]
    lo_end, hi_end = mean_interval(scores[alphas[0]]), mean_interval(scores[alphas[-1]])
    return {"dial_slope": slope, "dial_slope_ci": (slope - half, slope + half),
            "dial_monotone": all(b > a for a, b in zip(means, means[1:])),
            "dial_ends_apart": hi_end[0] > lo_end[1] or lo_end[0] > hi_end[1]}


def mean_interval(xs, z=1.96):
    """The mean's 95% interval (normal approximation, z * sd / sqrt(n)): (low, high)."""
    n = len(xs)
    if n < 2:
        return (float("nan"), float("nan"))
    m = mean(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return (m - z * sd / math.sqrt(n), m + z * sd / math.sqrt(n))


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
