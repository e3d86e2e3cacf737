"""The training loop. Prefix-tuning: GPT-2 frozen, AdamW on the prefix (and its MLP) only, the loss on each text
given its own label's prefix. Fine-tuning (the paper's baseline): AdamW on every GPT-2 weight, no prefix.

After every epoch: the held-out loss, the checkpoint of the epoch kept so far (--keep best: the lowest held-out
loss; last: the latest), a loss plot, and the state a run resumes from (optimizer, schedule, data order,
random state), written beside the checkpoint. Ctrl-C keeps what the run had.
"""
import json
import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minprefix import fast
from minprefix.data import batches
from minprefix.files import atomic_path
from minprefix.prefix import make_prefix, save_prefix


def build_prefix(mode, model, labels, prefix_len, mlp, tokenizer):
    """A fresh prefix per label. Without the MLP, the paper's advice (section 7.2): start from real words'
    activations rather than random ones; here each label's own name, repeated to fill P positions."""
    prefix = make_prefix(mode, model.config, len(labels), prefix_len, mlp=mlp)
    if prefix.mlp is None:
        words = [(tokenizer.encode(f" {label}") * prefix_len)[:prefix_len] for label in labels]
        prefix.init_from_tokens(model, torch.tensor(words, device=model.device))
    return prefix


def lm_loss(model, idx, targets, kv_cache=None):
    """The reference loss: mean cross-entropy of the next tokens (targets of -100, padding and context, are ignored)."""
    logits = model(idx, kv_cache)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def prefix_loss(model, prefix, idx, targets, labels, loss=lm_loss):
    """Each example's loss given its own label's prefix: the pure prefix of that label, as the cache it starts from."""
    return loss(model, idx, targets, prefix.cache(model, F.one_hot(labels, prefix.n_labels).float()))


def batch_loss(model, prefix, idx, targets, labels, loss=lm_loss):  # prefix None: fine-tuning, no prefix
    return loss(model, idx, targets) if prefix is None else prefix_loss(model, prefix, idx, targets, labels, loss)


@torch.no_grad()
def evaluate(model, prefix, items, batch_size, device, loss=lm_loss):  # -> mean loss per target token
    total, count = 0.0, 0
    for idx, targets, labels in batches(items, batch_size):
        n = (targets != -100).sum().item()
        total += batch_loss(model, prefix, idx.to(device), targets.to(device), labels.to(device), loss).item() * n
        count += n
    return total / count


def state_path(out):  # where the state a run resumes from goes, beside the checkpoint
    return str(out).rstrip("/").removesuffix(".safetensors") + ".resume.pt"


def loss_plot_path(out):
    return str(out).rstrip("/").removesuffix(".safetensors") + ".loss.png"


def read_resume_state(out, run):
    """The state saved beside `out`, refused if it belongs to another run: names the first setting that differs."""
    path = state_path(out)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no saved state at {path} (a run writes it after each finished epoch)")
    state = torch.load(path, weights_only=True)
    for key, value in run.items():
        before = state["run"].get(key)
        if before != value:
            raise ValueError(f"--resume: {path} is a run with {key} = {before!r}, this one asks for {value!r}; "
                             f"resume with the same {key}, or start afresh without --resume")
    return state


