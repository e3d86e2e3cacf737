"""Writing text, the reference: the prompt in one pass, then one token at a time through the key/value cache.

A prefix is the cache the text starts from, so it costs nothing per token. Sampling is softmax, top-k, top-p and
torch.multinomial; beam search (minprefix/beam.py) is the other way to pick. minprefix/fast.py replaces pieces of
this loop where that pays, and tests hold the two to the same tokens.
"""
import torch

from minprefix.gpt2 import KVCache


def check_sampling(temperature=1.0, top_k=None, top_p=None):
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None for off), got {top_p}")


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):  # logits (B, V) -> tokens (B, 1)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """logits (B, V) -> the distribution sample() draws from (B, V), for temperature > 0."""
    logits = logits / temperature
    if top_k is not None:  # keep the k likeliest (and any tied with the k-th), as HF does
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1:  # nucleus: the likeliest tokens until their mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token already reaches top_p
        drop[:, 0] = False  # the likeliest token always stays
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def room(model, cache, idx, real, max_new_tokens):
    """max_new_tokens, cut where the context ends: the last new token is sampled but never fed back."""
    cached = cache.length if cache.real is None else int(cache.real.sum(1).max())
    new = idx.size(1) if real is None else int(real.sum(1).max())
    if idx.size(1) == 0 or (real is not None and not bool(real.any(1).all())):
        raise ValueError("a prompt has no tokens: every row needs at least one (a text starts with the end-of-text "
                         "token, <|endoftext|> in GPT-2, which is what sample.py gives an empty prompt)")
    if cached + new > model.config.n_positions:  # the prompt alone does not fit: refuse, as the model would
        raise ValueError(f"{cached} cached + {new} new positions exceed the context of {model.config.n_positions}")
    return max(0, min(max_new_tokens, model.config.n_positions - cached - new + 1))


def decode(logits, step, max_new_tokens, temperature, top_k, top_p, eot, seed=None):
    """The sampling loop. logits (B, V): the next token's; step: tokens (B, 1) -> the next logits (B, V).
    Yields (B, 1) tokens; a row that has written eot writes eot from then on; ends when every row has (eot None:
    never, every row runs to max_new_tokens)."""
    generator = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    for i in range(max_new_tokens):
        x = sample(logits.float(), temperature, top_k, top_p, generator)  # (B, 1)
        if eot is not None:
            x = x.masked_fill(done[:, None], eot)
            done |= x[:, 0] == eot
        yield x
        if i == max_new_tokens - 1 or done.all():
            return
        logits = step(x)


@torch.no_grad()
def stream(model, idx, max_new_tokens=50, kv_cache=None, real=None, temperature=1.0, top_k=None, top_p=None,
           *, eot, seed=None):
    """Yields the new tokens, (B, 1) at a time. idx (B, T) prompt tokens, padded on the left where real (B, T) is
    False. kv_cache: where the text starts, e.g. a prefix (`prefix.cache(model, weights)`, one row per row of
    idx); it is left as it was. temperature 0 is greedy. eot: the model's end-of-text id (Tokenizer.eot), where a
    row stops; None: no row stops before max_new_tokens."""
    check_sampling(temperature, top_k, top_p)
    n, logits, step = start(model, idx, max_new_tokens, kv_cache, real)
    if n == 0:
        return
    yield from decode(logits, step, n, temperature, top_k, top_p, eot, seed)


@torch.no_grad()
def start(model, idx, max_new_tokens=50, kv_cache=None, real=None):
    """stream's first half, for a caller that picks the tokens itself (minprefix/serve.py: each row its own
    sampling settings): -> (n, logits (B, V) of the token after the prompt, step: tokens (B, 1) -> the next logits
    (B, V)). n: how many of max_new_tokens there is room for (room()); with n == 0, logits and step are None.
    Call step under torch.no_grad(), at most n - 1 times."""
    cache = KVCache() if kv_cache is None else kv_cache.copy()
    n = room(model, cache, idx, real, max_new_tokens)
    if n == 0:
        return 0, None, None
    logits = model(idx, cache, real)[:, -1]  # the prompt at once; with left padding every row ends at T-1: (B, V)
    return n, logits, lambda x: model(x, cache)[:, -1]


def generate(model, idx, max_new_tokens=50, num_beams=1, *, eot, **kw):
    """-> B lists of new tokens, each cut before its first eot (the model's end-of-text id: Tokenizer.eot).
    Arguments as stream's; with num_beams > 1 beam search instead of sampling (minprefix/beam.py: min_new_tokens,
    banned, length_penalty, as HF's)."""
    if num_beams > 1:
        from minprefix.beam import beam_search  # beam.py builds on this file
        return beam_search(model, idx, num_beams, max_new_tokens, eot=eot, **beam_settings(num_beams, kw))
    return collect(stream(model, idx, max_new_tokens, eot=eot, **kw), idx.size(0), eot)


def beam_settings(num_beams, kw):
    """generate's keywords for beam search: the sampling ones are refused by name (the search is deterministic)."""
    sampling = [k for k in ("temperature", "top_k", "top_p", "seed") if kw.get(k) is not None]
    if sampling:
        raise ValueError(f"{sampling[0]}= does not apply to beam search (num_beams={num_beams}), which is "
                         f"deterministic: drop it, or sample with num_beams=1")
    return {k: v for k, v in kw.items() if k not in ("temperature", "top_k", "top_p", "seed")}


def collect(steps, B, eot):  # stream's (B, 1) tokens -> B lists, each cut before its first eot
    steps = list(steps)
    rows = torch.cat(steps, dim=1).tolist() if steps else [[] for _ in range(B)]
    return [row[:row.index(eot)] if eot in row else row for row in rows]


def pad_left(prompts, pad, device=None):
    """Token lists of different lengths -> idx (B, T) padded on the left with `pad` (any id of the model's
    vocabulary: callers give Tokenizer.eot), real (B, T) False at the padding."""
    T = max(len(p) for p in prompts)
    idx = torch.tensor([[pad] * (T - len(p)) + list(p) for p in prompts], dtype=torch.long, device=device)
    real = torch.tensor([[False] * (T - len(p)) + [True] * len(p) for p in prompts], dtype=torch.bool, device=device)
    return idx, real
