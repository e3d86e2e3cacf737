"""Tone over a long text: does a prefix hold its tone for 2,000 tokens, what does the prefix boost buy, and does a
schedule turn the tone where it says?

Each condition writes --samples texts of --tokens new tokens (<|endoftext|> held back: --min-new-tokens), one per
neutral prompt in turn (minprefix/evaluation.NEUTRAL_PROMPTS, then experiments/dial.py's movie prompts), batched,
through the fast path, sampled as sample.py samples (temperature 0.8, top-p 0.9):
  --alphas (0, 0.5 and 1), each with every --boosts (0: none; 2: sample.py's --prefix-boost 2, docs/long.md);
  the --schedule 0 -> 1 over the whole text (--alpha 0:0,2000:1), with the last boost.
The judge (VADER, minprefix/evaluation.Judge) scores each --stretch-token stretch: the mean score with its 95%
interval, and the share judged positive (alpha 1) or negative (alpha 0) with its Wilson interval; the base model's
perplexity of each stretch read alone says what the tone costs in fluency. The share of
attention each layer gives the prefix (evaluation.prefix_attention: the text read again window by window, as it
was written) on the first --attention-samples texts of alpha 0 and of alpha 1, per stretch.

Writes runs/long/results.json (each condition as it finishes: a rerun resumes), runs/long/long.md (the tables
docs/long.md shows) and experiments/figures/long.png.

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python train.py --prefix-len 10 --mlp --out runs/long/prefix.safetensors       # the README's main command
  nice -n 10 python experiments/long.py --prefix runs/long/prefix.safetensors
"""
import argparse
import json
import math
import os
import sys
import time
from collections import Counter

import torch
from tqdm import tqdm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dial import MOVIE_PROMPTS  # noqa: E402
from minprefix import Tokenizer, fast  # noqa: E402
from minprefix.env import load_env  # noqa: E402
from minprefix.evaluation import NEUTRAL_PROMPTS, Judge, mean, mean_interval, prefix_attention, wilson  # noqa: E402
from minprefix.generate import pad_left  # noqa: E402
from minprefix.guidance import ANCHORS, DEFAULT_ANCHOR  # noqa: E402
from minprefix.method import describe, load, read_meta  # noqa: E402
from minprefix.prefix import mix_weights  # noqa: E402
from minprefix.tone import Tone, parse_schedule  # noqa: E402

SAMPLING = dict(temperature=0.8, top_p=0.9)  # sample.py's defaults
PROMPTS = NEUTRAL_PROMPTS + MOVIE_PROMPTS


def conditions(args):
    """-> {name: (alpha schedule, boost, guidance)}, in the order they run."""
    out = {}

    def add(schedule, what, boost, strength=0.0):  # the run's anchor and penalty go with every condition's name
        out[name(what, boost, strength, args.guide_from, args.frequency_penalty)] = (schedule, boost, strength)

    for boost in args.boosts:
        for alpha in args.alphas:
            add(f"{alpha:g}", f"alpha {alpha:g}", boost)
    for strength in args.guidance:  # guidance with each boost: the boost holds the experts' rows on their prefix
        for boost in args.boosts:
            for alpha in args.alphas:
                add(f"{alpha:g}", f"alpha {alpha:g}", boost, strength)
    if args.schedule:
        boost, strength = (0.0, args.guidance[-1]) if args.schedule_with == "guidance" else (args.boosts[-1], 0.0)
        add(args.schedule, f"schedule {args.schedule}", boost, strength)
    return out


def name(what, boost, guidance=0.0, anchor=DEFAULT_ANCHOR, penalty=0.0):
    return (what + (f", boost {boost:g}" if boost else "") + (f", guidance {guidance:g}" if guidance else "")
            + (f" from {anchor}" if guidance and anchor != DEFAULT_ANCHOR else "")
            + (f", frequency penalty {penalty:g}" if penalty else ""))


