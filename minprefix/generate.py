"""Sampling with a key/value cache. A prefix is passed as the cache the text starts from, so it costs nothing per token."""
import torch

from minprefix.gpt2 import KVCache
from minprefix.tokenizer import EOT


@torch.no_grad()
def generate(model, idx, max_new_tokens=50, kv_cache=None, temperature=1.0, top_k=None, top_p=None,
             eot=EOT, seed=None):
    """idx (B, T) prompt tokens -> list of B lists of new tokens, each cut before its first <|endoftext|>.

    kv_cache: where the text starts, e.g. a prefix: `prefix.cache(model, weights)` gives one row per row of
    idx (B, H, P, D per layer). It is extended in place. temperature 0 means greedy.
    """
    B = idx.size(0)
    cache = kv_cache if kv_cache is not None else KVCache()
    gen = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    out = torch.empty(B, 0, dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    x = idx
    for _ in range(max_new_tokens):
        logits = model(x, cache, last_only=True)[:, -1].float()  # (B, V)
        x = pick(logits, temperature, top_k, top_p, gen)  # (B, 1)
        x = torch.where(done[:, None], torch.full_like(x, eot), x)
        out = torch.cat([out, x], dim=1)
        done |= x[:, 0] == eot
        if done.all() or cache.length + 1 >= model.config.n_positions:  # also stop at the end of the context
            break
    rows = out.tolist()
    return [row[:row.index(eot)] if eot in row else row for row in rows]


def pick(logits, temperature=1.0, top_k=None, top_p=None, generator=None):  # logits (B, V) -> next tokens (B, 1)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = (logits / temperature).softmax(dim=-1)
    V, ids = probs.size(-1), None
    if top_k is not None or (top_p is not None and top_p < 1.0):
        # The candidates, likeliest first. The nucleus is looked for among the top 1024 first: sorting the whole
        # vocabulary for every row costs more than the model's step on a CPU.
        k = min(top_k or V, V)
        probs_k, ids = probs.topk(min(k, 1024) if top_p is not None and top_p < 1.0 else k)
        if top_k is not None:
            probs_k = probs_k / probs_k.sum(dim=-1, keepdim=True)  # top-k first, then top-p on what is left (as HF)
        if top_p is not None and top_p < 1.0:
            if ids.size(-1) < k and (probs_k.sum(dim=-1) < top_p).any():  # a flat distribution: take all k
                probs_k, ids = probs.sort(dim=-1, descending=True)
                probs_k, ids = probs_k[:, :k], ids[:, :k]
                if top_k is not None:
                    probs_k = probs_k / probs_k.sum(dim=-1, keepdim=True)
            # nucleus: the smallest set whose mass reaches top_p; a token is dropped once the mass before it does
            probs_k = probs_k.masked_fill(probs_k.cumsum(dim=-1) - probs_k >= top_p, 0.0)
        probs = probs_k
    # inverse-CDF sampling: one uniform number per row (torch.multinomial is 20x slower here on a CPU)
    cdf = probs.cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)  # (B, 1)
    return choice if ids is None else ids.gather(-1, choice)
