"""The prefix-tuning paper's own task, E2E table-to-text, decoded and scored as the paper did.

Decoding (the paper's gpt2/run_generation.py): the prompt is ` {table} <|endoftext|>`; beam search with 5
beams, at least 5 new tokens, the newline tokens banned ("\n" and "\n\n": GPT-2's 198 and 628; the model's
tokenizer says which ids they are), stop at <|endoftext|>, at most 100 new tokens; one output per test table,
stripped. Scoring: minprefix/e2e_metrics.py, the official e2e-metrics definitions (BLEU, NIST, ROUGE-L, CIDEr;
METEOR needs Java and is left out).
"""
import json
import math
import os
import time

import torch
from tqdm import tqdm

from minprefix import fast
from minprefix.beam import beam_search
from minprefix.data import read_data, source_prompt, tables
from minprefix.e2e_metrics import e2e_scores
from minprefix.files import atomic_path
from minprefix.generate import pad_left

DECODING = dict(num_beams=5, min_new_tokens=5, max_new_tokens=100)  # the paper's; banned: Tokenizer.newlines


def read_tables(path, limit=None):
    """-> [(table, [references])] in order of first appearance; limit: the first N tables."""
    examples = read_data(path)
    if examples[0].source is None:
        raise ValueError(f"{path}: E2E evaluation needs source -> text data (table||text lines or JSONL "
                         f"{{\"source\", \"text\"}}), not labelled text")
    return tables(examples)[:limit]


@torch.no_grad()
def decode_tables(model, tok, table_list, method=None, batch_size=10, progress=True, **decoding):
    """One text per table, in order: beam search from ` {table} <|endoftext|>`, under the task's method (a prefix,
    a LoRA; None: the model as it is).
    Tables are decoded batch_size at a time, shortest first (less padding), and put back in order."""
    decoding = {**DECODING, "banned": tok.newlines, **decoding}
    prompts = [source_prompt(tok, t) for t, _ in table_list]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc="decoding tables", dynamic_ncols=True,
                      disable=not progress):
        rows = order[start:start + batch_size]
        idx, real = pad_left([prompts[i] for i in rows], tok.eot, device=model.device)
        run, cache = (model, None) if method is None else method.apply(model, torch.ones(len(rows), 1, device=model.device))
        search = fast.beam_search if fast.enabled() else beam_search
        for i, new in zip(rows, search(run, idx, kv_cache=cache, real=real, eot=tok.eot, **decoding)):
            outputs[i] = tok.decode(new).strip()
    return outputs


def write_results(folder, table_list, outputs, scores, settings):
    """e2e_outputs.txt (one line per table, in test order), e2e_refs.txt (the official scorer's format: the
    references one per line, a blank line between tables), eval.json and eval.md."""
    os.makedirs(folder, exist_ok=True)
    files = {
        "e2e_outputs.txt": "".join(o.replace("\n", " ") + "\n" for o in outputs),
        "e2e_refs.txt": "\n".join("".join(r + "\n" for r in refs) for _, refs in table_list),
        "eval.json": json.dumps({"scores": scores, "settings": settings,
                                 "samples": [{"table": t, "output": o, "references": refs[:2]}
                                             for (t, refs), o in list(zip(table_list, outputs))[:5]]}, indent=2,
                                allow_nan=False),
        "eval.md": markdown(scores, settings),
    }
    for name, text in files.items():
        with atomic_path(os.path.join(folder, name)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def markdown(scores, settings):
    return ("| system | tables | BLEU | NIST | ROUGE-L | CIDEr |\n|---|---|---|---|---|---|\n"
            f"| {settings['system']} | {settings['tables']} | {scores['bleu']:.1f} | "
            f"{'-' if scores['nist'] is None else format(scores['nist'], '.2f')} | "
            f"{scores['rouge_l']:.1f} | {scores['cider']:.2f} |\n\n"
            f"base model {settings['base_model']}; beam {settings['num_beams']}, at least {settings['min_new_tokens']} "
            f"and at most {settings['max_new_tokens']} new tokens, tokens {list(settings['banned'])} banned; "
            f"{settings['minutes']:.1f} min on {settings['device']}. BLEU and ROUGE-L on the 0-100 scale; METEOR "
            f"is left out (it needs Java and paraphrase tables)."
            + (" NIST: - because no output has an n-gram of some order up to 5, where the official scorer divides "
               "by zero." if scores["nist"] is None else "") + "\n")


def evaluate_e2e(model, tok, table_list, method=None, system="", batch_size=10, progress=True, **decoding):
    """Decode and score: -> (outputs, scores, settings). A NIST that the official scorer cannot compute (no
    hypothesis n-gram of some order up to 5 in the whole corpus: it divides by zero) is None, and said so."""
    t0 = time.time()
    outputs = decode_tables(model, tok, table_list, method, batch_size, progress, **decoding)
    scores = e2e_scores(outputs, [refs for _, refs in table_list])
    if math.isnan(scores["nist"]):
        scores["nist"] = None
    settings = dict({**DECODING, "banned": tok.newlines, **decoding}, system=system, tables=len(table_list),
                    base_model=model.name_or_path, minutes=(time.time() - t0) / 60, device=str(model.device),
                    batch_size=batch_size)
    settings["banned"] = list(settings["banned"])
    return outputs, scores, settings
