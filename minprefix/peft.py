"""Prefix and LoRA checkpoints <-> PEFT adapters, in PEFT's own file format, without importing peft or transformers.

    python -m minprefix.peft export CKPT OUT_DIR          one adapter per label: OUT_DIR/<label>/
    python -m minprefix.peft import DIR [DIR ...] --labels positive,negative --out CKPT

An exported folder loads with peft.PeftModel.from_pretrained(base_model, "OUT_DIR/<label>"); import reads what
PeftModel.save_pretrained wrote, one adapter per label, and minprefix can then mix them (PEFT cannot mix prefixes).
A LoRA checkpoint becomes PEFT LoRA adapters and back: see the LoRA section below.

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
import math
import os
import re
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minprefix.files import atomic_path
from minprefix.gpt2 import config_from_hf
from minprefix.hub import read_config
from minprefix.lora import LoRA, check_targets, in_features, key, load_lora, save_lora, target_slices
from minprefix.method import read_meta
from minprefix.prefix import check_prefix_len, load_prefix, make_prefix, save_prefix

PROG = "python -m minprefix.peft"
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose files these are; PEFT reads it as the adapter's peft_version
CONFIG_NAME, WEIGHTS_NAME, BIN_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
SIDECAR = "minprefix.json"  # what PEFT's files cannot hold and minprefix needs to use the adapter again
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
    mode = read_meta(ckpt)["mode"]
    if mode in ("finetune", "base"):
        raise ValueError(f"{ckpt} is a model folder ({'fine-tuned' if mode == 'finetune' else 'a model as it is'}), "
                         f"not an adapter: PEFT adapters come from prefix and LoRA checkpoints")
    if mode == "lora":
        return export_lora(ckpt, out_dir, base_model)
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
        write_sidecar(folder, label, meta)
        with atomic_path(folder / CONFIG_NAME) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
        folders.append(folder)
    return folders


def write_sidecar(folder, label, meta):
    """minprefix.json beside PEFT's files (PEFT ignores it): the label, the checkpoint's labels and how it was
    trained, so that import gives back a checkpoint that sample.py and eval.py use as they used the original."""
    sidecar = {"label": label, "labels": meta["labels"], "mode": meta["mode"], "info": meta.get("info", {}),
               **{k: meta[k] for k in ("trained_with_mlp", "rank", "alpha", "targets") if k in meta}}
    with atomic_path(Path(folder) / SIDECAR) as tmp:
        Path(tmp).write_text(json.dumps(sidecar, indent=2))


def read_sidecars(folders):
    """-> the minprefix.json of every folder, or None where none of them has one (adapters PEFT trained)."""
    found = [(Path(f) / SIDECAR).is_file() for f in folders]
    if not any(found):
        return None
    sidecars = []
    for folder, there in zip(folders, found):
        if not there:
            raise AdapterError(f"{folder} has no {SIDECAR}, but {folders[found.index(True)]} has one: import the "
                               f"adapters minprefix exported together, or PEFT's own together")
        try:
            sidecars.append(json.loads((Path(folder) / SIDECAR).read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{Path(folder) / SIDECAR}: not valid JSON ({e})") from e
    return sidecars


LORA_NOTES = ("Using them with PEFT (transformers 5.24, peft 0.21.2): PeftModel.from_pretrained(model, folder) "
              "applies one label; PEFT's add_weighted_adapter(..., combination_type='cat') mixes them as minprefix "
              "does. Load a float16 checkpoint (such as imdb-gpt2-19m) with dtype=torch.float32, or transformers keeps "
              "it in float16 and the logits differ from minprefix's.")
PEFT_NOTES = ("Using them with PEFT (transformers 5.24, peft 0.21.2): PeftModel's forward applies a prefix, but "
              "PeftModel.generate drops it (transformers hands the model its own empty cache), so decode with the "
              "forward, or hand the prefix to GPT2LMHeadModel.generate as its cache; and load a float16 checkpoint "
              "(such as imdb-gpt2-19m) with dtype=torch.float32, or transformers keeps it in float16 (logits then "
              "differ from minprefix's by ~5e-3 instead of ~1e-5).")


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


def base_config(folders, configs, base_model):
    """-> (the base model's name, its GPTConfig): base_model, or else the one the adapters' base_model_name_or_path
    names, read from its config.json."""
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
        return base_model, config_from_hf(read_config(base_model), f"{base_model}/config.json")
    except (OSError, ValueError, KeyError) as e:
        if not from_adapter:
            raise
        raise type(e)(f"{e} (the base model named by base_model_name_or_path in {folders[0] / CONFIG_NAME}; "
                      f"pass --base-model to name it otherwise)") from e


def import_adapters(folders, labels, out, base_model=None, conditional=None):
    """PEFT prefix-tuning, prompt-tuning or LoRA adapters, one per label in the same order -> a minprefix checkpoint
    at out. base_model: the model the adapters were trained on (default: their base_model_name_or_path); its
    config.json is read to check the adapters' shapes. conditional: True for an adapter that writes text for a
    source (E2E tables), which PEFT's files cannot say (default: what minprefix.json says, where minprefix exported
    the adapters; else labelled text). -> (prefix or LoRA, base model name)."""
    folders, labels = [Path(f) for f in folders], list(labels)
    if len(labels) != len(folders):
        raise ValueError(f"{len(labels)} labels ({', '.join(labels)}) for {len(folders)} adapters: give one label per "
                         f"adapter, in the same order")
    if len(set(labels)) != len(labels) or not all(labels):
        raise ValueError(f"labels must be distinct and non-empty, got {labels}")
    configs = [read_adapter_config(f) for f in folders]
    for folder, c in zip(folders, configs):  # what the file says it is, before any shape
        where = folder / CONFIG_NAME
        if c.get("peft_type") not in (*MODES.values(), "LORA"):
            raise AdapterError(f"{where}: peft_type is {c.get('peft_type')!r}, expected 'PREFIX_TUNING', "
                               f"'PROMPT_TUNING' (a soft prompt) or 'LORA': the adapters minprefix has")
        if c.get("peft_type") != configs[0].get("peft_type"):
            raise AdapterError(f"{where}: peft_type is {c['peft_type']!r}, expected {configs[0]['peft_type']!r} as in "
                               f"{folders[0] / CONFIG_NAME}: one checkpoint holds one kind of adapter")
    if configs[0]["peft_type"] == "LORA":
        for folder, c in zip(folders, configs):
            check_lora_config(folder / CONFIG_NAME, c)
        base_model, base = base_config(folders, configs, base_model)
        return import_lora(folders, configs, labels, out, base_model, base, conditional), base_model
    for folder, c in zip(folders, configs):
        where = folder / CONFIG_NAME
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
    base_model, base = base_config(folders, configs, base_model)
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
    sidecars, with_mlp = read_sidecars(folders), None
    if sidecars is not None:  # exported by minprefix: what the original checkpoint said of itself comes back
        info = dict(sidecars[0].get("info", {}), **info)
        with_mlp = sidecars[0].get("trained_with_mlp") == "true"
    if conditional is not None:
        info["conditional"] = conditional
    if info.get("conditional") and len(labels) != 1:
        raise ValueError(f"a source -> text (conditional) checkpoint has one task prefix; {len(labels)} adapters given")
    save_prefix(out, prefix, base_model, labels, info, trained_with_mlp=with_mlp)
    return prefix.requires_grad_(False), base_model


# ---- LoRA: a LoRA checkpoint <-> PEFT LoRA adapters, one per label ----
#
# PEFT adapts GPT-2's Conv1D modules whole (fan_in_fan_out: true, W stored (in, out)) and saves, per module,
#   base_model.model.transformer.h.{i}.{module}.lora_A.weight   (r, in)
#   base_model.model.transformer.h.{i}.{module}.lora_B.weight   (out, r)
# for h = W x + (lora_alpha / r) B A x, with r and lora_alpha per module: the config's r and lora_alpha, or the
# rank_pattern / alpha_pattern entry whose regex ends the module's name. Ours, label n of a checkpoint of rank r:
#   c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj   A[n] (r, in), B[n] (out, r) as they are, lora_alpha = alpha
#   k of q, k, v                                one attn.c_attn pair of rank k r, lora_alpha k alpha (same alpha / r):
#       A = [A_q; A_v]                  (k r, C)    the targets' A's stacked
#       B = [[B_q, 0], [0, 0], [0, B_v]] (3C, k r)   query rows use the q columns, value rows the v columns, key rows 0
# Import runs this backwards where minprefix.json (export's sidecar) describes the adapters exactly, so the
# checkpoint comes back bit for bit. Adapters PEFT trained become targets c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
# (those any label adapts) of one rank, the largest: smaller pairs are zero-padded (zero rows of A, zero columns of
# B add nothing), and each module's lora_alpha / r is folded into its B relative to the checkpoint's alpha / r.

LORA_MODULES = {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "mlp.c_fc",
                "mlp.c_proj": "mlp.c_proj"}  # PEFT's module -> our target that adapts all of it
LORA_KEY = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                      r"\.lora_([AB])\.weight")
# LoraConfig fields that add to h = W x + (lora_alpha / r) B A x or change it; off, PEFT writes None, False, [], {}
# or "none"
LORA_REFUSED = {"use_rslora": "scaling lora_alpha / sqrt(r)", "use_dora": "DoRA's magnitude vectors",
                "bias": "trained biases of the base model", "lora_bias": "a bias on lora_B",
                "layers_to_transform": "pairs on some layers only", "layer_replication": "repeated layers",
                "modules_to_save": "whole modules trained beside the pairs",
                "target_parameters": "pairs on bare parameters", "trainable_token_indices": "trained rows of wte",
                "alora_invocation_tokens": "pairs that act only after these tokens", "use_qalora": "pooled inputs",
                "use_bdlora": "block-diagonal pairs", "kasa_config": "a changed base weight",
                "arrow_config": "routing between adapters", "monteclora_config": "sampled pairs"}
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")  # PEFT rewrites W when it loads these


def peft_key(i, module, m):
    return f"base_model.model.transformer.h.{i}.{module}.lora_{m}.weight"


def lora_adapter_config(modules, base_model):
    """The adapter_config.json that PEFT 0.21's LoraConfig writes. modules: {PEFT module: (rank, lora_alpha)}; the
    most common pair is r and lora_alpha, the others go to rank_pattern and alpha_pattern."""
    r, alpha = max(modules.values(), key=list(modules.values()).count)
    return {"alora_invocation_tokens": None, "alpha_pattern": {m: a for m, (_, a) in modules.items() if a != alpha},
            "arrow_config": None, "auto_mapping": None, "base_model_name_or_path": base_model, "bias": "none",
            "corda_config": None, "ensure_weight_tying": False, "eva_config": None, "exclude_modules": None,
            "fan_in_fan_out": True, "inference_mode": True, "init_lora_weights": True, "kasa_config": None,
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
            "lora_alpha": alpha, "lora_bias": False, "lora_dropout": 0.0, "lora_ga_config": None,
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
            "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION,
            "qalora_group_size": 16, "r": r, "rank_pattern": {m: k for m, (k, _) in modules.items() if k != r},
            "revision": None, "target_modules": list(modules), "target_parameters": None, "task_type": "CAUSAL_LM",
            "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
            "use_rslora": False, "velora_config": None}


def lora_parts(targets, config):
    """{PEFT module: our targets in it, in the order of its column blocks}, for the modules the targets touch."""
    slices = target_slices(config)
    parts = {m: [t for t in targets if slices[t][0] == m] for m in LORA_MODULES}
    return {m: ts for m, ts in parts.items() if ts}


def export_lora(ckpt, out_dir, base_model=None):
    """A LoRA checkpoint -> OUT_DIR/<label>/, one PEFT LoRA adapter per label (export_adapters' LoRA half)."""
    lora, meta = load_lora(ckpt)
    labels = [check_folder_name(label) for label in meta["labels"]]
    slices, r, parts = target_slices(lora.config), lora.rank, lora_parts(lora.targets, lora.config)
    config = lora_adapter_config({m: (len(ts) * r, len(ts) * lora.alpha) for m, ts in parts.items()},
                                 base_model or meta["base_model"])
    folders = []
    for n, label in enumerate(labels):
        tensors = {}
        for i, layer in enumerate(lora.h):
            for module, ts in parts.items():
                B = torch.zeros(slices[LORA_MODULES[module]][1].stop, len(ts) * r)  # (out, k r)
                for j, t in enumerate(ts):
                    B[slices[t][1], j * r:(j + 1) * r] = layer[key(t)].B[n].detach()
                tensors[peft_key(i, module, "A")] = torch.cat([layer[key(t)].A[n].detach() for t in ts])  # (k r, in)
                tensors[peft_key(i, module, "B")] = B
        folder = Path(out_dir) / label
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file({k: v.float().contiguous() for k, v in tensors.items()}, tmp, metadata={"format": "pt"})
        write_sidecar(folder, label, meta)
        with atomic_path(folder / CONFIG_NAME) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True))
        folders.append(folder)
    return folders


