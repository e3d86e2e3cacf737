"""The fast path. Each piece replaces one named piece of the reference (gpt2.py, generate.py, trainer.py, prefix.py),
says what it gains and where (bench/bench_vs_peft.py: medians over rounds on a 2-core AMD EPYC VM, torch 2.13 CPU),
and is held to the reference by tests/test_fast.py.

  piece                 replaces                                    gain measured
  DecodeLinear and      nn.Linear while decoding on a CPU           GPT-2-small-shaped sampling at batch 1:
  accelerate()                                                      20.8 -> 50.8 tok/s; batch 8: 89.2 -> 207.1
  stream / generate     generate.stream and KVCache: a static       (in the row above); in half precision the
  StaticKVCache         cache written in place, the prompt's        whole buffers: bfloat16 attention alone,
                        logits at its last position only; in half   GPT-2 small's shapes, 50 rows: 1.73 -> 0.84
                        precision attention over the whole          ms a layer (profile_steps.py --only pieces)
                        buffers; on a GPU each step replayed as a
                        CUDA graph
  linear_gelu           F.gelu(c_fc(x)) while decoding              GPT-2 small's c_fc, 50 rows: 0.87 -> 0.74 ms
  probabilities,        generate.probabilities with top_p < 1       8 rows of the offline model's logits, t 0.8,
  sample                (the server's and stream's sampling): no    top_p 0.9: 83 -> 26 ms (a development run);
                        sort of the whole vocabulary                bench/bench_long.py times the draw
  beam_search,          beam.CacheSteps and beam.best_pairs         E2E beam search (10 tables x 5 beams):
  StaticSteps,                                                      241.4 -> 471.1 tables/min (3 rounds)
  best_pairs, top_k,                                                alone: top_k 3.1x torch.topk, logsumexp
  logsumexp                                                         1.2-1.3x torch.logsumexp (profile_steps.py)
  Int8Linear            nn.Linear while decoding (--dtype int8)     batch 1: 96.5 tok/s against float32's 50.8,
                                                                    CTranslate2 int8's 48.9; batch 8: 467.9
  FloatAttention,       CausalSelfAttention's attention in          a training step's attention 0.82 -> 0.33 ms,
  attend                bfloat16 / float16 on a CPU                 a beam step's 0.93 -> 0.29 (one thread)
  lm_loss (LMHeadLoss)  trainer.lm_loss, trainer.token_nll: no      offline model's training: float32 1.05x the
  token_nll             (N, V) logits; bfloat16 products            reference (within the noise); bfloat16 1.57x
                                                                    float32 (medians of 3 rounds, and round by
                                                                    round); GPT-2 small's shape 2.13x
  HalfPrefixMLP         prefix.PrefixMLP's forward in a bfloat16    one label's MLP, forward and backward:
                        training step                               5.09 -> 2.85 ms (profile_steps.py)
  keep_freed_memory     glibc's malloc defaults (process-wide:      a 37.7 MB gradient (GPT-2 small's prefix
                        the scripts opt in; the package never       MLP) allocated and freed: 10.46 -> 1.32 ms
                        calls it)

On by default; MINPREFIX_REFERENCE=1 in the environment (or --reference on train.py, sample.py, eval.py) runs
the reference alone, end to end.
"""
import ctypes
import os
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from minprefix.generate import (KEEP, Window, beam_settings, check_lengths, check_prompt, check_sampling, collect,
                                decode, replace_prefix)
from minprefix.gpt2 import CausalSelfAttention, KVCache
from minprefix.guidance import Guided
from minprefix.prefix import PrefixMLP


def enabled():
    return os.environ.get("MINPREFIX_REFERENCE", "0").strip().lower() in ("", "0", "false", "no")


# ---- the weights: DecodeLinear and their storage (replace gpt2.py's nn.Linear) ----

PACKED = {torch.float32, torch.bfloat16}  # the dtypes oneDNN packs here; float16 needs avx512_fp16 or avx_ne_convert