def write(model, method, labels, cond, schedule, boost, guidance, args, tok):
    """-> the texts' new tokens, one list per sample. guidance: at the logits (minprefix/guidance.py) from
    --guide-from's anchor, each sample decoded as three rows; the boost holds every row that reads the prefix."""
    rows = [[tok.eot] + tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.samples)]
    out = [[] for _ in rows]
    bar = tqdm(total=args.tokens, desc=f"  {cond}", unit="tok", leave=False)
    for start in range(0, len(rows), args.batch_size):
        batch = rows[start:start + args.batch_size]
        idx, real = pad_left(batch, tok.eot)
        tone = Tone(method, model, labels, parse_schedule(schedule, extrapolate=True), len(batch), guidance,
                    anchor=args.guide_from, eot=tok.eot)
        run, cache = tone.start()
        cache = cache.boosted(boost)
        bar.reset()
        for x in fast.stream(run, idx, args.tokens, kv_cache=cache, real=real, seed=args.seed + start, eot=tok.eot,
                             min_new_tokens=args.tokens, tone=None if tone.schedule.constant else tone,
                             frequency_penalty=args.frequency_penalty, **SAMPLING):
            for j, t in enumerate(x[:, 0].tolist()):
                out[start + j].append(t)
            bar.update(1)
    bar.close()
    return out


def attention(model, method, labels, schedule, boost, texts, args, tok):
    """-> the prefix's share of attention per stretch and layer (n_stretches, n_layer), a mean over texts."""
    alpha = parse_schedule(schedule, extrapolate=True).at(0)
    _, cache = method.apply(model, mix_weights(labels, alpha=alpha))
    shares = []
    for i, new in enumerate(texts[:args.attention_samples]):
        prompt = [tok.eot] + tok.encode(PROMPTS[i % len(PROMPTS)])
        share = prefix_attention(model, cache.boosted(boost), prompt, new)  # (tokens, L)
        shares.append(torch.stack([s.mean(0) for s in share.split(args.stretch)]))
    return torch.stack(shares).mean(0).tolist()


def judge_stretches(texts, judge, tok, stretch):
    """-> per stretch, every sample's VADER score."""
    n = len(texts[0]) // stretch
    return [[judge.score(tok.decode(t[k * stretch:(k + 1) * stretch])) for t in texts] for k in range(n)]


