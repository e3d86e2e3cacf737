"""Prefix checkpoints <-> PEFT adapters, in PEFT's own file format, without importing peft or transformers.

    python -m minprefix.peft export CKPT OUT_DIR          one adapter per label: OUT_DIR/<label>/
    python -m minprefix.peft import DIR [DIR ...] --labels positive,negative --out CKPT

An exported folder loads with peft.PeftModel.from_pretrained(base_model, "OUT_DIR/<label>"); import reads what
PeftModel.save_pretrained wrote, one adapter per label, and minprefix can then mix them (PEFT cannot).

A PEFT prompt-learning adapter is a folder of two files:
  adapter_config.json         the PeftConfig's fields (peft_type, num_virtual_tokens, token_dim, num_layers, ...)
  adapter_model.safetensors   {"prompt_embeddings": tensor} (an old adapter_model.bin holds the same dict, pickled)
For PREFIX_TUNING that tensor is the final prefix, (P, L*2*C), in the layout KVPrefix uses too: per layer the keys
of all heads, then the values. PEFT's save_pretrained writes the MLP's output there even when the adapter was
trained with prefix_projection, so a saved adapter never needs its MLP. (A bare state dict of PEFT's PrefixEncoder,
whose MLP weights are embedding.weight, transform.0.* and transform.2.*, is accepted as well: its MLP is run.)
An embedding-mode checkpoint (a soft prompt) is PEFT's PROMPT_TUNING: {"prompt_embeddings": (P, C)} put before the
text's token embeddings at positions 0..P-1, which is exactly what EmbeddingPrefix does.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minprefix.files import atomic_path
from minprefix.gpt2 import config_from_hf
from minprefix.hub import read_config
from minprefix.prefix import check_prefix_len, load_prefix, make_prefix, save_prefix

PROG = "python -m minprefix.peft"
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files these are; PEFT reads it as the adapter's peft_version
CONFIG_NAME, WEIGHTS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
KEY = "prompt_embeddings"
MODES = {"kv": "PREFIX_TUNING", "embedding": "PROMPT_TUNING"}  # our prefix mode -> PEFT's type
MLP_KEYS = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias")


class AdapterError(ValueError):
    """A PEFT adapter that cannot be read or does not fit: the message names the file, the field, its value and
    what was expected."""


# ---- export: one minprefix checkpoint -> one PEFT adapter per label ----

def adapter_config(mode, config, prefix_len, base_model):
    """The adapter_config.json that PEFT 0.21's PrefixTuningConfig (kv) or PromptTuningConfig (embedding) writes."""
    d = {"auto_mapping": None, "base_model_name_or_path": base_model, "inference_mode": True,
         "modules_to_save": None, "num_attention_heads": config.n_head, "num_layers": config.n_layer,
         "num_transformer_submodules": 1, "num_virtual_tokens": prefix_len, "peft_type": MODES[mode],
         "peft_version": PEFT_FORMAT_VERSION, "revision": None, "task_type": "CAUSAL_LM", "token_dim": config.n_embd}
    if mode == "kv":  # the saved table is the MLP's product already: no projection at load time
        d.update(encoder_hidden_size=config.n_embd, init_weights=None, prefix_projection=False)
    else:
        d.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None,
                 tokenizer_name_or_path=None)
    return d


def check_folder_name(label):
    if not label or label in (".", "..") or "/" in label or os.sep in label or "\0" in label:
        raise ValueError(f"label {label!r} cannot name an adapter folder: rename it (no '/', not '.' or '..')")
    return label


def export_adapters(ckpt, out_dir, base_model=None):
    """-> the adapter folders written, OUT_DIR/<label>/ in the checkpoint's label order. base_model: what the
    adapters' base_model_name_or_path says (default: the base model recorded in the checkpoint)."""
    prefix, meta = load_prefix(ckpt)
    labels = [check_folder_name(label) for label in meta["labels"]]
    base_model = base_model or meta["base_model"]
    config = adapter_config(meta["mode"], prefix.config, prefix.prefix_len, base_model)
    table = prefix.table().detach().float().cpu()  # (n_labels, P, L*2*C) or (n_labels, P, C)
    folders = []
    for i, label in enumerate(labels):
        folder = Path(out_dir) / label
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_NAME) as tmp:  # the weights first: a folder without its config is no adapter
            save_file({KEY: table[i].contiguous()}, tmp, metadata={"format": "pt"})
        with atomic_path(folder / CONFIG_NAME) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
        folders.append(folder)
    return folders


# ---- import: PEFT adapters, one per label -> one minprefix checkpoint ----

def read_adapter_config(folder):
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}: not a PEFT adapter folder (PeftModel.save_pretrained "
                                f"writes {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: holds a {type(config).__name__}, expected a JSON object of PeftConfig fields")
    return config


