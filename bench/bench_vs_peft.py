"""minprefix against HF transformers + PEFT and CTranslate2, on one machine, in alternating rounds.

Sides (each workload of each side in its own process, so that its memory is its own; for sampling, every side's
process stays up through all rounds and the sides decode in turns, one call each, so that minprefix and the
CTranslate2 it is compared with run seconds apart, not minutes):
  minprefix            the default path (minprefix/fast.py on), float32; -bf16 / -int8: --dtype bfloat16 / int8
  minprefix-reference  MINPREFIX_REFERENCE=1: the plain reference code, float32
  hf                   HF GPT2LMHeadModel, the prefix handed over as its cache (a DynamicCache of the same keys
                       and values): the correct HF baseline for decoding, checked to pick our greedy tokens;
                       for training, HF + PEFT's standard loop (its forward applies the prefix, or its LoRA)
  peft-generate        PeftModel.generate as shipped, which with transformers 5.24 / peft 0.21.2 drops the
                       prefix: timed, and checked (printed) for whether the prefix changed its tokens
  ct2-float32, -int8   CTranslate2 (pip install ctranslate2), the engine a user picks for fast CPU decoding, on the
                       same weights converted with its converter; it cannot take a prefix as keys and values, so
                       its prompt is 10 real tokens longer (as many positions as the prefix)

Workloads:
  train-synthetic   GPT-2-small-shaped random weights, batch 2 x 64 tokens, prefix 10, MLP, AdamW: tokens/s
  train-real        data/train.jsonl, batch 2, one epoch on the offline model (imdb-gpt2-19m, NOT GPT-2), prefix 10
                    with its MLP: tokens of text per second (padding not counted) and the held-out loss after it;
                    minprefix trains both labels side by side in the same shuffled batches; PEFT one adapter per
                    label, each on its label's texts
  train-lora        the same with LoRA r=4, alpha 32: minprefix on the query and value parts of c_attn; PEFT on
                    c_attn (it addresses GPT-2's fused layer as one: queries, keys and values, 1.5x the parameters)
  sample-b1, -b8    GPT-2-small-shaped random weights, prompt 8 tokens, prefix 10, 128 new tokens, greedy
  beam-e2e          the offline model, 10 E2E test tables x 5 beams, 40 new tokens each (<|endoftext|> off, so
                    every side does the same work), as eval.py --task e2e decodes: tables per minute
  train-real-gpt2-shape, beam-e2e-gpt2-shape
                    the same two on GPT-2-small-shaped random weights (what GPT-2 small itself would cost, which
                    cannot be downloaded here), float32 against bfloat16 (and int8 for the beams): speed only
                    (the loss of random weights says nothing, and is not reported)

Every figure is the median over --rounds rounds with its min-max (a sampling round: 3 turns, its figure the
median of its 3 decodings; minprefix / CTranslate2 also decoding by decoding, turn against turn). Two limits
beside them: the machine's memory bandwidth (the fastest of a few 1 GiB reads, same threads), which bounds
batch-1 decoding (a step reads every weight once), and its peak arithmetic (the fastest of a few large matrix
products, float32 and bfloat16), which bounds training (4 multiply-adds per weight and position: the forward and
the gradient of the input; a frozen model computes no weight gradients).

  python bench/bench_vs_peft.py              # CPU, 3 rounds (about 40 min on 2 cores)
  python bench/bench_vs_peft.py --only sample-b1 sample-b8 --rounds 5
  python bench/bench_vs_peft.py --device cuda
"""
import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from minprefix.env import load_env  # noqa: E402

