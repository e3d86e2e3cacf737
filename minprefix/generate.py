"""Sampling with a key/value cache. A prefix is passed as the cache the text starts from, so it costs nothing per token."""
import torch

from minprefix.gpt2 import KVCache, StaticKVCache
from minprefix.tokenizer import EOT


@torch.no_grad()
def generate(model, idx, max_new_tokens=50, kv_cache=None, temperature=1.0, top_k=None, top_p=None,
             eot=EOT, seed=None, cuda_graph=None):
    """idx (B, T) prompt tokens -> list of B lists of new tokens, each cut before its first <|endoftext|>.

    kv_cache: where the text starts, e.g. a prefix: `prefix.cache(model, weights)` gives one row per row of
    idx (B, H, P, D per layer); generate extends it. temperature 0 means greedy. cuda_graph (default: on a
    GPU) replays each decoding step as one CUDA graph over a StaticKVCache copy of the cache.
    """
    B, T = idx.shape
    cache = kv_cache if kv_cache is not None else KVCache()
    max_new_tokens = min(max_new_tokens, model.config.n_positions - cache.length - T + 1)  # the context's end
    if cuda_graph if cuda_graph is not None else idx.is_cuda:
        cache = StaticKVCache(cache, model.config, B, cache.length + T + max_new_tokens, idx.device)
    gen = torch.Generator(device=idx.device).manual_seed(seed) if seed is not None else None
    logits = model(idx, cache, last_only=True)[:, -1]  # the prompt, at once: (B, V)
    step = cuda_graph_step(model, cache, B) if isinstance(cache, StaticKVCache) and idx.is_cuda else \
        (lambda x: model(x, cache, last_only=True)[:, -1])
    out, done = [], torch.zeros(B, dtype=torch.bool, device=idx.device)
    for i in range(max_new_tokens):
        x = pick(logits.float(), temperature, top_k, top_p, gen)  # (B, 1)
        x = torch.where(done[:, None], torch.full_like(x, eot), x)
        out.append(x)
        done |= x[:, 0] == eot
        if i == max_new_tokens - 1 or done.all():
            break
        logits = step(x)
    rows = torch.cat(out, dim=1).tolist() if out else [[] for _ in range(B)]  # max_new_tokens 0
    return [row[:row.index(eot)] if eot in row else row for row in rows]


def cuda_graph_step(model, cache, B):
    """One decoding step, (B, 1) tokens -> (B, V) logits, captured once as a CUDA graph. At batch 1 a GPT-2
    step is ~170 small kernels; eager PyTorch takes longer to launch them than the GPU takes to run them."""
    x_in = torch.zeros(B, 1, dtype=torch.long, device=cache.pos.device)
    start = cache.pos.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as CUDA graphs require; it writes one position ahead,
        for _ in range(2):  # which the first real step overwrites
            model(x_in, cache, last_only=True)
            cache.pos.copy_(start)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(x_in, cache, last_only=True)[:, -1]

    def step(x):
        x_in.copy_(x)
        graph.replay()  # writes this step's keys and values, advances cache.pos, fills `logits`
        return logits
    return step


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
