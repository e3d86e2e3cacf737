"""The one face every way of adapting GPT-2 shows here, so that train.py, sample.py and eval.py never ask which
one they hold:

  kind       what is trained                    how labels are mixed              saved as               PEFT calls it
  kv         per label, P keys and values in    sum_i w_i prefix_i                one .safetensors       PREFIX_TUNING
             every layer (through an MLP in     (minprefix/prefix.py)
             training, with --mlp)
  embedding  per label, P vectors before the    sum_i w_i vectors_i               one .safetensors       PROMPT_TUNING
             token embeddings (a soft prompt)
  lora       per label, (A, B) for each         dW = sum_i w_i (alpha/r) B_i A_i  one .safetensors       LORA
             adapted weight                     (minprefix/lora.py)
  finetune   every GPT-2 weight, no prefix      not mixed: one model              a model folder in      (a whole model,
                                                                                  the hub's layout       not an adapter)
  base       nothing: a model folder used as    not mixed: one model              (any GPT-2-layout      -
             it is, the baseline                                                  folder)

Each is an nn.Module whose parameters are what is trained, and says:
  kind, peft_type, n_labels
  steers   its labels are conditions the held-out pass can tell apart (minprefix/trainer.py's steering measure)
  mixes    a mix of labels (alpha, weights) means something
  apply(model, weights (B, n_labels)) -> (the model to run, the KVCache the text starts from, or None)
  save(path, model, labels, info)
and read_meta(path) / load(path, model) read any checkpoint back.
"""
import json
import os
import shutil

import torch
import torch.nn as nn

from minprefix.files import atomic_path
from minprefix.lora import DEFAULT_TARGETS, LoRA, load_lora
from minprefix.prefix import make_prefix, load_prefix

MODES = ("kv", "embedding", "lora", "finetune")
LATEST = "weights/latest"  # the path of the checkpoint train.py wrote last: sample.py's and eval.py's default


class FineTune(nn.Module):
    """Fine-tuning, the paper's baseline: every weight of the model trained, no prefix, one model for all labels.
    tokenizer: the model's (minprefix.Tokenizer), whose files and end-of-text id the saved folder gets."""
    kind, peft_type, steers, mixes = "finetune", None, False, False

    def __init__(self, model, n_labels=1, tokenizer=None):
        super().__init__()
        self.model, self.n_labels = model, n_labels  # its parameters are the model's: what the trainer trains
        self.tokenizer = tokenizer

    def apply(self, model, weights):
        return model, None

    def save(self, path, model, labels, info=None):
        save_model(path, model, dict(info or {}, labels=list(labels)), self.tokenizer)


class Base(FineTune):
    """A model folder that train.py did not write, used as it is: no prefix, nothing trained, the baseline that
    steering is compared against. Nothing to save."""
    kind = "base"

    def save(self, path, model, labels, info=None):
        raise ValueError("a base model is used as it is: there is nothing trained to save")


