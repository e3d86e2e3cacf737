"""The training loop: GPT-2 frozen, AdamW on the prefix only, loss on the text given its label's prefix."""
import ctypes
import math
import os
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minprefix.data import batches
from minprefix.prefix import make_prefix, save_prefix


def keep_freed_memory():
    """Stop glibc's malloc from handing big freed blocks back to the OS. Each CPU training step frees and
    allocates tens of MB (logits, gradients); unmapped, every one comes back through page faults that zero
    it again, a third of a step here (bench/bench_vs_peft.py). jemalloc and tcmalloc, which PyTorch CPU users
    often preload, behave like this by default. No-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: blocks under 32 MiB (glibc's ceiling) come from the heap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap rather than trimming it


def build_prefix(mode, model, labels, prefix_len, mlp, tokenizer):
    """A fresh prefix per label. Without the MLP, the paper's advice (section 7.2): start from real words'
    activations rather than random ones; here each label's own name, repeated to fill P positions."""
    prefix = make_prefix(mode, model.config, len(labels), prefix_len, mlp=mlp)
    if prefix.mlp is None:
        words = [(tokenizer.encode(f" {label}") * prefix_len)[:prefix_len] for label in labels]
        prefix.init_from_tokens(model, torch.tensor(words, device=next(model.parameters()).device))
    return prefix


def prefix_loss(model, prefix, idx, targets, labels):
    """Mean cross-entropy of the text tokens (targets -100 are padding), each example under its own label's prefix."""
    cache = prefix.cache(model, F.one_hot(labels, prefix.n_labels).float())  # the pure prefix of each row's label
    h = model.hidden(model.wte(idx), cache)  # (B, T, C)
    return LMHeadLoss.apply(h.flatten(0, 1), model.wte.weight, targets.flatten())


class LMHeadLoss(torch.autograd.Function):
    """cross_entropy(h @ wte.T, targets), ignoring targets of -100, without ever holding the (N, V) logits.

    One pass over the vocabulary in chunks keeps, per row, a running max m, the sum s of exp(logit - m) and
    acc = sum_v exp(logit_v - m) * wte_v, rescaling all three when m grows (the online softmax of flash
    attention). Then log sum_v exp(logit_v) = m + log s, and the gradient is there already:
        d loss / d h = (softmax @ wte - wte_y) / n = (acc / s - wte_y) / n
    Same numbers as F.cross_entropy(model(idx)); on a CPU a quarter faster (16 chunks stay in cache) and
    25 MB lighter per 128 tokens; on a GPU one chunk (16 would be 16 rounds of small kernels). Padding never
    enters the 50257-wide products."""

    @staticmethod
    def forward(ctx, h, wte, targets):  # h (N, C), wte (V, C), targets (N,) -> scalar
        chunks = 16 if h.device.type == "cpu" else 1
        keep = (targets != -100).nonzero()[:, 0]
        h_kept, y = h[keep], targets[keep]  # (n, C), (n,)
        n, grad = y.numel(), ctx.needs_input_grad[0]
        m = torch.full((n, 1), float("-inf"), device=h.device)
        s = torch.zeros(n, 1, device=h.device)
        acc = torch.zeros_like(h_kept) if grad else None
        for w in wte.chunk(chunks):  # (V/chunks, C)
            logits = (w @ h_kept.t()).t()  # (n, V/chunks)
            m_new = torch.maximum(m, logits.max(dim=-1, keepdim=True).values)
            scale = (m - m_new).exp()
            p = (logits - m_new).exp_()
            s = s * scale + p.sum(dim=-1, keepdim=True)
            if grad:
                acc = acc * scale + p @ w
            m = m_new
        target_logit = (h_kept * wte[y]).sum(dim=-1)
        loss = (m[:, 0] + s[:, 0].log() - target_logit).mean()  # mean of -log softmax_y
        if grad:
            dh = torch.zeros_like(h)
            dh[keep] = (acc / s - wte[y]) / n
            ctx.save_for_backward(dh)
        return loss

    @staticmethod
    def backward(ctx, grad):
        dh, = ctx.saved_tensors
        return grad * dh, None, None


@torch.no_grad()
def evaluate(model, prefix, items, batch_size, device):  # -> mean loss per text token
    total, count = 0.0, 0
    for idx, targets, labels in batches(items, batch_size):
        n = (targets != -100).sum().item()
        total += prefix_loss(model, prefix, idx.to(device), targets.to(device), labels.to(device)).item() * n
        count += n
    return total / count


def train(model, prefix, train_items, val_items, labels, out, epochs=5, batch_size=2, lr=5e-5, seed=0,
          device="cpu", info=None):
    """Trains `prefix` in place and writes checkpoints to `out` after every epoch and on Ctrl-C.
    -> history: {"step_loss": [...], "val_loss": [one per epoch], "steps_per_epoch": n, "interrupted": bool}"""
    device = torch.device(device)
    keep_freed_memory()
    model.requires_grad_(False)
    assert not any(p.requires_grad for p in model.parameters()), "GPT-2 must stay frozen"
    trainable = [p for p in prefix.parameters() if p.requires_grad]
    # weight decay would pull keys and values toward zero, which means nothing for a prefix (the paper uses none)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (epochs * steps_per_epoch))  # linear to 0
    gen = torch.Generator().manual_seed(seed)
    history = {"step_loss": [], "val_loss": [], "steps_per_epoch": steps_per_epoch, "interrupted": False}

    def checkpoint(interrupted=False):
        steps = len(history["step_loss"])
        run = dict(info or {}, epochs_done=round(steps / steps_per_epoch, 3), steps=steps, interrupted=interrupted,
                   lr=lr, batch_size=batch_size, seed=seed,
                   val_loss=history["val_loss"][-1] if history["val_loss"] else None,
                   train_loss=sum(history["step_loss"][-steps_per_epoch:]) / max(1, len(history["step_loss"][-steps_per_epoch:])))
        save_prefix(out, prefix, model.name_or_path, labels, run)
        save_loss_plot(history, loss_plot_path(out))

    try:
        for epoch in range(1, epochs + 1):
            bar = tqdm(batches(train_items, batch_size, shuffle=True, generator=gen), total=steps_per_epoch,
                       desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)
            running = None
            for idx, targets, y in bar:
                loss = prefix_loss(model, prefix, idx.to(device), targets.to(device), y.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history["step_loss"].append(loss.item())
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}")
            history["val_loss"].append(evaluate(model, prefix, val_items, batch_size, device))
            tqdm.write(f"epoch {epoch}: train loss {sum(history['step_loss'][-steps_per_epoch:]) / steps_per_epoch:.4f}"
                       f"  val loss {history['val_loss'][-1]:.4f}")
            checkpoint()
    except KeyboardInterrupt:
        history["interrupted"] = True
        checkpoint(interrupted=True)
        tqdm.write(f"interrupted: what was learned so far is saved in {out}")
    return history


def loss_plot_path(out):
    return os.path.splitext(str(out))[0] + ".loss.png"


def save_loss_plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = history["step_loss"]
    if not steps:
        return
    k = max(1, len(steps) // 50)  # a moving average over ~2% of the run makes the trend readable
    smooth = [sum(steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1]) for i in range(len(steps))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(steps) + 1), steps, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(range(1, len(steps) + 1), smooth, color="tab:blue", lw=1.5, label=f"train (mean of {k} steps)")
    n = history["steps_per_epoch"]
    ax.plot([n * (e + 1) for e in range(len(history["val_loss"]))], history["val_loss"], "o-", color="tab:orange",
            label="held-out (per epoch)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("prefix-tuning loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
