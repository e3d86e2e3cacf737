"""Where a step's time goes, float32 against bfloat16, on the offline model (imdb-gpt2-19m, NOT GPT-2): the
figures behind the README's "why bfloat16 stops short of 2x". Medians over repeated steps, one process.

  training   batch 2 x 25 tokens, prefix 10 + MLP, 2 labels: the whole step (fast.lm_loss, AdamW), the lm_head
             loss alone (forward and backward), the blocks alone (with the prefix and its MLP), the MLP + AdamW alone
  beam       10 E2E tables x 5 beams x 40 tokens as eval.py --task e2e decodes: the step, and torch.profiler's
             self time per step by kind of operator

  python bench/profile_steps.py
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import profile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minprefix import GPT2, Tokenizer, fast  # noqa: E402
from minprefix.data import source_prompt  # noqa: E402
from minprefix.e2e import read_tables  # noqa: E402
from minprefix.generate import pad_left  # noqa: E402
from minprefix.method import build  # noqa: E402
from minprefix.prefix import KVPrefix  # noqa: E402

MODEL = os.environ.get("MINPREFIX_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "imdb-gpt2-19m"))


def median_ms(fn, n=30):
    for _ in range(5):
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
        fast.LMHeadLoss.apply(h0, model.lm_head.weight, tg.flatten()).backward()

    def blocks():
        _, cache = prefix.apply(model, w)
        model.hidden(model.wte(idx), cache).float().sum().backward()

    def mlp_adamw():
        _, cache = prefix.apply(model, w)
        sum(k.float().sum() for k, _ in cache.layers).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"whole step": median_ms(step), "lm_head loss": median_ms(head), "blocks + prefix MLP": median_ms(blocks),
            "prefix MLP + AdamW": median_ms(mlp_adamw)}


def kind(name, shapes):
    vocab = "50257" in shapes
    if "linear_pointwise" in name or name in ("aten::bmm", "aten::mm", "aten::addmm"):
        return "lm_head" if vocab else "the blocks' products"
    if name in ("aten::topk", "aten::logsumexp", "aten::amax", "aten::sub", "aten::exp", "aten::exp_", "aten::sum",
                "aten::log", "aten::cat") and (vocab or "502" in shapes):
        return "best_pairs (log-sum-exp, top-k)"
    if "scaled_dot" in name or name in ("aten::_softmax", "aten::masked_fill"):
        return "attention"
    if name == "aten::index_select":
        return "beam reorder"
    return "everything else"


def beam(dtype_name):
    tok = Tokenizer()
    tables = read_tables(os.path.join(REPO, "..", "shared", "data", "e2e", "test.txt.gz"), 10)
    idx, real = pad_left([source_prompt(tok, t) for t, _ in tables])
    model = fast.decoding_model(MODEL, dtype_name).requires_grad_(False)
    torch.manual_seed(0)
    prefix = build("kv", model, ["task"], tok, 5, True)

    def decode():
        with torch.no_grad():
            run, cache = prefix.apply(model, torch.ones(len(tables), 1))
            fast.beam_search(run, idx, 5, 40, kv_cache=cache, real=real, eot=None, banned=(198, 628))
    out = {"whole step": median_ms(decode, 5) / 40}
    with profile(record_shapes=True) as p:
        decode()
    for e in p.key_averages(group_by_input_shape=True):
        k = kind(e.key, str(e.input_shapes))
        out[k] = out.get(k, 0.0) + e.self_cpu_time_total / 1e3 / 41  # 40 steps and the prompt
    return out


def table(title, a, b):
    rows = [f"| {title} | float32 | bfloat16 |", "|---|---|---|"]
    rows += [f"| {k} | {a.get(k, 0):.1f} | {b.get(k, 0):.1f} |" for k in a]
    return "\n".join(rows)


if __name__ == "__main__":
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}; ms per step, medians\n")
    print(table("training step (ms)", training(torch.float32), training(torch.bfloat16)) + "\n")
    print(table("beam step (ms; parts: profiler self time)", beam("float32"), beam("bfloat16")))