class DecodeLinear(nn.Linear):
    """nn.Linear as a CPU decodes fastest; with gradients wanted (or off a CPU) it is nn.Linear. Two ways, by rows:

    one row, float32   the weight's rows (one per output) cut into k = 2 x threads blocks, and one bmm of the k
                       blocks with the input row: each core reads its blocks straight through as dot products,
                       with no partial sums to add up. A step multiplies one row by each weight, so reading the
                       weights is all the work. On the 2-core AMD EPYC MKL's matrix-vector product (F.linear)
                       reads with one core, and this wins: GPT-2-small-shaped sampling at batch 1
                       (bench/bench_vs_peft.py) 47.5 tok/s, against 39.1 for cutting the inner dimension instead.
                       On the 2-core Intel Xeon with AMX F.linear reads with both and wins instead (GPT-2 small's
                       lm_head 3.9 ms against 11.7, c_attn 0.16 against 0.34). So which of the two a shape takes
                       is measured once per process, on first use (fastest), as for a few rows below.
    more rows, or      oneDNN's inner product on the weight packed once, on first use, into its blocked layout
    bfloat16           (kept beside the weight: a second copy). Batched sampling and beams multiply a few rows by
                       each weight, where MKL's small-M products fall to a quarter of the CPU's speed: GPT-2
                       small's lm_head for 8 rows, 7.0 ms against 15-24; bfloat16 one row 3.0 ms, 8 rows 3.4
                       (F.linear: 4.7 and 5.9). Up to FEW_ROWS float32 rows F.linear can win instead (the Intel
                       Xeon, 3 rows of the offline model's 256-wide layers: 0.011 ms against 0.025): timed too.
    float16            F.linear (oneDNN packs float16 only where the CPU has avx512_fp16 or avx_ne_convert).
    Same products, summed in another order: equal to nn.Linear to float rounding (tests/test_fast.py)."""

    def forward(self, x, gelu=False):  # x (..., in) -> (..., out); gelu: GPT-2's GELU of it, fused where packed
        way = self.way(x)
        if way != "linear" and x.dtype == torch.float32 and x.numel() // x.size(-1) <= FEW_ROWS:
            way = fastest(self, x, way)  # this CPU's faster product for so few rows, timed once
        if way == "packed":
            return self.packed_product(x, gelu)
        y = self.one_row(x) if way == "one row" else F.linear(x, self.weight, self.bias)
        return F.gelu(y, approximate="tanh") if gelu else y

    def packed_product(self, x, gelu=False):  # oneDNN's product with the weight packed by way()
        post = ("gelu", [], "tanh") if gelu else ("none", [], "")  # oneDNN applies the GELU to its float32 sums
        rows = x.numel() // x.size(-1)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), self.__dict__["packed"], self.bias, *post)
        return y.view(*x.shape[:-1], -1)

    def way(self, x):  # -> "linear", "one row" or "packed" (packing the weight first where it is new or changed)
        w = self.weight
        if x.device.type != "cpu" or torch.is_grad_enabled():
            return "linear"
        if x.numel() == x.size(-1) and w.dtype == torch.float32 and w.is_contiguous() and torch.get_num_threads() > 1:
            return "one row"
        if w.dtype not in PACKED or not torch.backends.mkldnn.is_available():
            return "linear"
        key = (w.data_ptr(), w._version, w.dtype)  # a new or changed weight (a LoRA merged into a copy) repacks
        if self.__dict__.get("packed_for") != key:
            try:
                self.__dict__["packed"] = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)
            except RuntimeError:  # a dtype this CPU's oneDNN cannot pack: PyTorch's own product from now on
                PACKED.discard(w.dtype)
                return "linear"
            self.__dict__["packed_for"] = key
        return "packed"

    def one_row(self, x):  # x (..., in), one row -> (..., out)
        w, b = self.weight, self.bias
        k, out = 2 * torch.get_num_threads(), w.size(0)
        m = out - out % k  # the rows that fill k equal blocks (all but one of GPT-2's 50,257 lm_head rows)
        col = x.reshape(1, -1).t().expand(k, -1, 1)  # (k, in, 1), strides (0, 1, in): MKL takes (0, 1, 1) far slower
        y = torch.bmm(w[:m].view(k, m // k, -1), col).view(-1)  # (k, m/k, in) @ (k, in, 1) -> (m,)
        if m < out:
            y = torch.cat([y, w[m:] @ x.reshape(-1)])
        return (y if b is None else y + b).view(*x.shape[:-1], out)


FEW_ROWS = 8  # up to this many float32 rows, which product is faster depends on the CPU: timed, not assumed
FASTEST = {}  # (in, out, rows, threads) -> "one row", "packed" or "linear", as fastest() found it


def fastest(linear, x, way, rounds=5):
    """-> way (DecodeLinear.way's choice for x) or "linear" (MKL's F.linear), whichever multiplies this many rows
    by this shape of weight faster here: timed on first use, the best of a few calls of each (a few ms, once per
    shape, row count and process). All are equal to nn.Linear to float rounding."""
    rows = x.numel() // x.size(-1)
    key = (linear.in_features, linear.out_features, rows, torch.get_num_threads())
    if key not in FASTEST:
        ways = {way: linear.one_row if way == "one row" else linear.packed_product,
                "linear": lambda v: F.linear(v, linear.weight, linear.bias)}
        best = {}
        for name, product in ways.items():
            product(x)  # warm-up
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                product(x)
                times.append(time.perf_counter() - t)
            best[name] = min(times)
        FASTEST[key] = min(best, key=best.get)
    return FASTEST[key]


def linear_gelu(linear, x):
    """F.gelu(linear(x), approximate="tanh"), GPT-2's MLP activation, fused into oneDNN's product where
    DecodeLinear packs its weight (GPT-2 small's c_fc at 50 rows in bfloat16: 0.87 -> 0.74 ms, profile_steps.py)."""
    if isinstance(linear, DecodeLinear):
        return linear.forward(x, gelu=True)
    return F.gelu(linear(x), approximate="tanh")


def accelerate(model):
    """Swap the fast pieces into a frozen model for decoding, in place (the parameters stay the same objects).
    CPU only: on a GPU cuBLAS reads every layout at full speed and the gain is the CUDA graph in stream()."""
    if model.device.type != "cpu":
        return model
    for_training(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                child.__class__ = DecodeLinear  # same parameters, another forward
    return model


def cpu_has(*flags):
    """True where /proc/cpuinfo lists any of these flags, False where it lists none, None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return bool(set(f.read().split()) & set(flags))
    except OSError:
        return None


def cpu_name():
    """The CPU's model name as /proc/cpuinfo gives it (what `lscpu` prints), else the platform's; for benchmarks'
    headers, which name the machine they ran on."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine() or "an unknown CPU"


def cpu_has_bfloat16():  # bfloat16 dot-product units: x86 avx512_bf16 or amx_bf16, Arm bf16
    return cpu_has("avx512_bf16", "amx_bf16", "bf16")


class Int8Linear(nn.Module):
    """Replaces nn.Linear for decoding in int8 (sample.py / eval.py --dtype int8) in a float32 model: the weight
    rounded to int8 per output row, w ~ q * scale with |q| <= 127, and no gradients. A batch-1 step reads a quarter
    of float32's bytes. Two kernels, the first where PyTorch has it:

    int8 x int8        fbgemm (PyTorch's x86 quantized engine) on the weight packed once into its layout: each
                       product rounds its input rows to uint8 on the fly (one scale for the whole input, from its
                       min and max), multiplies int8 by int8 (VNNI) and rescales to float32, as CTranslate2's
                       int8 does. GPT-2 small's lm_head: 1.2 ms against 3.1 for the kernel below at one row,
                       8.3 against 49.5 at 50 (profile_steps.py --only pieces).
    int8 weight only   PyTorch's _weight_int8pack_mm, the weight converted as it is read; compute-bound at one
                       row on this CPU. Its input in bfloat16, its only fast one (on float32 it was another 6x
                       slower at one row, 25x at 50: a development measurement). Where fbgemm is missing (not
                       x86) or refuses the weight.
    The input rounding costs about 1% of each product (tests/test_fast.py); greedy agreement and E2E scores by
    dtype in the README."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).bfloat16().float()  # exact in both kernels
        q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (out, in)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else linear.bias.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = int8_packed(q, scale, self.bias)  # fbgemm's copy of q; None where it has none
        if self.packed is None:
            self.register_buffer("weight_int8", q.contiguous())  # (out, in), as _weight_int8pack_mm reads it

    def forward(self, x):  # x (..., in) float32 -> (..., out) float32
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2, self.packed, REDUCE_RANGE)  # the bias added in float32
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight_int8, self.scale.bfloat16()).float()
            y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)

    def rounded_weight(self):  # -> q (out, in) int8, whichever kernel holds it
        if self.packed is None:
            return self.weight_int8
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()


# Without VNNI, fbgemm sums pairs of uint8 x int8 products in int16 (vpmaddubsw), which 8-bit inputs can overflow:
# there the input is rounded to 7 bits (twice the rounding error), as PyTorch's own x86 quantization does.
REDUCE_RANGE = cpu_has("avx512_vnni", "avx_vnni", "amx_int8") is not True


def int8_packed(q, scale, bias):
    """q (out, in) int8 and its per-row scale -> fbgemm's packed weight for torch.ops.quantized.linear_dynamic, or
    None where PyTorch's x86 quantized engine is missing or refuses it. PyTorch 2.13 warns that its quantized tensor
    type, through which the weight is packed, is deprecated (pytorch/pytorch#184982): the warning is kept quiet here
    and the weight-only kernel is the fallback the day it goes."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    except (RuntimeError, AttributeError):
        return None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
DTYPE_HELP = ("the model's weights; int8: int8 weights in a float32 model (fbgemm int8 x int8 products on x86), "
              "for decoding on a CPU (default: %(default)s)")  # sample.py and eval.py's --dtype


def half_precision_note(dtype, device):
    """A warning to print where bfloat16 will not pay, else None. Without the units oneDNN converts each product to
    float32 and back: the numbers are the same, the speed often below float32's."""
    if dtype != "bfloat16" or torch.device(device).type != "cpu" or cpu_has_bfloat16() is not False:
        return None
    return (f"warning: this CPU has no bfloat16 dot-product units (no avx512_bf16, amx_bf16 or bf16 in "
            f"/proc/cpuinfo): --dtype {dtype} runs, with the same results, but its products are converted to float32 "
            f"and back and may be slower than --dtype float32")


def decoding_model(name_or_path, dtype="float32", device="auto"):
    """GPT2.from_pretrained for sampling and evaluation (sample.py, eval.py): the fast pieces swapped in unless
    MINPREFIX_REFERENCE=1. dtype: float32, bfloat16, float16, or int8 (a bfloat16 model whose linear layers are
    Int8Linear: the fast path only)."""
    from minprefix.gpt2 import GPT2
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "int8" and not enabled():
        raise ValueError("--dtype int8 is a piece of the fast path (minprefix/fast.py): drop --reference, or unset "
                         "MINPREFIX_REFERENCE")
    model = GPT2.from_pretrained(name_or_path, dtype=DTYPES[dtype], device=device)
    note = half_precision_note(dtype, model.device)
    if note:
        print(note, file=sys.stderr)
    if enabled():
        accelerate(model)
    return quantize_int8(model) if dtype == "int8" else model


def quantize_int8(model):
    """Every linear layer of a float32 model (the lm_head too; wte stays float32 for the embedding lookups) ->
    Int8Linear, in place. CPU only."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(f"int8 decoding runs a float32 model on a CPU, not a {model.dtype} one on {model.device}")
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    release_freed_memory()  # the float32 weights just dropped: GPT-2 small's int8 model 770 -> 622 MB resident
    return model


# ---- attention in half precision (replaces gpt2.CausalSelfAttention's) ----

class FloatAttention(CausalSelfAttention):
    """CausalSelfAttention whose softmax(q k^T / sqrt(D) + mask) v runs as attend() runs it when the model is in
    bfloat16 or float16 on a CPU: PyTorch's CPU attention is 3x slower, forward and backward, in bfloat16 than in
    float32 at GPT-2's sizes, and q, k, v are small next to the weights, so converting them costs less than it
    saves. Same inputs and outputs."""

    def forward(self, x, mask, kv_cache, layer):  # as CausalSelfAttention.forward
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        k, v = kv_cache.update(layer, k, v)
        y = attend(q, k, v, mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v, as a CPU runs it fastest in half precision (one thread, 50 rows x 4
    heads against 60 keys, a beam search step: 0.93 ms in bfloat16's SDPA, 0.29 as the plain products below;
    training's 25 queries, forward and backward: 0.82 ms, 0.33 in float32). q (B, H, T, D); mask True: attend, or
    a float bias added to the scores (the prefix boost, GPT2.hidden)."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if q.size(2) == 1:  # decoding: the plain products, in the model's dtype (softmax sums in float32 inside)
        scores = (q @ k.transpose(-1, -2)) * q.size(-1) ** -0.5  # (B, H, 1, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1) @ v
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


def for_training(model, method=None):
    """Swap the pieces that pay while training (and decoding) into a model, and into the method trained on it, in
    place: FloatAttention where the model is in half precision on a CPU, HalfPrefixMLP where it is in bfloat16 on
    a CPU. The parameters stay the same objects."""
    if model.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float16):
        for block in model.h:
            if type(block.attn) is CausalSelfAttention:
                block.attn.__class__ = FloatAttention
    if method is not None and model.device.type == "cpu" and model.dtype == torch.bfloat16:
        for module in method.modules():
            if type(module) is PrefixMLP:
                module.__class__ = HalfPrefixMLP
    return model


# ---- the prefix MLP in bfloat16 (replaces prefix.PrefixMLP's forward in a training step) ----

class HalfPrefixMLP(PrefixMLP):
    """PrefixMLP whose products run in bfloat16 in a training step, when the frozen model is in bfloat16 on a CPU:
    autocast's mixed precision, so the parameters, their gradients and AdamW stay float32 and each product casts
    its weight. The MLP's products have P rows (the prefix's positions), where MKL's float32 runs far below the
    memory bandwidth; its forward and backward take about half the time in bfloat16 (2.85 against 5.09 ms a label
    at P=10, L*2*C=4096: bench/profile_steps.py). Its output goes to a bfloat16 model, which rounds it anyway.
    With gradients off (held-out passes, saving the table) it is PrefixMLP: what is saved is float32's product."""

    def forward(self):  # -> (P, L*2*C), bfloat16 in a training step
        if not torch.is_grad_enabled():
            return super().forward()
        with torch.autocast(self.wte.weight.device.type, dtype=torch.bfloat16):
            return super().forward()


# ---- the loss (replaces trainer.lm_loss) ----

class LMHeadLoss(torch.autograd.Function):
    """cross_entropy(h @ wte.T, targets, reduction="none"), targets of -100 ignored (their loss 0), without ever
    holding the (N, V) logits.

    One pass over the vocabulary in chunks keeps, per row, a running max m, s = sum_v exp(logit_v - m) and
    acc = sum_v exp(logit_v - m) * wte_v, rescaling all three when m grows (the online softmax of flash
    attention). Then log sum_v exp(logit_v) = m + log s, and the gradient is there already: for a row's loss l_i
    with upstream gradient g_i (1/n for the mean, other weights in the contrastive loss)
        d l_i / d h_i  = softmax_i @ wte - wte_y = acc / s - wte_y
    Only when wte itself is trained (fine-tuning) does backward take a second pass, for
        d loss / d wte = sum_i g_i (softmax_i - onehot_y)^T h_i
    On a CPU 16 chunks stay in cache; on a GPU one chunk (16 would be 16 rounds of small kernels). Padding
    never enters the products."""

    @staticmethod
    def forward(ctx, h, wte, targets):  # h (N, C), wte (V, C), targets (N,) -> losses (N,), float32
        V = wte.size(0)
        bad = (targets != -100) & ((targets < 0) | (targets >= V))
        if bad.any():  # F.cross_entropy refuses these too; indexing wte with them would read a wrong row
            raise IndexError(f"target {targets[bad][0].item()} is out of bounds: targets must be in [0, {V}) or -100")
        keep = (targets != -100).nonzero()[:, 0]
        h_kept, y = h[keep].float(), targets[keep]  # (n, C), (n,)
        lse, softmax_wte = _online_softmax(h_kept, wte, ctx.needs_input_grad[0])
        wte_y = wte[y].float()
        dh_kept = None if softmax_wte is None else softmax_wte - wte_y  # d loss_i / d h_i
        ctx.save_for_backward(h, wte, keep, y, lse, dh_kept)
        out = torch.zeros(targets.shape, device=h.device)
        out[keep] = lse[:, 0] - (h_kept * wte_y).sum(dim=-1)  # -log softmax_y
        return out

    @staticmethod
    def backward(ctx, grad):  # grad (N,): each row's upstream gradient
        h, wte, keep, y, lse, dh_kept = ctx.saved_tensors
        g = grad[keep][:, None].float()  # (n, 1)
        dh = dwte = None
        if ctx.needs_input_grad[0]:
            dh = torch.zeros_like(h)
            dh[keep] = (dh_kept * g).to(h.dtype)
        if ctx.needs_input_grad[1]:
            h_kept = h[keep].float()
            gh = h_kept * g
            parts = [(h_kept @ w.float().t() - lse).exp_().t() @ gh for w in wte.chunk(_chunks(h))]  # softmax^T (g h)
            dwte = torch.cat(parts).index_add_(0, y, gh, alpha=-1.0).to(wte.dtype)
        return dh, dwte, None


def _online_softmax(h, wte, with_softmax_wte):
    """h (n, C) float32 -> (log sum_v exp(h . wte_v) (n, 1), softmax @ wte (n, C) or None), in one pass over wte's
    chunks. The products run in wte's dtype (in bfloat16 3.5x float32's speed on a CPU with bfloat16 units; their
    sums are float32 inside), the softmax in float32 and in base 2 (see logsumexp): h is scaled by log2(e) once,
    so the logits come out of the products as x log2(e) and exp2 takes them as they are."""
    m = torch.full((h.size(0), 1), float("-inf"), device=h.device)  # running max, base 2
    s = torch.zeros(h.size(0), 1, device=h.device)
    acc = torch.zeros_like(h) if with_softmax_wte else None
    h_w = (h * LOG2E).to(wte.dtype)
    for w in wte.chunk(_chunks(h)):  # (V/chunks, C)
        logits = (h_w @ w.t()).float()  # (n, V/chunks), times log2(e)
        m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
        scale = (m - m_new).exp2()
        p = logits.sub_(m_new).exp2_()  # exp(logit - max)
        s = s * scale + p.sum(dim=-1, keepdim=True)
        if acc is not None:
            acc = acc * scale + (p.to(w.dtype) @ w).float()
        m = m_new
    return (m + s.log2()) / LOG2E, None if acc is None else acc / s


LOG2E = 1.4426950408889634  # exp(x) = 2 ** (x log2(e)); on a CPU PyTorch's exp2 with the scaling takes 0.89 ms
# over 50 x 50257 float32 logits against exp's 1.51 (bench/profile_steps.py)


def logsumexp(x):
    """x (n, V) of any float dtype -> torch.logsumexp(x.float(), -1, keepdim=True), (n, 1), through exp2: one
    scaled float32 copy of x, its max, and 2 ** (x - max) summed in place."""
    x2 = x.float() * LOG2E
    m = x2.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m.isinf(), 0.0)  # a row of -inf gives -inf, a row holding +inf gives +inf, as torch's
    return (x2.sub_(m).exp2_().sum(dim=-1, keepdim=True).log2_() + m) / LOG2E


def _chunks(h):
    return 16 if h.device.type == "cpu" else 1


def lm_loss(model, idx, targets, kv_cache=None):
    """Replaces trainer.lm_loss: the same mean cross-entropy of targets (-100 ignored) given the cache."""
    h = model.hidden(model.wte(idx), kv_cache)  # (B, T, C)
    flat = targets.flatten()
    return LMHeadLoss.apply(h.flatten(0, 1), model.lm_head.weight, flat).sum() / (flat != -100).sum()


def token_nll(model, idx, targets, kv_cache=None):
    """Replaces trainer.token_nll: the same per-token losses (B, T), 0 where the target is -100, without the
    (B, T, V) logits (the held-out pass scores every text under every label; the contrastive loss trains on them)."""
    h = model.hidden(model.wte(idx), kv_cache)  # (B, T, C)
    return LMHeadLoss.apply(h.flatten(0, 1), model.lm_head.weight, targets.flatten()).view_as(targets)


# ---- decoding (replaces generate.stream) ----

@torch.no_grad()
def stream(model, idx, max_new_tokens=50, kv_cache=None, real=None, temperature=1.0, top_k=None, top_p=None,
           *, eot, seed=None, cuda_graph=None, min_new_tokens=0, tone=None, keep=KEEP, frequency_penalty=0.0):
    """generate.stream with three pieces replaced: the prompt's logits only at its last position (the reference
    computes all T, and on a CPU the lm_head is most of a prompt's cost), each later step through a StaticKVCache,
    replayed as one CUDA graph on a GPU (cuda_graph: default on a GPU), and the nucleus drawn without sorting the
    vocabulary (sample). The same Window past the context's end and the same tone. Same tokens."""
    check_sampling(temperature, top_k, top_p)
    check_lengths(max_new_tokens, min_new_tokens)
    n, logits, step = start(model, idx, max_new_tokens, kv_cache, real, cuda_graph, tone, keep)
    if n == 0:
        return
    yield from decode(logits, step, n, temperature, top_k, top_p, eot, seed, min_new_tokens, sample, frequency_penalty)


@torch.no_grad()
def start(model, idx, max_new_tokens=50, kv_cache=None, real=None, cuda_graph=None, tone=None, keep=KEEP):
    """generate.start with stream's pieces replaced (above): -> (n, logits (B, V), step). Same logits. Past the
    context's end a new StaticKVCache is built from each re-encoding (generate.Window's); a tone's new prefix is
    written over the buffers' first P slots in place."""
    prefix = KVCache() if kv_cache is None else kv_cache
    check_prompt(model, prefix, idx, real)
    n = max(0, max_new_tokens)
    if n == 0:
        return 0, None, None
    graph = idx.is_cuda if cuda_graph is None else cuda_graph
    window = Window(model, prefix, idx, real, keep)
    guided, rows = unwrap(model)  # guidance: its rows decoded here, in one batch
    logits, steps = encode(guided, rows, prefix, idx, real, min(n - 1, window.left()), graph)
    written = 0

    def step(x):  # as generate.start's step
        nonlocal guided, rows, prefix, steps, written
        written += 1
        change = tone(written) if tone is not None else None
        if change is not None:
            guided, rows = unwrap(change[0])
            prefix = KVCache() if change[1] is None else change[1].boosted(prefix.boost)
            steps.retone(rows, prefix)
        tail = window.push(x)
        if tail is None:
            return steps(x) if guided is None else guided.combine(steps(guided.expand(x)))
        tail_idx, tail_real = tail  # the context is full: a new static cache from the prefix and the text's last part
        new_logits, steps = encode(guided, rows, prefix, tail_idx, tail_real, min(n - 1 - written, window.left()),
                                   graph)
        return new_logits

    return n, logits, step


def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """generate.sample drawing from probabilities() (below) instead of generate.probabilities: the same tokens, and
    no sort of the whole vocabulary where top_p < 1 (the offline model, 24 rows at sample.py's temperature 0.8 and
    top_p 0.9: a sampled step 0.40 -> 0.13 s on one loaded thread of the 2-core Xeon, a development measurement;
    bench/bench_long.py times the draw alone)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probabilities(logits, temperature, top_k, top_p), 1, generator=generator)


def unwrap(model):  # -> (the guidance.Guided wrapper or None, the model whose rows are decoded)
    if not isinstance(model, Guided):
        return None, model
    model.probabilities = probabilities  # the anchor's nucleus through the faster piece below
    return model, model.model


def encode(guided, model, prefix, idx, real, n, graph):
    """The prompt (or a window's last part) after the prefix -> (its last position's logits (B, V), Steps: up to n
    tokens fed one at a time). guided: the rows of guidance's wrapper, expanded here and combined into B."""
    if guided is not None:
        idx, real = guided.expand(idx), None if real is None else guided.expand(real)
    cache = prefix.copy()
    logits = model.lm_head(model.hidden(model.wte(idx), cache, real)[:, -1])  # (rows, V)
    return logits if guided is None else guided.combine(logits), Steps(model, cache, n, graph, idx.is_cuda)


class Steps:
    """One token at a time after encode(): through a StaticKVCache (a CUDA graph of its step on a GPU; its CPU step
    on a CPU), or the reference's KVCache where there is one token at most to feed. retone: a new mix (the prefix's
    positions rewritten in place; a new model's graph captured again)."""

    def __init__(self, model, cache, n, graph, cuda):
        self.model, self.cache, self.graph, self.cuda = model, cache, graph, cuda
        self.static = StaticKVCache(cache, capacity=cache.length + n) if n > 0 and (graph or not cuda) else None
        self.replay = self.static.graph_step(model, capture=cuda) if self.static is not None and graph else None

    def __call__(self, x):  # x (B, 1) -> logits (B, V)
        if self.replay is not None:
            return self.replay(x)
        if self.static is not None:
            return self.static.cpu_step(self.model, x)
        return self.model.lm_head(self.model.hidden(self.model.wte(x), self.cache)[:, -1])

    def retone(self, model, prefix):
        changed, self.model = model is not self.model, model
        if self.static is None:
            self.cache = replace_prefix(self.cache, prefix)
            return
        self.static.replace_prefix(prefix)
        if self.replay is not None and changed:  # the graph holds the old model's weights
            self.replay = self.static.graph_step(model, capture=self.cuda)


def generate(model, idx, max_new_tokens=50, num_beams=1, *, eot, **kw):
    """generate.generate through the fast stream(); num_beams > 1: the fast beam_search."""
    if num_beams > 1:
        return beam_search(model, idx, num_beams, max_new_tokens, eot=eot, **beam_settings(num_beams, kw))
    return collect(stream(model, idx, max_new_tokens, eot=eot, **kw), idx.size(0), eot)


def beam_search(model, idx, num_beams=5, max_new_tokens=100, *, eot, **kw):
    """beam.beam_search with its two pieces replaced (StaticSteps, best_pairs). Same hypotheses."""
    from minprefix.beam import hypotheses
    found = hypotheses(model, idx, num_beams, max_new_tokens, eot=eot, steps=StaticSteps, pairs=best_pairs, **kw)
    return [row[:-1] if row[-1:] == [eot] else row for row in (hyps[0][1] for hyps in found)]


def best_pairs(logits, scores, ban, k):
    """Replaces beam.best_pairs: the k best (beam, token) pairs of each row from each beam's k best tokens, and
    log-probs as logit - logsumexp only for those. The reference writes log_softmax over the whole vocabulary in
    float32, adds every beam's score to it and sorts N*V pairs; this reads the logits 8 rows at a time (a row's
    float32 copy stays in cache), takes their log-sum-exp through exp2 and each beam's k best tokens through
    block maxima (top_k). A row's k best pairs are among its beams' k best tokens, so the pairs are the same (up
    to the order of exact ties, and float rounding in the last bit)."""
    B, N = scores.shape
    lse, value, token = [], [], []
    for rows in logits.split(8):
        f = rows.float()  # float32 logits are not copied: the ban writes into them, as the reference's does
        lse.append(logsumexp(f))  # before the ban (banned tokens are not renormalised)
        if ban:
            f[:, ban] = float("-inf")
        v, t = top_k(f, k)  # each beam's k likeliest (8, k): float32 holds bfloat16's values exactly
        value.append(v)
        token.append(t)
    total = ((torch.cat(value) - torch.cat(lse)).view(B, N, k) + scores[:, :, None]).view(B, N * k)
    top, pick = total.topk(k)
    return top, pick // k, torch.cat(token).view(B, N * k).gather(1, pick)


def top_k(x, k, block=64):
    """x (n, V) float32 -> x.topk(k) (values, indices; ties in any order), 3.1x faster over GPT-2's vocabulary (50
    rows, k=10: 0.78 against 2.37 ms, bench/profile_steps.py). The k blocks of 64 with the largest maxima hold the
    k largest values (a block holding one of them has a max at least the k-th largest, and at most k blocks can),
    so topk runs on the block maxima and then on those k blocks, plus the V % 64 values left over."""
    n, V = x.shape
    whole = V - V % block
    if whole // block < k or not x.is_contiguous():
        return x.topk(k)
    blocks = x[:, :whole].view(n, whole // block, block)
    best = blocks.amax(dim=-1).topk(k).indices  # (n, k): the blocks holding the k largest
    values = blocks.gather(1, best[..., None].expand(-1, -1, block)).view(n, k * block)
    index = (best[..., None] * block + torch.arange(block, device=x.device)).view(n, k * block)
    if whole < V:
        values = torch.cat([values, x[:, whole:]], dim=1)
        index = torch.cat([index, torch.arange(whole, V, device=x.device).expand(n, -1)], dim=1)
    top, pos = values.topk(k)
    return top, index.gather(1, pos)


def probabilities(logits, temperature=1.0, top_k=None, top_p=None, candidates=1024):
    """Replaces generate.probabilities where top_p < 1 (the server's sampling, minprefix/serve.py): each row's
    nucleus found among its `candidates` likeliest tokens (torch.topk) rather than by sorting the whole vocabulary;
    a row whose nucleus may reach past them is sorted as the reference does. The nucleus is a prefix of the sorted
    order and the mass before each of its tokens is summed in the same order, so the probabilities are the same
    (up to which of two exactly tied tokens is kept at the nucleus's edge). On the offline model's own logits
    (temperature 0.8, top_p 0.9) the median nucleus is 57 tokens and 90% are under 1,621; 8 rows of GPT-2's
    vocabulary: the sort 75 ms, topk(1024) 6.5 ms (one loaded CPU thread: development measurements)."""
    from minprefix.generate import probabilities as reference
    if top_p is None or top_p >= 1 or logits.size(-1) <= candidates:
        return reference(logits, temperature, top_k, top_p)
    probs = reference(logits, temperature, top_k)  # temperature and top-k as the reference applies them
    top, order = probs.topk(candidates)  # (B, candidates), likeliest first
    before = top.cumsum(dim=-1) - top  # the mass before each token, as the reference sums it
    keep = before < top_p
    keep[:, 0] = True  # the likeliest token always stays
    out = torch.zeros_like(probs).scatter(-1, order, top.masked_fill(~keep, 0.0))
    wide = (~(before[:, -1] >= top_p)).nonzero()[:, 0]  # rows whose nucleus may go on past the candidates
    if len(wide):
        out[wide] = reference(logits[wide], temperature, top_k, top_p)
    return out


class StaticSteps:
    """Replaces beam.CacheSteps: the beams' keys and values in a StaticKVCache, reordered in place where the
    reference selects every layer's cache into new tensors and then concatenates each step's to them (two copies
    of the whole cache per step), and the prompt's logits at its last position only."""

    def __init__(self, model, cache, rows, n):
        self.model, self.cache, self.n = model, cache, n

    def start(self, idx, real, beams):
        model = self.model
        logits = model.lm_head(model.hidden(model.wte(idx), self.cache, real)[:, -1])  # (B, V)
        self.static = StaticKVCache(self.cache.select(beams), capacity=self.cache.length + self.n)
        return logits[beams]

    def next(self, tokens, rows):
        self.static.reorder(rows, same_below=self.cache.length)  # rows stay within a prompt's beams
        if not tokens.is_cuda:
            return self.static.cpu_step(self.model, tokens)
        logits = self.static.step(self.model, tokens)
        self.static.n += 1  # step() moves the slot on the device; reorder() reads it on the host
        return logits


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
        self.boost, self.prefix_len = cache.boost, cache.prefix_len  # as GPT2.hidden reads them

    def bias(self, real):
        """real (B, S): the keys a step sees -> GPT2.hidden's prefix boost as a float mask (B, 1, 1, S): -inf where
        not real, log(1 + boost * n / P) on the prefix's P keys, n the text's positions the new token sees."""
        P = self.prefix_len
        factor = 1 + self.boost * (self.position - P + 1).clamp(min=1) / P  # (B, 1)
        bias = torch.zeros(real.shape, device=real.device).masked_fill(~real, float("-inf"))
        bias[:, :P] += factor.log()
        return bias[:, None, None, :].to(self.k[0].dtype)

    def replace_prefix(self, prefix):  # generate.replace_prefix, in place: the first P slots take prefix's
        for buffers, pairs in ((self.k, [k for k, _ in prefix.layers]), (self.v, [v for _, v in prefix.layers])):
            for t, p in zip(buffers, pairs):
                t[:, :, :p.size(2)] = p

    def step(self, model, x):  # x (B, 1) -> logits (B, V); writes the token's keys and values, moves on by one
        B, C, nh = x.size(0), model.config.n_embd, model.config.n_head
        self.real.index_fill_(1, self.slot, True)
        mask = self.real[:, None, None, :]  # (B, 1, 1, capacity): the new token sees every real slot so far
        if self.boost:
            mask = self.bias(self.real)
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

    def reorder(self, rows, same_below=0):
        """Rows (B,) -> row i takes row rows[i]'s keys, values and positions (beam search's survivors).
        same_below: the positions that row i and row rows[i] already hold alike (a beam search's beams share their
        prompt's and prefix's), left in place: a step copies the beams' own tokens only, not the whole cache."""
        n = self.n
        for buffers in (self.k, self.v):
            for t in buffers:  # index_select: faster here than t[rows] on the strided slice
                t[:, :, same_below:n] = torch.index_select(t[:, :, same_below:n], 0, rows)
        self.real.copy_(self.real[rows])
        self.position.copy_(self.position[rows])
        self.padded = self.padded or not bool(self.real[:, :n].all())

    @torch.no_grad()
    def cpu_step(self, model, x):
        """step() as a CPU runs it best: the slot a Python int, attention over the slots written so far only, and
        no mask unless a prompt was padded. Replaces the reference's per-step mask, positions and the cache's
        growing torch.cat (a copy of every layer's keys and values at every step)."""
        B, C, nh = x.size(0), model.config.n_embd, model.config.n_head
        n = self.n
        self.real[:, n] = True
        # In half precision PyTorch's CPU bmm copies a slice of the buffers (not contiguous) before multiplying:
        # attending over the whole buffers, the slots not written yet masked, is faster (GPT-2 small's shapes, 50
        # rows: 1.73 -> 0.84 ms a layer, bench/profile_steps.py). float32's products read the slice as it is.
        whole = self.k[0].dtype != torch.float32
        end = self.real.size(1) if whole else n + 1
        mask = self.real[:, None, None, :end] if self.padded or whole else None
        if self.boost:
            mask = self.bias(self.real[:, :end])
        h = model.wte(x) + model.wpe(self.position)  # (B, 1, C)
        norm = lambda ln, h: F.layer_norm(h, (C,), ln.weight, ln.bias, ln.eps)  # the modules' forwards, called
        for block, ks, vs in zip(model.h, self.k, self.v):  # directly: a step makes ~100 of these calls
            attn, mlp = block.attn, block.mlp
            q, k, v = attn.c_attn.forward(norm(block.ln_1, h)).view(B, 3, nh, 1, C // nh).unbind(1)  # (B, H, 1, D)
            ks[:, :, n:n + 1] = k
            vs[:, :, n:n + 1] = v
            y = attend(q, ks[:, :, :end], vs[:, :, :end], mask)
            h = h + attn.c_proj.forward(y.view(B, 1, C))  # (B, H, 1, D) is (B, 1, C) heads side by side
            h = h + mlp.c_proj.forward(linear_gelu(mlp.c_fc, norm(block.ln_2, h)))
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

def glibc(name):
    """-> glibc's function `name` through ctypes, or None where there is no glibc (not Linux, or another libc)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def release_freed_memory():
    """Hand the heap's free memory back to the OS once (glibc's malloc_trim), where keep_freed_memory would keep it
    for good: after a one-off drop, such as the float32 weights that int8 replaces. No-op where there is no glibc."""
    malloc_trim = glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


def keep_freed_memory():
    """Stop glibc's malloc from handing big freed blocks back to the OS. Each CPU training step frees and
    allocates tens of MB (activations, gradients); unmapped, every one comes back through page faults that
    zero it again. So every block comes from the heap, and the heap keeps what is freed. jemalloc and tcmalloc,
    which PyTorch CPU users often preload, behave like this by default.
    It holds for the whole process, for good, so the package never calls it: train.py, sample.py and eval.py do
    (on the fast path), and a program using minprefix may. No-op where there is no glibc."""
    mallopt = glibc("mallopt")
    if mallopt is None:
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB (glibc's ceiling for it) come from the heap
    mallopt(-4, 0)  # M_MMAP_MAX: and larger ones too. GPT-2 small's prefix MLP has 37.7 MB gradients, mapped anew
    # each step otherwise, 9,217 page faults each: 10.46 against 1.32 ms a block (bench/profile_steps.py)
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap rather than trimming it
