"""Beam search, the reference: the decoding the prefix-tuning paper reports its table-to-text results with.

The same search as HF transformers' `generate(num_beams=N, do_sample=False, early_stopping=False)` (5.x), step by
step, with the prefix riding in the key/value cache as in generate.py:

  1. The prompt in one pass; its cache is copied to N beams per row (row b's beams are rows b*N .. b*N+N-1).
     Only beam 0 starts live (the others score -1e9), so the first step does not pick one token N times.
  2. Each step: log-softmax of the next token (float32), banned tokens and, before min_new_tokens, eot set to
     -inf (not renormalised); add each beam's running score; keep the 2N best (beam, token) pairs of the row.
  3. Among those 2N, an eot at ranks 0..N-1 ends a hypothesis, scored sum(log p) / new_tokens**length_penalty,
     new_tokens counting the eot and not the prompt (or the prefix); an eot at ranks N..2N-1 is dropped. Every
     row keeps its N best finished hypotheses.
  4. The N best candidates that are not eot go on as the beams; the cache's rows follow them (select).
  5. A row is done once it holds N finished hypotheses and its best live beam, divided by its own length
     (tokens so far)**length_penalty, scores no better than the worst of them. The search ends when every row
     is done, or at max_new_tokens: there the N best candidates all finish, eot or not (HF's fallback for a row
     whose beams never wrote eot).
  6. Each row answers with its best finished hypothesis, without its closing eot.

HF 5.x is the reference (tests/test_beam.py holds every hypothesis and score to it). The paper's own code ran a
transformers 3.x fork, whose beam search divided by the whole sequence's length, prompt included, and whose
min_length=5 counted the prompt too; its numbers come from that older search.
"""
import torch

from minprefix.generate import room
from minprefix.gpt2 import KVCache
from minprefix.guidance import Guided

DEAD = -1e9  # the score of a beam that is not there yet (HF's value)


def beam_search(model, idx, num_beams=5, max_new_tokens=100, min_new_tokens=0, banned=(), kv_cache=None, real=None,
                *, eot, length_penalty=1.0):
    """idx (B, T) prompt tokens, padded on the left where real (B, T) is False -> B lists of new tokens: each row's
    best beam, without its closing eot. kv_cache: where the text starts, e.g. a prefix (one row per row of idx);
    it is left as it was. banned: tokens never written (as in HF, eot is never banned this way: min_new_tokens
    holds it back). eot: the model's end-of-text id (Tokenizer.eot); None: every hypothesis runs to
    max_new_tokens."""
    best = [hyps[0][1] for hyps in hypotheses(model, idx, num_beams, max_new_tokens, min_new_tokens, banned, kv_cache,
                                              real, eot=eot, length_penalty=length_penalty)]
    return [row[:-1] if row[-1:] == [eot] else row for row in best]


