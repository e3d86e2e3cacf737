"""Where a step's time goes, float32 against bfloat16, on the offline model (imdb-gpt2-19m, NOT GPT-2) or any
model in the hub's layout (--model: GPT-2-small-shaped random weights, say): the figures behind the README's "why
bfloat16 stops short of 2x". One process; float32 and bfloat16 alternate, 5
rounds of each measurement, and each figure is the median of the 5 rounds' medians (this VM drifts between minutes).

  training   batch 2 x 25 tokens, prefix 10 + MLP, 2 labels: the whole step (fast.lm_loss, AdamW), the lm_head
             loss alone (forward and backward), the blocks alone (with the prefix and its MLP), the MLP + AdamW alone;
             and the whole step's minor page faults and kernel time (getrusage)
  beam       10 E2E tables x 5 beams x 40 tokens as eval.py --task e2e decodes: the step, and torch.profiler's
             self time per step by kind of operator
  bound      a beam step's products alone (the most bfloat16 could gain if nothing else took time), the fast
             step, and the same step compiled by torch.compile (Inductor), float32 against bfloat16
  pieces     fast.py's small pieces against what they replace, alone, on a beam step's or a training step's shapes
             (and int8's products on GPT-2 small's lm_head, one row and 50);
             and the allocator: a GPT-2-small prefix gradient's block allocated and freed, glibc's way and ours,
             and a training run's peak memory each way

  python bench/profile_steps.py
  python bench/profile_steps.py --model /path/to/gpt2-small-shaped --only steps
"""
import argparse
import os
import resource
import subprocess
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minprefix import GPT2, Tokenizer, fast  # noqa: E402
from minprefix.data import source_prompt  # noqa: E402
from minprefix.e2e import read_tables  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from minprefix.generate import pad_left  # noqa: E402
from minprefix.method import build  # noqa: E402
from minprefix.prefix import KVPrefix  # noqa: E402

load_env()  # .env at the checkout's root (minprefix/env.py), before MODEL reads the environment
MODEL = os.environ.get("MINPREFIX_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "imdb-gpt2-19m"))


def median_ms(fn, n=30, warmup=5):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def training(dtype):
    torch.manual_seed(0)
    model = GPT2.from_pretrained(MODEL, dtype=dtype).requires_grad_(False)
    fast.keep_freed_memory()
    prefix = KVPrefix(model.config, 2, 10, mlp=True)
    fast.for_training(model, prefix)
    opt = torch.optim.AdamW(prefix.parameters(), lr=5e-5, fused=True)
    idx, tg = torch.randint(0, 50257, (2, 25)), torch.randint(0, 50257, (2, 25))
    w = F.one_hot(torch.tensor([0, 1]), 2).float()
    h0 = torch.randn(50, model.config.n_embd, dtype=dtype, requires_grad=True)

    def step():
        _, cache = prefix.apply(model, w)
        loss = fast.lm_loss(model, idx, tg, cache)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def head():
        fast.LMHeadLoss.apply(h0, model.lm_head.weight, tg.flatten()).sum().backward()

    def blocks():
        _, cache = prefix.apply(model, w)
        model.hidden(model.wte(idx), cache).float().sum().backward()

    def mlp_adamw():
        _, cache = prefix.apply(model, w)
        sum(k.float().sum() for k, _ in cache.layers).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"whole step": step, "lm_head loss": head, "blocks + prefix MLP": blocks, "prefix MLP + AdamW": mlp_adamw}


def kind(name, shapes):
    vocab = "50257" in shapes
    if "linear_pointwise" in name or name in ("aten::mm", "aten::addmm"):
        return "lm_head" if vocab else "the blocks' products"
    if name in ("aten::embedding", "aten::index_select") and vocab:
        return "everything else"  # the token embeddings' lookup
    if vocab or any(s in shapes for s in ("50240", "785", "657")):  # the logits, whole or as top_k's blocks
        return "best_pairs (log-sum-exp, top-k)"
    if "scaled_dot" in name or name in ("aten::bmm", "aten::_softmax", "aten::masked_fill"):  # bmm: attend()'s
        return "attention"
    if name == "aten::index_select":
        return "beam reorder"
    return "everything else"


def e2e_prompts(tok):  # -> the first 10 E2E test tables' prompts, padded on the left: idx (10, T), real (10, T)
    tables = read_tables(os.path.join(REPO, "..", "shared", "data", "e2e", "test.txt.gz"), 10)
    return pad_left([source_prompt(tok, t) for t, _ in tables], tok.eot)


