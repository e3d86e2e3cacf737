"""Guidance at the logits, with the labels' own prefixes as experts (DExperts, Liu et al., ACL 2021; the same with
prefixes: Focused Prefix Tuning, Ma et al., ACL 2023).

A mix of labels can steer in two places. In the keys and values (the prefix's own dial, prefix.py): one row under
sum_i w_i prefix_i. At the logits: each sample is decoded as 1 + n rows of one batch on the same frozen model, an
anchor and each label alone, and the next token is drawn from

    z = z_anchor + strength * n / (n - 1) * (sum_i w_i z_i - mean_i z_i)                   (B, V)

With two labels and alpha (w = (alpha, 1 - alpha) for positive, negative) this is

    z = z_anchor + strength * (2 alpha - 1) * (z_positive - z_negative)

What the labels' texts share (their topic, their style) cancels in the difference; what tells them apart is what
is added. As DExperts does, the sum is taken only over the anchor's own nucleus, the likeliest tokens until their
probability reaches FILTER_P (its filter_p, 0.9): every other token is -inf, so guidance re-ranks what the anchor
would plausibly write and never brings in a token the anchor finds implausible. Where the anchor is so sure the text
ends that its nucleus is <|endoftext|> alone, the nucleus of the other tokens joins it: a text held back from
ending (min_new_tokens) then still has tokens to write. And guidance steers what is
written, not when it ends: <|endoftext|> keeps the anchor's logit (given eot). Without this the labels' texts'
small difference in where they end is amplified too: on data/ the negative end's texts came out half as long as
the positive end's, and shorter texts carry less tone (docs/results.md). The anchor:
  bare  the model without any prefix (its rows see none: the prefix's positions are masked out, theirs start
        at 0; a LoRA's rows get a zero change). DExperts' form: at alpha 1 the bare model plus strength times
        (positive expert - negative anti-expert); at alpha 0.5 the bare model itself. The text keeps the bare
        model's fluency, since the experts' shared domain cancels.
  mix   the K/V mix at alpha (what the dial writes without guidance), pushed further by the same difference.
Strength 0 is no guidance: the K/V mix alone, one row a sample.

Guided is a model to decode with: its forward takes B rows and returns B rows of guided logits, so the sampling
loop (generate.py) runs it as it runs any model; the cache it decodes from holds its (1 + n) * B rows. The
fast path (fast.stream) unwraps it and decodes the rows in one batch.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minprefix.generate import probabilities

DEFAULT_STRENGTH = 1.0  # sample.py's, eval.py's and the server's default: the frontier's best point under 2x the bare model's perplexity (docs/results.md)
DEFAULT_ANCHOR = "bare"
FILTER_P = 0.9  # DExperts' filter_p: guidance re-ranks the anchor's nucleus of this much probability


class Guided(nn.Module):
    """model decoding (1 + n) * B rows -> B rows of guided logits. weights (B, n): each sample's mix."""

    def __init__(self, model, weights, strength, eot=None, probabilities=probabilities):
        super().__init__()
        self.eot = eot  # its logit stays the anchor's (None: every token is guided)
        self.probabilities = probabilities  # generate's, or a faster piece that gives the same (fast.py)
        n = weights.size(1)
        if n < 2:
            raise ValueError(f"guidance needs two or more labels to tell apart, this checkpoint has {n}")
        self.model, self.strength, self.rows = model, strength, weights.size(0)
        self.config = model.config
        self.coef = strength * n / (n - 1) * (weights.float() - 1 / n)  # (B, n): each label's logits' weight

    def expand(self, t):  # (B, ...) -> ((1 + n) * B, ...): the mix rows, then label 0's, label 1's, ...
        return t.repeat(1 + self.coef.size(1), *([1] * (t.dim() - 1)))

    def combine(self, logits):  # ((1 + n) * B, ..., V) -> (B, ..., V)
        z = logits.float().unflatten(0, (1 + self.coef.size(1), self.rows))  # (1 + n, B, ..., V)
        coef = self.coef.to(z.device).t().reshape(-1, self.rows, *([1] * (z.dim() - 2)))  # (n, B, 1.., 1)
        anchor = z[0]
        nucleus = self.probabilities(anchor.reshape(-1, anchor.size(-1)), top_p=FILTER_P).view_as(anchor) > 0
        if self.eot is not None:  # the end alone in the nucleus: the rest's own nucleus joins it, so that a text
            only = (nucleus.sum(-1) == 1) & nucleus[..., self.eot]  # held back from ending (min_new_tokens) still
            if only.any():  # has tokens to write; elsewhere the nucleus is DExperts' own
                rest = anchor[only].index_fill(-1, torch.tensor([self.eot], device=z.device), float("-inf"))
                nucleus[only] |= self.probabilities(rest, top_p=FILTER_P) > 0
        guided = anchor + (coef * z[1:]).sum(0)
        if self.eot is not None:
            guided[..., self.eot] = anchor[..., self.eot]
        return guided.masked_fill(~nucleus, float("-inf"))

    def forward(self, idx, kv_cache=None, real=None):  # idx (B, T) -> guided logits (B, T, V)
        return self.combine(self.model(self.expand(idx), kv_cache, None if real is None else self.expand(real)))


ANCHORS = ("bare", "mix")


def guide(method, model, weights, strength, anchor=DEFAULT_ANCHOR, eot=None):
    """-> (the model to decode with, the cache the text starts from) for weights (B, n_labels), as method.apply
    gives them, with guidance at the logits of this strength from this anchor (0: method.apply itself, one row
    per sample). eot: the end-of-text id, whose logit guidance leaves to the anchor (sample.py, eval.py and the
    server give their tokenizer's)."""
    if not strength:
        return method.apply(model, weights)
    if anchor not in ANCHORS:
        raise ValueError(f"the anchor of guidance must be one of {', '.join(ANCHORS)}, got {anchor!r}")
    if not method.mixes:
        raise ValueError(f"guidance combines the labels' logits: this {method.kind} checkpoint has no labels to mix")
    B, n = weights.shape
    alone = F.one_hot(torch.arange(n, device=weights.device).repeat_interleave(B), n).to(weights)
    first = weights if anchor == "mix" else torch.zeros_like(weights)  # a zero mix: a LoRA's change is 0
    run, cache = method.apply(model, torch.cat([first, alone]))  # ((1 + n) * B, n): the anchor, then each label
    if anchor == "bare" and cache is not None:  # the anchor rows see no prefix: its positions masked out
        real = torch.ones(cache.layers[0][0].size(0), cache.length, dtype=torch.bool, device=weights.device)
        real[:B] = False
        cache.real = real if cache.real is None else cache.real & real
    return Guided(run, weights, strength, eot), cache
