"""GPT-2 in plain PyTorch: the reference. GPT-2's own parameter names, so the hub's weights map 1:1.

Shapes: B batch, T new positions, S positions already in the key/value cache (a prefix, or tokens decoded so
far), C = n_embd, H = n_head, D = C // H, V = vocab_size. Nothing here is tuned for speed; minprefix/fast.py
holds the faster pieces, each checked against this file by tests.
"""
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024
    layer_norm_epsilon: float = 1e-5


class KVCache:
    """The keys and values of the positions before the current ones: one (k, v) pair per layer, each (B, H, S, D),
    and which of those positions are real (B, S), False where a shorter prompt was padded on the left.

    This one mechanism carries both things that come before the text: a learned prefix (the cache starts with
    P trained positions) and the tokens already decoded (each step appends one position).
    """

    def __init__(self, layers=(), real=None, boost=0.0, prefix_len=0):
        self.layers = list(layers)
        self.real = real  # None: every position is real
        # boost > 0: attention to the first prefix_len positions (the prefix) grows with the text (GPT2.hidden)
        self.boost, self.prefix_len = boost, prefix_len

    @property
    def length(self):  # S
        return self.layers[0][0].size(2) if self.layers else 0

    def update(self, i, k, v):  # layer i's new k, v (B, H, T, D) -> all its keys and values (B, H, S+T, D)
        if i < len(self.layers):
            past_k, past_v = self.layers[i]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            self.layers[i] = (k, v)
        else:
            self.layers.append((k, v))
        return k, v

    def copy(self):  # a cache to extend without changing this one (the tensors are shared, never written)
        return KVCache(self.layers, self.real, self.boost, self.prefix_len)

    def select(self, rows):  # rows (N,) -> the cache of those rows, e.g. the surviving beams
        return KVCache([(k[rows], v[rows]) for k, v in self.layers], None if self.real is None else self.real[rows],
                       self.boost, self.prefix_len)

    def boosted(self, boost):  # -> a copy whose positions so far (the prefix) get attention that grows with the text
        return KVCache(self.layers, self.real, boost, self.length if boost else 0)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, mask, kv_cache, layer):  # x (B, T, C), mask (B, 1, T, S+T): True seen, or a bias -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        k, v = kv_cache.update(layer, k, v)  # the prefix and earlier tokens come first: (B, H, S+T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(q k^T / sqrt(D) + mask) v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new" is the tanh form


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, mask, kv_cache, layer):  # pre-LN residual block, (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), mask, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: GPT-2 reads its output with its input embedding
        self.name_or_path = None  # set by from_pretrained; recorded in prefix checkpoints

    def forward(self, idx, kv_cache=None, real=None):  # idx (B, T) -> logits (B, T, V)
        return self.lm_head(self.hidden(self.wte(idx), kv_cache, real))

    def hidden(self, x, kv_cache=None, real=None):
        """Token (or soft-prompt) embeddings x (B, T, C) -> final hidden states (B, T, C).

        kv_cache: the keys and values of the positions before x (a prefix; tokens decoded so far); this call
        appends x's. real (B, T): False at left padding, so that prompts of different lengths share a batch.
        """
        B, T, _ = x.shape
        cache = kv_cache if kv_cache is not None else KVCache()
        S = cache.length
        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if real is None else real
        past = torch.ones(B, S, dtype=torch.bool, device=x.device) if cache.real is None else cache.real
        keys = torch.cat([past, real], dim=1)  # (B, S+T): which keys are real
        # Positions count the real positions before: with a P-position prefix the text starts at position P, as in
        # the paper's code and PEFT, and a padded prompt gets the positions it would have alone.
        pos = (past.sum(1, keepdim=True) + real.cumsum(1) - 1).clamp(min=0)  # (B, T)
        if S + T > self.config.n_positions and int(pos.max()) >= self.config.n_positions:
            raise ValueError(f"{S} cached + {T} new positions exceed the context of {self.config.n_positions}")
        # The one mask for every case: new token t (at index S+t among the keys) sees the real keys up to itself,
        # prefix and cache included; and always itself, so that a padding position's softmax is never empty.
        key_index, query_index = torch.arange(S + T, device=x.device), torch.arange(S, S + T, device=x.device)
        causal = key_index[None, :] <= query_index[:, None]  # (T, S+T)
        itself = key_index[None, :] == query_index[:, None]
        mask = (causal & keys[:, None, :]) | itself  # (B, T, S+T)
        if cache.boost:  # DTPA-style (Yang et al. 2025, "Dynamic Token-level Prefix Augmentation"): the prefix's P
            # keys weigh 1 + boost * n / P times more, n the text's positions the query sees, itself included, so
            # that the prefix's share of attention does not fade as the text grows (docs/long.md)
            P = cache.prefix_len
            factor = 1 + cache.boost * (pos - P + 1).clamp(min=1) / P  # (B, T)
            bias = torch.zeros(B, T, S + T, device=x.device).masked_fill(~mask, float("-inf"))
            bias[:, :, :P] += factor.log()[:, :, None]
            mask = bias.to(x.dtype)  # added to q k^T / sqrt(D) in every layer
        x = x + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, mask[:, None], cache, i)
        cache.real = keys
        return self.ln_f(x)

    @classmethod
    def from_pretrained(cls, name_or_path, dtype=torch.float32, device="cpu"):
        """A hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local folder in the hub's layout
        (config.json + model.safetensors, or a sharded model.safetensors.index.json). Eval mode.
        device: "cpu", "cuda", ..., or "auto" for a GPU where there is one."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        from minprefix.hub import read_checkpoint  # file finding and key layouts live beside the model

        config_dict, tensors, where = read_checkpoint(name_or_path)
        config = config_from_hf(config_dict, where)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: v.shape for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise KeyError(f"{where}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise KeyError(f"{where}: unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} more)"
                           f" is not part of GPT-2")
        state = {}
        for k, t in tensors.items():
            # GPT-2 stores these four as Conv1D weights, (in, out); nn.Linear wants (out, in): transposed once here
            conv1d = k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
            want = tuple(reversed(expected[k])) if conv1d else tuple(expected[k])
            if tuple(t.shape) != want:
                raise ValueError(f"{where}: tensor {k} has shape {tuple(t.shape)} on disk, but config.json "
                                 f"(n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
                                 f"vocab_size={config.vocab_size}, n_positions={config.n_positions}) expects {want}")
            state[k] = (t.t() if conv1d else t).to(device=device, dtype=dtype).contiguous()
        model.load_state_dict(state, strict=False, assign=True)
        model.lm_head.weight = model.wte.weight  # assign=True replaced wte's parameter: tie again
        # a folder is recorded as an absolute path, so that a prefix trained on it loads from any directory
        local = os.path.isdir(os.path.expanduser(str(name_or_path)))
        model.name_or_path = os.path.abspath(os.path.expanduser(str(name_or_path))) if local else str(name_or_path)
        return model.eval()

    def num_params(self):  # wte and lm_head are one tensor, counted once
        return sum(p.numel() for p in self.parameters())

    @property
    def dtype(self):
        return self.wte.weight.dtype

    @property
    def device(self):
        return self.wte.weight.device


def config_from_hf(d, where="config.json"):
    """HF GPT2Config fields -> GPTConfig; refuses the variants this model does not implement."""
    act = d.get("activation_function", "gelu_new")
    unsupported = {
        "activation_function": act not in ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": d.get("n_inner") not in (None, 4 * d["n_embd"]),
        "scale_attn_weights": d.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": d.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": d.get("add_cross_attention", False),
        "tie_word_embeddings": d.get("tie_word_embeddings", True) is not True,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"{where}: {bad[0]}={d.get(bad[0])!r} is a GPT-2 variant this model does not implement")
    return GPTConfig(n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"], vocab_size=d["vocab_size"],
                     n_positions=d["n_positions"], layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5))
