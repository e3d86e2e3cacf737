"""What steering costs: a training step with the contrastive term (two labels) against a plain one, and sampling
with guidance at the logits (each sample decoded as 3 rows: the mix and each label alone) against sampling
without it. The fast path, as train.py and sample.py run it; the two sides alternate within each round, so a
drift of the machine between minutes falls on both; medians over rounds, [min-max], and the ratio round by round.

  python bench/bench_steer.py --model ../shared/models/imdb-gpt2-19m
  python bench/bench_steer.py --model small-shape      # GPT-2 small's shape (124M), random weights
"""
import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minprefix import GPT2, GPTConfig, Tokenizer, fast  # noqa: E402
from minprefix.data import batches, encode, label_names, read_jsonl  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from minprefix.guidance import DEFAULT_STRENGTH, guide  # noqa: E402
from minprefix.method import build  # noqa: E402
from minprefix.prefix import label_weights  # noqa: E402
from minprefix.trainer import batch_loss, contrastive_loss  # noqa: E402


def machine():
    amx = fast.cpu_has("amx_bf16")
    return f"{fast.cpu_name()}, {os.cpu_count()} cores, {'with' if amx else 'no'} AMX, torch {torch.__version__}"


def load(name):
    if name == "small-shape":
        torch.manual_seed(0)
        model = GPT2(GPTConfig())  # GPT-2 small's shape; nn.Linear's and nn.Embedding's random init
        model.name_or_path = "small-shape"
        return model.eval()
    return GPT2.from_pretrained(name)


def fmt(values, f="{:.2f}"):
    return f"{f.format(statistics.median(values))} [{f.format(min(values))}-{f.format(max(values))}]"


def bench_training(model, args):
    """ms per step (forward, backward, AdamW), K/V prefix P=10 with its MLP, batch 2 of data/train.jsonl."""
    tok = Tokenizer()
    train_set = read_jsonl(os.path.join(REPO, "data/train.jsonl"))
    labels = label_names(train_set)
    items = encode(train_set, tok, labels, model.config.n_positions - 10)
    fast.for_training(model)
    model.requires_grad_(False)
    sides = {}
    for name, lam in (("plain", 0.0), ("contrastive", 1.0)):
        torch.manual_seed(0)
        method = build("kv", model, labels, tok, 10, True).requires_grad_(True)
        fast.for_training(model, method)
        opt = torch.optim.AdamW(method.parameters(), lr=3e-4, fused=True)
        data = list(batches(items, 2, shuffle=True, generator=torch.Generator().manual_seed(0), group_by_length=True))
        sides[name] = (lam, method, opt, data)

    def step(lam, method, opt, idx, targets, y):
        if lam:
            loss = contrastive_loss(model, method, idx, targets, y, lam, fast.token_nll)
        else:
            loss = batch_loss(model, method, idx, targets, y, fast.lm_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = {name: [] for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            lam, method, opt, data = sides[name]
            for b in data[:2]:  # warm-up
                step(lam, method, opt, *b)
            t = time.perf_counter()
            for b in data[2:2 + args.steps]:
                step(lam, method, opt, *b)
            times[name].append(1000 * (time.perf_counter() - t) / args.steps)
    ratio = [c / p for p, c in zip(times["plain"], times["contrastive"])]
    print(f"| training step, batch 2, K/V + MLP P=10, 2 labels | {fmt(times['plain'])} ms | "
          f"{fmt(times['contrastive'])} ms (contrastive term, weight 1) | {fmt(ratio)}x |")


def bench_sampling(model, args, rows):
    """tokens/s writing args.tokens new tokens (no early stop) from one prompt per row, K/V prefix P=10."""
    tok = Tokenizer()
    torch.manual_seed(0)
    method = build("kv", model, ["positive", "negative"], tok, 10, False).requires_grad_(False)
    with torch.no_grad():
        method.table_.normal_(0, 0.5)
    idx = torch.tensor([[tok.eot] + tok.encode("The lectures")] * rows)
    w = label_weights(2, alpha=1.0).repeat(rows, 1)
    times = {0.0: [], args.guidance: []}
    for r in range(args.rounds):
        for g in (list(times) if r % 2 == 0 else list(times)[::-1]):
            run, cache = guide(method, model, w, g, eot=tok.eot)
            fast.generate(run, idx, 4, kv_cache=cache, temperature=0.7, top_p=0.9, seed=0, eot=None)  # warm-up
            t = time.perf_counter()
            fast.generate(run, idx, args.tokens, kv_cache=cache, temperature=0.7, top_p=0.9, seed=0, eot=None)
            times[g].append(rows * args.tokens / (time.perf_counter() - t))
    ratio = [a / b for a, b in zip(times[0.0], times[args.guidance])]
    print(f"| sampling, batch {rows}, {args.tokens} tokens | {fmt(times[0.0], '{:,.1f}')} tok/s | "
          f"{fmt(times[args.guidance], '{:,.1f}')} tok/s (guidance {args.guidance:g}: {3 * rows} rows) | "
          f"{fmt(ratio)}x |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"),
                   help="a hub name or folder, or small-shape (default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--rounds", type=int, default=5, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per side and round (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per sampling call (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=DEFAULT_STRENGTH, help="(default: sample.py's, %(default)s)")
    args = p.parse_args()
    fast.keep_freed_memory()
    model = load(args.model)
    print(f"{args.model} ({model.num_params() / 1e6:.1f}M parameters), float32, fast path; {machine()}; "
          f"{args.rounds} rounds, medians [min-max]")
    print("| work | plain | steered | time steered / plain, round by round |")
    print("|---|---|---|---|")
    bench_training(model, args)
    fast.accelerate(model)
    for rows in (1, 8):
        bench_sampling(model, args, rows)


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