def beam(dtype_name):
    tok = Tokenizer()
    newlines = tok.newlines
    idx, real = e2e_prompts(tok)
    model = fast.decoding_model(MODEL, dtype_name).requires_grad_(False)
    fast.keep_freed_memory()  # as eval.py and sample.py run
    torch.manual_seed(0)
    prefix = build("kv", model, ["task"], tok, 5, True)

    def decode():
        with torch.no_grad():
            run, cache = prefix.apply(model, torch.ones(len(idx), 1))
            fast.beam_search(run, idx, 5, 40, kv_cache=cache, real=real, eot=None, banned=newlines)
    return decode


def bound(dtype_name):
    """-> ({name: fn}, compile seconds or an error): one beam step at the E2E search's shapes (10 tables x 5 beams,
    the prefix and the padded prompts cached, room for 40 tokens), three ways. Its products alone: every linear
    layer and the lm_head on 50 rows, one after another, as DecodeLinear runs them (what a step would take if
    nothing but its products took time). The fast step (StaticKVCache.cpu_step), without the beams' choice. And
    the same step compiled: torch.compile (Inductor, freezing) of StaticKVCache.step on the plain model."""
    from minprefix.gpt2 import KVCache
    idx, _ = e2e_prompts(Tokenizer())
    B, S = 50, 5 + idx.size(1)  # 5 prefix positions
    model = fast.decoding_model(MODEL, dtype_name).requires_grad_(False)
    fast.keep_freed_memory()  # as eval.py and sample.py run
    plain = GPT2.from_pretrained(MODEL, dtype=model.dtype).requires_grad_(False)
    c = model.config
    torch.manual_seed(0)
    shape = (B, c.n_head, S, c.n_embd // c.n_head)
    cache = KVCache([(torch.randn(shape, dtype=model.dtype), torch.randn(shape, dtype=model.dtype)) for _ in model.h])
    x = torch.randint(0, c.vocab_size, (B, 1))
    products = [(m, torch.randn(B, 1, m.in_features, dtype=model.dtype), m is b.mlp.c_fc)
                for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
    products.append((model.lm_head, torch.randn(B, 1, c.n_embd, dtype=model.dtype), False))
    fast_cache, plain_cache = fast.StaticKVCache(cache, S + 40), fast.StaticKVCache(cache, S + 40)

    def products_alone():
        for m, h, gelu in products:
            m.forward(h, gelu)

    def fast_step():
        if fast_cache.n == S + 40:  # full: start again from the prompt
            fast_cache.n = S
            fast_cache.real[:, S:] = False
        fast_cache.cpu_step(model, x)

    def compiled_step():
        if int(plain_cache.slot) == S + 40:
            plain_cache.slot.fill_(S)
            plain_cache.real[:, S:] = False
        compiled(x)
    torch._inductor.config.freezing = True  # the weights are constants: Inductor may pack them, as DecodeLinear does
    compiled = torch.compile(lambda x: plain_cache.step(plain, x))
    steps = {"the step's products alone": no_grad(products_alone), "the fast step (cpu_step)": no_grad(fast_step)}
    try:
        t = time.perf_counter()
        no_grad(compiled_step)()
        compile_s = time.perf_counter() - t
        steps["the step compiled (Inductor)"] = no_grad(compiled_step)
    except Exception as e:  # no C++ compiler, most often: Inductor's CPU backend builds its kernels with one
        compile_s = f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return steps, compile_s


def no_grad(f):  # as decoding runs: DecodeLinear takes its own ways only without gradients
    return torch.no_grad()(f)


def by_kind(decode):  # torch.profiler's self time per step of one beam search, by kind of operator
    out = {}
    with profile(record_shapes=True) as p:
        decode()
    for e in p.key_averages(group_by_input_shape=True):
        k = kind(e.key, str(e.input_shapes))
        out[k] = out.get(k, 0.0) + e.self_cpu_time_total / 1e3 / 41  # 40 steps and the prompt
    return out


def alternate(a, b, n, rounds=5, warmup=5):
    """a, b: {name: fn} -> ({name: ms}, {name: ms}), each the median of `rounds` medians of n calls, a and b taking
    turns."""
    out_a, out_b = {k: [] for k in a}, {k: [] for k in b}
    for _ in range(rounds):
        for k in a:
            out_a[k].append(median_ms(a[k], n, warmup))
            out_b[k].append(median_ms(b[k], n, warmup))
    return ({k: statistics.median(v) for k, v in out_a.items()}, {k: statistics.median(v) for k, v in out_b.items()})


def pieces():
    """ms per call: each fast piece beside the PyTorch code it replaces, on a beam step's shapes (50 rows of logits:
    10 tables x 5 beams) and the offline model's prefix MLP. The two of a pair alternate, 5 times 20 calls each;
    medians of the 5."""
    from minprefix.prefix import PrefixMLP
    torch.manual_seed(0)
    mlp = PrefixMLP(10, 256, 4096)  # one label's prefix MLP on the offline model: P=10, L*2*C = 4096

    def forward_backward(cls):
        def run():
            mlp.__class__ = cls
            mlp.zero_grad(set_to_none=True)
            mlp().float().sum().backward()
        return run
    f32 = torch.randn(50, 50257) * 4
    pairs = []
    for dtype in (torch.float32, torch.bfloat16):
        x = f32.to(dtype)
        name = str(dtype).removeprefix("torch.")
        pairs += [(f"exp of 50 x {x.size(1)} {name} logits, in float32: torch.exp, exp2(x log2 e)",
                   lambda x=x: torch.exp(x.float()), lambda x=x: torch.exp2(x.float() * fast.LOG2E)),
                  (f"log-sum-exp of the {name} logits, 8 rows at a time: torch.logsumexp, fast.logsumexp",
                   lambda x=x: [torch.logsumexp(r.float(), -1, keepdim=True) for r in x.split(8)],
                   lambda x=x: [fast.logsumexp(r) for r in x.split(8)])]
    pairs += [("top-10 of each row, float32: torch.topk, fast.top_k", lambda: f32.topk(10), lambda: fast.top_k(f32, 10)),
              ("prefix MLP forward + backward, one label: PrefixMLP float32, HalfPrefixMLP",
               forward_backward(PrefixMLP), forward_backward(fast.HalfPrefixMLP))]
    # GPT-2 small's shapes, a beam step's 50 rows, bfloat16
    q, ks, vs = (torch.randn(50, 12, n, 64).bfloat16() for n in (1, 80, 80))
    written = torch.arange(80) < 60  # 60 of the cache's 80 slots written so far
    pairs.append(("decoding attention, 50 rows x 12 heads, 60 of 80 slots written, bfloat16: the slice (bmm copies "
                  "it), the whole buffers masked (StaticKVCache.cpu_step)", lambda: fast.attend(q, ks[:, :, :60],
                  vs[:, :, :60], None), lambda: fast.attend(q, ks, vs, written.expand(50, 1, 1, 80))))
    c_fc = nn.Linear(768, 3072).bfloat16().requires_grad_(False)
    c_fc.__class__ = fast.DecodeLinear
    x = torch.randn(50, 1, 768).bfloat16()
    pairs.append(("c_fc and GELU, 50 rows, 768 -> 3072, bfloat16: F.gelu(DecodeLinear), fast.linear_gelu",
                  no_grad(lambda: F.gelu(c_fc(x), approximate="tanh")), no_grad(lambda: fast.linear_gelu(c_fc, x))))
    lm_head = fast.Int8Linear(nn.Linear(768, 50257, bias=False))  # GPT-2 small's, int8 x int8 through fbgemm
    q8, scale = lm_head.rounded_weight(), lm_head.scale
    for n in (1, 50):
        h = torch.randn(n, 768)
        pairs.append((f"GPT-2 small's lm_head in int8, {n} row{'s' * (n > 1)}: the weight alone int8 "
                      f"(torch._weight_int8pack_mm, the input bfloat16), int8 x int8 (fbgemm, Int8Linear)",
                      lambda h=h: torch.ops.aten._weight_int8pack_mm(h.bfloat16(), q8, scale.bfloat16()),
                      no_grad(lambda h=h: lm_head(h))))
    rows = []
    for what, ref, new in pairs:
        a, b = [], []
        for _ in range(5):
            a.append(median_ms(ref, 20))
            b.append(median_ms(new, 20))
        rows.append(f"| {what} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
                    f"{statistics.median(a) / statistics.median(b):.1f}x |")
    return "\n".join(["| a piece alone (ms per call) | PyTorch's | fast.py's | gain |", "|---|---|---|---|"] + rows)


def kernel(step, n=10):
    """-> (minor page faults, kernel ms) per call of step, from getrusage over n calls after 3 unmeasured."""
    for _ in range(3):
        step()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(n):
        step()
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return (r1.ru_minflt - r0.ru_minflt) / n, (r1.ru_stime - r0.ru_stime) / n * 1e3


ALLOCATE = """
import resource, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from minprefix import fast
if sys.argv[2] == "heap":
    fast.keep_freed_memory()
times, faults = [], []
for _ in range(50):
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(18432, 512).fill_(1.0)  # GPT-2 small's prefix MLP: one label's c_proj gradient, 37.7 MB
    times.append(time.perf_counter() - t)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
print(statistics.median(times) * 1e3, statistics.median(faults))
"""


TRAIN_PEAK = """
import sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/bench"]
import profile_steps
from minprefix import fast
if sys.argv[2] == "default":
    fast.keep_freed_memory = lambda: None  # training() calls it: here glibc keeps its defaults
profile_steps.MODEL = sys.argv[3]
step = profile_steps.training(torch.bfloat16)["whole step"]
for _ in range(20):
    step()
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""  # VmHWM, not ru_maxrss: Linux carries the parent's resident size at the fork over into a child's ru_maxrss


def allocator():
    """A 37.7 MB block allocated, written and freed 50 times, and 20 bfloat16 training steps (as above) on MODEL, in
    a child process for each setting (glibc keeps a freed heap block, so the two cannot share a process): -> table
    rows of ms and page faults per time (medians of the 50), and the training's peak resident memory (VmHWM)."""
    rows = ["| glibc's setting | a 37.7 MB gradient allocated, written and freed: ms | its page faults | 20 training "
            "steps: peak resident MB |", "|---|---|---|---|"]
    run = lambda *a: subprocess.run([sys.executable, "-c", *a], capture_output=True, text=True, check=True).stdout
    for mode, what in (("default", "glibc's default: mapped anew each time"), ("heap", "keep_freed_memory: the heap")):
        ms, faults = map(float, run(ALLOCATE, REPO, mode).split())
        peak = float(run(TRAIN_PEAK, REPO, mode, MODEL).split()[-1])
        rows.append(f"| {what} | {ms:.2f} | {faults:,.0f} | {peak:,.0f} |")
    return "\n".join(rows)


def table(title, a, b):
    rows = [f"| {title} | float32 | bfloat16 |", "|---|---|---|"]
    rows += [f"| {k} | {a.get(k, 0):.1f} | {b.get(k, 0):.1f} |" for k in a]
    return "\n".join(rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="a folder in the hub's layout (default: %(default)s)")
    p.add_argument("--only", choices=("steps", "pieces", "bound"), help="the training and beam steps only, the "
                   "small pieces alone only, or the beam step's bound only: its products alone and the step compiled "
                   "(default: steps and pieces)")
    args = p.parse_args()
    MODEL = args.model
    print(f"{MODEL}; {torch.get_num_threads()} threads, torch {torch.__version__}; ms per step, medians\n")
    if args.only == "bound":
        (steps32, compile32), (steps16, compile16) = bound("float32"), bound("bfloat16")
        a, b = alternate(steps32, steps16, 10, warmup=2)
        print("| one beam step, 50 rows (ms) | float32 | bfloat16 | float32 / bfloat16 |\n|---|---|---|---|")
        print("\n".join(f"| {k} | {a[k]:.1f} | {b[k]:.1f} | {a[k] / b[k]:.2f}x |" for k in a))
        for name, c in (("float32", compile32), ("bfloat16", compile16)):
            print(f"\n{name}: " + (f"compiled in {c:.1f} s" if isinstance(c, float) else c))
        sys.exit()
    if args.only == "pieces":
        fast.keep_freed_memory()  # as the scripts run (training() and beam() set it for the steps)
        print(pieces() + "\n\n" + allocator())
        sys.exit()
    train32, train16 = training(torch.float32), training(torch.bfloat16)
    a, b = alternate(train32, train16, 10)
    (a["page faults (a count)"], a["kernel time"]), (b["page faults (a count)"], b["kernel time"]) = \
        kernel(train32["whole step"]), kernel(train16["whole step"])
    print(table("training step (ms)", a, b) + "\n")
    decode32, decode16 = beam("float32"), beam("bfloat16")
    whole32, whole16 = alternate({"whole step": decode32}, {"whole step": decode16}, 2, warmup=1)
    steps = lambda d: {k: v / 40 for k, v in d.items()}
    print(table("beam step (ms; parts: profiler self time, one search)", dict(steps(whole32), **by_kind(decode32)),
                dict(steps(whole16), **by_kind(decode16))) + "\n")
    if args.only != "steps":
        print(pieces() + "\n\n" + allocator())
