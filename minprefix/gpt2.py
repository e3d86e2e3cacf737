"""GPT-2 in plain PyTorch, with the checkpoint's own parameter names so the hub's weights map 1:1.

Shapes: B batch, T new positions, P positions already in the key/value cache (a prefix, or tokens decoded
so far), C = n_embd, H = n_head, D = C // H, V = vocab_size.
"""
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


def linear(x, weight, bias=None):  # x (..., in), weight (out, in) -> (..., out)
    rows, k = x.numel() // x.size(-1), torch.get_num_threads()
    if x.device.type == "cpu" and rows <= 16 and k > 1 and weight.t().is_contiguous() and weight.size(1) % k == 0:
        # Decoding multiplies a few rows by each weight, so reading the weight is all the work, and MKL's
        # matrix-vector product reads it with one core. Cutting the inner dimension into one slice per core
        # makes bmm read with all of them: 1.5x faster sampling on a 2-core CPU (bench/bench_vs_peft.py).
        xs = x.reshape(rows, k, -1).transpose(0, 1)  # (k, rows, in/k)
        y = torch.bmm(xs, weight.t().view(k, -1, weight.size(0))).sum(0)  # (rows, out)
        y = y if bias is None else y + bias
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear, whose weight may be a (out, in) view of the checkpoint's (in, out) Conv1D storage."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class KVCache:
    """Keys and values of the positions before the current ones, one (k, v) pair per layer, each (B, H, P, D).

    This one mechanism carries both things that come before the text: a learned prefix (the cache starts
    with P trained positions) and the tokens already decoded (each step appends one position).
    """

    def __init__(self, layers=None):
        self.layers = list(layers) if layers is not None else []

    @property
    def length(self):  # P
        return self.layers[0][0].size(2) if self.layers else 0

    def positions(self, T, limit, device):  # -> (T,) the new tokens' positions: they follow the cached ones
        P = self.length
        if P + T > limit:
            raise ValueError(f"{P} cached + {T} new positions exceed the context of {limit}")
        return torch.arange(P, P + T, device=device)

    def update(self, i, k, v):  # k, v (B, H, T, D) -> the layer's keys and values so far (B, H, P+T, D), mask
        if i == len(self.layers):
            self.layers.append((k, v))
        else:
            past_k, past_v = self.layers[i]
            k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            self.layers[i] = (k, v)
        return k, v, None  # None: causal, aligned to the end


class StaticKVCache:
    """A KVCache in buffers of fixed size (B, H, capacity, D) with the fill level on the device, so that a
    decoding step has the same shapes and addresses every time and can be replayed as a CUDA graph
    (generate.py). Attention reads all `capacity` positions and masks those not written yet."""

    def __init__(self, cache, config, batch, capacity, device):  # cache: a KVCache to start from (a prefix)
        shape = (batch, config.n_head, capacity, config.n_embd // config.n_head)
        self.k = [torch.zeros(shape, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device) for _ in range(config.n_layer)]
        for i, (k, v) in enumerate(cache.layers):
            self.k[i][:, :, :k.size(2)] = k
            self.v[i][:, :, :v.size(2)] = v
        self.pos = torch.tensor(cache.length, device=device)  # positions filled so far
        self.slots = torch.arange(capacity, device=device)

    def positions(self, T, limit, device):  # capacity <= limit was checked when the buffers were sized
        self.new = self.pos + torch.arange(T, device=device)
        self.mask = self.slots[None, :] <= self.new[:, None]  # (T, capacity): new token t sees 0..pos+t
        return self.new

    def update(self, i, k, v):
        self.k[i].index_copy_(2, self.new, k)
        self.v[i].index_copy_(2, self.new, v)
        if i == len(self.k) - 1:
            self.pos += k.size(2)
        return self.k[i], self.v[i], self.mask


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = Linear(config.n_embd, config.n_embd)

    def forward(self, x, kv_cache=None, layer=0):  # x (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        mask = None
        if kv_cache is not None:
            k, v, mask = kv_cache.update(layer, k, v)  # (B, H, P+T, D)
        S = k.size(2)
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif S == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # new token t sees the P cached positions and new tokens 0..t
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new" is the tanh form


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0):  # pre-LN residual block, (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.name_or_path = None  # set by from_pretrained; recorded in prefix checkpoints

    def forward(self, idx, kv_cache=None, last_only=False):  # idx (B, T) -> logits (B, T, V), or (B, 1, V)
        x = self.hidden(self.wte(idx), kv_cache)
        if last_only:
            x = x[:, -1:]
        return linear(x, self.wte.weight)  # lm_head is tied to wte

    def hidden(self, x, kv_cache=None):  # token (or soft-prompt) embeddings (B, T, C) -> final hidden states (B, T, C)
        # Positions continue after the cache: with a P-position prefix the text sits at positions P.. onward,
        # as in the paper's code and PEFT, and the same in training and sampling.
        T = x.size(1)
        if kv_cache is None:
            if T > self.config.n_positions:
                raise ValueError(f"{T} positions exceed the context of {self.config.n_positions}")
            pos = torch.arange(T, device=x.device)
        else:
            pos = kv_cache.positions(T, self.config.n_positions, x.device)
        x = x + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = block(x, kv_cache, i)
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
        expected = {k: v.shape for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise KeyError(f"{where}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        unexpected = sorted(set(tensors) - set(expected))
        if unexpected:
            raise KeyError(f"{where}: unexpected tensor {unexpected[0]} (and {len(unexpected) - 1} more)"
                           f" is not part of GPT-2")
        state = {}
        for k, t in tensors.items():
            # HF stores these four as Conv1D weights (in, out); Linear wants (out, in): a transposed view, no copy
            conv1d = k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
            want = tuple(reversed(expected[k])) if conv1d else tuple(expected[k])
            if tuple(t.shape) != want:
                raise ValueError(f"{where}: tensor {k} has shape {tuple(t.shape)} on disk, but config.json "
                                 f"(n_layer={config.n_layer}, n_head={config.n_head}, n_embd={config.n_embd}, "
                                 f"vocab_size={config.vocab_size}, n_positions={config.n_positions}) expects {want}")
            t = t.to(device=device, dtype=dtype)
            if k == "wte.weight":  # (V, C) as a view of (C, V) storage: the lm_head then reads it in order
                t = t.t().contiguous().t()
            state[k] = t.t() if conv1d else t
        model.load_state_dict(state, assign=True)
        model.name_or_path = str(name_or_path)
        return model.eval()

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


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
