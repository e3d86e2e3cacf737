"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), the reference.

A frozen weight W (out, in) gets a trained change of rank r, h = W x + (alpha / r) B A x, with A (r, in) and
B (out, r). B starts at zero, so training starts from the base model exactly; A starts as PEFT starts it,
kaiming-uniform with a = sqrt(5) (the paper says random Gaussian; PEFT's default is what its users train with).

One (A, B) pair per adapted weight per label, trained side by side in the same batches as prefixes are; labels are
mixed exactly, as dW = sum_i w_i (alpha / r) B_i A_i (mixing A and B separately would not give this). Two forms:
  unmerged  h = W x + (alpha / r) sum_i w_i B_i (A_i x): any mix per row; what training runs
  merged    (W + dW) x: one mix for every row, dW added to the weights once, so a token costs what the base
            model's costs (the paper's deployment, section 4.1); used when no gradient is needed
tests/test_lora.py holds the two equal, and each to PEFT's LoRA.

Targets, in GPT-2's names: the query, key and value parts of attn.c_attn (q, k, v: each its own pair, as the LoRA
paper's code adapts them), the whole fused attn.c_attn (c_attn: one pair for all three, as PEFT adapts GPT-2),
attn.c_proj, mlp.c_fc, mlp.c_proj. The LoRA paper's GPT-2 setup, and the default: q and v.
"""
import copy
import json
import math

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minprefix.files import atomic_path
from minprefix.gpt2 import GPTConfig
from minprefix.prefix import base_config

FORMAT = "minprefix-lora-v1"
DEFAULT_TARGETS = ("q", "v")


def target_slices(config):
    """target -> (the module it adapts, the rows of that module's output it changes)."""
    C = config.n_embd
    return {"q": ("attn.c_attn", slice(0, C)), "k": ("attn.c_attn", slice(C, 2 * C)),
            "v": ("attn.c_attn", slice(2 * C, 3 * C)), "c_attn": ("attn.c_attn", slice(0, 3 * C)),
            "attn.c_proj": ("attn.c_proj", slice(0, C)), "mlp.c_fc": ("mlp.c_fc", slice(0, 4 * C)),
            "mlp.c_proj": ("mlp.c_proj", slice(0, C))}


def in_features(config, target):
    return 4 * config.n_embd if target == "mlp.c_proj" else config.n_embd


def check_targets(targets, config=None):
    known = tuple(target_slices(config or GPTConfig()))
    targets = tuple(targets)
    unknown = [t for t in targets if t not in known]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}: the targets are {', '.join(known)}")
    if not targets or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct and at least one, got {', '.join(targets) or 'none'}")
    if "c_attn" in targets and {"q", "k", "v"} & set(targets):
        raise ValueError("LoRA target c_attn (all of attn.c_attn) overlaps q, k and v: give one or the others")
    return targets


class LoRAPair(nn.Module):
    """One adapted weight's change for every label: A (n_labels, r, in), B (n_labels, out, r)."""

    def __init__(self, n_labels, rank, n_in, n_out):
        super().__init__()
        self.A = nn.Parameter(torch.empty(n_labels, rank, n_in))
        self.B = nn.Parameter(torch.zeros(n_labels, n_out, rank))
        for a in self.A.data:  # each label's A as PEFT initializes nn.Linear(in, r)'s weight
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self, weights):  # weights (n_labels,) -> sum_i w_i B_i A_i: (out, in), float32
        return torch.einsum("n,nor,nri->oi", weights.float(), self.B.float(), self.A.float())


class LoRALinear(nn.Module):
    """A frozen linear layer and the changes of the labels' pairs, mixed per row:
    h = W x + (alpha / r) sum_i w_i B_i A_i x, on the rows of the output each pair adapts."""

    def __init__(self, base, parts, weights, scale):
        super().__init__()
        self.base, self.parts, self.weights, self.scale = base, parts, weights, scale  # parts: [(rows, LoRAPair)]

    def forward(self, x):  # x (B, T, in) -> (B, T, out)
        h = self.base(x)
        if self.weights.size(0) not in (1, x.size(0)):
            raise ValueError(f"this LoRA mixes {self.weights.size(0)} rows differently but the batch has {x.size(0)} "
                             f"rows (beam search reorders rows): decode rows of one mix together")
        dtype = self.parts[0][1].A.dtype  # the change in the pairs' own dtype (float32), as PEFT computes it
        xa, w = x.to(dtype), self.weights.to(dtype).expand(x.size(0), -1)  # w: (B, n_labels)
        for rows, pair in self.parts:
            ax = torch.einsum("bti,nri->btnr", xa, pair.A)  # A_i x for every label i: (B, T, n, r)
            bax = torch.einsum("btnr,bn,nor->bto", ax, w, pair.B)  # sum_i w_i B_i A_i x: (B, T, out rows)
            h[..., rows] = h[..., rows] + (self.scale * bax).to(h.dtype)
        return h