def check_lora_config(where, c):
    """Refuse, by its field, a LoRA adapter that does more than h = W x + (lora_alpha / r) B A x."""
    for field, what in LORA_REFUSED.items():
        value = c.get(field)
        if value is not None and value is not False and value not in ([], {}, "none"):  # 0 is a layer, not off
            raise AdapterError(f"{where}: {field} is {value!r} ({what}), which minprefix's LoRA cannot hold: "
                               f"train the adapter without it")
    init = c.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{where}: init_lora_weights is {init!r}: PEFT changes the base weights when it loads this "
                           f"adapter; save it with PeftModel.save_pretrained(..., path_initial_model_for_weight_"
                           f"conversion=...), which writes a plain LoRA, and import that")
    ranks, alphas = [c.get("r")], [c.get("lora_alpha")]
    for field, values in (("rank_pattern", ranks), ("alpha_pattern", alphas)):
        if not isinstance(c.get(field) or {}, dict):
            raise AdapterError(f"{where}: {field} is {c[field]!r}, expected an object {{module regex: value}}")
        values += (c.get(field) or {}).values()
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ranks):
        raise AdapterError(f"{where}: r and rank_pattern hold {ranks}, expected positive integers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in alphas):
        raise AdapterError(f"{where}: lora_alpha and alpha_pattern hold {alphas}, expected numbers")


def pattern_value(c, pattern, default, name):
    """PEFT's r or lora_alpha for the module `name`: the first pattern key that, as a regex, ends the name."""
    for k, v in (c.get(pattern) or {}).items():
        if re.match(rf"(.*\.)?({k})$", name):
            return v
    return c[default]


def lora_pairs(folder, c, base, base_model):
    """One PEFT LoRA adapter -> {(layer, PEFT module): (A (r, in), B (out, r), PEFT's scaling lora_alpha / r)}."""
    weights, path = read_adapter_weights(folder)
    found = {}
    for name, t in weights.items():
        m = LORA_KEY.fullmatch(name)
        if m is None:
            raise AdapterError(f"{path}: tensor {name} is not a LoRA pair of transformer.h.*'s attn.c_attn, attn.c_proj, "
                               f"mlp.c_fc or mlp.c_proj, the modules minprefix's LoRA adapts (target_modules among "
                               f"c_attn, c_proj, c_fc)")
        if not t.is_floating_point():
            raise AdapterError(f"{path}: tensor {name} has dtype {t.dtype}, expected a floating-point tensor")
        found.setdefault((int(m[1]), m[2]), {})[m[3]] = t.float()
    if not found:
        raise AdapterError(f"{path}: holds no LoRA pairs")
    C, pairs = base.n_embd, {}
    for (i, module), ab in sorted(found.items()):
        name = f"transformer.h.{i}.{module}"
        if len(ab) != 2:
            there = next(iter(ab))
            raise AdapterError(f"{path}: {name} has lora_{there} but no lora_{'B' if there == 'A' else 'A'}")
        r, alpha = pattern_value(c, "rank_pattern", "r", name), pattern_value(c, "alpha_pattern", "lora_alpha", name)
        target = LORA_MODULES[module]
        want = {"A": (r, in_features(base, target)), "B": (target_slices(base)[target][1].stop, r)}
        got = {m: tuple(t.shape) for m, t in ab.items()}
        if i >= base.n_layer or got != want:
            raise AdapterError(f"{path}: {name} has lora_A {got['A']}, lora_B {got['B']}, but the base model "
                               f"{base_model} (n_layer={base.n_layer}, n_embd={C}) with r={r} (r, rank_pattern in "
                               f"{CONFIG_NAME}) " + (f"has no layer {i}" if i >= base.n_layer else
                                                     f"wants lora_A {want['A']}, lora_B {want['B']}")
                               + ": this adapter was made for another base model, or its config does not fit its weights")
        pairs[i, module] = (ab["A"], ab["B"], alpha / r)
    return pairs


def sidecar_pairs(pairs, sidecar, base):
    """-> (targets, rank, alpha, every label's {(layer, target): (A, B, alpha / rank)}) where minprefix.json's
    targets, rank and alpha describe the adapters exactly (export wrote them): c_attn's blocks split back into q, k,
    v. None where they do not (the adapter was trained on after export, say)."""
    try:
        targets, r, alpha = check_targets(sidecar["targets"], base), sidecar["rank"], sidecar["alpha"]
        parts = lora_parts(targets, base)
    except (KeyError, TypeError, ValueError):
        return None
    slices, split = target_slices(base), []
    for label_pairs in pairs:
        if set(label_pairs) != {(i, m) for i in range(base.n_layer) for m in parts}:
            return None
        split.append({})
        for (i, module), (A, B, s) in label_pairs.items():
            ts = parts[module]
            if A.shape[0] != len(ts) * r or not math.isclose(s, alpha / r, rel_tol=1e-12):
                return None
            rest = B.clone()  # what is left of B outside the targets' blocks: zero, where export wrote it
            for j, t in enumerate(ts):
                cols = slice(j * r, (j + 1) * r)
                split[-1][i, t] = (A[cols], B[slices[t][1], cols], alpha / r)
                rest[slices[t][1], cols] = 0
            if rest.any():
                return None
    return targets, r, alpha, split


def import_lora(folders, configs, labels, out, base_model, base, conditional=None):
    """PEFT LoRA adapters, one per label -> a LoRA checkpoint at out (import_adapters' LoRA half). -> the LoRA."""
    pairs = [lora_pairs(f, c, base, base_model) for f, c in zip(folders, configs)]
    sidecars = read_sidecars(folders)
    exact = sidecars is not None and sidecars[0].get("mode") == "lora" and sidecar_pairs(pairs, sidecars[0], base)
    if exact:  # the checkpoint export was given, info included
        targets, rank, alpha, pairs = exact
        info = sidecars[0].get("info", {})
    else:
        targets = [t for m, t in LORA_MODULES.items() if any(m == module for p in pairs for _, module in p)]
        rank = max(A.shape[0] for p in pairs for A, _, _ in p.values())
        alpha = rank * next(iter(pairs[0].values()))[2]  # the first module's scaling, kept as it is
        pairs = [{(i, LORA_MODULES[m]): v for (i, m), v in p.items()} for p in pairs]
        info = dict(sidecars[0].get("info", {}) if sidecars else {}, imported_from="peft",
                    adapters=[str(f) for f in folders])
    if conditional is not None:
        info["conditional"] = conditional
    if info.get("conditional") and len(labels) != 1:
        raise ValueError(f"a source -> text (conditional) checkpoint has one task adapter; {len(labels)} adapters given")
    lora = LoRA(base, len(labels), rank, alpha, targets).requires_grad_(False)
    with torch.no_grad():
        for p in lora.parameters():
            p.zero_()  # what no adapter sets (a smaller rank's columns, a module one label does not adapt) adds nothing
        for n, label_pairs in enumerate(pairs):
            for (i, t), (A, B, s) in label_pairs.items():
                pair, r = lora.h[i][key(t)], A.shape[0]
                pair.A[n, :r] = A
                pair.B[n, :, :r] = B if s == lora.scale else B * (s / lora.scale)  # (s / scale) B A: PEFT's s B A
    save_lora(out, lora, base_model, labels, info)
    return lora


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
                                   "prefix or LoRA alone (mix them with minprefix).")
    e.add_argument("ckpt", metavar="CKPT", help="a prefix or LoRA checkpoint written by train.py or import")
    e.add_argument("out_dir", metavar="OUT_DIR", help="folder for the adapters, one subfolder per label")
    e.add_argument("--base-model", help="base_model_name_or_path to write (default: the one the checkpoint records)")
    i = sub.add_parser("import", help="PEFT adapter folders, one per label -> a minprefix checkpoint",
                       description="Read PEFT prefix-tuning adapters (with or without prefix_projection) or LoRA "
                                   "adapters (on c_attn, c_proj, c_fc), saved by PeftModel.save_pretrained "
                                   "(adapter_model.safetensors, or an old adapter_model.bin), and write one checkpoint "
                                   "whose labels can be mixed by sample.py and eval.py.")
    i.add_argument("dirs", nargs="+", metavar="DIR", help="adapter folders, one per label, in the order of --labels")
    i.add_argument("--labels", required=True, help="comma-separated label names, e.g. positive,negative")
    i.add_argument("--out", required=True, metavar="CKPT", help="the checkpoint to write")
    i.add_argument("--base-model", help="the base model (hub name or local folder) whose config.json the adapters "
                                        "must fit (default: their base_model_name_or_path)")
    i.add_argument("--conditional", action=argparse.BooleanOptionalAction, default=None,
                   help="the adapter writes text for a source (trained on E2E's table||text), so that eval.py --task "
                        "e2e takes it; PEFT's files cannot say so (default: what the minprefix.json minprefix's "
                        "export wrote beside them says; else labelled text)")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.command == "export":
        lora = read_meta(args.ckpt)["mode"] == "lora"
        for folder in export_adapters(args.ckpt, args.out_dir, args.base_model):
            print(f"wrote {folder}/ ({CONFIG_NAME}, {WEIGHTS_NAME}, {SIDECAR})")
        print(LORA_NOTES if lora else PEFT_NOTES)
        return 0
    labels = [s.strip() for s in args.labels.split(",")]
    if not all(labels) or len(set(labels)) != len(labels):
        p.error(f"--labels {args.labels!r}: the names must be distinct and non-empty")
    if len(labels) != len(args.dirs):
        p.error(f"--labels names {len(labels)} labels ({', '.join(labels)}) for {len(args.dirs)} adapter folders: "
                f"give one label per folder, in the same order")
    method, base_model = import_adapters(args.dirs, labels, args.out, args.base_model, args.conditional)
    what = (f"LoRA r={method.rank}, alpha={method.alpha:g} on {', '.join(method.targets)}" if method.kind == "lora"
            else f"P={method.prefix_len}")
    print(f"imported {len(labels)} adapters ({', '.join(labels)}; {what}) for {base_model} -> {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # our loaders' and checks' errors: the message says it all
        sys.exit(f"{PROG}: error: {e}")
