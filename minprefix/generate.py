"""Writing text, the reference: the prompt in one pass, then one token at a time through the key/value cache.

A prefix is the cache the text starts from, so it costs nothing per token. Sampling is softmax, top-k, top-p and
torch.multinomial; beam search (minprefix/beam.py) is the other way to pick. minprefix/fast.py replaces pieces of
this loop where that pays, and tests hold the two to the same tokens.

A text longer than the context keeps its prefix and the most recent part of itself (Window); the mix of labels
can change between tokens (stream's tone, minprefix/tone.py). docs/long.md says what both cost.
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


def check_prompt(model, cache, idx, real):
    """Refuse a prompt with an empty row, or one that does not fit in the context after what is cached."""
    cached = cache.length if cache.real is None else int(cache.real.sum(1).max())
    new = idx.size(1) if real is None else int(real.sum(1).max())
    if idx.size(1) == 0 or (real is not None and not bool(real.any(1).all())):
        raise ValueError("a prompt has no tokens: every row needs at least one (a text starts with the end-of-text "
                         "token, <|endoftext|> in GPT-2, which is what sample.py gives an empty prompt)")
    if cached + new > model.config.n_positions:  # the prompt alone does not fit: refuse, as the model would
        raise ValueError(f"{cached} cached + {new} new positions exceed the context of {model.config.n_positions}")
    return cached, new


def room(model, cache, idx, real, max_new_tokens):
    """Beam search's max_new_tokens, checked: the search stops at the context's end (the last new token is picked
    but never fed back) and refuses to promise more. Sampling goes past the end (Window, below)."""
    cached, new = check_prompt(model, cache, idx, real)
    fits = model.config.n_positions - cached - new + 1
    if max_new_tokens > fits:
        raise ValueError(f"beam search stops at the context's end: {cached} cached + {new} prompt positions of "
                         f"{model.config.n_positions} leave room for {fits} new tokens, and {max_new_tokens} were asked "
                         f"for; ask for at most {fits}, or sample (num_beams 1), which writes past the window "
                         f"(docs/long.md)")
    return max(0, max_new_tokens)


KEEP = 0.5  # the share of the text's positions a re-encoding keeps (Window)


class Window:
    """What the model sees once a text is longer than its context (docs/long.md): the prefix, always, and the
    most recent part of the text. The text has n_positions - P positions after a P-position prefix. When the next
    token would fall past the last one, every row keeps its last `keep` tokens (KEEP of the text's positions:
    507 of 1,014 for GPT-2 and a 10-position prefix), which are encoded again from the prefix alone, at positions
    P, P+1, ..., and the text goes on: one pass over `keep` tokens every n_positions - P - keep tokens written.

    All rows are re-encoded together, when the longest of them (the least padded) reaches the end: shorter rows
    keep their left padding, masked as before, so each row has its own positions as it had before."""

    def __init__(self, model, prefix, idx, real, keep=KEEP):  # prefix: the KVCache the text starts from
        if not 0 < keep < 1:
            raise ValueError(f"keep is the share of the window kept at a re-encoding: in (0, 1), got {keep}")
        P = prefix.length if prefix.real is None else int(prefix.real.sum(1).max())
        self.positions = model.config.n_positions - P  # the text's
        self.keep = min(max(1, int(keep * self.positions)), self.positions - 1)
        self.idx = idx  # (B, t): the tokens the model sees, from the last re-encoding on
        self.real = torch.ones_like(idx, dtype=torch.bool) if real is None else real

    def left(self):  # tokens that can still be fed before a re-encoding
        return self.positions - int(self.real.sum(1).max())

    def push(self, x):
        """x (B, 1): the token about to be fed -> None while it fits; else the tokens to encode again from the
        prefix, x last: (idx (B, keep), real (B, keep))."""
        self.idx = torch.cat([self.idx, x], dim=1)
        self.real = torch.cat([self.real, torch.ones_like(x, dtype=torch.bool)], dim=1)
        if int(self.real.sum(1).max()) <= self.positions:
            return None
        self.idx, self.real = self.idx[:, -self.keep:], self.real[:, -self.keep:]
        return self.idx, self.real


REPEAT_WINDOW = 64  # frequency_penalty counts a token's uses among the last this many tokens written


def penalize(logits, recent, frequency_penalty):
    """logits (B, V), recent (B, W): the row's last W tokens written -> logits less frequency_penalty for each
    use of a token among them. OpenAI's frequency_penalty, counted over a window rather than the whole text: over
    2,000 tokens every common word has been used many times, and whole-text counts would push the text off them.
    It breaks the loops a small model falls into on long texts (docs/long.md)."""
    counts = torch.zeros_like(logits).scatter_add_(1, recent, torch.ones(recent.shape, dtype=logits.dtype,
                                                                         device=logits.device))  # (B, V)
    return logits - frequency_penalty * counts


def decode(logits, step, max_new_tokens, temperature, top_k, top_p, eot, seed=None, min_new_tokens=0, pick=sample,
           frequency_penalty=0.0):
    """The sampling loop. logits (B, V): the next token's; step: tokens (B, 1) -> the next logits (B, V).
    Yields (B, 1) tokens; a row that has written eot writes eot from then on; ends when every row has (eot None:
    never, every row runs to max_new_tokens). min_new_tokens: eot is held back (its logit -inf) until that many
    tokens are written. pick: sample, or a function that draws the same tokens (fast.sample). frequency_penalty:
    penalize() before each pick, over the last REPEAT_WINDOW new tokens."""
    generator = torch.Generator(device=logits.device).manual_seed(seed) if seed is not None else None
    done = torch.zeros(logits.size(0), dtype=torch.bool, device=logits.device)
    recent = torch.zeros(logits.size(0), 0, dtype=torch.long, device=logits.device)  # (B, <= REPEAT_WINDOW)
    for i in range(max_new_tokens):
        logits = logits.float()
        if eot is not None and i < min_new_tokens:
            logits = logits.index_fill(-1, torch.tensor([eot], device=logits.device), float("-inf"))
        if frequency_penalty:
            logits = penalize(logits, recent, frequency_penalty)
        x = pick(logits, temperature, top_k, top_p, generator)  # (B, 1)
        if eot is not None:
            x = x.masked_fill(done[:, None], eot)
            done |= x[:, 0] == eot
        if frequency_penalty:
            recent = torch.cat([recent, x], 1)[:, -REPEAT_WINDOW:]
        yield x
        if i == max_new_tokens - 1 or done.all():
            return
        logits = step(x)


def check_lengths(max_new_tokens, min_new_tokens):
    if min_new_tokens < 0 or min_new_tokens > max(0, max_new_tokens):
        raise ValueError(f"min_new_tokens must be between 0 and max_new_tokens ({max_new_tokens}), got {min_new_tokens}")


def replace_prefix(cache, prefix):
    """-> cache with its first P positions replaced by prefix's (P = prefix.length; 0, LoRA's: cache as it is): a
    new mix of the labels between two tokens. The text's own keys and values, computed under the old mix, stay."""
    P = prefix.length
    if P == 0:
        return cache
    layers = [(torch.cat([pk, k[:, :, P:]], dim=2), torch.cat([pv, v[:, :, P:]], dim=2))  # (B, H, S, D)
              for (k, v), (pk, pv) in zip(cache.layers, prefix.layers)]
    return KVCache(layers, cache.real, cache.boost, cache.prefix_len)


