"""The training loop, the same for every method (minprefix/method.py): AdamW on what the method trains (a prefix
and its MLP, a LoRA, or every GPT-2 weight), the loss on each text given its own label.

After every epoch: the held-out pass (the loss, and for two or more labels how well each label's prefix tells its
own texts from the others': the steering measure), the checkpoint of the epoch kept so far, a loss plot, and the
state a run resumes from (optimizer, schedule, data order, random state), written beside the checkpoint and
removed once the run has finished (unless asked to keep it). Ctrl-C keeps what the run had.

Which epoch is kept (keep="best"): with two or more labels the one whose prefixes steer best on held-out texts
(the highest mean margin, below); with one label (a task prefix, E2E) the lowest held-out loss. keep="last": the
latest. The held-out language-model loss measures how well the prefixes predict texts, not whether they pull
apart: two runs differing by 0.0004 in it were measured 0.06 and 0.32 apart in how far their dial turns.
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


def lm_loss(model, idx, targets, kv_cache=None):
    """The reference loss: mean cross-entropy of the next tokens (targets of -100, padding and context, are ignored)."""
    logits = model(idx, kv_cache)  # (B, T, V)
    return F.cross_entropy(at_least_float32(logits).flatten(0, 1), targets.flatten(), ignore_index=-100)


def token_nll(model, idx, targets, kv_cache=None):
    """The reference per-token loss: -log p(target) at each position (B, T), 0 where the target is -100."""
    logits = model(idx, kv_cache)  # (B, T, V)
    return F.cross_entropy(at_least_float32(logits).transpose(1, 2), targets, ignore_index=-100, reduction="none")


def at_least_float32(x):  # half precision's logits to float32 for the softmax; float64 stays float64
    return x.to(torch.promote_types(x.dtype, torch.float32))


def batch_loss(model, method, idx, targets, labels, loss=lm_loss):
    """Each text's loss given its own label: the method applied with that label alone (a one-hot mix)."""
    run, cache = method.apply(model, F.one_hot(labels, method.n_labels).float())
    return loss(run, idx, targets, cache)


def contrastive_loss(model, method, idx, targets, labels, weight, nll=token_nll):
    """The LM loss plus `weight` times a contrastive term (Qian et al., ACL Findings 2022, "Controllable Natural
    Language Generation with Contrastive Prefixes"): every text is scored under every label's prefix, in one batch
    of n_labels * B rows, and asked to be likelier under its own label's than under the others':

        s_k    = (1 / n_tokens) sum_t log p(x_t | x_<t, prefix_k)            each text's mean log-likelihood, (B, n)
        loss   = LM loss under the own label + weight * cross_entropy(s, label)

    The LM loss is batch_loss's (the same own-label rows); s is what the held-out steering measure compares."""
    B, n = idx.size(0), method.n_labels
    every = torch.arange(n, device=idx.device).repeat_interleave(B)  # (n*B,): rows k*B .. k*B+B-1 under label k
    run, cache = method.apply(model, F.one_hot(every, n).float())
    per_text = nll(run, idx.repeat(n, 1), targets.repeat(n, 1), cache).sum(1).view(n, B)  # summed losses (n, B)
    count = (targets != -100).sum(1)  # (B,) target tokens per text
    lm = per_text.gather(0, labels[None]).sum() / count.sum()  # mean over the batch's tokens, own label: lm_loss's
    s = -(per_text / count).t()  # (B, n): mean log-likelihood per token of each text under each label
    return lm + weight * F.cross_entropy(s, labels)


@torch.no_grad()
def evaluate(model, method, items, batch_size, device, nll=token_nll):
    """The held-out pass -> {"loss": mean loss per target token under each text's own label, and with two or more
    labels "steer_acc", "steer_margin"}.

    The steering measure reads each label's prefix as a classifier: every text is scored under every label (one
    more forward per text and extra label), and its per-token loss under its own label is compared with the
    lowest under another. steer_acc: the share of texts their own label explains best; steer_margin: the mean,
    over texts, of (lowest other loss - own loss) in nats per token. Both 0-ish when the prefixes are alike."""
    total, count, wins, margins = 0.0, 0, 0, []
    n_labels = method.n_labels if getattr(method, "steers", False) else 1
    for idx, targets, y in batches(items, batch_size):
        idx, targets, y = idx.to(device), targets.to(device), y.to(device)
        n = (targets != -100).sum(1)  # (B,) target tokens per text
        if n_labels == 1:
            run, cache = method.apply(model, F.one_hot(y, method.n_labels).float())
            per_text = nll(run, idx, targets, cache).sum(1)  # (B,)
            total, count = total + per_text.sum().item(), count + n.sum().item()
            continue
        per_label = []
        for k in range(n_labels):  # every text under label k's prefix
            run, cache = method.apply(model, F.one_hot(torch.full_like(y, k), n_labels).float())
            per_label.append(nll(run, idx, targets, cache).sum(1))
        per_label = torch.stack(per_label, 1)  # (B, n_labels) summed loss of each text under each label
        own = per_label.gather(1, y[:, None])[:, 0]
        total, count = total + own.sum().item(), count + n.sum().item()
        others = per_label.scatter(1, y[:, None], float("inf")).min(1).values  # the best other label's
        wins += int((own < others).sum())
        margins += ((others - own) / n).tolist()
    result = {"loss": total / count}
    if n_labels > 1:
        result.update(steer_acc=wins / len(margins), steer_margin=sum(margins) / len(margins))
    return result


