"""The training loop: GPT-2 frozen, AdamW on the prefix only, loss on the text given its label's prefix."""
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minprefix import fast
from minprefix.data import batches
from minprefix.prefix import make_prefix, save_prefix


def build_prefix(mode, model, labels, prefix_len, mlp, tokenizer):
    """A fresh prefix per label. Without the MLP, the paper's advice (section 7.2): start from real words'
    activations rather than random ones; here each label's own name, repeated to fill P positions."""
    prefix = make_prefix(mode, model.config, len(labels), prefix_len, mlp=mlp)
    if prefix.mlp is None:
        words = [(tokenizer.encode(f" {label}") * prefix_len)[:prefix_len] for label in labels]
        prefix.init_from_tokens(model, torch.tensor(words, device=next(model.parameters()).device))
    return prefix


def lm_loss(model, idx, targets, kv_cache=None):
    """The reference loss: mean cross-entropy of the next tokens (targets of -100, padding, are ignored)."""
    logits = model(idx, kv_cache)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def prefix_loss(model, prefix, idx, targets, labels, loss=lm_loss):
    """Each example's loss given its own label's prefix: the pure prefix of that label, as the cache it starts from."""
    return loss(model, idx, targets, prefix.cache(model, F.one_hot(labels, prefix.n_labels).float()))


@torch.no_grad()
def evaluate(model, prefix, items, batch_size, device, loss=lm_loss):  # -> mean loss per text token
    total, count = 0.0, 0
    for idx, targets, labels in batches(items, batch_size):
        n = (targets != -100).sum().item()
        total += prefix_loss(model, prefix, idx.to(device), targets.to(device), labels.to(device), loss).item() * n
        count += n
    return total / count


def train(model, prefix, train_items, val_items, labels, out, epochs=5, batch_size=2, lr=5e-5, seed=0,
          device="cpu", info=None):
    """Trains `prefix` in place and writes checkpoints to `out` after every epoch and on Ctrl-C.
    -> history: {"step_loss": [...], "val_loss": [one per epoch], "steps_per_epoch": n, "interrupted": bool}"""
    device = torch.device(device)
    loss_fn = fast.lm_loss if fast.enabled() else lm_loss
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
                loss = prefix_loss(model, prefix, idx.to(device), targets.to(device), y.to(device), loss_fn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history["step_loss"].append(loss.item())
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}")
            history["val_loss"].append(evaluate(model, prefix, val_items, batch_size, device, loss_fn))
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