def build(mode, model, labels, tokenizer, prefix_len=10, mlp=False, lora_rank=4, lora_alpha=32,
          lora_targets=DEFAULT_TARGETS, init=None):
    """A fresh method for these labels on this model, on the model's device.

    init (prefixes): None, the default: without the MLP each label's own name, repeated to fill P positions (the
    paper, section 7.2: real words' activations beat random ones); with the MLP, random. "random": random either
    way. Any other string: those words' activations (keys and values, or embeddings), repeated or cut to P, for
    every label (the paper's low-data runs start from "table-to-text:")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "finetune":
        return FineTune(model, len(labels), tokenizer)
    if mode == "lora":
        method = LoRA(model.config, len(labels), lora_rank, lora_alpha, lora_targets)
    else:
        method = make_prefix(mode, model.config, len(labels), prefix_len, mlp=mlp)
        words = None
        if init not in (None, "random"):
            words = [tokenizer.encode(init)] * len(labels)
        elif init is None and method.mlp is None:
            words = [tokenizer.encode(f" {label}") for label in labels]
        if words is not None:
            if not all(words):
                raise ValueError(f"init {init!r} has no tokens to start the prefix from")
            tokens = [(w * prefix_len)[:prefix_len] for w in words]
            method.to(model.device).init_from_tokens(model, torch.tensor(tokens, device=model.device))
        elif init == "random" and method.mlp is None:
            with torch.no_grad():  # the scale of PEFT's prefix embedding (nn.Embedding's N(0, 1))
                method.table_.normal_()
    return method.to(model.device)


def read_meta(path):
    """What a checkpoint says of itself, without a model: {"mode", "labels", "base_model", "info", ...}.
    A .safetensors file is a prefix or a LoRA; a folder is a fine-tuned model (its base model is itself), or, if
    train.py did not write it, a model to use as it is (mode "base")."""
    path = str(path)
    if os.path.isdir(path):
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{path} has no config.json: not a model folder")
        info = json.loads(open(config_file).read()).get("minprefix")
        if info is None:  # any GPT-2-layout folder: the model alone
            return {"mode": "base", "labels": ["text"], "base_model": os.path.abspath(path), "info": {}}
        return {"mode": "finetune", "labels": info.get("labels", ["task"]), "base_model": os.path.abspath(path),
                "info": info, "fine_tuned_from": info.get("fine_tuned_from")}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}: train one with train.py (its --out), or name another")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable checkpoint (corrupt or truncated?): {e}") from e
    if meta.get("format", "").startswith("minprefix-lora"):
        return load_lora(path)[1]
    return load_prefix(path)[1]


def load(path, model):
    """-> (method, metadata), checked against `model` (for a fine-tuned folder: the model loaded from it)."""
    meta = read_meta(path)
    if meta["mode"] == "base":
        method = Base(model, 1)
    elif meta["mode"] == "finetune":
        method = FineTune(model, 1)
    elif meta["mode"] == "lora":
        method, meta = load_lora(path, model)
    else:
        method, meta = load_prefix(path, model)
    return method.to(model.device), meta


def remember(path):
    """Record `path` as the checkpoint train.py wrote last."""
    with atomic_path(LATEST) as tmp:
        with open(tmp, "w") as f:
            f.write(os.path.abspath(path) + "\n")


def latest(default):
    """The checkpoint train.py wrote last, if it is still there; else `default`."""
    try:
        path = open(LATEST).read().strip()
    except OSError:
        return default
    return path if os.path.exists(path) else default


def describe(meta):
    """A row name for tables: what the checkpoint is."""
    mode = meta["mode"]
    if mode == "base":
        return "base model, no prefix"
    if mode == "finetune":
        return "fine-tuning (every weight)"
    if mode == "lora":
        return f"LoRA r={meta['rank']} on {', '.join(meta['targets'])}"
    if mode == "embedding":
        return f"embedding prefix (soft prompt), P={meta['prefix_len']}"
    mlp = json.loads(meta.get("trained_with_mlp", "false")) if isinstance(meta.get("trained_with_mlp"), str) \
        else bool(meta.get("trained_with_mlp"))
    return f"K/V prefix{' + MLP' if mlp else ''}, P={meta['prefix_len']}"


def save_model(folder, model, info=None, tokenizer=None):
    """A fine-tuned GPT-2 in the hub's layout (config.json + model.safetensors, Conv1D weights as (in, out)), so
    that GPT2.from_pretrained, and HF transformers, load it. What minprefix needs to use it again (the data's
    kind, its labels, how it was trained) goes in config.json's "minprefix" section. tokenizer: the model's; its
    files are copied beside the weights and its end-of-text id is the folder's bos and eos token (minprefix starts
    and ends every text with it). Without one the folder has no tokenizer files: GPT-2's BPE reads it."""
    from safetensors.torch import save_file
    c = model.config
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":  # tied to wte, as in the hub's files
            continue
        conv1d = name.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        tensors[name] = (t.t() if conv1d else t).detach().float().cpu().contiguous()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "activation_function": "gelu_new",
              "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
              "n_positions": c.n_positions, "n_ctx": c.n_positions, "layer_norm_epsilon": c.layer_norm_epsilon,
              "tie_word_embeddings": True, "minprefix": {"fine_tuned_from": model.name_or_path, **(info or {})}}
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.eot, eos_token_id=tokenizer.eot)
    os.makedirs(folder, exist_ok=True)
    for name, source in (tokenizer.files if tokenizer is not None else {}).items():
        with atomic_path(os.path.join(folder, name)) as tmp:
            shutil.copyfile(source, tmp)
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(os.path.join(folder, "config.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)
