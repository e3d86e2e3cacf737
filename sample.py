"""Write with a trained checkpoint (prefix, LoRA or fine-tuned model): one label (--sentiment) or a mix (--alpha:
alpha * positive + (1 - alpha) * negative, by the labels' names; --weights: one weight per label, in the
checkpoint's order).

  python sample.py --alpha 1.0                       # positive
  python sample.py --alpha 0.5 --prompt "The labs"   # halfway; at a terminal the text appears as it is written
  python sample.py --sentiment negative --n 5        # each sample is printed as soon as it ends
  python sample.py --prompts-file prompts.txt --output out.jsonl --temperature 0   # many prompts, batched
  python sample.py --alpha 0:0,600:1 --max-new-tokens 1000 --min-new-tokens 1000  # a story that turns from bleak
                                                     # to bright, past the model's window (docs/long.md)
  python sample.py --prefix weights/e2e-prefix.safetensors --num-beams 5 \\
      --prompt "name : The Eagle | Type : pub | area : riverside"        # a source -> text prefix: the prompt is the source
  python sample.py --prefix ../shared/models/imdb-gpt2-19m --prompt "The labs"   # a model folder alone, no prefix
  python sample.py --serve --port 8000               # an OpenAI-style server and a page with sliders (docs/serve.md)

The checkpoint is the one train.py wrote last (weights/latest), unless --prefix names another. Prompts of
different lengths are decoded together, padded on the left with an attention mask that hides the padding and
positions that skip it (minprefix/gpt2.py), so each prompt is continued as it would be alone (up to the window's
end). --stream decodes one sample at a time (each printed as it is written); otherwise up to --batch-size rows at
once. A text longer than the model's window (1,024 positions for GPT-2) keeps its prefix and its last half,
encoded again: a batch's rows all at once, when the longest reaches the end (docs/long.md).
"""
import argparse
import json
import os
import sys

import torch

from minprefix import Tokenizer, fast
from minprefix.data import source_prompt
from minprefix.e2e import DECODING
from minprefix.env import load_env
from minprefix.beam import hypotheses
from minprefix.generate import REPEAT_WINDOW, pad_left, stream
from minprefix.guidance import ANCHORS, DEFAULT_ANCHOR, DEFAULT_STRENGTH, guide
from minprefix.method import latest, load, read_meta
from minprefix.prefix import DEFAULT_CHECKPOINT, mix_weights
from minprefix.tone import Tone, parse_schedule

