"""The data, checked line by line, tokenized and batched. Two kinds of example:

  labelled text    JSON Lines {"text", "sentiment"}: one prefix per label learns to write that label's texts
  source -> text   E2E's `table||text` lines (the prefix-tuning paper's files, plain or .gz) or JSON Lines
                   {"source", "text"}: one task prefix learns to write the text given the source

Both become one token sequence and the index where the loss starts: the model is trained on every token from
there on, and the tokens before it are only context.
"""
import gzip
import hashlib
import json
import warnings
from dataclasses import dataclass

import torch

LABEL_ORDER = ("positive", "negative")  # positive -> 0, negative -> 1; any other label follows in order of appearance
TASK_LABEL = "task"  # the one label of a source -> text prefix


@dataclass
class Example:
    text: str
    label: str
    where: str  # "file:line", for messages
    source: str = None  # the table (or other input) a source -> text example is conditioned on


def _lines(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                yield f"{path}:{n}", line


FORMATS = ("labelled", "source")  # what --format may declare for a JSON Lines file


def read_data(path, labels=None, format=None):
    """Any of the formats above. A .jsonl file (or any file whose first line is a JSON object) is JSON Lines, and
    which kind it holds is read off every row: {"text", "sentiment"} labelled text, {"source", "text"} source ->
    text. A file whose rows mix the two, or whose rows could be either (both fields), is refused unless format
    ("labelled" or "source", train.py's --format) settles it. Anything else is E2E's table||text lines.
    labels: the allowed ones (labelled text)."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    first = next(_lines(path), (None, ""))[1].lstrip()
    if str(path).endswith((".jsonl", ".jsonl.gz")) or first.startswith("{"):
        kind = format or jsonl_kind(path)
        return read_jsonl(path, conditional=kind == "source", labels=labels)
    if format == "labelled":
        raise ValueError(f"{path}: --format labelled needs JSON Lines {{\"text\", \"sentiment\"}}; this file holds "
                         f"table||text lines (source -> text)")
    return read_table_text(path)


def jsonl_kind(path):
    """-> "labelled" or "source", decided by every row of the file, not by its first line."""
    kinds = {}  # kind -> the first line that has it
    for where, row in _objects(path, '{"text", "sentiment"} or {"source", "text"}'):
        if "sentiment" in row and "source" in row:
            raise ValueError(f"{where}: the row has both 'sentiment' and 'source', so it could be labelled text or "
                             f"source -> text: say which with --format labelled or --format source")
        kind = "labelled" if "sentiment" in row else "source" if "source" in row else None
        if kind is None:  # neither: name the field this file's other rows have
            want = {"labelled": "'sentiment'", "source": "'source'"}
            missing = want[next(iter(kinds))] if kinds else "'sentiment' (labelled text) or 'source' (source -> text)"
            raise ValueError(f"{where}: missing field {missing}")
        kinds.setdefault(kind, where)
        if len(kinds) > 1:
            (k1, w1), (k2, w2) = kinds.items()
            raise ValueError(f"{w2}: a {k2} row ({'source' if k2 == 'source' else 'sentiment'} field), but {w1} is "
                             f"{k1}: one file holds one kind of example; fix the file, or read it as one kind with "
                             f"--format labelled or --format source")
    if not kinds:
        raise ValueError(f"{path}: no examples")
    return next(iter(kinds))


def _objects(path, expected):
    """-> (file:line, the row's JSON object), every non-blank line; refused by line if not a JSON object."""
    for where, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with {expected}, got {type(row).__name__}")
        yield where, row


def read_jsonl(path, labels=None, conditional=False):
    """-> examples. conditional: rows {"source", "text"}; else {"text", "sentiment"} with the label in labels."""
    fields = ("source", "text") if conditional else ("text", "sentiment")
    examples = []
    for where, row in _objects(path, " and ".join(repr(f) for f in fields)):
        for field in fields:
            if field not in row:
                raise ValueError(f"{where}: missing field '{field}'")
            if not isinstance(row[field], str):
                raise ValueError(f"{where}: field '{field}' must be a string, got {type(row[field]).__name__}")
            if not row[field].strip():
                raise ValueError(f"{where}: empty {field}")
        if conditional:
            examples.append(Example(row["text"].strip(), TASK_LABEL, where, row["source"].strip()))
        else:
            if labels is not None and row["sentiment"] not in labels:
                raise ValueError(f"{where}: unknown sentiment {row['sentiment']!r}; known: {', '.join(labels)}")
            examples.append(Example(row["text"].strip(), row["sentiment"], where))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def read_table_text(path):
    """E2E as the paper's code reads it: `table||text` per line, the table `field : value | field : value ...`."""
    examples = []
    for where, line in _lines(path):
        parts = line.rstrip("\n").split("||")
        if len(parts) != 2:
            raise ValueError(f"{where}: expected one 'table||text' pair, found {len(parts) - 1} '||' separators")
        table, text = (p.strip() for p in parts)
        if not table:
            raise ValueError(f"{where}: empty table before '||'")
        if not text:
            raise ValueError(f"{where}: empty text after '||'")
        examples.append(Example(text, TASK_LABEL, where, table))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def label_names(examples):
    seen = list(dict.fromkeys(e.label for e in examples))
    return [l for l in LABEL_ORDER if l in seen] + [l for l in seen if l not in LABEL_ORDER]


def source_prompt(tokenizer, source):
    """The paper's layout of the input: ` {source} ` then <|endoftext|>, after which the text is written."""
    return tokenizer.encode(f" {source} ") + [tokenizer.eot]


def encode(examples, tokenizer, labels, max_tokens):
    """-> [(tokens, start, label id)]: the loss covers tokens[start:].

    labelled text:   <|endoftext|> text <|endoftext|>, start 1: the first token is only the context to start from
    source -> text:  ` {source} ` <|endoftext|> ` {text} ` <|endoftext|> (the paper's code), start after the first
                     <|endoftext|>: the loss covers the text and its closing <|endoftext|>, never the source.
    max_tokens: room left in the context by the prefix; longer texts are cut, with a warning."""
    items = []
    for e in examples:
        head = [tokenizer.eot] if e.source is None else source_prompt(tokenizer, e.source)
        text = tokenizer.encode(e.text if e.source is None else f" {e.text} ")
        if len(head) >= max_tokens - 1:
            what = (f"the source takes {len(head)} tokens" if e.source is not None else
                    "the text's start token (<|endoftext|>) and its end leave no room for a word")
            raise ValueError(f"{e.where}: {what} in the {max_tokens} positions of the context left after the prefix")
        ids = head + text + [tokenizer.eot]
        if len(ids) > max_tokens:
            keep = max_tokens - len(head)
            warnings.warn(f"{e.where}: text of {len(text)} tokens truncated to {keep} to fit the context")
            ids = ids[:max_tokens]  # cut mid-text: no end token to learn
        items.append((ids, len(head), labels.index(e.label)))
    return items


def tables(examples):
    """Source -> text examples grouped by identical source, in order of first appearance: [(source, [texts])].
    E2E's test set is 630 tables with 1 to ~10 human references each; a system writes one text per table."""
    grouped = {}
    for e in examples:
        grouped.setdefault(e.source, []).append(e.text)
    return list(grouped.items())


def batches(items, batch_size, shuffle=False, generator=None, pad=None, group_by_length=False):
    """-> (idx (B, T), targets (B, T), labels (B,)). Padding goes on the right, where causal attention keeps
    it out of every real token's view; its targets, and those of the context before `start`, are -100. pad: the id
    written there (default: each row's own last token, the end-of-text token of a text that ends: an id of the
    model's vocabulary, whatever its tokenizer).

    group_by_length: batches of similar lengths, less padding (HF Trainer's group_by_length): the shuffled order
    is cut into runs of 50 batches and each run sorted longest first, so batches still differ every epoch."""
    order = torch.randperm(len(items), generator=generator).tolist() if shuffle else list(range(len(items)))
    if group_by_length:
        run = 50 * batch_size
        order = [i for s in range(0, len(order), run)
                 for i in sorted(order[s:s + run], key=lambda i: -len(items[i][0]))]
    for i in range(0, len(order), batch_size):
        chunk = [items[j] for j in order[i:i + batch_size]]
        T = max(len(ids) for ids, _, _ in chunk) - 1
        idx = torch.empty((len(chunk), T), dtype=torch.long)  # each row filled with its padding first
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        for row, (ids, start, _) in enumerate(chunk):
            idx[row] = ids[-1] if pad is None else pad
            ids = torch.tensor(ids)
            idx[row, :len(ids) - 1] = ids[:-1]
            targets[row, start - 1:len(ids) - 1] = ids[start:]  # position t predicts token t+1
        yield idx, targets, torch.tensor([label for _, _, label in chunk])


def file_digest(path):  # sha256 of a data file's bytes: what a resumed run checks it is given the same data
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
