"""The sentiment data: JSON Lines of {"text": ..., "sentiment": ...}, checked line by line, tokenized and batched."""
import json
import warnings
from dataclasses import dataclass

import torch

LABEL_ORDER = ("positive", "negative")  # positive -> 0, negative -> 1; any other label follows in order of appearance


@dataclass
class Example:
    text: str
    label: str
    where: str  # "file:line", for messages


def read_jsonl(path, labels=None):
    """-> examples. labels: the allowed ones (e.g. those a prefix was trained on); None allows any."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected an object with 'text' and 'sentiment', got {type(row).__name__}")
            for field in ("text", "sentiment"):
                if field not in row:
                    raise ValueError(f"{where}: missing field '{field}'")
                if not isinstance(row[field], str):
                    raise ValueError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
            if not row["text"].strip():
                raise ValueError(f"{where}: empty text")
            if labels is not None and row["sentiment"] not in labels:
                raise ValueError(f"{where}: unknown sentiment {row['sentiment']!r}; known: {', '.join(labels)}")
            examples.append(Example(row["text"].strip(), row["sentiment"], where))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def label_names(examples):
    seen = list(dict.fromkeys(e.label for e in examples))
    return [l for l in LABEL_ORDER if l in seen] + [l for l in seen if l not in LABEL_ORDER]


def encode(examples, tokenizer, labels, max_tokens):
    """-> [(tokens, label id)], tokens = <|endoftext|> text <|endoftext|>: the first token is the context the
    text starts from, the last teaches the model to stop. max_tokens: room left in the context by the prefix."""
    items = []
    for e in examples:
        ids = tokenizer.encode(e.text)
        if len(ids) + 1 > max_tokens:
            keep = max_tokens - 1
            warnings.warn(f"{e.where}: text of {len(ids)} tokens truncated to {keep} to fit the context")
            ids = ids[:keep]
            items.append(([tokenizer.eot] + ids, labels.index(e.label)))  # cut mid-text: no end token to learn
        else:
            items.append(([tokenizer.eot] + ids + [tokenizer.eot], labels.index(e.label)))
    return items


def batches(items, batch_size, shuffle=False, generator=None, pad=50256):
    """-> (idx (B, T), targets (B, T), labels (B,)). Padding goes on the right, where causal attention keeps
    it out of every real token's view; its targets are -100, which the loss ignores."""
    order = torch.randperm(len(items), generator=generator).tolist() if shuffle else range(len(items))
    order = list(order)
    for i in range(0, len(order), batch_size):
        chunk = [items[j] for j in order[i:i + batch_size]]
        T = max(len(ids) for ids, _ in chunk) - 1
        idx = torch.full((len(chunk), T), pad, dtype=torch.long)
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            ids = torch.tensor(ids)
            idx[row, :len(ids) - 1] = ids[:-1]
            targets[row, :len(ids) - 1] = ids[1:]
        yield idx, targets, torch.tensor([label for _, label in chunk])
