"""Why a low-data run writes blank outputs: on one run of experiments/low_data.py, for each of the study's first
test tables, the likeliest first new token, and what four decodings write, with at least 5 and at most 100 new
tokens:
  beam search         as eval.py --task e2e (the paper's: 5 beams, newlines banned), ranking hypotheses by their
                      sum of log-probs divided by their number of new tokens (HF's length normalisation, 1.0)
  greedy              the likeliest token each step, newlines banned
  newlines allowed    beam search without the ban
  length_penalty 0    beam search ranking by the sum of log-probs itself
Each with the share of outputs empty or only spaces, their length and their mean log-prob per new token.

  export MINPREFIX_MODEL=../shared/models/imdb-gpt2-19m TIKTOKEN_CACHE_DIR=../shared/tiktoken
  python experiments/low_data.py --sizes 100 --subsamples 1 --methods LoRA     # the run: runs/low-data/100-0-LoRA
  python experiments/blank_outputs.py runs/low-data/100-0-LoRA --tables 50
"""
import argparse
import os
import statistics
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, TASK_WORDS, test_file  # noqa: E402
from minprefix import Tokenizer, fast  # noqa: E402
from minprefix.beam import hypotheses  # noqa: E402
from minprefix.data import source_prompt  # noqa: E402
from minprefix.e2e import DECODING, read_tables  # noqa: E402
from minprefix.generate import pad_left  # noqa: E402
from minprefix.method import load, read_meta  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a low-data run's folder, holding its checkpoint.safetensors")
    p.add_argument("--tables", type=int, default=50, help="the first N of the study's test tables (default: "
                   "%(default)s)")
    p.add_argument("--batch-size", type=int, default=10, help="(default: %(default)s)")
    args = p.parse_args()
    ckpt = os.path.join(args.run, "checkpoint.safetensors")
    mode = read_meta(ckpt)["mode"]
    words = None if mode in ("kv", "embedding") else TASK_WORDS  # what low_data.py puts before each table
    tables = read_tables(test_file(DATA, words), args.tables)
    model = fast.decoding_model(read_meta(ckpt)["base_model"])
    fast.keep_freed_memory()  # as eval.py decodes
    method, meta = load(ckpt, model)
    tok = Tokenizer.for_model(model.name_or_path)
    first = {"allowed": Counter(), "banned": Counter()}  # the likeliest first new token, newlines allowed or not
    # per decoding: its best (score, new tokens) per table
    decodings = {"beam search": dict(num_beams=DECODING["num_beams"]), "greedy": dict(num_beams=1),
                 "beam search, newlines allowed": dict(num_beams=DECODING["num_beams"], banned=()),
                 "beam search, sum of log-probs (length_penalty 0)": dict(num_beams=DECODING["num_beams"],
                                                                          length_penalty=0.0)}
    found = {name: [] for name in decodings}
    for start in range(0, len(tables), args.batch_size):
        batch = [source_prompt(tok, t) for t, _ in tables[start:start + args.batch_size]]
        idx, real = pad_left(batch, tok.eot)
        run, cache = method.apply(model, torch.ones(len(batch), 1))
        with torch.no_grad():
            logits = run(idx, None if cache is None else cache.copy(), real)[:, -1].float()  # (B, V)
        first["allowed"].update(tok.decode([t]) for t in logits.argmax(-1).tolist())
        logits[:, list(tok.newlines)] = float("-inf")
        first["banned"].update(tok.decode([t]) for t in logits.argmax(-1).tolist())
        for name, settings in decodings.items():
            settings = dict(dict(max_new_tokens=DECODING["max_new_tokens"], banned=tok.newlines,
                                 min_new_tokens=DECODING["min_new_tokens"], eot=tok.eot), **settings)
            got = hypotheses(run, idx, kv_cache=cache, real=real, steps=fast.StaticSteps, pairs=fast.best_pairs,
                             **settings)
            found[name] += [hyps[0] for hyps in got]
        print(f"# {min(start + args.batch_size, len(tables))} of {len(tables)} tables", file=sys.stderr, flush=True)

    print(f"{ckpt} ({meta['mode']}), base model {model.name_or_path}; the first {len(tables)} of the study's test "
          f"tables; at least {DECODING['min_new_tokens']} and at most {DECODING['max_new_tokens']} new tokens, "
          f"newlines banned unless said")
    for rule, counts in first.items():
        print(f"the likeliest first new token, newlines {rule}: "
              + ", ".join(f"{t!r} for {n} tables" for t, n in counts.most_common(3)))
    print("\n| decoding | outputs empty or only spaces | new tokens, median [min-max] | mean log-prob per new token, "
          "median [min-max] |\n|---|---|---|---|")
    text = {name: [tok.decode([t for t in new if t != tok.eot]) for _, new in hyps] for name, hyps in found.items()}
    for name, hyps in found.items():  # the score a search ranks by is sum / tokens**length_penalty: per token here
        penalty = decodings[name].get("length_penalty", 1.0)
        found[name] = hyps = [(score / len(new) ** (1 - penalty), new) for score, new in hyps]
        lengths, scores = [len(new) for _, new in hyps], [s for s, _ in hyps]
        print(f"| {name} | {sum(not t.strip() for t in text[name])} of {len(hyps)} | {statistics.median(lengths):g} "
              f"[{min(lengths)}-{max(lengths)}] | {statistics.median(scores):.3f} [{min(scores):.3f}, "
              f"{max(scores):.3f}] |")
    empty = [i for i, t in enumerate(text["beam search"]) if not t.strip()]
    if empty:
        median = lambda name, f: statistics.median(f(found[name][i]) for i in empty)
        print(f"\nthe {len(empty)} tables whose beam search output is blank, there (medians):")
        for name in found:
            print(f"  {name}: {median(name, lambda h: len(h[1])):g} new tokens at {median(name, lambda h: h[0]):.3f} "
                  f"per token; text (not blank) in {sum(bool(text[name][i].strip()) for i in empty)} of them")
        i = empty[0]
        print(f"e.g. {tables[i][0]!r}:" + "".join(f"\n  {name}: {text[name][i]!r}" for name in found))


if __name__ == "__main__":
    main()