def read_adapter_weights(folder):
    """-> ({name: tensor}, the file read): adapter_model.safetensors, or else an old adapter_model.bin."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        path = folder / WEIGHTS_NAME
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, path
        except (SafetensorError, OSError) as e:
            raise AdapterError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    if (folder / BIN_NAME).is_file():
        path = folder / BIN_NAME
        try:  # weights_only: a pickle may run code on load; this one may hold tensors and nothing else
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, or a pickle of more than tensors
            raise AdapterError(f"{path}: not a state dict of tensors that torch.load(weights_only=True) reads: {e}") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(f"{path}: holds a {type(state).__name__}, expected a dict of tensors")
        return state, path
    raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {BIN_NAME}")


def adapter_table(folder, config, weights, path, mode):
    """-> the adapter's final table as float32: (P, L*2*C) for prefix tuning, (P, C) for prompt tuning."""
    P, L, C = config["num_virtual_tokens"], config["num_layers"], config["token_dim"]
    want = (P, L * 2 * C) if mode == "kv" else (P, C)
    if KEY in weights:
        table = weights[KEY]
    elif mode == "kv" and set(MLP_KEYS) <= set(weights):  # a PrefixEncoder's state dict: run its MLP
        w = {k: weights[k].float() for k in MLP_KEYS}
        shapes = {k: tuple(v.shape) for k, v in w.items()}
        hidden = shapes["transform.0.bias"][0] if len(shapes["transform.0.bias"]) == 1 else -1
        expect = {"embedding.weight": (P, C), "transform.0.weight": (hidden, C), "transform.0.bias": (hidden,),
                  "transform.2.weight": (L * 2 * C, hidden), "transform.2.bias": (L * 2 * C,)}
        for k in MLP_KEYS:
            if shapes[k] != expect[k]:
                raise AdapterError(f"{path}: tensor {k} has shape {shapes[k]}, expected {expect[k]} for "
                                   f"num_virtual_tokens={P}, token_dim={C}, num_layers={L} in {CONFIG_NAME}")
        x = torch.tanh(w["embedding.weight"] @ w["transform.0.weight"].t() + w["transform.0.bias"])
        return x @ w["transform.2.weight"].t() + w["transform.2.bias"]
    else:
        raise AdapterError(f"{path}: holds tensors {sorted(weights)}, expected {KEY!r}"
                           + (f" (or a PrefixEncoder's {', '.join(MLP_KEYS)})" if mode == "kv" else ""))
    if tuple(table.shape) != want:
        raise AdapterError(f"{path}: tensor {KEY} has shape {tuple(table.shape)}, expected {want} for "
                           f"num_virtual_tokens={P}, token_dim={C}, num_layers={L} in {CONFIG_NAME}")
    if not table.is_floating_point():
        raise AdapterError(f"{path}: tensor {KEY} has dtype {table.dtype}, expected a floating-point tensor")
    return table.float()