def selection(method, keep):
    """-> (the held-out figure that picks the kept epoch, True if higher is better). keep: "best" (the steering
    margin with two or more labels, else the loss), "loss" (the lowest held-out loss whatever the labels), "last"."""
    if keep == "last":
        return None, None
    if keep == "best" and getattr(method, "steers", False) and method.n_labels > 1:
        return "steer_margin", True
    return "loss", False


def state_path(out):  # where the state a run resumes from goes, beside the checkpoint
    return str(out).rstrip("/").removesuffix(".safetensors") + ".resume.pt"


def loss_plot_path(out):
    return str(out).rstrip("/").removesuffix(".safetensors") + ".loss.png"


def history_path(out):  # the numbers behind the loss plot: every step's loss, every held-out pass
    return str(out).rstrip("/").removesuffix(".safetensors") + ".history.json"


class NothingToResume(Exception):
    """--resume on a run that has already done every epoch asked for."""


def read_resume_state(out, run, epochs):
    """The state saved beside `out`, refused if it belongs to another run: names every setting that differs.
    epochs may differ (a longer run extends this one); fewer epochs than already done, or as many, are refused."""
    path = state_path(out)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no saved state at {path} (a run writes it after each finished epoch and "
                                f"removes it when it has finished all its epochs, unless --keep-resume-state)")
    state = torch.load(path, weights_only=True)
    differ = [f"{key} = {state['run'].get(key)!r}, this one asks for {value!r}" for key, value in run.items()
              if key != "epochs" and state["run"].get(key) != value]
    if differ:
        raise ValueError(f"--resume: {path} is a run with " + "; ".join(differ) + ". Resume with the same settings, "
                         "or start afresh without --resume")
    if epochs <= state["epoch"]:
        raise NothingToResume(f"--resume: {path} has finished {state['epoch']} epochs of {state['run']['epochs']}: "
                              f"nothing left to do for --epochs {epochs}; give a larger --epochs to train on")
    return state