@torch.no_grad()
def stretch_perplexity(model, texts, stretch, eot):
    """-> per stretch, the base model's perplexity (no prefix) of its tokens read alone after <|endoftext|>, over
    all samples: what the tone costs in fluency."""
    out = []
    for k in range(len(texts[0]) // stretch):
        nll = 0.0
        for t in texts:
            ids = torch.tensor([[eot] + t[k * stretch:(k + 1) * stretch]])
            nll += torch.nn.functional.cross_entropy(model(ids[:, :-1])[0].float(), ids[0, 1:], reduction="sum").item()
        out.append(math.exp(nll / (stretch * len(texts))))
    return out


LOOP_SHARE = 0.2  # a text's second half loops where one word is more than this share of its words


def looping(text):
    """-> whether text's second half is a loop: one word (split at spaces) more than LOOP_SHARE of its words (in
    English prose the commonest, "the", is about 6%)."""
    words = text[len(text) // 2:].split()
    return bool(words) and max(Counter(words).values()) > LOOP_SHARE * len(words)


def summarise(scores, alpha):
    """scores per stretch -> per stretch: mean, its 95% interval, and the share judged in alpha's direction (positive
    for alpha > 0.5, negative below) with its Wilson interval."""
    out = []
    for s in scores:
        want = [x >= 0.05 for x in s] if alpha > 0.5 else [x <= -0.05 for x in s] if alpha < 0.5 else None
        out.append({"mean": mean(s), "ci": mean_interval(s),
                    "share": None if want is None else mean(want),
                    "share_ci": None if want is None else wilson(sum(want), len(want))})
    return out


def machine():
    name, amx = fast.cpu_name(), fast.cpu_has("amx_bf16")
    threads = torch.get_num_threads()
    return (f"{name}, {'with' if amx else 'without' if amx is False else 'AMX unknown,'} AMX, {threads} "
            f"thread{'s' if threads > 1 else ''}")


def side_first(condition):  # the conditions of alpha 1, then of alpha 0, then the rest, each in the order they ran
    return {"alpha 1": 0, "alpha 0": 1}.get(condition.split(",")[0], 2)


def table(results, args):
    lines = [f"Prefix {results['prefix']} ({results['describe']}) on {results['base_model']}; {args.samples} samples a "
             f"condition, {args.tokens} new tokens each, judged by VADER per {args.stretch}-token stretch. "
             f"{results['machine']}.", ""]
    names = sorted((n for n in results["conditions"] if "summary" in results["conditions"][n]), key=side_first)
    if not names:
        return "\n".join(lines + ["(no condition has finished)"])
    k = len(results["conditions"][names[0]]["summary"])
    head = [f"{i * args.stretch}-{(i + 1) * args.stretch}" for i in range(k)]
    lines += ["Share judged in the asked direction (alpha 1: positive, alpha 0: negative), 95% Wilson interval:", "",
              "| condition | " + " | ".join(head) + " | last - first |", "|---" * (k + 2) + "|"]
    for n in names:
        s = results["conditions"][n]["summary"]
        if s[0]["share"] is None or n.startswith("schedule"):
            continue
        cells = [f"{x['share']:.0%} [{x['share_ci'][0]:.0%}-{x['share_ci'][1]:.0%}]" for x in s]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {100 * (s[-1]['share'] - s[0]['share']):+.0f} pts |")
    lines += ["", "Mean VADER score, 95% interval:", "", "| condition | " + " | ".join(head) + " |", "|---" * (k + 1) + "|"]
    for n in names:
        s = results["conditions"][n]["summary"]
        lines.append(f"| {n} | " + " | ".join(f"{x['mean']:+.2f} [{x['ci'][0]:+.2f}, {x['ci'][1]:+.2f}]" for x in s) + " |")
    lines += ["", "The base model's perplexity of each stretch read alone (no prefix): what the tone costs in fluency; "
              f"and the texts whose second half loops (one word more than {LOOP_SHARE:.0%} of its words):",
              "", "| condition | " + " | ".join(head) + " | texts looping |", "|---" * (k + 2) + "|"]
    for n in names:
        c = results["conditions"][n]
        lines.append(f"| {n} | " + " | ".join(f"{x:.1f}" for x in c["perplexity"])
                     + f" | {sum(map(looping, c['texts']))} of {len(c['texts'])} |")
    att = {n: c["attention"] for n, c in results["conditions"].items() if c.get("attention")}
    if att:
        layers = len(next(iter(att.values()))[0])
        lines += ["", f"Share of attention on the prefix's positions, per layer (mean over the first "
                      f"{args.attention_samples} texts, over heads and the stretch's tokens):", "",
                  "| condition | stretch | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
                  "|---" * (layers + 2) + "|"]
        for n, a in att.items():
            for i in (0, len(a) // 2, len(a) - 1):
                lines.append(f"| {n} | {head[i]} | " + " | ".join(f"{x:.3f}" for x in a[i]) + " |")
    checks = verdicts(results, args)
    if checks:
        lines += ["", *checks]
    return "\n".join(lines)


def verdicts(results, args):
    """The issue's 'done when', read off the results."""
    c, out = results["conditions"], []
    for tag, v in sorted(c.items(), key=lambda kv: side_first(kv[0])):  # every finished condition of alpha 1 or 0
        side = {"alpha 1": "positive", "alpha 0": "negative"}.get(tag.split(",")[0])
        s = v.get("summary")
        if side and s:
            drop = round(100 * (s[0]["share"] - s[-1]["share"]), 6)  # points, as a share of whole samples
            ok = s[-1]["share"] >= 0.7 and drop <= 15
            out.append(f"- {tag}: last stretch {side} in {s[-1]['share']:.0%} of samples (first "
                       f"{s[0]['share']:.0%}, {drop:+.0f} points lost): {'meets' if ok else 'misses'} >= 70% "
                       f"and <= 15 points")
    for n, v in c.items():
        if n.startswith("schedule") and "summary" in v:
            s = v["summary"]
            steps = [b["mean"] >= a["mean"] or b["ci"][1] >= a["ci"][0] for a, b in zip(s, s[1:])]
            out.append(f"- {n}: first stretch {s[0]['mean']:+.2f}, last {s[-1]['mean']:+.2f}; "
                       f"{'monotone within the intervals' if all(steps) else 'not monotone within the intervals'}"
                       f" (each stretch's mean at least the last one's, or their intervals overlapping)")
    return out


def plot(results, args, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = results["conditions"]
    fig, grid = plt.subplots(2, 2, figsize=(15, 10))
    axes = [grid[0, 0], grid[0, 1], grid[1, 0], grid[1, 1]]  # alpha 1, the other alphas, the schedule, attention
    mid = lambda k: [(i + 0.5) * args.stretch for i in range(k)]
    drawn = [0, 0]
    for n in sorted(c, key=side_first):
        v = c[n]
        if "summary" not in v or n.startswith("schedule"):
            continue
        s, panel = v["summary"], 0 if n.split(",")[0] == "alpha 1" else 1
        x, color = mid(len(s)), plt.get_cmap("tab10")(drawn[panel] % 10)
        drawn[panel] += 1
        style = "--" if "boost" in n else ":" if "guidance" in n else "-"
        axes[panel].plot(x, [p["mean"] for p in s], style, color=color, marker="o", label=n)
        axes[panel].fill_between(x, [p["ci"][0] for p in s], [p["ci"][1] for p in s], color=color, alpha=0.08)
    for panel, what in ((0, "alpha 1 (positive asked for)"), (1, "alpha 0 (negative asked for)")):
        axes[panel].set(title=f"{what}: solid plain, dashed boosted, dotted guided", xlabel="new tokens",
                        ylabel="VADER score per stretch (mean, 95% interval)", ylim=(-1.05, 1.05))
        axes[panel].axhline(0, color="k", lw=0.5)
        axes[panel].legend(fontsize=7, loc="lower left" if panel == 0 else "upper left")
    for n, v in c.items():
        if n.startswith("schedule") and "summary" in v:
            s = v["summary"]
            x = mid(len(s))
            axes[2].errorbar(x, [p["mean"] for p in s], yerr=[[p["mean"] - p["ci"][0] for p in s],
                                                               [p["ci"][1] - p["mean"] for p in s]],
                             marker="o", capsize=3, label=f"judge ({n})")
            schedule = parse_schedule(v["alpha"])
            ts = list(range(0, args.tokens + 1, 10))
            twin = axes[2].twinx()
            twin.plot(ts, [schedule.at(t) for t in ts], color="tab:orange", label="alpha")
            twin.set_ylabel("alpha (weight of positive)", color="tab:orange")
            twin.set_ylim(-0.05, 1.05)
    axes[2].axhline(0, color="k", lw=0.5)
    axes[2].set(title="a schedule 0 -> 1: the judge follows", xlabel="new tokens", ylabel="VADER score per stretch")
    axes[2].legend(fontsize=7, loc="upper left")
    cmap = plt.get_cmap("viridis")
    shown = [n for n, v in c.items() if v.get("attention") and n.split(",")[0] == "alpha 1"]  # alpha 0's look alike
    shown = [n for n in shown if not c[n]["boost"]] + sorted((n for n in shown if c[n]["boost"]),
                                                             key=lambda n: c[n]["boost"])[-1:]  # plain, most boosted
    for n in shown:
        a = torch.tensor(c[n]["attention"])  # (stretches, L)
        for layer in range(a.size(1)):
            axes[3].plot(mid(a.size(0)), a[:, layer], "--" if c[n]["boost"] else "-", color=cmap(layer / a.size(1)),
                         label=f"layer {layer}" if n == shown[0] else None)
    axes[3].set(title="attention on the prefix, alpha 1 (solid: plain; dashed: "
                + (", ".join(n.split(", ", 1)[1] for n in shown if c[n]["boost"]) or "boosted") + ")",
                xlabel="new tokens", ylabel="share of each layer's attention", yscale="log")
    axes[3].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{results['describe']} on the offline stand-in (NOT GPT-2), {args.samples} samples a condition; "
                 f"{results['machine']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", default=os.path.join(REPO, "runs", "long", "prefix.safetensors"),
                   help="a two-label checkpoint from train.py (default: %(default)s)")
    p.add_argument("--samples", type=int, default=20, help="texts a condition, one per prompt in turn (default: "
                   "%(default)s)")
    p.add_argument("--tokens", type=int, default=2000, help="new tokens a text (default: %(default)s)")
    p.add_argument("--stretch", type=int, default=250, help="tokens the judge reads at a time (default: %(default)s)")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.0, 0.0, 0.5], help="constant alphas (outside [0, 1]: "
                   "extrapolated) (default: %(default)s)")
    p.add_argument("--boosts", type=float, nargs="+", default=[0.0, 2.0], help="sample.py's --prefix-boost: each alpha "
                   "with each; the schedule with the last (default: %(default)s)")
    p.add_argument("--guidance", type=float, nargs="*", default=[], help="sample.py's --guidance: each alpha with each "
                   "strength and each boost (default: none)")
    p.add_argument("--guide-from", choices=ANCHORS, default=DEFAULT_ANCHOR, help="guidance's anchor, as sample.py's "
                   "--guide-from: the bare model, or the (boosted) K/V mix itself (default: %(default)s)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="sample.py's --frequency-penalty, for every "
                   "condition of this run (default: %(default)s)")
    p.add_argument("--schedule-with", choices=("boost", "guidance"), default="boost", help="the schedule's remedy: "
                   "the last --boosts or the last --guidance (default: %(default)s)")
    p.add_argument("--schedule", default="0:0,2000:1", help="the --alpha schedule written with the last boost; '' for "
                   "none (default: %(default)s)")
    p.add_argument("--attention-samples", type=int, default=4, help="texts of alpha 0 and 1 whose attention is "
                   "measured (default: %(default)s)")
    p.add_argument("--only", nargs="*", help="run these conditions only (their names in the table)")
    p.add_argument("--batch-size", type=int, default=24, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "long"), help="(default: %(default)s)")
    p.add_argument("--figure", default=os.path.join(REPO, "experiments", "figures", "long.png"),
                   help="(default: %(default)s)")
    p.add_argument("--report", action="store_true", help="decode nothing: the table and figure from what finished")
    args = p.parse_args()
    if args.tokens % args.stretch:
        p.error(f"--tokens {args.tokens} is not a whole number of --stretch {args.stretch} stretches")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"conditions": {}}
    meta = read_meta(args.prefix)
    if results.get("prefix") not in (None, os.path.abspath(args.prefix)) or results.get("tokens") not in (None, args.tokens):
        sys.exit(f"{path} holds a study of {results['prefix']} ({results['tokens']} tokens): give another --out, or "
                 f"remove it")
    results.update(prefix=os.path.abspath(args.prefix), tokens=args.tokens, base_model=meta["base_model"])
    tok, judge = Tokenizer(), Judge()
    if not args.report:
        model = fast.decoding_model(meta["base_model"])
        method, meta = load(args.prefix, model)
        results.update(describe=describe(meta), machine=machine())
        for cond, (schedule, boost, guidance) in conditions(args).items():
            done = results["conditions"].get(cond, {})
            if (args.only and cond not in args.only) or done.get("samples") == args.samples:
                continue
            print(f"{cond}: {args.samples} texts of {args.tokens} tokens", flush=True)
            t0 = time.time()
            texts = write(model, method, meta["labels"], cond, schedule, boost, guidance, args, tok)
            seconds = time.time() - t0
            scores = judge_stretches(texts, judge, tok, args.stretch)
            entry = {"alpha": schedule, "boost": boost, "guidance": guidance,
                     "anchor": args.guide_from if guidance else None, "frequency_penalty": args.frequency_penalty,
                     "samples": args.samples, "seconds": seconds,
                     "scores": scores, "summary": summarise(scores, parse_schedule(schedule, extrapolate=True).at(0)),
                     "perplexity": stretch_perplexity(model, texts, args.stretch, tok.eot),
                     "texts": [tok.decode(t) for t in texts]}
            if schedule in ("0", "1") and not guidance:
                entry["attention"] = attention(model, method, meta["labels"], schedule, boost, texts, args, tok)
            if os.path.exists(path):  # what another run of the study into the same --out finished meanwhile stays
                results["conditions"] = {**json.load(open(path))["conditions"], **results["conditions"]}
            results["conditions"][cond] = entry
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(results, f)
            os.replace(tmp, path)
            print(f"  {seconds:.0f} s; per stretch: " + " ".join(f"{s['mean']:+.2f}" for s in entry["summary"]), flush=True)
    results.setdefault("describe", describe(meta))
    results.setdefault("machine", machine())
    text = table(results, args)
    with open(os.path.join(args.out, "long.md"), "w") as f:
        f.write(text + "\n")
    plot(results, args, args.figure)
    print(text)
    print(f"wrote {os.path.join(args.out, 'long.md')} and {args.figure}")


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
