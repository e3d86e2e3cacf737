"""The learned prefixes, one per label, and how they are mixed, saved and loaded.

The whole path of a K/V prefix (Li & Liang 2021, section 4):
  parameter  (n_labels*P, C) embedding, or the (n_labels, P, L*2*C) table itself
  -> MLP     Linear(C, 512) -> Tanh -> Linear(512, L*2*C), training only; the product is what gets saved
  -> mix     mixed = sum_i w_i * prefix_i, e.g. alpha * positive + (1 - alpha) * negative
  -> cache   (B, P, L*2*C) -> L pairs of keys and values (B, H, P, D): a KVCache of P positions
  -> attention in every layer: the text's queries attend to those P positions before its own (gpt2.py)
"""
import json

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from minprefix.files import atomic_path
from minprefix.gpt2 import GPTConfig, KVCache

FORMAT = "minprefix-prefix-v1"
DEFAULT_CHECKPOINT = "weights/prefix.safetensors"  # where train.py writes and sample.py / eval.py read


def check_prefix_len(prefix_len, config):
    if not 1 <= prefix_len < config.n_positions - 1:  # room left for at least <|endoftext|> and one token
        raise ValueError(f"prefix_len must be between 1 and {config.n_positions - 2} for a context of "
                         f"{config.n_positions} positions, got {prefix_len}")


class PrefixMLP(nn.Module):
    """The paper's reparametrization of one label's prefix (section 4.3: optimizing the table directly is
    unstable): Embedding(P, C) -> Linear(C, 512) -> Tanh -> Linear(512, L*2*C)."""

    def __init__(self, prefix_len, n_embd, width, hidden=512):
        super().__init__()
        self.wte = nn.Embedding(prefix_len, n_embd)
        self.c_fc = nn.Linear(n_embd, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self):  # -> (P, L*2*C)
        return self.c_proj(torch.tanh(self.c_fc(self.wte.weight)))