# defaults when sampling, not with beams
SAMPLING = {"temperature": 0.8, "top_p": 0.9, "top_k": None, "seed": 0, "frequency_penalty": 0.0}


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefix", "--checkpoint", dest="prefix", help="a checkpoint from train.py: a prefix or LoRA "
                   f"(.safetensors) or a fine-tuned model folder; or any model folder in the hub's layout, which then "
                   f"writes alone, no prefix (the baseline) (default: the one train.py wrote last, else "
                   f"{DEFAULT_CHECKPOINT})")
    tone = p.add_mutually_exclusive_group()
    tone.add_argument("--alpha", help="weight of the label called positive against the other: 1.0 positive, 0.0 "
                      "negative, whatever order the checkpoint stores its labels in (default: 0.5 with two labels); or a schedule over the new tokens, TOKEN:ALPHA points, "
                      "e.g. 0:0,600:1 (0 at the first token rising linearly to 1 at token 600, then held; "
                      "minprefix/tone.py)")
    tone.add_argument("--sentiment", help="one label alone, by name, e.g. positive")
    tone.add_argument("--weights", help="one weight per label, comma-separated, in the checkpoint's label order "
                      "(the order the first line of the output shows, e.g. 0.5*positive, 0.5*negative)")
    p.add_argument("--extrapolate", action="store_true", help="allow --alpha outside [0, 1]")
    p.add_argument("--guidance", type=float, help="strength of guidance at the logits: each sample decoded as an "
                   "anchor and each label alone, its next token drawn from z_anchor + strength * (2 alpha - 1) * "
                   "(z_positive - z_negative) (DExperts with the labels' prefixes as experts; minprefix/guidance.py); "
                   f"0 for the K/V mix alone (default: {DEFAULT_STRENGTH:g} when sampling with two or more labels; "
                   "0 with --prefix-boost, which it would undo over long texts (docs/long.md); not with --num-beams)")
    p.add_argument("--guide-from", default=DEFAULT_ANCHOR, choices=ANCHORS, help="guidance's anchor: bare, the model "
                   "without a prefix (DExperts' form: the labels' shared style cancels, the bare model's fluency "
                   "stays), or mix, the K/V mix at alpha (default: %(default)s)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue (default: none, a fresh text)")
    src.add_argument("--prompts-file", help="one prompt per line ('-': standard input; blank lines are skipped, and "
                     "said so), decoded in batches, printed in the file's order")
    p.add_argument("--output", help="also write JSON Lines, one per sample: {\"index\", \"prompt_index\", \"sample\", "
                   "\"prompt\", \"alpha\" or \"weights\", \"text\", \"new_tokens\"} (and \"line\" with --prompts-file)")
    p.add_argument("--n", type=int, help="samples per prompt (default: 3; 1 with --prompts-file or --num-beams; "
                   "with --num-beams, the n best hypotheses)")
    p.add_argument("--batch-size", type=int, default=16, help="rows decoded together (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per sample, past the model's window if need be "
                   "(beam search stops at it, and says so) (default: 60; 100 for a source -> text checkpoint with beams)")
    p.add_argument("--temperature", type=float, help="0 for greedy (default: 0.8; not with --num-beams)")
    p.add_argument("--top-k", type=int, help="keep the k likeliest tokens (default: off; not with --num-beams)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1], 1 for off (default: 0.9; not with "
                   "--num-beams)")
    p.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams instead of sampling "
                   "(as the paper decodes E2E: 5) (default: %(default)s)")
    p.add_argument("--min-new-tokens", type=int, help="hold <|endoftext|> back for this many tokens, so that a sample "
                   "is at least that long (default: 0; with beams and a source -> text checkpoint 5, as eval.py --task e2e)")
    p.add_argument("--prefix-boost", type=float, default=0.0, help="hold the prefix's tone over long texts: its "
                   "keys weigh 1 + B * n / P times more in attention, n the text's positions so far, P the prefix's "
                   "(DTPA-style; docs/long.md measures it: 2 holds either end over 2,000 tokens, at a cost in "
                   "fluency); prefixes only; guidance is then off unless --guidance is given (default: 0, off)")
    p.add_argument("--frequency-penalty", type=float, help="each use of a token among the last "
                   f"{REPEAT_WINDOW} written lowers its logit by this much (OpenAI's frequency_penalty, counted over "
                   "a window; it breaks the loops a small model falls into on long texts, docs/long.md) (default: 0, "
                   "off; not with --num-beams)")
    p.add_argument("--allow-newlines", action="store_true", help="beam search with a source -> text checkpoint: "
                   "do not ban the newline tokens, \"\\n\" and \"\\n\\n\" (GPT-2's 198 and 628; the paper bans them)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are decoded, one sample at a time (default: at a terminal, with one "
                        "sample in all)")
    p.add_argument("--seed", type=int, help="(default: 0; not with --num-beams)")
    p.add_argument("--model", help="where the base model is, if not where the checkpoint says (a moved folder)")
    p.add_argument("--dtype", default="float32", choices=list(fast.DTYPES), help=fast.DTYPE_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--reference", action="store_true", help="run the plain reference code only (minprefix/fast.py off)")
    srv = p.add_argument_group("serving (--serve; each request gives its own prompt, mix and sampling settings; "
                               "--batch-size is the most rows decoded together)")
    srv.add_argument("--serve", action="store_true", help="answer HTTP: POST /v1/completions (OpenAI's completions "
                     "with alpha, weights or label), GET /v1/models, and GET / a page with a slider per label "
                     "(needs pip install -e \".[serve]\"; docs/serve.md)")
    srv.add_argument("--host", help="the address to listen on (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, help="(default: 8000)")
    return p


# sample.py's flags that a request gives for itself when serving: flag -> the request's field
PER_REQUEST = {"alpha": "alpha", "sentiment": "label", "weights": "weights", "extrapolate": "extrapolate",
               "prompt": "prompt", "prompts_file": "prompt", "output": None, "n": "n", "max_new_tokens": "max_tokens",
               "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "num_beams": None,
               "min_new_tokens": None, "allow_newlines": None, "stream": "stream", "seed": "seed",
               "frequency_penalty": "frequency_penalty"}


def serve(p, args):
    """--serve: load the checkpoint once and answer HTTP until interrupted (minprefix/serve.py)."""
    for dest, field in PER_REQUEST.items():
        if getattr(args, dest) != p.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            p.error(f"{flag} does not apply to --serve: " + (f"each request gives its own ({field!r})" if field else
                    "the server samples (no beams) and answers over HTTP") + "; see docs/serve.md")
    if args.port is not None and not 0 < args.port < 65536:
        p.error(f"--port must be in 1-65535, got {args.port}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, got {args.batch_size}")
    try:
        from minprefix import serve
    except ImportError as e:
        p.error(f"--serve: {e}")
    args.prefix = args.prefix or latest(DEFAULT_CHECKPOINT)
    meta = read_meta(args.prefix)
    model = fast.decoding_model(args.model or meta["base_model"], args.dtype, args.device)
    method, meta = load(args.prefix, model)
    engine = serve.Engine(model, method, meta, args.prefix, batch_size=args.batch_size)
    serve.serve(engine, args.host or "127.0.0.1", 8000 if args.port is None else args.port)
    return 0


def read_prompts(path):
    """-> [(line number, prompt)], blank lines skipped (and named on stderr)."""
    f = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with f:
        lines = [line.rstrip("\r\n") for line in f]
    prompts = [(n, q) for n, q in enumerate(lines, start=1) if q.strip()]
    blank = [n for n, q in enumerate(lines, start=1) if not q.strip() and prompts and n < prompts[-1][0]]
    if blank:  # (blank lines at the end are no news)
        print(f"# {path}: skipped blank line{'s' if len(blank) > 1 else ''} {', '.join(map(str, blank))} (to write "
              f"a fresh text, use --prompt '')", file=sys.stderr)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def tone(p, args, meta, mixes):
    """-> (mixing weights (1, n_labels) for the first token, what to record of them in --output, the Schedule
    where --alpha changes over the tokens, else None)."""
    labels = meta["labels"]
    given = [f for f, v in (("--alpha", args.alpha), ("--sentiment", args.sentiment), ("--weights", args.weights))
             if v is not None]
    if not mixes:
        if given:
            what = ("a model used as it is" if meta["mode"] == "base" else
                    "a fine-tuned model, one model for every label")
            p.error(f"{given[0]}: {args.prefix} is {what}: it has no labels to mix (train a prefix or a LoRA for that)")
        return torch.ones(1, 1), {}, None
    if args.alpha is not None:
        if len(labels) != 2 or "positive" not in labels:
            p.error(f"--alpha weighs the label called positive against the other one; {args.prefix} has "
                    f"{len(labels)} label{'s' if len(labels) > 1 else ''} ({', '.join(labels)}): "
                    + ("it has nothing to mix" if len(labels) == 1 else
                       "give one weight per label with --weights, in that order"))
        try:
            schedule = parse_schedule(args.alpha, args.extrapolate)
        except ValueError as e:
            p.error(str(e))
        if schedule.constant:
            alpha = schedule.at(0)
            return mix_weights(labels, alpha=alpha), {"alpha": alpha}, None
        return mix_weights(labels, alpha=schedule.at(0)), {"alpha": str(schedule)}, schedule
    try:
        w = mix_weights(labels, label=args.sentiment, weights=None if args.weights is None else
                        [float(x) for x in args.weights.split(",")])
    except ValueError as e:
        if args.sentiment is not None:
            p.error(f"--sentiment {args.sentiment!r}: this checkpoint knows {', '.join(labels)}")
        if args.weights is not None:
            p.error(f"--weights {args.weights!r}: {e}" + ("" if "labels" in str(e) else
                    f"; give {len(labels)} numbers, one per label ({', '.join(labels)})"))
        p.error(f"{args.prefix} has {len(labels)} labels ({', '.join(labels)}): choose one with --sentiment, or a "
                f"mix with --weights (one weight per label)")
    weights = {"weights": dict(zip(labels, w[0].tolist()))}
    if args.sentiment is None and args.weights is None:  # nothing asked: one label alone, or two evenly
        return w, {} if len(labels) == 1 else {"alpha": 0.5} if "positive" in labels else weights, None
    return w, weights, None


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.reference:
        os.environ["MINPREFIX_REFERENCE"] = "1"
    if args.serve:
        return serve(p, args)
    for flag, value in (("--host", args.host), ("--port", args.port)):
        if value is not None:
            p.error(f"{flag} is for --serve")
    beams = args.num_beams > 1
    if beams:  # beam search is deterministic and picks its own tokens: refuse what it would silently ignore
        for flag, value in (("--temperature", args.temperature), ("--top-k", args.top_k), ("--top-p", args.top_p),
                            ("--seed", args.seed), ("--stream", args.stream or None), ("--guidance", args.guidance),
                            ("--frequency-penalty", args.frequency_penalty)):
            if value is not None:
                p.error(f"{flag} does not apply to beam search (--num-beams {args.num_beams}), which is deterministic; "
                        f"drop {flag}, or sample with --num-beams 1")
    else:
        if args.allow_newlines:
            p.error("--allow-newlines is for beam search: give --num-beams too")
        for name, default in SAMPLING.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
    if args.guidance is not None and args.guidance < 0:
        p.error(f"--guidance must be >= 0 (0 is the K/V mix alone), got {args.guidance:g}")
    if args.n is None:
        args.n = 1 if args.prompts_file or beams else 3
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size),
                        ("--num-beams", args.num_beams)):
        if value is not None and value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.prefix_boost < 0:
        p.error(f"--prefix-boost must be >= 0 (0 is off), got {args.prefix_boost}")
    if beams and args.n > args.num_beams:
        p.error(f"--n {args.n}: beam search keeps {args.num_beams} hypotheses per prompt; ask for at most that many")
    if not beams:
        if args.temperature < 0:
            p.error(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
        if not 0 < args.top_p <= 1:
            p.error(f"--top-p must be in (0, 1], got {args.top_p}")
        if args.top_k is not None and args.top_k < 1:
            p.error(f"--top-k must be at least 1, got {args.top_k}")

    if fast.enabled():
        fast.keep_freed_memory()  # a process-wide malloc setting: the script's to choose, not the library's
    args.prefix = args.prefix or latest(DEFAULT_CHECKPOINT)
    meta = read_meta(args.prefix)
    conditional = bool(meta["info"].get("conditional"))
    model = fast.decoding_model(args.model or meta["base_model"], args.dtype, args.device)
    method, meta = load(args.prefix, model)  # now checked against the base model
    weights, recorded, schedule = tone(p, args, meta, method.mixes)
    if args.guidance is None:
        # not with the boost: over long texts the bare anchor drifts to its own tone and undoes it (docs/long.md)
        args.guidance = (DEFAULT_STRENGTH if method.mixes and len(meta["labels"]) > 1 and not beams
                         and not args.prefix_boost else 0.0)
    elif args.guidance and not (method.mixes and len(meta["labels"]) > 1):
        p.error(f"--guidance {args.guidance:g} combines the labels' logits; {args.prefix} has "
                + (f"one label ({meta['labels'][0]})" if method.mixes else "no labels to mix") + ": drop --guidance")
    if args.guidance:
        recorded.update(guidance=args.guidance, guide_from=args.guide_from)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else [(None, args.prompt)]
    if conditional and not all(q.strip() for _, q in prompts):
        p.error("this checkpoint writes text for a source (e.g. an E2E table): give it with --prompt or --prompts-file")
    e2e = conditional and beams  # decode as eval.py --task e2e does, unless told otherwise
    if args.max_new_tokens is None:
        args.max_new_tokens = DECODING["max_new_tokens"] if e2e else 60
    if args.min_new_tokens is not None and not 0 <= args.min_new_tokens <= args.max_new_tokens:
        p.error(f"--min-new-tokens must be between 0 and --max-new-tokens ({args.max_new_tokens}), got "
                f"{args.min_new_tokens}")
    if schedule is not None and beams:
        p.error(f"--alpha {args.alpha}: a schedule is for sampling; beam search keeps one mix (give one number)")
    device = model.device
    tok = Tokenizer.for_model(model.name_or_path)  # the model folder's own BPE, else GPT-2's
    mix = ", ".join(f"{w:g}*{l}" for w, l in zip(weights[0].tolist(), meta["labels"])) if method.mixes else "no mix"
    if schedule is not None:
        mix = f"alpha {schedule} over the new tokens (first token: {mix})"
    print(f"# {meta['mode']} {args.prefix} on {model.name_or_path}: {mix}"
          + (f", guidance {args.guidance:g} from "
             + ("the bare model" if args.guide_from == "bare" else "the K/V mix") if args.guidance else ""), flush=True)

    n, one = args.n, beams  # with beams, each prompt is decoded once and gives its n best hypotheses
    rows = [(i, q) for i, (_, q) in enumerate(prompts) for _ in range(1 if one else n)]
    ids = [source_prompt(tok, q) if conditional else [tok.eot] + tok.encode(q) for _, q in rows]
    streaming = args.stream if args.stream is not None else (sys.stdout.isatty() and len(rows) == 1 and not beams)
    texts = [[] for _ in rows]  # per row: its samples (n hypotheses with beams, else one)
    lengths = [[] for _ in rows]  # and their lengths in new tokens
    batch_size = 1 if streaming else args.batch_size
    in_order = args.prompts_file and not streaming  # printed at the end, in the file's order
    label = lambda r, j: r * n + j + 1 if one else r + 1  # the sample's number, as printed: [k]
    for start in range(0, len(rows), batch_size):
        batch = list(range(start, min(start + batch_size, len(rows))))
        idx, real = pad_left([ids[r] for r in batch], tok.eot, device=device)
        changing = None if schedule is None else Tone(method, model, meta["labels"], schedule, len(batch),
                                                      args.guidance, args.guide_from, tok.eot)
        run, cache = changing.start() if changing is not None else \
            guide(method, model, weights.to(device).repeat(len(batch), 1), args.guidance, args.guide_from, tok.eot)
        if args.prefix_boost:
            if cache is None:
                p.error(f"--prefix-boost amplifies attention to a prefix, and {args.prefix} ({meta['mode']}) puts "
                        f"none before the text: drop it")
            cache = cache.boosted(args.prefix_boost)
        if beams:
            settings = dict(min_new_tokens=args.min_new_tokens if args.min_new_tokens is not None else
                            (DECODING["min_new_tokens"] if e2e else 0),
                            banned=tok.newlines if e2e and not args.allow_newlines else ())
            pieces = dict(steps=fast.StaticSteps, pairs=fast.best_pairs) if fast.enabled() else {}
            found = hypotheses(run, idx, args.num_beams, args.max_new_tokens, kv_cache=cache, real=real, eot=tok.eot,
                               **settings, **pieces)
            for r, hyps in zip(batch, found):
                for j, (_, new) in enumerate(hyps[:n]):
                    new = new[:-1] if new[-1:] == [tok.eot] else new
                    texts[r].append(tok.decode(new))
                    lengths[r].append(len(new))
                    show(label(r, j), rows[r][1], texts[r][-1], conditional, not in_order)
            continue
        steps = (fast.stream if fast.enabled() else stream)(run, idx, args.max_new_tokens, kv_cache=cache, real=real, seed=args.seed + start,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eot=tok.eot,
                              min_new_tokens=args.min_new_tokens or 0, tone=changing,
                              frequency_penalty=args.frequency_penalty)
        if streaming:  # one row: print each piece of text as soon as its characters are whole
            r = batch[0]
            print(f"[{r + 1}] {'' if conditional else rows[r][1]}", end="", flush=True)
            piece, new = tok.stream_decoder(), []
            for x in steps:
                if x[0, 0].item() == tok.eot:
                    break
                new.append(x[0, 0].item())
                print(piece(new[-1]), end="", flush=True)
            print()
            texts[r].append(tok.decode(new))
            lengths[r].append(len(new))
            continue
        # several rows: print each as soon as it has written <|endoftext|> (or run out of tokens), with its number
        done, tokens = set(), [[] for _ in batch]
        for x in steps:
            for j, t in enumerate(x[:, 0].tolist()):
                if j in done:
                    continue
                if t == tok.eot:
                    done.add(j)
                else:
                    tokens[j].append(t)
                    continue
                texts[batch[j]].append(tok.decode(tokens[j]))
                lengths[batch[j]].append(len(tokens[j]))
                show(batch[j] + 1, rows[batch[j]][1], texts[batch[j]][0], conditional, not in_order)
        for j in range(len(batch)):
            if j not in done:
                texts[batch[j]].append(tok.decode(tokens[j]))
                lengths[batch[j]].append(len(tokens[j]))
                show(batch[j] + 1, rows[batch[j]][1], texts[batch[j]][0], conditional, not in_order)
        if args.prompts_file:
            print(f"# {batch[-1] + 1} of {len(rows)} done", file=sys.stderr, flush=True)
    samples = [(r, j, text, length) for r in range(len(rows))
               for j, (text, length) in enumerate(zip(texts[r], lengths[r]))]
    if in_order:  # in the file's order, once all are done
        for r, j, text, _ in samples:
            show(label(r, j), rows[r][1], text, conditional)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for k, (r, j, text, length) in enumerate(samples):
                i = rows[r][0]
                row = {"index": k, "prompt_index": i, "sample": j if one else r % n,
                       **({"line": prompts[i][0]} if args.prompts_file else {}), "prompt": rows[r][1], **recorded,
                       "text": text, "new_tokens": length}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"# wrote {len(samples)} samples to {args.output}")
    return 0


def show(number, prompt, text, conditional, now=True):  # one sample, as "[number] prompt + text"
    if now:
        print(f"[{number}] {'' if conditional else prompt}{text}", flush=True)


if __name__ == "__main__":
    try:
        load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{sys.argv[0]}: error: {e}")
