"""Tone on a schedule: alpha, the weight of the positive label, changing over the tokens a text writes.

  "0.7"            alpha 0.7 throughout
  "0:0,600:1"      alpha 0 at the first new token, rising linearly to 1 at token 600, then held
  "0:0,400:0,800:1,1200:1,1600:0"   bleak for 400 tokens, brightening by token 800, bleak again by 1,600

Points are TOKEN:ALPHA, tokens counted from 0 (the first new token) and increasing; alpha is held at the first
point's value before it and at the last one's after it. The mix changes between two tokens without encoding the
text again: a method's apply(model, weights) at the new weights gives the model to run and the cache the text
starts from, and generate.stream swaps in the model (LoRA) and writes the new prefix over the cache's first P
positions (a K/V prefix's P positions are the mix itself; a soft prompt's are its mixed vectors run through the
model; with guidance, the labels' weights in the logits move too). The text's own keys and values stay as they
were written, under the mix of their time. A new mix is
applied whenever alpha has moved by ALPHA_STEP since the last one, and at the schedule's end: at most 101 times on
a ramp from 0 to 1, each costing one apply() (a merge of LoRA's weights; an einsum for a K/V prefix).
"""
import torch

from minprefix.guidance import DEFAULT_ANCHOR, guide
from minprefix.prefix import mix_weights

ALPHA_STEP = 0.01


class Schedule:
    """points [(token, alpha)], tokens increasing -> alpha at any token, linear between the points."""

    def __init__(self, points):
        self.points = list(points)

    @property
    def constant(self):
        return len({a for _, a in self.points}) == 1

    @property
    def end(self):  # the token from which alpha no longer changes
        return self.points[-1][0]

    def at(self, token):
        (t0, a0), (t1, a1) = self.points[0], self.points[-1]
        if token <= t0:
            return a0
        if token >= t1:
            return a1
        for (t0, a0), (t1, a1) in zip(self.points, self.points[1:]):
            if t0 <= token <= t1:
                return a0 + (a1 - a0) * (token - t0) / (t1 - t0)

    def __str__(self):
        if len(self.points) == 1 and self.points[0][0] == 0:
            return f"{self.points[0][1]:g}"
        return ",".join(f"{t}:{a:g}" for t, a in self.points)


def parse_schedule(text, extrapolate=False):
    """'0.7' or '0:0,600:1' -> Schedule; a ValueError that says what is wrong and what is allowed."""
    how = ("give a number (alpha throughout) or TOKEN:ALPHA points, e.g. '0:0,600:1' (alpha 0 at the first new "
           "token, rising to 1 at token 600, then held)")
    text = str(text).strip()
    if ":" not in text:
        try:
            points = [(0, float(text))]
        except ValueError:
            raise ValueError(f"--alpha {text!r} is not a number or a schedule: {how}") from None
    else:
        points = []
        for piece in text.split(","):
            token, sep, alpha = piece.strip().partition(":")
            try:
                points.append((int(token), float(alpha)))
            except ValueError:
                raise ValueError(f"--alpha {text!r}: point {piece.strip()!r} is not TOKEN:ALPHA (a whole number of "
                                 f"tokens, a colon, a number): {how}") from None
        for (t0, _), (t1, _) in zip(points, points[1:]):
            if t1 <= t0:
                raise ValueError(f"--alpha {text!r}: the tokens must increase, and {t1} comes after {t0}")
        if points[0][0] < 0:
            raise ValueError(f"--alpha {text!r}: token {points[0][0]} is negative; the first new token is 0")
    for _, alpha in points:
        if alpha != alpha or alpha in (float("inf"), float("-inf")):
            raise ValueError(f"--alpha {text!r}: {alpha} is not a finite number")
        if not 0.0 <= alpha <= 1.0 and not extrapolate:
            raise ValueError(f"--alpha must be in [0, 1] (1.0 = positive, 0.0 = negative), got {alpha:g}"
                             + (f" in {text!r}" if ":" in text else "") + "; add --extrapolate to go beyond")
    return Schedule(points)


class Tone:
    """A schedule applied through a method's one face, for generate.stream's tone: token number j -> None (the mix
    stays), or (the model to run, the prefix cache or None) at alpha(j). rows: the batch's rows, one mix for all.
    guidance, anchor: guidance at the logits (minprefix/guidance.py: guide() is method.apply at strength 0), whose
    labels' weights then move with alpha too."""

    def __init__(self, method, model, labels, schedule, rows, guidance=0.0, anchor=DEFAULT_ANCHOR, eot=None,
                 step=ALPHA_STEP):
        self.method, self.model, self.labels, self.schedule, self.rows, self.step = \
            method, model, labels, schedule, rows, step
        self.guidance, self.anchor, self.eot = guidance, anchor, eot
        self.applied = None
        self.changes = 0  # how many new mixes were applied after the first

    def start(self):  # -> (model to run, prefix cache) for the first new token
        return self.apply(self.schedule.at(0))

    @torch.no_grad()  # for decoding: a LoRA merges its mix into the weights
    def apply(self, alpha):
        self.applied = alpha
        weights = mix_weights(self.labels, alpha=alpha).to(self.model.device).repeat(self.rows, 1)
        return guide(self.method, self.model, weights, self.guidance, self.anchor, self.eot)

    def __call__(self, j):
        alpha = self.schedule.at(j)
        moved = abs(alpha - self.applied)
        if moved >= self.step * (1 - 1e-9) or (moved > 0 and j >= self.schedule.end):
            self.changes += 1
            return self.apply(alpha)
        return None