def schedule(step, total, warmup=0):
    """The learning rate's factor at a step: linear warm-up from 0 over `warmup` steps, then linear decay to 0 at
    `total` (HF's get_linear_schedule_with_warmup, which the paper's code and the LoRA paper's use)."""
    if step < warmup:
        return step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model, method, train_items, val_items, labels, out, epochs=5, batch_size=2, lr=5e-5, seed=0,
          device="cpu", info=None, keep="best", resume=False, group_by_length=False, run=None, weight_decay=0.0,
          warmup=0, keep_state=False, max_steps=None, eval_every=None, contrastive=0.0, log=tqdm.write):
    """Trains `method` (minprefix/method.py) in place; writes to `out` and beside it. run: the settings that make
    a run (data, base model, hyperparameters); a resumed run must have the same, but may ask for more epochs.
    max_steps: stop there (the schedule decays to 0 there), whatever the epochs; eval_every: the held-out pass
    every N steps (and at the end) instead of after each epoch, as the paper's low-data runs keep the best of
    them (its early stopping). contrastive: the weight of contrastive_loss's term (two or more labels that steer).
    -> history: {"step_loss", "val" (the held-out passes), "val_loss", "steps_per_epoch", "kept_epoch",
    "kept_step", "selected_by", "interrupted", "resumed_at", "finished"}"""
    if keep not in ("best", "loss", "last"):
        raise ValueError(f"keep must be 'best', 'loss' or 'last', got {keep!r}")
    if contrastive and not (getattr(method, "steers", False) and method.n_labels > 1):
        raise ValueError(f"the contrastive term asks each text to be likelier under its own label than under the "
                         f"others: it needs two or more labels to steer by; this {method.kind} has {method.n_labels}")
    if contrastive < 0:
        raise ValueError(f"the contrastive weight must be >= 0, got {contrastive}")
    device = torch.device(device)
    steps_per_epoch = math.ceil(len(train_items) / batch_size)
    if max_steps is not None:
        epochs = math.ceil(max_steps / steps_per_epoch)
    total = max_steps or epochs * steps_per_epoch
    run = dict(run or {}, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, group_by_length=group_by_length,
               weight_decay=weight_decay, warmup=warmup, max_steps=max_steps, eval_every=eval_every,
               contrastive=contrastive or None)
    loss_fn, nll_fn = (fast.lm_loss, fast.token_nll) if fast.enabled() else (lm_loss, token_nll)
    if fast.enabled():
        fast.keep_freed_memory()
        fast.for_training(model, method)
    model.requires_grad_(False)
    method.requires_grad_(True)  # fine-tuning's method holds the model itself: every weight
    trainable = [p for p in method.parameters() if p.requires_grad]
    # The paper uses no weight decay: it would pull a prefix's keys and values toward zero, which means nothing.
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, warmup))
    gen = torch.Generator().manual_seed(seed)
    metric, higher = selection(method, keep)
    history = {"step_loss": [], "val": [], "val_loss": [], "steps_per_epoch": steps_per_epoch, "kept_epoch": None,
               "kept_step": None, "selected_by": metric or "last", "interrupted": False, "resumed_at": None,
               "finished": False}
    first = 1
    if resume:
        state = read_resume_state(out, run, epochs)
        method.load_state_dict(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["data_order"])
        torch.set_rng_state(state["rng"])
        history.update(json.loads(state["history"]), resumed_at=state["epoch"])
        first = state["epoch"] + 1
        log(f"resuming after epoch {state['epoch']} of {epochs} from {state_path(out)}")
        if epochs != state["run"]["epochs"]:
            step = state["epoch"] * steps_per_epoch
            log(f"extending the run from {state['run']['epochs']} to {epochs} epochs: the learning rate now follows "
                f"the {epochs}-epoch schedule, {lr * schedule(step, total, warmup):.3g} at step "
                f"{step} (it was {opt.param_groups[0]['lr']:.3g}), linearly to 0 at step {total}")
            for group in opt.param_groups:  # LambdaLR keeps the old epoch's lr until its next step
                group["lr"] = lr * schedule(step, total, warmup)

    def save(epoch, val=None, interrupted=False):  # the checkpoint users load: a prefix, a LoRA or a model folder
        steps = history["step_loss"][-steps_per_epoch:]
        val = val or {}
        meta = dict(info or {}, epoch=epoch, step=len(history["step_loss"]),
                    epochs_done=round(len(history["step_loss"]) / steps_per_epoch, 3),
                    steps=len(history["step_loss"]), interrupted=interrupted, lr=lr, batch_size=batch_size, seed=seed,
                    val_loss=val.get("loss"), steer_acc=val.get("steer_acc"), steer_margin=val.get("steer_margin"),
                    selected_by=history["selected_by"], train_loss=sum(steps) / max(1, len(steps)),
                    contrastive=contrastive)
        method.save(out, model, labels, meta)

    def save_state(epoch):  # what --resume needs, after a finished epoch
        state = {"run": run, "epoch": epoch, "trainable": method.state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "data_order": gen.get_state(), "rng": torch.get_rng_state(),
                 "history": json.dumps(history)}
        with atomic_path(state_path(out)) as tmp:
            torch.save(state, tmp)

    def check(epoch):  # the held-out pass, and what follows from it
        val = dict(evaluate(model, method, val_items, batch_size, device, nll_fn), step=len(history["step_loss"]),
                   epoch=epoch)
        history["val"].append(val)
        history["val_loss"].append(val["loss"])
        scores = [v[metric] for v in history["val"]] if metric else None
        kept = metric is None or val[metric] == (max(scores) if higher else min(scores))
        if kept:
            history.update(kept_epoch=epoch, kept_step=val["step"])
            save(epoch, val)
        save_loss_plot(history, loss_plot_path(out))
        with atomic_path(history_path(out)) as tmp:
            with open(tmp, "w") as f:
                json.dump(history, f)
        kept_val = next(v for v in history["val"] if v["step"] == history["kept_step"])
        done = history["step_loss"][-steps_per_epoch:]
        where = f"epoch {epoch}" + (f", step {val['step']}" if eval_every else "")
        return (f"{where}: train loss {sum(done) / len(done):.4f}  held-out loss {val['loss']:.4f}"
                + (f"  steering: {val['steer_acc']:.0%} of texts best explained by their own label, margin "
                   f"{val['steer_margin']:+.4f} nats/token" if "steer_acc" in val else "")
                + ("  (kept)" if kept else f"  (keeping step {kept_val['step']}: {metric} {kept_val[metric]:.4f})"))

    epoch = finished = first - 1
    last_saved = (first - 1) * steps_per_epoch
    bar = tqdm(total=total - (first - 1) * steps_per_epoch, dynamic_ncols=True, unit="step")  # ETA: the whole run
    try:
        for epoch in range(first, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            running = None
            for idx, targets, y in batches(train_items, batch_size, shuffle=True, generator=gen,
                                           group_by_length=group_by_length):
                idx, targets, y = idx.to(device), targets.to(device), y.to(device)
                if contrastive:
                    loss = contrastive_loss(model, method, idx, targets, y, contrastive, nll_fn)
                else:
                    loss = batch_loss(model, method, idx, targets, y, loss_fn)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                history["step_loss"].append(loss.item())
                running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
                bar.set_postfix(loss=f"{running:.3f}")
                bar.update()
                step = len(history["step_loss"])
                if eval_every and (step % eval_every == 0 or step == total):
                    log(check(epoch))
                if step >= total:
                    break
            line = None if eval_every else check(epoch)
            step = len(history["step_loss"])
            if step >= total or not eval_every or step - last_saved >= eval_every:  # not every tiny epoch
                save_state(epoch)
                last_saved = step
            finished = epoch
            if line:  # said once the epoch is saved: Ctrl-C after this line resumes after this epoch
                log(line)
            if step >= total:
                break
        history["finished"] = True
        with atomic_path(history_path(out)) as tmp:
            with open(tmp, "w") as f:
                json.dump(history, f)
        if not keep_state:
            os.remove(state_path(out))
    except KeyboardInterrupt:
        history["interrupted"] = True
        if history["kept_epoch"] is None:  # nothing finished yet: keep the steps taken rather than nothing
            save(epoch, interrupted=True)
            log(f"interrupted in epoch {finished + 1}: the {method.kind} so far is saved in {out}")
        else:
            log(f"interrupted in epoch {finished + 1}: {out} was left as it was, holding epoch "
                f"{history['kept_epoch']}; --resume continues after epoch {finished}")
    finally:
        bar.close()
    return history


def save_loss_plot(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    steps = history["step_loss"]
    if not steps:
        return
    k = max(1, len(steps) // 50)  # a moving average over ~2% of the run makes the trend readable
    smooth = [sum(steps[max(0, i - k + 1):i + 1]) / len(steps[max(0, i - k + 1):i + 1]) for i in range(len(steps))]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    ax.plot(range(1, len(steps) + 1), steps, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
    ax.plot(range(1, len(steps) + 1), smooth, color="tab:blue", lw=1.5, label=f"train (mean of {k} steps)")
    n = history["steps_per_epoch"]
    val = history.get("val") or [{"loss": v} for v in history["val_loss"]]
    ends = [v.get("step", n * e) for e, v in enumerate(val, start=1)]  # where each held-out pass was
    ax.plot(ends, [v["loss"] for v in val], "o-", color="tab:orange", label="held-out loss (per epoch)", zorder=4)
    lines = ax.get_legend_handles_labels()
    if "steer_margin" in val[0]:  # the steering measure on its own axis
        ax2 = ax.twinx()
        ax2.plot(ends, [v["steer_margin"] for v in val], "s--", color="tab:green", ms=5,
                 label="steering margin (nats/token, right)")
        ax2.set_ylabel("held-out steering margin (nats per token)", color="tab:green")
        h2, l2 = ax2.get_legend_handles_labels()
        lines = (lines[0] + h2, lines[1] + l2)
    if history.get("kept_epoch"):  # a hollow star around the kept pass's point, which stays visible inside it
        e = history["kept_epoch"]
        i = ends.index(history["kept_step"]) if history.get("kept_step") in ends else e - 1
        ax.plot([ends[i]], [val[i]["loss"]], "*", ms=22, mfc="none", mec="tab:red", mew=1.8, zorder=5,
                label=f"kept: epoch {e}" + (f", step {ends[i]}" if ends[i] != n * e else "")
                      + f" ({history.get('selected_by', 'loss')})")
        h, l = ax.get_legend_handles_labels()
        lines = (lines[0] + h[-1:], lines[1] + l[-1:])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(0.5, len(steps) + 0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title("training loss")
    ax.legend(*lines, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
