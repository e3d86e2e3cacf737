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
from minprefix.tokenizer import EOT

DEAD = -1e9  # the score of a beam that is not there yet (HF's value)


def beam_search(model, idx, num_beams=5, max_new_tokens=100, min_new_tokens=0, banned=(), kv_cache=None, real=None,
                eot=EOT, length_penalty=1.0):
    """idx (B, T) prompt tokens, padded on the left where real (B, T) is False -> B lists of new tokens: each row's
    best beam, without its closing eot. kv_cache: where the text starts, e.g. a prefix (one row per row of idx);
    it is left as it was. banned: tokens never written (as in HF, eot is never banned this way: min_new_tokens
    holds it back). eot None: every hypothesis runs to max_new_tokens."""
    best = [hyps[0][1] for hyps in hypotheses(model, idx, num_beams, max_new_tokens, min_new_tokens, banned, kv_cache,
                                              real, eot, length_penalty)]
    return [row[:-1] if row[-1:] == [eot] else row for row in best]


@torch.no_grad()
def hypotheses(model, idx, num_beams=5, max_new_tokens=100, min_new_tokens=0, banned=(), kv_cache=None, real=None,
               eot=EOT, length_penalty=1.0):
    """Arguments as beam_search's -> per row, its num_beams finished hypotheses, best first: (score, new tokens
    with the closing eot where there is one). score: sum of log-probs / len(tokens)**length_penalty; these are HF's
    sequences_scores with num_return_sequences=num_beams."""
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    B, T = idx.shape
    N = num_beams
    cache = KVCache() if kv_cache is None else kv_cache.copy()
    n = room(model, cache, idx, real, max_new_tokens)  # the context's end: the last token is never fed back
    if n == 0:
        return [[(0.0, [])] for _ in range(B)]
    logits = model(idx, cache, real)[:, -1]  # the prompt at once; every row ends at T-1: (B, V)
    V = logits.size(-1)
    beams = torch.arange(B, device=idx.device).repeat_interleave(N)  # (B*N,): row b's beams are b*N .. b*N+N-1
    cache = cache.select(beams)  # B*N rows
    logp = logits.float().log_softmax(-1)[beams]  # (B*N, V)
    ban = torch.zeros(V, dtype=torch.bool, device=idx.device)
    ban[[t for t in banned if t != eot]] = True

    tokens = torch.zeros(B, N, 0, dtype=torch.long, device=idx.device)  # the live beams' new tokens (B, N, step)
    scores = torch.full((B, N), DEAD, device=idx.device)  # their sums of log-probs (B, N)
    scores[:, 0] = 0.0
    finished = [[] for _ in range(B)]  # per row, best first: at most N (score, tokens) that ended
    done = [False] * B
    for step in range(n):  # step 2
        logp[:, ban] = float("-inf")
        if eot is not None and step < min_new_tokens:
            logp[:, eot] = float("-inf")
        total = (logp.view(B, N, V) + scores[:, :, None]).view(B, N * V)  # every (beam, token) pair of a row
        top, pick = total.topk(2 * N)  # (B, 2N), best first
        beam, token = pick // V, pick % V  # (B, 2N) each
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
        cache = cache.select((beam + N * torch.arange(B, device=idx.device)[:, None]).view(-1))  # follow the beams
        logp = model(token.view(B * N, 1), cache)[:, -1].float().log_softmax(-1)  # (B*N, V)
    return finished  # step 6 is beam_search's