class KVPrefix(nn.Module):
    """Full prefix-tuning: per label, P positions of keys and values for every layer, (P, L, 2*H*D)."""
    kind, peft_type, steers, mixes = "kv", "PREFIX_TUNING", True, True  # the face of every method (minprefix/method.py)

    def __init__(self, config, n_labels, prefix_len, mlp=False, mlp_hidden=512):
        super().__init__()
        check_prefix_len(prefix_len, config)
        self.config, self.n_labels, self.prefix_len = config, n_labels, prefix_len
        width = config.n_layer * 2 * config.n_embd  # per layer: keys of all heads, then values (PEFT's layout)
        if mlp:  # one MLP per label: each label's prefix is its own prefix-tuning, trained side by side
            self.mlp = nn.ModuleList(PrefixMLP(prefix_len, config.n_embd, width, mlp_hidden) for _ in range(n_labels))
        else:
            self.mlp = None
            self.table_ = nn.Parameter(torch.zeros(n_labels, prefix_len, width))

    def table(self):  # -> (n_labels, P, L*2*C)
        if self.mlp is None:
            return self.table_
        return torch.stack([mlp() for mlp in self.mlp])

    def apply(self, model, weights):  # -> the model, unchanged, and the mixed prefix as the cache the text starts from
        return model, self.cache(model, weights)

    def save(self, path, model, labels, info=None):
        return save_prefix(path, self, model.name_or_path, labels, info)

    def cache(self, model, weights):  # weights (B, n_labels) -> KVCache of P positions, (B, H, P, D) per layer
        c = self.config
        table = self.table()
        kv = torch.einsum("bn,npw->bpw", weights.to(table), table).to(model.dtype)  # the mix: (B, P, L*2*C)
        B, P = kv.shape[:2]
        kv = kv.view(B, P, 2 * c.n_layer, c.n_head, c.n_embd // c.n_head).permute(2, 0, 3, 1, 4)  # (L*2, B, H, P, D)
        return KVCache([(kv[2 * i], kv[2 * i + 1]) for i in range(c.n_layer)])

    def init_from_tokens(self, model, tokens, steps=500, lr=1e-4):
        """tokens (n_labels, P): start from real words' keys and values. The table takes them as they are; an MLP
        is fitted to them, as the paper's low-data runs do (its code: Adam, lr 1e-4, 500 steps of mean squared
        error, the MLP's layers trained and its input embedding left as drawn)."""
        with torch.no_grad():
            cache = KVCache()
            model.hidden(model.wte(tokens), cache)  # (n_labels, H, P, D) per layer
            kv = torch.stack([t for k, v in cache.layers for t in (k, v)])  # (L*2, n_labels, H, P, D)
            target = kv.permute(1, 3, 0, 2, 4).reshape(len(tokens), self.prefix_len, -1).float()  # cache()'s inverse
        if self.mlp is None:
            with torch.no_grad():
                self.table_.copy_(target)
            return
        with torch.enable_grad():
            for mlp, want in zip(self.mlp, target):
                layers = [p for name, p in mlp.named_parameters() if not name.startswith("wte")]
                opt = torch.optim.Adam(layers, lr=lr)
                for _ in range(steps):
                    loss = torch.nn.functional.mse_loss(mlp(), want)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()


class EmbeddingPrefix(nn.Module):
    """The simpler baseline (a soft prompt): P trainable vectors per label before the token embeddings.
    Only the input changes; every layer's keys and values of those P positions come from the frozen model."""
    kind, peft_type, steers, mixes = "embedding", "PROMPT_TUNING", True, True

    def __init__(self, config, n_labels, prefix_len):
        super().__init__()
        check_prefix_len(prefix_len, config)
        self.config, self.n_labels, self.prefix_len, self.mlp = config, n_labels, prefix_len, None
        self.table_ = nn.Parameter(torch.zeros(n_labels, prefix_len, config.n_embd))

    def table(self):  # -> (n_labels, P, C)
        return self.table_

    def apply(self, model, weights):
        return model, self.cache(model, weights)

    def save(self, path, model, labels, info=None):
        return save_prefix(path, self, model.name_or_path, labels, info)

    def cache(self, model, weights):  # weights (B, n_labels) -> KVCache of P positions
        vectors = torch.einsum("bn,npc->bpc", weights.to(self.table_), self.table_).to(model.dtype)  # the mix: (B, P, C)
        cache = KVCache()
        model.hidden(vectors, cache)  # running the P vectors through the model leaves their keys and values
        return cache

    @torch.no_grad()
    def init_from_tokens(self, model, tokens):  # tokens (n_labels, P): start from real words' embeddings
        self.table_.copy_(model.wte(tokens).float())


def make_prefix(mode, config, n_labels, prefix_len, mlp=False):
    if mode == "kv":
        return KVPrefix(config, n_labels, prefix_len, mlp=mlp)
    if mode == "embedding":
        if mlp:
            raise ValueError("--mlp reparametrizes the K/V prefix; use it with --mode kv")
        return EmbeddingPrefix(config, n_labels, prefix_len)
    raise ValueError(f"unknown prefix mode {mode!r}: use 'kv' or 'embedding'")


def label_weights(n_labels, label=None, alpha=None, weights=None):
    """One mixing weight per label, by position -> (1, n_labels). label: a pure prefix (its index); alpha:
    alpha*label0 + (1-alpha)*label1, whatever they are called: the mechanics, for tests. What a user's alpha means
    (the label called positive) is mix_weights's."""
    if weights is not None:
        if len(weights) != n_labels:
            raise ValueError(f"{len(weights)} weights given for {n_labels} labels")
        return torch.tensor([weights], dtype=torch.float32)
    if alpha is not None:
        if n_labels != 2:
            raise ValueError(f"alpha mixes two labels, this prefix has {n_labels}: give one weight per label")
        return torch.tensor([[alpha, 1.0 - alpha]])
    return nn.functional.one_hot(torch.tensor([label]), n_labels).float()


def mix_weights(labels, alpha=None, label=None, weights=None):
    """The mix a user asks for, over a checkpoint's labels (its order) -> (1, len(labels)) weights. At most one of:
    alpha    alpha * the label called "positive" + (1 - alpha) * the other one, whatever the checkpoint's order
             (a checkpoint imported negative-first turns the same way); refused unless there are two labels and
             one is called positive
    label    that label alone, by name
    weights  one weight per label, a list in the checkpoint's order or {label: weight} (labels left out weigh 0)
    None of them: one label alone, or an even mix of two (alpha 0.5)."""
    labels = list(labels)
    given = [name for name, v in (("alpha", alpha), ("label", label), ("weights", weights)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give one of alpha, label, weights, not {' and '.join(given)}")
    n = len(labels)
    if isinstance(weights, dict):
        unknown = [k for k in weights if k not in labels]
        if unknown:
            raise ValueError(f"unknown label {unknown[0]!r}: this checkpoint's labels are {', '.join(labels)}")
        weights = [weights.get(name, 0.0) for name in labels]
    if weights is not None:
        if len(weights) != n:
            raise ValueError(f"{len(weights)} weights for {n} labels: give one per label, in the checkpoint's order "
                             f"({', '.join(labels)})")
        return label_weights(n, weights=[float(w) for w in weights])
    if label is not None:
        if label not in labels:
            raise ValueError(f"unknown label {label!r}: this checkpoint's labels are {', '.join(labels)}")
        return label_weights(n, label=labels.index(label))
    if alpha is None:
        if n > 2:
            raise ValueError(f"{n} labels ({', '.join(labels)}): choose one label, or give one weight per label")
        return torch.full((1, n), 1.0 / n)
    if n != 2 or "positive" not in labels:
        raise ValueError(f"alpha weighs the label called positive against the other one; these labels are "
                         f"{', '.join(labels)}: give one weight per label instead, in that order")
    w = [0.0, 0.0]
    w[labels.index("positive")], w[1 - labels.index("positive")] = alpha, 1.0 - alpha
    return torch.tensor([w])


# ---- checkpoints: the final prefix (after the MLP) and what it was trained for ----

def save_prefix(path, prefix, base_model, labels, info=None, trained_with_mlp=None):
    """Write atomically: a crash mid-write leaves the previous checkpoint, never half of one.
    base_model: what GPT2.from_pretrained should load for this prefix (model.name_or_path). trained_with_mlp:
    default, whether this prefix has its MLP (an imported table may say otherwise)."""
    c = prefix.config
    with torch.no_grad():
        table = prefix.table().float().cpu()
    if isinstance(prefix, KVPrefix):
        table = table.view(prefix.n_labels, prefix.prefix_len, c.n_layer, 2 * c.n_embd)  # (n_labels, P, L, 2*H*D)
    meta = {"format": FORMAT, "mode": "kv" if isinstance(prefix, KVPrefix) else "embedding",
            "prefix_len": str(prefix.prefix_len), "labels": json.dumps(list(labels)),
            "base_model": str(base_model), "base_config": json.dumps(vars(c)),
            "trained_with_mlp": json.dumps(prefix.mlp is not None if trained_with_mlp is None else trained_with_mlp), "info": json.dumps(info or {})}
    with atomic_path(path) as tmp:
        save_file({"prefix": table.contiguous()}, tmp, metadata=meta)
    return table.numel()


def base_config(path, meta, model=None):
    """The config of the base model a checkpoint (prefix or LoRA) was trained for; refused if `model` is another."""
    config = GPTConfig(**json.loads(meta["base_config"]))
    if model is not None and vars(model.config) != vars(config):
        raise ValueError(f"{path} was trained for base model {meta['base_model']} ({vars(config)}), "
                         f"but the model loaded is {model.name_or_path} ({vars(model.config)})")
    return config


def load_prefix(path, model=None):
    """-> (prefix module holding the saved table, metadata). With model: refuse a prefix made for another base."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, table = f.metadata() or {}, f.get_tensor("prefix")
    except FileNotFoundError:
        raise FileNotFoundError(f"no prefix checkpoint at {path}: train one with train.py (--out) or pass --prefix")
    except (SafetensorError, KeyError, OSError) as e:
        raise ValueError(f"{path}: not a readable prefix checkpoint (corrupt or truncated?): {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a minprefix prefix checkpoint (metadata format={meta.get('format')!r})")
    config = base_config(path, meta, model)
    labels = json.loads(meta["labels"])
    prefix = make_prefix(meta["mode"], config, len(labels), int(meta["prefix_len"]))
    want = (len(labels), prefix.prefix_len) + ((config.n_layer, 2 * config.n_embd) if meta["mode"] == "kv" else (config.n_embd,))
    if tuple(table.shape) != want:
        raise ValueError(f"{path}: tensor prefix has shape {tuple(table.shape)}, its metadata says {want}")
    with torch.no_grad():
        prefix.table_.copy_(table.view_as(prefix.table_))
    meta = dict(meta, labels=labels, prefix_len=prefix.prefix_len, info=json.loads(meta.get("info", "{}")))
    return prefix.requires_grad_(False), meta