@torch.no_grad()
def stream(model, idx, max_new_tokens=50, kv_cache=None, real=None, temperature=1.0, top_k=None, top_p=None,
           *, eot, seed=None, min_new_tokens=0, tone=None, keep=KEEP, frequency_penalty=0.0):
    """Yields the new tokens, (B, 1) at a time. idx (B, T) prompt tokens, padded on the left where real (B, T) is
    False. kv_cache: where the text starts, e.g. a prefix (`prefix.cache(model, weights)`, one row per row of
    idx); it is left as it was. temperature 0 is greedy. eot: the model's end-of-text id (Tokenizer.eot), where a
    row stops; None: no row stops before max_new_tokens. Past the context's end the text goes on (Window: keep is
    the share of the window kept). min_new_tokens: no eot before that many tokens. tone: the mix on a schedule
    (minprefix/tone.py), token number j -> None, or (model, prefix cache) to write token j with. frequency_penalty:
    each use of a token among the last REPEAT_WINDOW written lowers its logit by this much (penalize)."""
    check_sampling(temperature, top_k, top_p)
    check_lengths(max_new_tokens, min_new_tokens)
    n, logits, step = start(model, idx, max_new_tokens, kv_cache, real, tone, keep)
    if n == 0:
        return
    yield from decode(logits, step, n, temperature, top_k, top_p, eot, seed, min_new_tokens,
                      frequency_penalty=frequency_penalty)


@torch.no_grad()
def start(model, idx, max_new_tokens=50, kv_cache=None, real=None, tone=None, keep=KEEP):
    """stream's first half, for a caller that picks the tokens itself (minprefix/serve.py: each row its own
    sampling settings): -> (n, logits (B, V) of the token after the prompt, step: tokens (B, 1) -> the next logits
    (B, V)). n: max_new_tokens, once the prompt is known to fit (check_prompt); with n == 0, logits and step are
    None. Call step under torch.no_grad(), at most n - 1 times: past the context's end it re-encodes (Window),
    and with a tone it changes the mix before the tokens the schedule says."""
    prefix = KVCache() if kv_cache is None else kv_cache
    check_prompt(model, prefix, idx, real)
    n = max(0, max_new_tokens)
    if n == 0:
        return 0, None, None
    window = Window(model, prefix, idx, real, keep)
    cache = prefix.copy()
    logits = model(idx, cache, real)[:, -1]  # the prompt at once; with left padding every row ends at T-1: (B, V)
    written = 0

    def step(x):  # the token just written (B, 1) -> the next one's logits (B, V)
        nonlocal model, prefix, cache, written
        written += 1
        change = tone(written) if tone is not None else None
        if change is not None:  # a new mix: another model to run (LoRA), or the prefix's positions rewritten
            model, new = change
            prefix = KVCache() if new is None else new.boosted(prefix.boost)
            cache = replace_prefix(cache, prefix)
        tail = window.push(x)
        if tail is None:
            return model(x, cache)[:, -1]
        tail_idx, tail_real = tail  # the context is full: the prefix, and the text's last part encoded again after it
        cache = prefix.copy()
        return model(tail_idx, cache, tail_real)[:, -1]

    return n, logits, step


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
