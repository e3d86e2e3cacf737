"""The fast path. Each piece replaces one named piece of the reference (gpt2.py, generate.py, trainer.py), says
what it gains and where (bench/bench_vs_peft.py: medians of 3 rounds on a 2-core AMD EPYC VM, torch 2.13 CPU),
and is held to the reference by tests/test_fast.py.

  piece                 replaces                                    gain measured
  SplitKLinear and      nn.Linear while decoding on a CPU, and      sampling at batch 1: 20.4 -> 32.8 tok/s;
  accelerate()          the weights' (out, in) storage              batch 8: 78.7 -> 104.1 (with stream below)
  stream / generate     generate.stream: the prompt's logits at     (in the row above)
                        its last position only; on a GPU each
                        step replayed as one CUDA graph over a
                        StaticKVCache
  lm_loss (LMHeadLoss)  trainer.lm_loss: no (N, V) logits held      training, GPT-2-small shape: 171.5 -> 200.8
  keep_freed_memory     glibc's malloc defaults                     tok/s, 89 MiB less peak; the 19M offline
                                                                    model: 87 MiB less, no faster

On by default; MINPREFIX_REFERENCE=1 in the environment (or --reference on train.py, sample.py, eval.py) runs
the reference alone, end to end.
"""
import ctypes
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from minprefix.generate import beam_settings, check_sampling, collect, decode, room
from minprefix.gpt2 import KVCache
from minprefix.tokenizer import EOT


def enabled():
    return os.environ.get("MINPREFIX_REFERENCE", "0").strip().lower() in ("", "0", "false", "no")


# ---- the weights: SplitKLinear and their storage (replace gpt2.py's nn.Linear) ----

class SplitKLinear(nn.Linear):
    """nn.Linear whose weight (out, in) is stored as (in, out), as GPT-2's Conv1D checkpoints store it.

    Decoding multiplies a few rows by each weight, so reading the weight is all the work, and MKL's
    matrix-vector product reads it with one core (and reads a (V, C) lm_head at a third of the speed of a
    (C, V) one). Cutting the inner dimension into one slice per core lets bmm read with all of them. Same
    products, summed in another order: equal to nn.Linear to float rounding (tests/test_fast.py)."""

    def forward(self, x):  # x (..., in) -> (..., out)
        w, k = self.weight, torch.get_num_threads()
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > 16 or k < 2 or not w.t().is_contiguous() or w.size(1) % k:
            return F.linear(x, w, self.bias)
        xs = x.reshape(rows, k, -1).transpose(0, 1)  # (k, rows, in/k)
        y = torch.bmm(xs, w.t().view(k, -1, w.size(0))).sum(0)  # (rows, out)
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)


def accelerate(model):
    """Swap the fast pieces into a frozen model, in place (the parameters stay the same objects). CPU only: on a
    GPU cuBLAS reads every layout at full speed and the gain is the CUDA graph in stream()."""
    if model.device.type != "cpu":
        return model
    keep_freed_memory()
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                child.__class__ = SplitKLinear  # same parameters, another forward
    for p in {id(m.weight): m.weight for m in model.modules() if isinstance(m, SplitKLinear)}.values():
        p.data = p.data.t().contiguous().t()  # (out, in) as a view of (in, out) storage; wte, tied, included
    return model


# ---- the loss (replaces trainer.lm_loss) ----

class LMHeadLoss(torch.autograd.Function):
    """cross_entropy(h @ wte.T, targets), targets of -100 ignored, without ever holding the (N, V) logits.

    One pass over the vocabulary in chunks keeps, per row, a running max m, s = sum_v exp(logit_v - m) and
    acc = sum_v exp(logit_v - m) * wte_v, rescaling all three when m grows (the online softmax of flash
    attention). Then log sum_v exp(logit_v) = m + log s, and the gradient is there already:
        d loss / d h   = (softmax @ wte - wte_y) / n = (acc / s - wte_y) / n
    Only when wte itself is trained (fine-tuning) does backward take a second pass, for
        d loss / d wte = (softmax^T @ h - onehot_y^T @ h) / n
    On a CPU 16 chunks stay in cache; on a GPU one chunk (16 would be 16 rounds of small kernels). Padding
    never enters the products."""

    @staticmethod
    def forward(ctx, h, wte, targets):  # h (N, C), wte (V, C), targets (N,) -> scalar
        V = wte.size(0)
        bad = (targets != -100) & ((targets < 0) | (targets >= V))
        if bad.any():  # F.cross_entropy refuses these too; indexing wte with them would read a wrong row
            raise IndexError(f"target {targets[bad][0].item()} is out of bounds: targets must be in [0, {V}) or -100")
        keep = (targets != -100).nonzero()[:, 0]
        h_kept, y = h[keep].float(), targets[keep]  # (n, C), (n,)
        lse, softmax_wte = _online_softmax(h_kept, wte, ctx.needs_input_grad[0])
        wte_y = wte[y].float()
        dh_kept = None if softmax_wte is None else softmax_wte - wte_y  # n times d loss / d h
        ctx.save_for_backward(h, wte, keep, y, lse, dh_kept)
        return (lse[:, 0] - (h_kept * wte_y).sum(dim=-1)).mean()  # mean of -log softmax_y

    @staticmethod
    def backward(ctx, grad):
        h, wte, keep, y, lse, dh_kept = ctx.saved_tensors
        scale = grad / y.numel()
        dh = dwte = None
        if ctx.needs_input_grad[0]:
            dh = torch.zeros_like(h)
            dh[keep] = (dh_kept * scale).to(h.dtype)
        if ctx.needs_input_grad[1]:
            h_kept = h[keep].float()
            parts = [(h_kept @ w.float().t() - lse).exp_().t() @ h_kept for w in wte.chunk(_chunks(h))]  # softmax^T h
            dwte = (torch.cat(parts).index_add_(0, y, h_kept, alpha=-1.0) * scale).to(wte.dtype)
        return dh, dwte, None


