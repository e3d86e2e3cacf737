"""minprefix against HF transformers + PEFT prefix-tuning, on one machine, in alternating rounds.

Sides (each workload of each side in its own child process, so that its memory is its own):
  minprefix            the default path (minprefix/fast.py on)
  minprefix-reference  MINPREFIX_REFERENCE=1: the plain reference code
  hf                   HF GPT2LMHeadModel, the prefix handed over as its cache (a DynamicCache of the same keys
                       and values): the correct HF baseline for decoding, checked to pick our greedy tokens;
                       for training, HF + PEFT's standard loop (its forward applies the prefix)
  peft-generate        PeftModel.generate as shipped, which with transformers 5.24 / peft 0.21.2 drops the
                       prefix: timed, and checked (printed) for whether the prefix changed its tokens

Workloads:
  train-synthetic   GPT-2-small-shaped random weights, batch 2 x 64 tokens, prefix 10, MLP, AdamW: tokens/s
  train-real        data/train.jsonl, batch 2, one epoch on the offline model (imdb-gpt2-19m, NOT GPT-2): tokens
                    of text per second (padding not counted) and the held-out loss on data/test.jsonl after it;
                    minprefix trains both labels' prefixes side by side in shuffled batches, or grouped by length
                    (--group-by-length); PEFT trains one adapter per label, each on its label's texts, shuffled
  sample-b1, -b8    GPT-2-small-shaped random weights, prompt 8 tokens, prefix 10, 128 new tokens, greedy

Every figure is the median over --rounds rounds with its min-max; the machine's memory bandwidth (the fastest of
a few large reads, same threads) gives the batch-1 limit: a decoding step reads every weight once.

  python bench/bench_vs_peft.py              # CPU, 3 rounds
  python bench/bench_vs_peft.py --device cuda
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
P, TRAIN_B, TRAIN_T, NEW_TOKENS, PROMPT = 10, 2, 64, 128, 8
OFFLINE = os.environ.get("MINPREFIX_TEST_MODEL", os.path.join(REPO, "..", "shared", "models", "imdb-gpt2-19m"))
WORKLOADS = ("train-synthetic", "train-real", "train-real-grouped", "sample-b1", "sample-b8")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


# ---- the sides ----

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
                                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=50256)
            else:
                out = model.generate(idx, attention_mask=mask, cache=DynamicCache(ddp_cache_data=kv),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=50256)
        return out[:, PROMPT:].tolist()
    return sample


def peft_with_prefix(model, kv, batch_rows=1):
    """A PeftModel whose prefix table holds exactly the keys and values of `kv` (row 0)."""
    from peft import PrefixTuningConfig, get_peft_model
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    table = torch.cat([t[0].permute(1, 0, 2).reshape(P, -1) for k, v in kv for t in (k, v)], dim=1)  # (P, L*2*C)
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(table)
    return pm.eval()


def train_synthetic(side, folder, device, steps):
    torch.manual_seed(0)
    x = torch.randint(0, 50257, (TRAIN_B, TRAIN_T + 1), device=device)
    if side.startswith("minprefix"):
        from minprefix import GPT2, fast
        from minprefix.prefix import KVPrefix
        from minprefix.trainer import lm_loss, batch_loss
        model = GPT2.from_pretrained(folder, device=device).requires_grad_(False)
        if fast.enabled():
            fast.keep_freed_memory()  # as train.py: the loss and the allocator (accelerate() is for decoding)
        loss_fn = fast.lm_loss if fast.enabled() else lm_loss
        prefix = KVPrefix(model.config, 1, P, mlp=True).to(device)
        opt = torch.optim.AdamW(prefix.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
        label = torch.zeros(TRAIN_B, dtype=torch.long, device=device)

        def step():  # the step minprefix.trainer.train takes
            loss = batch_loss(model, prefix, x[:, :-1], x[:, 1:], label, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    else:
        pm, opt = hf_peft_trainer(folder, device)

        def step():  # the standard PEFT loop: model.train(), labels=input_ids (HF shifts them)
            loss = pm(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with Peak(device) as m:
        dt = timed(step, device, steps)
    return {"tokens_per_s": TRAIN_B * TRAIN_T / dt, "peak_bytes": m.bytes}


def hf_peft_trainer(folder, device):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device)
    pm = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                  prefix_projection=True, encoder_hidden_size=512))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0, fused=True)
    return pm, opt


def train_real(side, device, group_by_length=False):
    """One epoch on data/train.jsonl at batch 2, prefix 10 with its MLP, the offline model; the same batches
    (same seed) on both sides unless grouped. -> text tokens/s (targets that are not padding) and held-out loss."""
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
        model = GPT2.from_pretrained(OFFLINE, device=device).requires_grad_(False)
        prefix = build("kv", model, labels, tok, P, True).to(device)
        if fast.enabled():
            fast.keep_freed_memory()
        loss_fn = fast.lm_loss if fast.enabled() else lm_loss
        opt = torch.optim.AdamW(prefix.parameters(), lr=5e-5, weight_decay=0.0, fused=True)
        step_loss = lambda idx, tg, y: batch_loss(model, prefix, idx, tg, y, loss_fn)
        held = lambda: evaluate(model, prefix, held_out, 2, device, fast.token_nll if fast.enabled() else token_nll)["loss"]
    else:  # one PEFT adapter per label, as PEFT trains prefixes: each on its own label's texts
        from peft import PrefixTuningConfig, get_peft_model
        from transformers import GPT2LMHeadModel
        config = lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
                                            encoder_hidden_size=512)
        pm = get_peft_model(GPT2LMHeadModel.from_pretrained(OFFLINE, dtype=torch.float32).to(device), config())
        names = ["default"] + labels[1:]
        for name in names[1:]:
            pm.add_adapter(name, config())
        params = [p for n, p in pm.named_parameters() if "prompt_encoder" in n]
        opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0, fused=True)
        pm.train()

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
                   for i, t, y in batches(rows, 2, shuffle=True, generator=gen, group_by_length=group_by_length)]
    text_tokens = sum(int((t != -100).sum()) for _, t, _ in all_batches)
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
    return {"tokens_per_s": text_tokens / dt, "peak_bytes": m.bytes, "held_out_loss": held(), "seconds": dt}


def sample_workload(side, folder, device, batch, repeats):
    from transformers import GPT2LMHeadModel
    result = {}
    if side.startswith("minprefix"):
        from minprefix import GPT2, fast
        model = GPT2.from_pretrained(folder, device=device).requires_grad_(False)
        if fast.enabled():
            fast.accelerate(model)
        sample = ours_sampler(model, device)
    else:
        hf = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        if side == "peft-generate":
            pm = peft_with_prefix(hf, prompt_and_prefix(device, hf.config, 1)[1])
            sample = hf_sampler(hf, device, peft_model=pm)
        else:
            sample = hf_sampler(hf, device)
    with Peak(device) as m:
        dt = timed(lambda: sample(batch), device, repeats, warm_up=lambda: sample(batch, 8))
    result.update(tokens_per_s=batch * NEW_TOKENS / dt, peak_bytes=m.bytes, tokens=sample(1, 32)[0])
    return result


def child(side, workload, folder, device, steps):
    torch.manual_seed(0)
    device = torch.device(device)
    if workload == "train-synthetic":
        r = train_synthetic(side, folder, device, steps)
    elif workload.startswith("train-real"):
        r = train_real(side, device, group_by_length=workload.endswith("grouped"))
    else:
        r = sample_workload(side, folder, device, int(workload.split("-b")[1]), repeats=2)
    print(json.dumps(r))


# ---- the parent: the machine, the rounds, the table ----

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
    return best


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def fmt_range(values, f="{:,.1f}"):
    return f"{f.format(statistics.median(values))} [{f.format(min(values))}-{f.format(max(values))}]"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians and min-max over them "
                   "(default: %(default)s)")
    p.add_argument("--steps", type=int, help="timed synthetic training steps per round (default: 8 CPU, 30 GPU)")
    p.add_argument("--only", nargs="+", choices=WORKLOADS, help="run these workloads only")
    p.add_argument("--out", help="JSON file to write (default: bench/results-<device>.json)")
    p.add_argument("--child", nargs=3, metavar=("SIDE", "WORKLOAD", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    steps = args.steps or (30 if cuda else 8)
    if args.child:
        return child(*args.child, args.device, steps)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")

    import peft
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel
    t0 = time.time()
    folder = tempfile.mkdtemp(prefix="bench-gpt2-")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)  # GPT-2 small's shape, random weights
    plan = {"train-synthetic": ["minprefix", "minprefix-reference", "hf"],
            "train-real": ["minprefix", "minprefix-reference", "hf"], "train-real-grouped": ["minprefix"],
            "sample-b1": ["minprefix", "minprefix-reference", "hf", "peft-generate"],
            "sample-b8": ["minprefix", "minprefix-reference", "hf", "peft-generate"]}
    plan = {w: s for w, s in plan.items() if not args.only or w in args.only}
    runs = {w: {s: [] for s in sides} for w, sides in plan.items()}
    bw = []
    for r in range(args.rounds):
        if not cuda:
            bw.append(bandwidth())
        for workload, sides in plan.items():
            for side in (sides if r % 2 == 0 else sides[::-1]):  # alternate who goes first
                env = dict(os.environ, MINPREFIX_REFERENCE="1" if side == "minprefix-reference" else "0")
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(steps),
                                      "--child", side, workload, folder], capture_output=True, text=True, env=env)
                if out.returncode != 0:
                    sys.exit(f"{side} {workload} failed:\n{out.stderr[-3000:]}")
                runs[workload][side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1}/{args.rounds} {workload} {side}: "
                      f"{runs[workload][side][-1]['tokens_per_s']:,.1f} tok/s", file=sys.stderr)

    machine = torch.cuda.get_device_name() if cuda else f"{cpu_name()}, {os.cpu_count()} cores"
    versions = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                f"{torch.get_num_threads()} threads")
    tps = lambda w, s: [x["tokens_per_s"] for x in runs[w][s]]
    med = lambda w, s: statistics.median(tps(w, s))
    mb = lambda w, s: f"{statistics.median([x['peak_bytes'] for x in runs[w][s]]) / 2**20:,.0f}"
    lines = [f"minprefix vs HF transformers + PEFT on {args.device}: {machine}; {versions}; median [min-max] of "
             f"{args.rounds} alternating rounds, {time.time() - t0:.0f} s in all", ""]
    weights_bytes = 124_439_808 * 4 - 1024 * 768 * 4  # every weight but wpe, read once per decoding step
    if bw:
        best = [max(b.values()) for b in bw]
        limit = statistics.median(best) * 1e9 / weights_bytes
        lines += [f"memory bandwidth (fastest of sum / sum per thread / bmm over 1 GiB): {fmt_range(best)} GB/s; "
                  f"a batch-1 decoding step reads {weights_bytes / 1e9:.3f} GB of weights, so the limit is "
                  f"{limit:.1f} tok/s (batch 8: {8 * limit:.0f})", ""]
    head = "| workload | minprefix tok/s | reference path | HF (prefix as cache) | PEFT generate as shipped | minprefix / HF | peak MiB: minprefix / HF |"
    lines += [head, "|---|---|---|---|---|---|---|"]
    names = {"train-synthetic": "training, GPT-2-small shape, B=2 x T=64, P=10, MLP",
             "sample-b1": "sampling, batch 1, 128 new tokens, greedy",
             "sample-b8": "sampling, batch 8, 128 new tokens, greedy"}
    for w in ("train-synthetic", "sample-b1", "sample-b8"):
        if w not in runs:
            continue
        cells = [fmt_range(tps(w, s)) if s in runs[w] else "-" for s in ("minprefix", "minprefix-reference", "hf",
                                                                          "peft-generate")]
        if bw and w.startswith("sample"):
            batch = int(w.split("-b")[1])
            cells[0] += f" ({med(w, 'minprefix') / (batch * limit):.0%} of the limit)"
        lines.append(f"| {names[w]} | " + " | ".join(cells) + f" | **{med(w, 'minprefix') / med(w, 'hf'):.2f}x** | "
                     f"{mb(w, 'minprefix')} / {mb(w, 'hf')} |")
    if "train-real" in runs:
        lines += ["", "| one epoch of data/train.jsonl, batch 2, P=10, MLP (imdb-gpt2-19m, NOT GPT-2) | text tok/s | "
                  "held-out loss after it | vs HF + PEFT |", "|---|---|---|---|"]
        rows = [("minprefix, shuffled batches", "train-real", "minprefix"),
                ("minprefix, grouped by length (--group-by-length)", "train-real-grouped", "minprefix"),
                ("minprefix reference path, shuffled", "train-real", "minprefix-reference"),
                ("HF + PEFT, shuffled batches, one adapter per label", "train-real", "hf")]
        for name, w, s in rows:
            if w in runs and s in runs[w]:
                loss = statistics.median([x["held_out_loss"] for x in runs[w][s]])
                lines.append(f"| {name} | {fmt_range(tps(w, s))} | {loss:.4f} | "
                             f"{med(w, s) / med('train-real', 'hf'):.2f}x |")
    checks = []
    for w in ("sample-b1", "sample-b8"):
        if w in runs:
            ours, hf = runs[w]["minprefix"][0]["tokens"], runs[w]["hf"][0]["tokens"]
            checks.append(f"{w}: greedy tokens of minprefix and HF (prefix as cache) "
                          f"{'identical' if ours == hf else 'DIFFER'} over the first {len(ours)}")
            if "peft-generate" in runs[w]:
                peft_tokens = runs[w]["peft-generate"][0]["tokens"]
                checks.append(f"{w}: PeftModel.generate {'applied the prefix' if peft_tokens == hf else 'did NOT apply the prefix (its tokens differ from decoding with it)'}")
    lines += [""] + [f"- {c}" for c in checks]
    table = "\n".join(lines)
    print(table)
    out = args.out or os.path.join(REPO, "bench", f"results-{args.device.split(':')[0]}.json")
    with open(out, "w") as f:
        json.dump({"device": args.device, "machine": machine, "versions": versions, "bandwidth": bw, "runs": runs,
                   "table": table}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