class LoRA(nn.Module):
    """LoRA for every label on the chosen targets of every layer: h[i][target] is a LoRAPair."""
    kind, peft_type, steers, mixes = "lora", "LORA", True, True  # the face of every method (minprefix/method.py)

    def __init__(self, config, n_labels, rank=4, alpha=32, targets=DEFAULT_TARGETS):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.config, self.n_labels, self.rank, self.alpha = config, n_labels, rank, alpha
        self.targets = check_targets(targets, config)
        slices = target_slices(config)
        self.h = nn.ModuleList(nn.ModuleDict({key(t): LoRAPair(n_labels, rank, in_features(config, t),
                                                                slices[t][1].stop - slices[t][1].start)
                                              for t in self.targets}) for _ in range(config.n_layer))

    @property
    def scale(self):  # alpha / r
        return self.alpha / self.rank

    def apply(self, model, weights):
        """weights (B, n_labels) -> (model with its adapted layers replaced, no cache: LoRA changes the weights, not
        what comes before the text). One mix for every row and no gradient wanted: merged; else unmerged (and always
        on a model whose weights are not floating-point tensors to add to: fast.Int8Linear's)."""
        same = bool((weights == weights[:1]).all())
        floats = isinstance(getattr(model.h[0].attn.c_attn, "weight", None), torch.Tensor)
        if same and floats and not torch.is_grad_enabled():
            return self.merged(model, weights[0]), None
        return self.unmerged(model, weights[:1] if same else weights), None

    def unmerged(self, model, weights):  # weights (B or 1, n_labels)
        new = {}
        for i, layer in enumerate(self.h):
            for module, parts in self._by_module(layer).items():
                base = model.get_submodule(f"h.{i}.{module}")
                new[f"h.{i}.{module}"] = LoRALinear(base, parts, weights.to(parts[0][1].A.device), self.scale)
        return swap_modules(model, new)

    @torch.no_grad()
    def merged(self, model, weights):  # weights (n_labels,): W + dW, written once into copies of the weights
        new = {}
        for i, layer in enumerate(self.h):
            for module, parts in self._by_module(layer).items():
                base = model.get_submodule(f"h.{i}.{module}")
                W = base.weight  # (out, in), in whatever layout the model keeps it
                merged = W.to(torch.float32, copy=True)  # never W itself: the base model stays as it was
                for rows, pair in parts:
                    merged[rows] += self.scale * pair.delta(weights.to(pair.A.device))
                weight = torch.empty_like(W)  # same strides as W
                weight.copy_(merged)
                new[f"h.{i}.{module}"] = with_weight(base, weight)
        return swap_modules(model, new)

    def _by_module(self, layer):  # {"attn.c_attn": [(rows, pair), ...], ...}
        slices, by = target_slices(self.config), {}
        for t in self.targets:
            module, rows = slices[t]
            by.setdefault(module, []).append((rows, layer[key(t)]))
        return by

    def save(self, path, model, labels, info=None):
        return save_lora(path, self, model.name_or_path, labels, info)


def key(target):  # a ModuleDict key has no dots: "attn.c_proj" -> "attn_c_proj"
    return target.replace(".", "_")


def with_weight(module, weight):
    """A copy of a linear module with another weight tensor (its bias and its forward, fast or not, kept)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters, weight=nn.Parameter(weight, requires_grad=False))
    return new


def swap_modules(model, new):
    """A shallow copy of `model` in which each module named in `new` ({"h.0.attn.c_attn": module}) is replaced.
    Every other module and every parameter is shared with `model`, which is left as it was."""
    root = copy.copy(model)
    root._modules = dict(model._modules)
    copies = {"": root}
    for path, module in new.items():
        names = path.split(".")
        for depth in range(1, len(names)):  # copy each module on the way down, once
            here = ".".join(names[:depth])
            if here not in copies:
                parent = copies[".".join(names[:depth - 1])]
                child = copy.copy(parent._modules[names[depth - 1]])
                child._modules = dict(child._modules)
                parent._modules[names[depth - 1]] = child
                copies[here] = child
        copies[".".join(names[:-1])]._modules[names[-1]] = module
    return root


# ---- checkpoints: every label's pairs, and what they were trained for ----

def save_lora(path, lora, base_model, labels, info=None):
    """One safetensors file: h.{i}.{target}.lora_A (n_labels, r, in) and .lora_B (n_labels, out, r), float32."""
    tensors = {f"h.{i}.{t}.lora_{m}": getattr(layer[key(t)], m).detach().float().cpu().contiguous()
               for i, layer in enumerate(lora.h) for t in lora.targets for m in ("A", "B")}
    meta = {"format": FORMAT, "mode": "lora", "labels": json.dumps(list(labels)), "base_model": str(base_model),
            "base_config": json.dumps(vars(lora.config)), "rank": str(lora.rank), "alpha": repr(float(lora.alpha)),
            "targets": json.dumps(list(lora.targets)), "info": json.dumps(info or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return sum(t.numel() for t in tensors.values())


def load_lora(path, model=None):
    """-> (LoRA holding the saved pairs, metadata). With model: refuse a LoRA made for another base."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"no LoRA checkpoint at {path}: train one with train.py --mode lora (--out)")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable LoRA checkpoint (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a minprefix LoRA checkpoint (metadata format={meta.get('format')!r})")
    config = base_config(path, meta, model)
    labels, targets = json.loads(meta["labels"]), json.loads(meta["targets"])
    try:
        check_targets(targets, config)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    lora = LoRA(config, len(labels), int(meta["rank"]), float(meta["alpha"]), targets)
    state = lora.state_dict()
    names = {f"h.{i}.{t}.lora_{m}": f"h.{i}.{key(t)}.{m}" for i in range(config.n_layer) for t in targets
             for m in ("A", "B")}
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]} is not a pair of the targets {', '.join(targets)} the metadata names")
    for name, ours in names.items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name} is missing")
        if tuple(tensors[name].shape) != tuple(state[ours].shape):
            raise ValueError(f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, its metadata (rank "
                             f"{lora.rank}, {len(labels)} labels, n_embd {config.n_embd}) says {tuple(state[ours].shape)}")
        state[ours] = tensors[name]
    lora.load_state_dict(state)
    meta = dict(meta, labels=labels, targets=targets, rank=lora.rank, alpha=lora.alpha,
                info=json.loads(meta.get("info", "{}")))
    return lora.requires_grad_(False), meta