load_env()  # .env at the checkout's root (minprefix/env.py), before the settings below read the environment
P, TRAIN_B, TRAIN_T, NEW_TOKENS, PROMPT = 10, 2, 64, 128, 8
OFFLINE = os.environ.get("MINPREFIX_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "imdb-gpt2-19m"))
PLAN = {
    "train-synthetic": ["minprefix", "minprefix-bf16", "minprefix-reference", "hf"],
    "train-real": ["minprefix", "minprefix-bf16", "minprefix-reference", "hf"],
    "train-lora": ["minprefix", "minprefix-bf16", "hf"],
    "sample-b1": ["minprefix", "minprefix-bf16", "minprefix-int8", "minprefix-reference", "hf", "peft-generate",
                  "ct2-float32", "ct2-int8"],
    "sample-b8": ["minprefix", "minprefix-bf16", "minprefix-int8", "minprefix-reference", "hf", "peft-generate",
                  "ct2-float32", "ct2-int8"],
    "beam-e2e": ["minprefix", "minprefix-bf16", "minprefix-int8", "minprefix-reference"],
    "train-real-gpt2-shape": ["minprefix", "minprefix-bf16"],
    "beam-e2e-gpt2-shape": ["minprefix", "minprefix-bf16", "minprefix-int8"],
}
DTYPE = {"bf16": "bfloat16", "int8": "int8"}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def side_dtype(side):  # "minprefix-bf16" -> "bfloat16"
    return DTYPE.get(side.rsplit("-", 1)[-1], "float32")


class Peak:
    """Peak memory of one workload: GPU bytes allocated, or on a CPU the process's VmHWM (reset before)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak resident set size (Linux)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            with open("/proc/self/status") as f:
                self.bytes = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


def timed(fn, device, repeats, warm_up=None):
    """Median seconds per call over `repeats` calls, after one warm-up call (of warm_up, if given)."""
    (warm_up or fn)()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- decoding ----

def prompt_and_prefix(device, config, batch, seed=1):
    torch.manual_seed(seed)
    idx = torch.randint(0, 50257, (batch, PROMPT), device=device)
    L, H, C = config.n_layer, config.n_head, config.n_embd
    kv = [(torch.randn(batch, H, P, C // H, device=device), torch.randn(batch, H, P, C // H, device=device))
          for _ in range(L)]  # a prefix's keys and values, the same for both sides
    return idx, kv


def ours_sampler(model, device):
    from minprefix import fast
    from minprefix.generate import generate
    from minprefix.gpt2 import KVCache
    decode = fast.generate if fast.enabled() else generate

    def sample(batch, new_tokens=NEW_TOKENS):
        idx, kv = prompt_and_prefix(device, model.config, batch)
        kv = [(k.to(model.dtype), v.to(model.dtype)) for k, v in kv]
        return decode(model, idx, new_tokens, kv_cache=KVCache(kv), temperature=0, eot=None)
    return sample


def hf_sampler(model, device, peft_model=None):
    from transformers import DynamicCache

    def sample(batch, new_tokens=NEW_TOKENS):
        idx, kv = prompt_and_prefix(device, model.config, batch)
        mask = torch.ones(batch, P + PROMPT, dtype=torch.long, device=device)
        with torch.no_grad():
            if peft_model is not None:  # as shipped: PEFT brings its own prefix (its table holds the same values)
                out = peft_model.generate(input_ids=idx, attention_mask=mask[:, P:], max_new_tokens=new_tokens,
                                          min_new_tokens=new_tokens, do_sample=False,
                                          pad_token_id=model.config.eos_token_id)
            else:
                out = model.generate(idx, attention_mask=mask, cache=DynamicCache(ddp_cache_data=kv),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=model.config.eos_token_id)
        return out[:, PROMPT:].tolist()
    return sample


def ct2_sampler(folder, quantization, threads):
    """CTranslate2's Generator on the same weights; the prefix's P positions become P more real prompt tokens."""
    import ctranslate2
    g = ctranslate2.Generator(os.path.join(folder, f"ct2-{quantization}"), device="cpu", compute_type=quantization,
                              intra_threads=threads)
    with open(os.path.join(folder, f"ct2-{quantization}", "vocabulary.json")) as f:
        vocab = json.load(f)

    def sample(batch, new_tokens=NEW_TOKENS):
        torch.manual_seed(1)
        idx = torch.randint(0, 50257, (batch, P + PROMPT))
        tokens = [[vocab[t] for t in row] for row in idx.tolist()]
        out = g.generate_batch(tokens, max_length=new_tokens, min_length=new_tokens, include_prompt_in_result=False,
                               end_token=[])
        return [r.sequences_ids[0] for r in out]
    return sample


def peft_with_prefix(model, kv):
    """A PeftModel whose prefix table holds exactly the keys and values of `kv` (row 0)."""
    from peft import PrefixTuningConfig, get_peft_model
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    table = torch.cat([t[0].permute(1, 0, 2).reshape(P, -1) for k, v in kv for t in (k, v)], dim=1)  # (P, L*2*C)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
    return pm.eval()


def sampler(side, folder, device):  # -> sample(batch, new_tokens): one side's decoding, loaded
    if side.startswith("minprefix"):
        from minprefix import fast
        model = fast.decoding_model(folder, side_dtype(side), device).requires_grad_(False)
        fast.keep_freed_memory()  # as sample.py runs
        return ours_sampler(model, device)
    if side.startswith("ct2"):
        return ct2_sampler(folder, side.split("-", 1)[1], torch.get_num_threads())
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    if side == "peft-generate":
        return hf_sampler(hf, device, peft_model=peft_with_prefix(hf, prompt_and_prefix(device, hf.config, 1)[1]))
    return hf_sampler(hf, device)


def serve(side, workload, folder, device):
    """A sampling side kept up for the whole bench: it loads, decodes once (first-use costs excluded), says
    "ready", then times one decoding for each "time" read on stdin (printing tokens/s), until "done": then its
    peak memory and greedy tokens. The parent calls every side's server in turn, call by call, so that the two
    sides of a comparison decode seconds apart (this VM's memory bandwidth drifts between minutes)."""
    batch = int(workload.split("-b")[1])
    sample = sampler(side, folder, device)
    with Peak(device) as m:
        sample(batch)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "time":
                break
            dt = timed(lambda: sample(batch), device, 1, warm_up=lambda: None)
            print(json.dumps({"tokens_per_s": batch * NEW_TOKENS / dt}), flush=True)
    print(json.dumps({"peak_bytes": m.bytes, "tokens": sample(1, 32)[0]}), flush=True)


def sampling_rounds(workload, sides, folder, args, rounds, calls=3):
    """-> {side: [{tokens_per_s (median of the round's calls), calls, peak_bytes, tokens}] per round}. Every side's
    server up at once; each round makes `calls` turns, one decoding per side per turn, in an order that keeps
    minprefix beside the CTranslate2 it is compared with and reverses every turn."""
    servers, errors = {}, {}

    def failed(side, what):
        errors[side].seek(0)
        sys.exit(f"{side} {workload} failed{what}:\n{errors[side].read()[-3000:]}")
    for side in sides:  # loaded one at a time, so that loading does not share the cores
        env = dict(os.environ, MINPREFIX_REFERENCE="1" if side == "minprefix-reference" else "0")
        errors[side] = tempfile.TemporaryFile("w+")  # its warnings, shown only if it fails
        servers[side] = subprocess.Popen([sys.executable, __file__, "--device", args.device, "--serve", side, workload,
                                          folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors[side],
                                         text=True, env=env)
        if servers[side].stdout.readline().strip() != "ready":
            failed(side, " to start")
    order = sorted(sides, key=lambda s: PAIRED.index(s) if s in PAIRED else len(PAIRED))
    runs = {s: [] for s in sides}
    for r in range(rounds):
        got = {s: [] for s in sides}
        for turn in range(calls):
            for side in (order if (r * calls + turn) % 2 == 0 else order[::-1]):
                time.sleep(0.2)  # the last side's OpenMP threads stop spinning
                servers[side].stdin.write("time\n")
                servers[side].stdin.flush()
                line = servers[side].stdout.readline()
                if not line:
                    failed(side, "")
                got[side].append(json.loads(line)["tokens_per_s"])
        for side in sides:
            runs[side].append({"tokens_per_s": statistics.median(got[side]), "calls": got[side]})
            print(f"round {r + 1}/{rounds} {workload} {side}: {runs[side][-1]['tokens_per_s']:,.1f}", file=sys.stderr)
    for side, server in servers.items():
        out, _ = server.communicate("done\n")
        runs[side][0].update(json.loads(out.strip().splitlines()[-1]))
    return runs


PAIRED = ["minprefix", "ct2-float32", "minprefix-int8", "ct2-int8", "minprefix-bf16"]  # neighbours in each turn


def beam_workload(side, device, repeats, model_dir=OFFLINE):
    """10 E2E tables, 5 beams, 40 new tokens each: -> tables per minute (reported as tokens_per_s for the table)."""
    from minprefix import Tokenizer, fast
    from minprefix.beam import beam_search
    from minprefix.data import source_prompt
    from minprefix.e2e import read_tables
    from minprefix.generate import pad_left
    from minprefix.method import build
    tok = Tokenizer()
    tables = read_tables(os.path.join(REPO, "..", "shared", "data", "e2e", "test.txt.gz"), 10)
    model = fast.decoding_model(model_dir, side_dtype(side), device).requires_grad_(False)
    fast.keep_freed_memory()  # as eval.py runs
    torch.manual_seed(0)
    prefix = build("kv", model, ["task"], tok, 5, True)
    idx, real = pad_left([source_prompt(tok, t) for t, _ in tables], tok.eot, device=device)
    search = fast.beam_search if fast.enabled() else beam_search

    def decode(n=40):
        with torch.no_grad():
            run, cache = prefix.apply(model, torch.ones(len(tables), 1, device=device))
            return search(run, idx, 5, n, kv_cache=cache, real=real, eot=None, banned=tok.newlines)
    with Peak(device) as m:
        dt = timed(decode, device, repeats)
    return {"tokens_per_s": len(tables) * 60 / dt, "peak_bytes": m.bytes, "tokens": decode(12)[0]}


# ---- training ----

def train_synthetic(side, folder, device, steps):
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (TRAIN_B, TRAIN_T + 1), device=device)
    if side.startswith("minprefix"):
        from minprefix import GPT2, fast
        from minprefix.prefix import KVPrefix
        from minprefix.trainer import batch_loss, lm_loss
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[side_dtype(side)]
        model = GPT2.from_pretrained(folder, device=device, dtype=dtype).requires_grad_(False)
        loss_fn = fast.lm_loss if fast.enabled() else lm_loss
        prefix = KVPrefix(model.config, 1, P, mlp=True).to(device)
        if fast.enabled():  # as train.py: the loss, the allocator, and in bfloat16 float32 attention and a bfloat16 MLP
            fast.keep_freed_memory()
            fast.for_training(model, prefix)
        opt = torch.optim.AdamW(prefix.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
        label = torch.zeros(TRAIN_B, dtype=torch.long, device=device)

        def step():  # the step minprefix.trainer.train takes
            loss = batch_loss(model, prefix, x[:, :-1], x[:, 1:], label, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        from peft import PrefixTuningConfig, get_peft_model
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device)
        pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                      prefix_projection=True, encoder_hidden_size=512))
        pm.train()
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0,
                                fused=True)

        def step():  # the standard PEFT loop: model.train(), labels=input_ids (HF shifts them)
            loss = pm(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with Peak(device) as m:
        dt = timed(step, device, steps)
    return {"tokens_per_s": TRAIN_B * TRAIN_T / dt, "peak_bytes": m.bytes}


def train_real(side, device, mode="kv", model_dir=OFFLINE):
    """One epoch on data/train.jsonl at batch 2 on model_dir (the offline model, or GPT-2-small-shaped random
    weights); the same batches (same seed) on both sides. mode kv: prefix 10 with its MLP; lora: r=4, alpha 32.
    -> text tokens/s (targets that are not padding), positions/s (every position computed) and the held-out loss
    (the offline model's only)."""
    from minprefix import Tokenizer
    from minprefix.data import batches, encode, label_names, read_jsonl
    tok = Tokenizer()
    train_set = read_jsonl(os.path.join(REPO, "data/train.jsonl"))
    labels = label_names(train_set)
    test_set = read_jsonl(os.path.join(REPO, "data/test.jsonl"), labels)
    items, held_out = encode(train_set, tok, labels, 1000), encode(test_set, tok, labels, 1000)
    torch.manual_seed(0)
    if side.startswith("minprefix"):
        from minprefix import GPT2, fast
        from minprefix.method import build
        from minprefix.trainer import batch_loss, evaluate, lm_loss, token_nll
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[side_dtype(side)]
        model = GPT2.from_pretrained(model_dir, device=device, dtype=dtype).requires_grad_(False)
        method = build(mode, model, labels, tok, P, True).requires_grad_(True) if mode == "kv" else \
            build("lora", model, labels, tok, lora_rank=4, lora_alpha=32).requires_grad_(True)
        if fast.enabled():
            fast.keep_freed_memory()
            fast.for_training(model, method)
        loss_fn = fast.lm_loss if fast.enabled() else lm_loss
        opt = torch.optim.AdamW(method.parameters(), lr=5e-5 if mode == "kv" else 1e-3, weight_decay=0.0, fused=True)
        step_loss = lambda idx, tg, y: batch_loss(model, method, idx, tg, y, loss_fn)
        held = lambda: evaluate(model, method, held_out, 2, device, fast.token_nll if fast.enabled() else token_nll)["loss"]
        trainable = sum(p.numel() for p in method.parameters())
    else:  # one PEFT adapter per label, as PEFT trains them: each on its own label's texts
        from peft import LoraConfig, PrefixTuningConfig, get_peft_model
        from transformers import GPT2LMHeadModel
        config = (lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                             encoder_hidden_size=512)) if mode == "kv" else \
            (lambda: LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=32, target_modules=["c_attn"],
                                fan_in_fan_out=True, lora_dropout=0.0))
        pm = get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).to(device), config())
        names = ["default"] + labels[1:]
        for name in names[1:]:
            pm.add_adapter(name, config())
        key = "prompt_encoder" if mode == "kv" else "lora_"
        params = [p for n, p in pm.named_parameters() if key in n]
        opt = torch.optim.AdamW(params, lr=5e-5 if mode == "kv" else 1e-3, weight_decay=0.0, fused=True)
        pm.train()
        trainable = sum(p.numel() for p in params)

        def step_loss(idx, tg, y):  # one label per batch: its adapter; HF shifts the labels itself
            pm.set_adapter(names[int(y[0])])
            for p in params:  # set_adapter freezes the other adapters' parameters
                p.requires_grad_(True)
            x = torch.cat([idx, tg[:, -1:].clamp(min=0)], dim=1)  # every token, the last target included
            labels_ = torch.cat([torch.full_like(tg[:, :1], -100), tg], dim=1)
            mask = labels_ != -100
            mask[:, 0] = True  # the first <|endoftext|> is context, not padding
            return pm(input_ids=x, attention_mask=mask.long(), labels=labels_).loss

        by_label = lambda its: [[it for it in its if it[2] == k] for k in range(len(labels))]

        @torch.no_grad()
        def held():
            pm.eval()
            total, count = 0.0, 0
            for rows in by_label(held_out):
                for idx, tg, y in batches(rows, 2):
                    n = (tg != -100).sum().item()
                    total += step_loss(idx.to(device), tg.to(device), y.to(device)).item() * n
                    count += n
            return total / count
    gen = torch.Generator().manual_seed(0)
    groups = [items] if side.startswith("minprefix") else by_label(items)  # PEFT: label by label
    all_batches = [(i.to(device), t.to(device), y.to(device)) for rows in groups
                   for i, t, y in batches(rows, 2, shuffle=True, generator=gen)]
    text_tokens = sum(int((t != -100).sum()) for _, t, _ in all_batches)
    positions = sum(t.numel() for _, t, _ in all_batches)
    with Peak(device) as m:
        sync(device)
        t0 = time.perf_counter()
        for idx, tg, y in all_batches:
            loss = step_loss(idx, tg, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        dt = time.perf_counter() - t0
    return {"tokens_per_s": text_tokens / dt, "positions_per_s": positions / dt, "peak_bytes": m.bytes,
            "held_out_loss": held() if model_dir == OFFLINE else None, "seconds": dt, "trainable": trainable}


def child(side, workload, folder, device, steps):
    torch.manual_seed(0)
    device = torch.device(device)
    if workload == "train-synthetic":
        r = train_synthetic(side, folder, device, steps)
    elif workload == "train-real":
        r = train_real(side, device)
    elif workload == "train-lora":
        r = train_real(side, device, mode="lora")
    elif workload == "beam-e2e":
        r = beam_workload(side, device, repeats=3)
    elif workload == "train-real-gpt2-shape":
        r = train_real(side, device, model_dir=folder)
    elif workload == "beam-e2e-gpt2-shape":
        r = beam_workload(side, device, repeats=2, model_dir=folder)
    else:
        raise ValueError(f"{workload} runs in a server (--serve), not a child")
    print(json.dumps(r))


# ---- the parent: the machine, the weights, the rounds, the tables ----

def bandwidth(repeats=7):
    """GB/s of the fastest of a few large reads of 1 GiB (same threads as the children): a plain sum, a sum in
    one slice per thread, and bmm against ones. Decoding at batch 1 cannot beat weights-bytes / this."""
    x = torch.ones(256 * 1024 * 1024)
    k = torch.get_num_threads()
    ones = torch.ones(k, 1, 1024)
    reads = {"sum": lambda: x.sum(), "sum per thread": lambda: x.view(k, -1).sum(1),
             "bmm": lambda: torch.bmm(ones, x.view(k, 1024, -1))}
    best = {}
    for name, f in reads.items():
        times = []
        f()
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        best[name] = x.numel() * 4 / statistics.median(times) / 1e9
    return max(best.values())


def arithmetic(repeats=5):
    """GFLOP/s of the fastest of a few large matrix products, per dtype: the CPU's peak as PyTorch reaches it."""
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        rates = []
        for m, k, n in ((1024, 768, 3072), (2048, 1024, 4096), (512, 768, 50257)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b
            t = time.perf_counter()
            for _ in range(repeats):
                a @ b
            rates.append(2 * m * k * n * repeats / (time.perf_counter() - t) / 1e9)
        best[str(dtype).removeprefix("torch.")] = max(rates)
    return best


def make_weights(folder):
    """GPT-2 small's shape, random weights, in the hub's layout; and CTranslate2's conversions of it, if installed.
    CTranslate2's converter wants GPT-2's vocabulary files: those tiktoken caches (TIKTOKEN_CACHE_DIR)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    try:
        import ctranslate2
    except ImportError:
        return False
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.path.join(REPO, "..", "shared", "tiktoken"))
    url = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
    cached = lambda name: os.path.join(cache, hashlib.sha1((url + name).encode()).hexdigest())
    with open(cached("encoder.json")) as f:
        vocab = json.load(f)
    with open(cached("vocab.bpe"), encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line]
    GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(folder)
    for q in ("float32", "int8"):
        ctranslate2.converters.TransformersConverter(folder).convert(os.path.join(folder, f"ct2-{q}"), quantization=q,
                                                                     force=True)
    return True



def fmt_range(values, f="{:,.1f}"):
    return f"{f.format(statistics.median(values))} [{f.format(min(values))}-{f.format(max(values))}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians and min-max over them "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, help="timed synthetic training steps per round (default: 8 CPU, 30 GPU)")
    p.add_argument("--only", nargs="+", choices=list(PLAN), help="run these workloads only")
    p.add_argument("--out", help="JSON file to write (default: bench/results-<device>.json)")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "WORKLOAD", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--serve", nargs=3, metavar=("SIDE", "WORKLOAD", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    steps = args.steps or (30 if cuda else 8)
    if args.child:
        return child(*args.child, args.device, steps)
    if args.serve:
        return serve(*args.serve, torch.device(args.device))
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    import peft
    import transformers
    if any(w not in ("sample-b1", "sample-b8", "train-synthetic") for w in (args.only or PLAN)):
        from minprefix import Tokenizer
        Tokenizer()  # the text workloads need GPT-2's BPE: fail now, not an hour in (offline: TIKTOKEN_CACHE_DIR)
    t0 = time.time()
    folder = tempfile.mkdtemp(prefix="bench-gpt2-")
    have_ct2 = make_weights(folder)
    plan = {w: [s for s in sides if (have_ct2 or not s.startswith("ct2")) and not (cuda and s.endswith("int8"))]
            for w, sides in PLAN.items() if not args.only or w in args.only}
    runs = {w: {s: [] for s in sides} for w, sides in plan.items()}
    bw, peak = [], []
    for workload in [w for w in plan if w.startswith("sample-")]:  # every side up at once: see serve()
        runs[workload] = sampling_rounds(workload, plan.pop(workload), folder, args, args.rounds)
    for r in range(args.rounds):
        if not cuda:
            bw.append(bandwidth())
            peak.append(arithmetic())
        for workload, sides in plan.items():
            for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate who goes first
                env = dict(os.environ, MINPREFIX_REFERENCE="1" if side == "minprefix-reference" else "0")
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(steps),
                                      "--child", side, workload, folder], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{side} {workload} failed:\n{out.stderr[-3000:]}")
                runs[workload][side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {workload} {side}: "
                      f"{runs[workload][side][-1]['tokens_per_s']:,.1f}", file=sys.stderr)

    from minprefix.fast import cpu_name
    machine = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {os.cpu_count()} cores"
    ct2 = ""
    if have_ct2:
        import ctranslate2
        ct2 = f", ctranslate2 {ctranslate2.__version__}"
    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}{ct2}, "
                f"{torch.get_num_threads()} threads")
    table = report(runs, bw, peak, args, machine, versions, time.time() - t0)
    print(table)
    out = args.out or os.path.join(REPO, "bench", f"results-{args.device.split(':')[0]}.json")
    with open(out, "w") as f:
        json.dump({"device": args.device, "machine": machine, "versions": versions, "bandwidth": bw,
                   "arithmetic": peak, "runs": runs, "table": table}, f, indent=2)
    print(f"wrote {out}")


def report(runs, bw, peak, args, machine, versions, seconds):
    tps = lambda w, s: [x["tokens_per_s"] for x in runs[w][s]]
    med = lambda w, s: statistics.median(tps(w, s))
    cell = lambda w, s: fmt_range(tps(w, s)) if s in runs.get(w, {}) else "-"
    # This VM's speed drifts by tens of percent between minutes; the two sides of one round run minutes apart at
    # most, so their ratio round by round is steadier than the ratio of the medians: both are printed.
    ratio = lambda w, a, b: (f"**{med(w, a) / med(w, b):.2f}x** (medians); round by round "
                             + fmt_range([x / y for x, y in zip(tps(w, a), tps(w, b))], "{:.2f}x"))
    # Sampling's sides decode in turns, seconds apart (sampling_rounds): their ratio decoding by decoding.
    paired = lambda w, a, b: fmt_range([x / y for ra, rb in zip(runs[w][a], runs[w][b])
                                        for x, y in zip(ra["calls"], rb["calls"])], "{:.2f}x")
    mb = lambda w, s: f"{statistics.median([x['peak_bytes'] for x in runs[w][s]]) / 2**20:,.0f}" \
        if s in runs.get(w, {}) else "-"
    lines = [f"minprefix vs HF transformers + PEFT and CTranslate2 on {args.device}: {machine}; {versions}; median "
             f"[min-max] of {args.rounds} alternating rounds, {seconds:.0f} s in all", ""]
    weights_bytes = 124_439_808 * 4 - 1024 * 768 * 4  # every weight but wpe, read once per decoding step
    limit = None
    if bw:
        limit = statistics.median(bw) * 1e9 / weights_bytes
        flops = {d: statistics.median([x[d] for x in peak]) for d in peak[0]}
        lines += [f"- memory bandwidth (fastest of sum / sum per thread / bmm over 1 GiB): {fmt_range(bw)} GB/s; a "
                  f"batch-1 float32 decoding step reads {weights_bytes / 1e9:.3f} GB of weights, so the limit is "
                  f"{limit:.1f} tok/s (bfloat16 {2 * limit:.1f}, int8 {4 * limit:.1f})",
                  f"- peak arithmetic (fastest of three large products): float32 {flops['float32']:.0f}, bfloat16 "
                  f"{flops['bfloat16']:.0f} GFLOP/s; a frozen GPT-2 small trains at most at "
                  f"{flops['float32'] * 1e9 / (4 * 124e6):.0f} / {flops['bfloat16'] * 1e9 / (4 * 124e6):.0f} "
                  f"positions/s (4 x 124M multiply-adds per position), the 19M offline model at "
                  f"{flops['float32'] * 1e9 / (4 * 19.2e6):,.0f} / {flops['bfloat16'] * 1e9 / (4 * 19.2e6):,.0f}", ""]
    sampling = [w for w in ("sample-b1", "sample-b8") if w in runs]
    if sampling:
        lines += ["| sampling, GPT-2-small shape, 128 new tokens, greedy (tok/s) | minprefix float32 | bfloat16 | "
                  "int8 | reference path | HF (prefix as cache) | PEFT generate as shipped | CTranslate2 float32 | "
                  "CTranslate2 int8 | minprefix / HF | minprefix / CT2 (float32; bf16 and int8 / CT2 int8) |",
                  "|" + "---|" * 11]
        for w in sampling:
            batch = int(w.split("-b")[1])
            cells = [cell(w, s) for s in ("minprefix", "minprefix-bf16", "minprefix-int8", "minprefix-reference",
                                          "hf", "peft-generate", "ct2-float32", "ct2-int8")]
            if limit:
                for i, bytes_per in ((0, 1), (1, 2), (2, 4)):
                    side = ("minprefix", "minprefix-bf16", "minprefix-int8")[i]
                    if side in runs[w]:
                        cells[i] += f" ({med(w, side) / (batch * limit * bytes_per):.0%} of the limit)"
            vs = "-"
            if "ct2-float32" in runs[w]:
                vs = (f"**{med(w, 'minprefix') / med(w, 'ct2-float32'):.2f}x** (call by call "
                      f"{paired(w, 'minprefix', 'ct2-float32')}); "
                      + "; ".join(f"{med(w, s) / med(w, 'ct2-int8'):.2f}x" for s in ("minprefix-bf16", "minprefix-int8")
                                  if s in runs[w]))
                if "minprefix-int8" in runs[w]:
                    vs += f" (int8 call by call {paired(w, 'minprefix-int8', 'ct2-int8')})"
            lines.append(f"| batch {batch} | " + " | ".join(cells) + f" | **{med(w, 'minprefix') / med(w, 'hf'):.2f}x** "
                         f"| {vs} |")
        lines.append("")
    if "beam-e2e" in runs:
        w = "beam-e2e"
        cells = [cell(w, s) for s in ("minprefix", "minprefix-bf16", "minprefix-int8", "minprefix-reference")]
        lines += ["| beam search, 10 E2E tables x 5 beams x 40 tokens, offline model (tables/min) | float32 | bfloat16 "
                  "| int8 | reference path | bfloat16 / float32 | int8 / float32 |", "|" + "---|" * 7,
                  "| eval.py --task e2e's decoding | " + " | ".join(cells)
                  + f" | {ratio(w, 'minprefix-bf16', 'minprefix')} | {ratio(w, 'minprefix-int8', 'minprefix')} |", ""]
    if "train-synthetic" in runs:
        w = "train-synthetic"
        lines += ["| training, GPT-2-small shape, B=2 x T=64, P=10, MLP (tok/s) | minprefix float32 | bfloat16 | "
                  "reference path | HF + PEFT | bfloat16 / float32 | minprefix / HF (float32; bfloat16) | peak MiB: "
                  "minprefix / HF |", "|" + "---|" * 8,
                  "| one step | " + " | ".join(cell(w, s) for s in ("minprefix", "minprefix-bf16",
                                                                       "minprefix-reference", "hf"))
                  + f" | **{med(w, 'minprefix-bf16') / med(w, 'minprefix'):.2f}x** | "
                    f"{med(w, 'minprefix') / med(w, 'hf'):.2f}x; {med(w, 'minprefix-bf16') / med(w, 'hf'):.2f}x | "
                    f"{mb(w, 'minprefix')} / {mb(w, 'hf')} |", ""]
    shaped = [w for w in ("train-real-gpt2-shape", "beam-e2e-gpt2-shape") if w in runs]
    if shaped:
        what = {"train-real-gpt2-shape": "one epoch of data/train.jsonl, batch 2, prefix 10 + MLP (text tok/s)",
                "beam-e2e-gpt2-shape": "beam search, 10 E2E tables x 5 beams x 40 tokens (tables/min)"}
        lines += ["| GPT-2-small shape, random weights: speed only | float32 | bfloat16 | int8 | bfloat16 / float32 | "
                  "int8 / float32 |", "|" + "---|" * 6]
        lines += [f"| {what[w]} | {cell(w, 'minprefix')} | {cell(w, 'minprefix-bf16')} | {cell(w, 'minprefix-int8')} | "
                  f"{ratio(w, 'minprefix-bf16', 'minprefix')} | "
                  f"{ratio(w, 'minprefix-int8', 'minprefix') if 'minprefix-int8' in runs[w] else '-'} |" for w in shaped]
        lines.append("")
    for w, what in (("train-real", "prefix 10 + MLP"), ("train-lora", "LoRA r=4")):
        if w not in runs:
            continue
        lines += [f"| one epoch of data/train.jsonl, batch 2, {what} (imdb-gpt2-19m, NOT GPT-2) | text tok/s | "
                  "positions/s | held-out loss after it | trained parameters | vs HF + PEFT float32 |", "|---|---|---|---|---|---|"]
        names = {"minprefix": "minprefix, float32", "minprefix-bf16": "minprefix, bfloat16 (the trained parameters "
                 "and AdamW float32)", "minprefix-reference": "minprefix reference path, float32",
                 "hf": "HF + PEFT, float32, one adapter per label" + ("" if w == "train-real" else " (c_attn: q, k, v)")}
        for s in runs[w]:
            loss = statistics.median([x["held_out_loss"] for x in runs[w][s]])
            pos = fmt_range([x["positions_per_s"] for x in runs[w][s]])
            lines.append(f"| {names[s]} | {cell(w, s)} | {pos} | {loss:.4f} | {runs[w][s][0]['trainable']:,} | "
                         f"**{med(w, s) / med(w, 'hf'):.2f}x** |")
        if "minprefix-bf16" in runs[w]:
            lines.append(f"\nbfloat16 / float32 on this workload: {ratio(w, 'minprefix-bf16', 'minprefix')}")
        lines.append("")
    checks = []
    for w in sampling:
        ours, hf = runs[w]["minprefix"][0]["tokens"], runs[w]["hf"][0]["tokens"]
        checks.append(f"{w}: greedy tokens of minprefix and HF (prefix as cache) "
                      f"{'identical' if ours == hf else 'DIFFER'} over the first {len(ours)}")
        if "peft-generate" in runs[w]:
            peft_tokens = runs[w]["peft-generate"][0]["tokens"]
            checks.append(f"{w}: PeftModel.generate {'applied the prefix' if peft_tokens == hf else 'did NOT apply the prefix (its tokens differ from decoding with it)'}")
    if "beam-e2e" in runs:
        agree = [s for s in runs["beam-e2e"] if runs["beam-e2e"][s][0]["tokens"] == runs["beam-e2e"]["minprefix"][0]["tokens"]]
        checks.append(f"beam-e2e: the first table's best hypothesis (12 tokens) equals float32's for: {', '.join(agree)}")
    lines += [f"- {c}" for c in checks]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