def import_adapters(folders, labels, out, base_model=None):
    """PEFT prefix-tuning (or prompt-tuning) adapters, one per label in the same order -> a minprefix checkpoint at
    out. base_model: the model the adapters were trained on (default: their base_model_name_or_path); its
    config.json is read to check the adapters' shapes. -> (prefix, base model name)."""
    folders, labels = [Path(f) for f in folders], list(labels)
    if len(labels) != len(folders):
        raise ValueError(f"{len(labels)} labels ({', '.join(labels)}) for {len(folders)} adapters: give one label per "
                         f"adapter, in the same order")
    if len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"labels must be distinct and non-empty, got {labels}")
    configs = [read_adapter_config(f) for f in folders]
    for folder, c in zip(folders, configs):  # what the file says it is, before any shape
        where = folder / CONFIG_NAME
        if c.get("peft_type") not in MODES.values():
            raise AdapterError(f"{where}: peft_type is {c.get('peft_type')!r}, expected 'PREFIX_TUNING' (or "
                               f"'PROMPT_TUNING' for a soft prompt): only prompt-learning adapters are prefixes")
        if c.get("peft_type") != configs[0].get("peft_type"):
            raise AdapterError(f"{where}: peft_type is {c['peft_type']!r}, but {folders[0] / CONFIG_NAME} has "
                               f"{configs[0]['peft_type']!r}: one checkpoint holds one kind of prefix")
        if c.get("task_type") != "CAUSAL_LM":
            raise AdapterError(f"{where}: task_type is {c.get('task_type')!r}, expected 'CAUSAL_LM' (a prefix for "
                               f"GPT-2's language-model head)")
        if c.get("num_transformer_submodules") not in (None, 1):  # None: PEFT makes it 1 for a causal LM
            raise AdapterError(f"{where}: num_transformer_submodules is {c['num_transformer_submodules']!r}, expected 1 "
                               f"(2 is an encoder-decoder's prefix; GPT-2 has one stack)")
        for field in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
            if not isinstance(c.get(field), int) or isinstance(c.get(field), bool) or c[field] < 1:
                raise AdapterError(f"{where}: {field} is {c.get(field)!r}, expected a positive integer")
        if c["num_virtual_tokens"] != configs[0]["num_virtual_tokens"]:
            raise AdapterError(f"{where}: num_virtual_tokens is {c['num_virtual_tokens']}, but {folders[0] / CONFIG_NAME} "
                               f"has {configs[0]['num_virtual_tokens']}: the prefixes of one checkpoint share one length P")
    from_adapter = base_model is None
    if from_adapter:
        names = [c.get("base_model_name_or_path") for c in configs]
        if not names[0]:
            raise AdapterError(f"{folders[0] / CONFIG_NAME}: base_model_name_or_path is {names[0]!r}: pass --base-model")
        for folder, name in zip(folders, names):
            if name != names[0]:
                raise AdapterError(f"{folder / CONFIG_NAME}: base_model_name_or_path is {name!r}, but "
                                   f"{folders[0] / CONFIG_NAME} has {names[0]!r}: pass --base-model if they are the same model")
        base_model = names[0]
    try:
        base = config_from_hf(read_config(base_model), f"{base_model}/config.json")
    except (OSError, ValueError, KeyError) as e:
        if not from_adapter:
            raise
        raise type(e)(f"{e} (the base model named by base_model_name_or_path in {folders[0] / CONFIG_NAME}; "
                      f"pass --base-model to name it otherwise)") from e
    for folder, c in zip(folders, configs):
        for field, ours in (("num_layers", "n_layer"), ("token_dim", "n_embd"), ("num_attention_heads", "n_head")):
            if c[field] != getattr(base, ours):
                raise AdapterError(f"{folder / CONFIG_NAME}: {field} is {c[field]}, but the base model {base_model} has "
                                   f"{ours}={getattr(base, ours)}: this adapter was made for another base model"
                                   + ("" if c.get("base_model_name_or_path") == base_model else
                                      f" ({c.get('base_model_name_or_path')!r}, says the adapter)"))
    mode = {v: k for k, v in MODES.items()}[configs[0]["peft_type"]]
    P = configs[0]["num_virtual_tokens"]
    check_prefix_len(P, base)
    tables = [adapter_table(f, c, *read_adapter_weights(f), mode) for f, c in zip(folders, configs)]
    prefix = make_prefix(mode, base, len(labels), P)
    with torch.no_grad():
        prefix.table_.copy_(torch.stack(tables).view_as(prefix.table_))
    info = {"imported_from": "peft", "adapters": [str(f) for f in folders],
            "prefix_projection": [bool(c.get("prefix_projection", False)) for c in configs]}
    save_prefix(out, prefix, base_model, labels, info)
    return prefix.requires_grad_(False), base_model


# ---- command line ----

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: usage, then one line, exit 2 (subcommands too)
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def parser():
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{export,import}")
    e = sub.add_parser("export", help="a minprefix checkpoint -> one PEFT adapter folder per label",
                       description="Write OUT_DIR/<label>/ for every label of CKPT: a PEFT adapter of that label's "
                                   "prefix alone (PEFT mixes nothing: use minprefix to mix).")
    e.add_argument("ckpt", metavar="CKPT", help="a prefix checkpoint written by train.py or import")
    e.add_argument("out_dir", metavar="OUT_DIR", help="folder for the adapters, one subfolder per label")
    e.add_argument("--base-model", help="base_model_name_or_path to write (default: the one the checkpoint records)")
    i = sub.add_parser("import", help="PEFT adapter folders, one per label -> a minprefix checkpoint",
                       description="Read PEFT prefix-tuning adapters saved by PeftModel.save_pretrained (with or "
                                   "without prefix_projection; adapter_model.safetensors, or an old adapter_model.bin) "
                                   "and write one checkpoint whose labels can be mixed by sample.py and eval.py.")
    i.add_argument("dirs", nargs="+", metavar="DIR", help="adapter folders, one per label, in the order of --labels")
    i.add_argument("--labels", required=True, help="comma-separated label names, e.g. positive,negative")
    i.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint to write")
    i.add_argument("--base-model", help="the base model (hub name or local folder) whose config.json the adapters "
                                        "must fit (default: their base_model_name_or_path)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.command == "export":
        for folder in export_adapters(args.ckpt, args.out_dir, args.base_model):
            print(f"wrote {folder}/ ({CONFIG_NAME}, {WEIGHTS_NAME})")
        return 0
    labels = [s.strip() for s in args.labels.split(",")]
    if not all(labels) or len(set(labels)) != len(labels):
        p.error(f"--labels {args.labels!r}: the names must be distinct and non-empty")
    if len(labels) != len(args.dirs):
        p.error(f"--labels names {len(labels)} labels ({', '.join(labels)}) for {len(args.dirs)} adapter folders: "
                f"give one label per folder, in the same order")
    prefix, base_model = import_adapters(args.dirs, labels, args.out, args.base_model)
    print(f"imported {len(labels)} adapters ({', '.join(labels)}; P={prefix.prefix_len}) for {base_model} -> {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{PROG}: error: {e}")