def _online_softmax(h, wte, with_softmax_wte):
    """h (n, C) -> (log sum_v exp(h . wte_v) (n, 1), softmax @ wte (n, C) or None), in one pass over wte's chunks."""
    m = torch.full((h.size(0), 1), float("-inf"), device=h.device)
    s = torch.zeros(h.size(0), 1, device=h.device)
    acc = torch.zeros_like(h) if with_softmax_wte else None
    for w in wte.chunk(_chunks(h)):  # (V/chunks, C)
        w = w.float()
        logits = h @ w.t()  # (n, V/chunks)
        m_new = torch.maximum(m, logits.max(dim=-1, keepdim=True).values)
        scale = (m - m_new).exp()
        p = (logits - m_new).exp_()
        s = s * scale + p.sum(dim=-1, keepdim=True)
        if acc is not None:
            acc = acc * scale + p @ w
        m = m_new
    return m + s.log(), None if acc is None else acc / s


def _chunks(h):
    return 16 if h.device.type == "cpu" else 1


def lm_loss(model, idx, targets, kv_cache=None):
    """Replaces trainer.lm_loss: the same mean cross-entropy of targets (-100 ignored) given the cache."""
    h = model.hidden(model.wte(idx), kv_cache)  # (B, T, C)
    return LMHeadLoss.apply(h.flatten(0, 1), model.lm_head.weight, targets.flatten())


@torch.no_grad()
def token_nll(model, idx, targets, kv_cache=None):
    """Replaces trainer.token_nll: the same per-token losses (B, T), 0 where the target is -100, without the
    (B, T, V) logits (the held-out pass scores every text under every label)."""
    h = model.hidden(model.wte(idx), kv_cache).flatten(0, 1)  # (B*T, C)
    flat = targets.flatten()
    keep = (flat != -100).nonzero()[:, 0]
    h_kept, wte = h[keep].float(), model.lm_head.weight
    lse, _ = _online_softmax(h_kept, wte, False)
    out = torch.zeros(flat.shape, device=h.device)
    out[keep] = lse[:, 0] - (h_kept * wte[flat[keep]].float()).sum(dim=-1)
    return out.view_as(targets)


# ---- decoding (replaces generate.stream) ----

@torch.no_grad()
def stream(model, idx, max_new_tokens=50, kv_cache=None, real=None, temperature=1.0, top_k=None, top_p=None,
           eot=EOT, seed=None, cuda_graph=None):
    """generate.stream with two pieces replaced: the prompt's logits only at its last position (the reference
    computes all T, and on a CPU the lm_head is most of a prompt's cost), and on a GPU each later step
    replayed as one CUDA graph over a StaticKVCache (cuda_graph: default on a GPU). Same tokens."""
    check_sampling(temperature, top_k, top_p)
    cache = KVCache() if kv_cache is None else kv_cache.copy()
    n = room(model, cache, idx, real, max_new_tokens)
    if n == 0:
        return
    logits = model.lm_head(model.hidden(model.wte(idx), cache, real)[:, -1])  # (B, V)
    graph = idx.is_cuda if cuda_graph is None else cuda_graph
    if graph and n > 1:
        step = StaticKVCache(cache, capacity=cache.length + n - 1).graph_step(model, capture=idx.is_cuda)
    elif not idx.is_cuda and n > 1:
        static = StaticKVCache(cache, capacity=cache.length + n - 1)
        step = lambda x: static.cpu_step(model, x)
    else:
        step = lambda x: model.lm_head(model.hidden(model.wte(x), cache)[:, -1])
    yield from decode(logits, step, n, temperature, top_k, top_p, eot, seed)


def generate(model, idx, max_new_tokens=50, num_beams=1, **kw):
    """generate.generate through the fast stream(); num_beams > 1: beam search, as generate.generate."""
    if num_beams > 1:
        from minprefix.beam import beam_search
        return beam_search(model, idx, num_beams, max_new_tokens, **beam_settings(num_beams, kw))
    return collect(stream(model, idx, max_new_tokens, **kw), idx.size(0), kw.get("eot", EOT))