def train(model, prefix, train_items, val_items, labels, out, epochs=5, batch_size=2, lr=5e-5, seed=0,
          device="cpu", info=None, keep="best", resume=False, group_by_length=False, run=None):
    """Trains `prefix` (or, prefix None, every weight of `model`) in place; writes to `out` and beside it.
    run: the settings that make a run (data, base model, hyperparameters); a resumed run must have the same.
    -> history: {"step_loss", "val_loss" (per epoch), "steps_per_epoch", "kept_epoch", "interrupted", "resumed_at"}"""
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    device = torch.device(device)
    run = dict(run or {}, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, group_by_length=group_by_length)
    loss_fn = fast.lm_loss if fast.enabled() else lm_loss
    if fast.enabled():
        fast.keep_freed_memory()
    finetune = prefix is None
    model.requires_grad_(finetune)
    module = model if finetune else prefix
    trainable = [p for p in module.parameters() if p.requires_grad]
    # Weight decay would pull keys and values toward zero, which means nothing for a prefix (the paper uses none).
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=device.type in ("cpu", "cuda"))
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (epochs * steps_per_epoch))  # linear to 0
    gen = torch.Generator().manual_seed(seed)
    history = {"step_loss": [], "val_loss": [], "steps_per_epoch": steps_per_epoch, "kept_epoch": None,
               "interrupted": False, "resumed_at": None}
    first = 1
    if resume:
        state = read_resume_state(out, run)
        module.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["data_order"])
        torch.set_rng_state(state["rng"])
        history.update(json.loads(state["history"]), resumed_at=state["epoch"])
        first = state["epoch"] + 1
        tqdm.write(f"resuming after epoch {state['epoch']} of {epochs} from {state_path(out)}")

    def save(epoch, interrupted=False):  # the checkpoint users load: a prefix, or a model folder
        steps = history["step_loss"][-steps_per_epoch:]
        meta = dict(info or {}, epoch=epoch, epochs_done=round(len(history["step_loss"]) / steps_per_epoch, 3),
                    steps=len(history["step_loss"]), interrupted=interrupted, lr=lr, batch_size=batch_size, seed=seed,
                    val_loss=history["val_loss"][epoch - 1] if 0 < epoch <= len(history["val_loss"]) else None,
                    train_loss=sum(steps) / max(1, len(steps)))
        if finetune:
            save_model(out, model, meta)
        else:
            save_prefix(out, prefix, model.name_or_path, labels, meta)

    def save_state(epoch):  # what --resume needs, after a finished epoch
        state = {"run": run, "epoch": epoch, "trainable": module.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "data_order": gen.get_state(), "rng": torch.get_rng_state(),
                 "history": json.dumps(history)}
        with atomic_path(state_path(out)) as tmp:
            torch.save(state, tmp)

    epoch = finished = first - 1
    try:
        for epoch in range(first, epochs + 1):
            bar = tqdm(batches(train_items, batch_size, shuffle=True, generator=gen, group_by_length=group_by_length),
                       total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True)
            running = None
            for idx, targets, y in bar:
                loss = batch_loss(model, prefix, idx.to(device), targets.to(device), y.to(device), loss_fn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history["step_loss"].append(loss.item())
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}")
            history["val_loss"].append(evaluate(model, prefix, val_items, batch_size, device, loss_fn))
            best = min(history["val_loss"])
            kept = keep == "last" or history["val_loss"][-1] <= best
            if kept:
                history["kept_epoch"] = epoch
                save(epoch)
            save_state(epoch)
            finished = epoch
            save_loss_plot(history, loss_plot_path(out))
            tqdm.write(f"epoch {epoch}: train loss {sum(history['step_loss'][-steps_per_epoch:]) / steps_per_epoch:.4f}"
                       f"  held-out loss {history['val_loss'][-1]:.4f}"
                       + ("  (kept)" if kept else f"  (keeping epoch {history['kept_epoch']}: {best:.4f})"))
    except KeyboardInterrupt:
        history["interrupted"] = True
        if history["kept_epoch"] is None:  # nothing finished yet: keep the steps taken rather than nothing
            save(epoch, interrupted=True)
            tqdm.write(f"interrupted in epoch {finished + 1}: the prefix so far is saved in {out}")
        else:
            tqdm.write(f"interrupted in epoch {finished + 1}: {out} holds epoch {history['kept_epoch']}; "
                       f"--resume continues after epoch {finished}")
    return history


def save_model(folder, model, info=None):
    """A fine-tuned GPT-2 in the hub's layout (config.json + model.safetensors, Conv1D weights as (in, out)), so
    that GPT2.from_pretrained, and HF transformers, load it."""
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
              "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
              "minprefix": {"fine_tuned_from": model.name_or_path, **(info or {})}}
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(os.path.join(folder, "config.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)


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
    epochs = range(1, len(history["val_loss"]) + 1)
    ax.plot([n * e for e in epochs], history["val_loss"], "o-", color="tab:orange", label="held-out (per epoch)")
    if history.get("kept_epoch"):
        e = history["kept_epoch"]
        ax.plot([n * e], [history["val_loss"][e - 1]], "*", color="tab:red", ms=16, zorder=5,
                label=f"kept: epoch {e}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
