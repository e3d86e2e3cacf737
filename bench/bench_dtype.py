"""How often half precision (and int8 decoding) picks the token float32 picks, on real text.

Teacher-forced: every position of every held-out text (data/test.jsonl, each after <|endoftext|>), the model in
float32 and in bfloat16 / float16 reading the same tokens: the share of positions whose argmax agrees, and the
largest |dlogit|. Free-running: greedy decoding of 48 tokens from each text's first 3 words in both dtypes, and
how many tokens match before the first difference.

  python bench/bench_dtype.py --model ../shared/models/imdb-gpt2-19m
"""
import argparse
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from minprefix import Tokenizer, fast  # noqa: E402
from minprefix.data import read_jsonl  # noqa: E402
from minprefix.env import load_env  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=os.environ.get("MINPREFIX_MODEL", "gpt2"), help="(default: $MINPREFIX_MODEL, else gpt2)")
    p.add_argument("--data", default=os.path.join(REPO, "data/test.jsonl"), help="(default: %(default)s)")
    args = p.parse_args()
    tok = Tokenizer()
    texts = [e.text for e in read_jsonl(args.data)]
    reference = fast.decoding_model(args.model, "float32")
    generate = fast.generate
    print(f"{args.model}: {len(texts)} texts of {args.data}")
    print("| dtype | teacher-forced positions | argmax = float32's | max abs dlogit | greedy, 48 tokens: "
          "tokens equal before the first difference (median [min-max]) | all 48 equal |")
    print("|---|---|---|---|---|---|")
    for name in ("bfloat16", "float16", "int8"):
        half = fast.decoding_model(args.model, name)
        agree = total = 0
        worst = 0.0
        runs = []
        with torch.no_grad():
            for text in texts:
                idx = torch.tensor([[tok.eot] + tok.encode(text)])
                a, b = reference(idx)[0], half(idx)[0].float()
                agree += int((a.argmax(-1) == b.argmax(-1)).sum())
                total += idx.size(1)
                worst = max(worst, (a - b).abs().max().item())
                prompt = torch.tensor([[tok.eot] + tok.encode(" ".join(text.split()[:3]))])
                x = generate(reference, prompt, 48, temperature=0, eot=None)[0]
                y = generate(half, prompt, 48, temperature=0, eot=None)[0]
                runs.append(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), len(x)))
        print(f"| {name} | {total} | {agree / total:.2%} | {worst:.3f} | {statistics.median(runs):.0f} "
              f"[{min(runs)}-{max(runs)}] | {sum(r == 48 for r in runs)} of {len(runs)} |")


if __name__ == "__main__":
    load_env()  # .env at the checkout's root: MINPREFIX_MODEL, TIKTOKEN_CACHE_DIR (minprefix/env.py)
    main()