class StaticKVCache:
    """Replaces KVCache while decoding on a GPU: buffers (B, H, capacity, D) written in place at a slot index
    held on the device, so that every step has the same shapes and addresses and can be replayed as one CUDA
    graph. At batch 1 a GPT-2 step is ~170 small kernels, which eager PyTorch takes longer to launch than the
    GPU takes to run. Attention reads all `capacity` slots and masks those not written yet."""

    def __init__(self, cache, capacity):  # cache: a KVCache holding the prefix and the prompt
        k0 = cache.layers[0][0]
        B, H, S, D = k0.shape
        if capacity < S:
            raise ValueError(f"capacity {capacity} is below the {S} positions already cached")
        self.k, self.v = [], []
        for k, v in cache.layers:
            for buffers, t in ((self.k, k), (self.v, v)):
                buffers.append(torch.zeros(B, H, capacity, D, dtype=t.dtype, device=t.device))
                buffers[-1][:, :, :S] = t
        self.real = torch.zeros(B, capacity, dtype=torch.bool, device=k0.device)
        self.real[:, :S] = True if cache.real is None else cache.real
        self.padded = cache.real is not None and not bool(cache.real.all())  # else no mask is needed at all
        self.slot = torch.tensor([S], device=k0.device)  # where the next token's keys and values go
        self.n = S  # the same, on the host (the CPU step)
        self.position = self.real.sum(1, keepdim=True) if cache.real is not None else \
            torch.full((B, 1), S, device=k0.device)  # (B, 1): the next token's position in its row

    def step(self, model, x):  # x (B, 1) -> logits (B, V); writes the token's keys and values, moves on by one
        B, C, nh = x.size(0), model.config.n_embd, model.config.n_head
        self.real.index_fill_(1, self.slot, True)
        mask = self.real[:, None, None, :]  # (B, 1, 1, capacity): the new token sees every real slot so far
        h = model.wte(x) + model.wpe(self.position)  # (B, 1, C)
        for block, ks, vs in zip(model.h, self.k, self.v):
            q, k, v = block.attn.c_attn(block.ln_1(h)).split(C, dim=2)
            q, k, v = (t.view(B, 1, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, H, 1, D)
            ks.index_copy_(2, self.slot, k)
            vs.index_copy_(2, self.slot, v)
            y = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask)
            h = h + block.attn.c_proj(y.transpose(1, 2).reshape(B, 1, C))
            h = h + block.mlp(block.ln_2(h))
        self.slot += 1
        self.position += 1
        return model.lm_head(model.ln_f(h))[:, -1]

    @torch.no_grad()
    def cpu_step(self, model, x):
        """step() as a CPU runs it best: the slot a Python int, attention over the slots written so far only, and
        no mask unless a prompt was padded. Replaces the reference's per-step mask, positions and the cache's
        growing torch.cat (a copy of every layer's keys and values at every step)."""
        B, C, nh = x.size(0), model.config.n_embd, model.config.n_head
        n = self.n
        self.real[:, n] = True
        mask = self.real[:, None, None, :n + 1] if self.padded else None
        h = model.wte(x) + model.wpe(self.position)  # (B, 1, C)
        for block, ks, vs in zip(model.h, self.k, self.v):
            q, k, v = block.attn.c_attn(block.ln_1(h)).view(B, 3, nh, 1, C // nh).unbind(1)  # (B, H, 1, D) each
            ks[:, :, n:n + 1] = k
            vs[:, :, n:n + 1] = v
            y = F.scaled_dot_product_attention(q, ks[:, :, :n + 1], vs[:, :, :n + 1], attn_mask=mask)
            h = h + block.attn.c_proj(y.view(B, 1, C))  # (B, H, 1, D) is (B, 1, C) heads side by side
            h = h + block.mlp(block.ln_2(h))
        self.n += 1
        self.position += 1
        return model.lm_head(model.ln_f(h))[:, -1]

    def graph_step(self, model, capture=True):
        """-> step(x): self.step, captured once as a CUDA graph and replayed (capture=False: eager, for tests)."""
        if not capture:
            return lambda x: self.step(model, x)
        device = self.slot.device
        with torch.cuda.device(device):  # the prompt's GPU, which need not be the current one
            x_in = torch.zeros(self.real.size(0), 1, dtype=torch.long, device=device)
            slot, position = self.slot.clone(), self.position.clone()
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up before capture, as CUDA graphs require. It writes the
                for _ in range(2):  # next slot, which exists (capacity covers every step) and the first
                    self.step(model, x_in)  # real step overwrites
                    self.slot.copy_(slot)
                    self.position.copy_(position)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.step(model, x_in)

        def step(x):
            x_in.copy_(x)
            graph.replay()  # writes this step's keys and values, moves the slot on, fills `logits`
            return logits
        return step


# ---- the process ----

def keep_freed_memory():
    """Stop glibc's malloc from handing big freed blocks back to the OS. Each CPU training step frees and
    allocates tens of MB (activations, gradients); unmapped, every one comes back through page faults that
    zero it again. jemalloc and tcmalloc, which PyTorch CPU users often preload, behave like this by default.
    No-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB (glibc's ceiling) come from the heap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap rather than trimming it