@torch.no_grad()
def hypotheses(model, idx, num_beams=5, max_new_tokens=100, min_new_tokens=0, banned=(), kv_cache=None, real=None,
               *, eot, length_penalty=1.0, steps=None, pairs=None):
    """Arguments as beam_search's -> per row, its num_beams finished hypotheses, best first: (score, new tokens
    with the closing eot where there is one). score: sum of log-probs / len(tokens)**length_penalty; these are HF's
    sequences_scores with num_return_sequences=num_beams. steps and pairs: the two pieces below (CacheSteps,
    best_pairs) unless minprefix/fast.py gives faster ones."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if isinstance(model, Guided):  # its rows would be reordered as beams
        raise ValueError("guidance at the logits is for sampling: decode without guidance, or sample (num_beams=1)")
    B, T = idx.shape
    N = num_beams
    cache = KVCache() if kv_cache is None else kv_cache.copy()
    n = room(model, cache, idx, real, max_new_tokens)  # the context's end: the last token is never fed back
    if n == 0:
        return [[(0.0, [])] for _ in range(B)]
    steps = (steps or CacheSteps)(model, cache, B * N, n)
    pairs = pairs or best_pairs
    logits = steps.start(idx, real, torch.arange(B, device=idx.device).repeat_interleave(N))  # (B*N, V): step 1
    never = [t for t in banned if t != eot]

    tokens = torch.zeros(B, N, 0, dtype=torch.long, device=idx.device)  # the live beams' new tokens (B, N, step)
    scores = torch.full((B, N), DEAD, device=idx.device)  # their sums of log-probs (B, N)
    scores[:, 0] = 0.0
    finished = [[] for _ in range(B)]  # per row, best first: at most N (score, tokens) that ended
    done = [False] * B
    for step in range(n):  # step 2
        ban = never + ([eot] if eot is not None and step < min_new_tokens else [])
        top, beam, token = pairs(logits, scores, ban, 2 * N)  # (B, 2N) each, best first
        last = step == n - 1
        ends = (token == eot) if eot is not None else torch.zeros_like(token, dtype=torch.bool)
        ends |= last  # at max_new_tokens every candidate ends
        normed = (top / ((step + 1) ** length_penalty)).tolist()  # as finished hypotheses: eot counted in the length
        for b in range(B):  # step 3
            if done[b]:  # a row that is done takes no more hypotheses
                continue
            for r in range(N):  # only the first N ranks may finish
                if ends[b, r]:
                    finished[b].append((normed[b][r], tokens[b, beam[b, r]].tolist() + [token[b, r].item()]))
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:N]
        if last:
            break
        keep = ends.int().argsort(dim=1, stable=True)[:, :N]  # step 4: the N best that go on, in rank order (B, N)
        beam, token, scores = beam.gather(1, keep), token.gather(1, keep), top.gather(1, keep)
        tokens = torch.cat([tokens.gather(1, beam[:, :, None].expand(-1, -1, tokens.size(2))), token[:, :, None]], 2)
        for b in range(B):  # step 5: can the best live beam still beat the worst finished hypothesis?
            best_live = (scores[b, 0] / ((step + 1) ** length_penalty)).item()
            if len(finished[b]) == N and best_live <= finished[b][-1][0]:
                done[b] = True
        if all(done):
            break
        rows = (beam + N * torch.arange(B, device=idx.device)[:, None]).view(-1)  # the surviving beams' rows
        logits = steps.next(token.view(B * N, 1), rows)  # (B*N, V)
    return finished  # step 6 is beam_search's


def best_pairs(logits, scores, ban, k):
    """logits (B*N, V) of every live beam, scores (B, N) their running sums of log-probs, ban: tokens set to -inf
    (not renormalised) -> the k best (beam, token) pairs of each row: (score + log-prob (B, k), beam (B, k),
    token (B, k)), best first."""
    B, N = scores.shape
    logp = logits.float().log_softmax(-1)
    logp[:, ban] = float("-inf")
    V = logp.size(-1)
    total = (logp.view(B, N, V) + scores[:, :, None]).view(B, N * V)  # every (beam, token) pair of a row
    top, pick = total.topk(k)
    return top, pick // V, pick % V


class CacheSteps:
    """The model through the KVCache: the prompt once, its cache copied to every beam; then one token per beam,
    the cache's rows following the surviving beams."""

    def __init__(self, model, cache, rows, n):
        self.model, self.cache = model, cache

    def start(self, idx, real, beams):  # prompt (B, T) -> the next token's logits, one row per beam (B*N, V)
        logits = self.model(idx, self.cache, real)[:, -1]  # every row ends at T-1: (B, V)
        self.cache = self.cache.select(beams)
        return logits[beams]

    def next(self, tokens, rows):  # the beams' new tokens (B*N, 1), after reordering to rows -> logits (B*N, V)
        self.cache = self.cache.select(rows)
        return self.model(tokens, self.cache)[:, -1]
