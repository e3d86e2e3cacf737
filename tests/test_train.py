"""The training loop in-process: resuming, keeping the best epoch, the schedule, fine-tuning's saved model,
and the conditional (source -> text) loss."""
import json
import os

import pytest
import torch

import minprefix.trainer as trainer
from conftest import assert_near
from minprefix import GPT2, Tokenizer
from minprefix.data import Example, batches, encode
from minprefix.prefix import load_prefix
from minprefix.method import FineTune, build
from minprefix.trainer import read_resume_state, state_path, train

LABELS = ["positive", "negative"]


@pytest.fixture(scope="module")
def items():
    tok = Tokenizer()
    texts = ["The labs were great and the mentors kind.", "The food was cold and the rooms were noisy.",
             "I learned more in a week than in a term.", "Nobody answered our emails about the grants.",
             "The poster session was lively.", "The wifi never worked."]
    examples = [Example(t, LABELS[i % 2], f"t:{i}") for i, t in enumerate(texts)]
    return encode(examples, tok, LABELS, 1000)


def fresh_prefix(model, mlp=True):
    torch.manual_seed(0)
    return build("kv", model, LABELS, Tokenizer(), 4, mlp)


def run(model, prefix, items, out, **kw):
    kw = dict(dict(epochs=3, batch_size=2, lr=1e-3, seed=5, keep="last", run={"data": "t"}), **kw)
    return train(model, prefix, items, items[:2], LABELS, out, **kw)


SETUPS = [("kv", True, "last"), ("kv", False, "best"), ("embedding", False, "best"), ("lora", False, "last"),
          ("finetune", False, "best")]


def fresh(setup, offline_model_dir, shared_model):
    """-> (model, method): a model of its own for fine-tuning (trained in place), the shared frozen one otherwise."""
    mode, mlp, _ = setup
    model = GPT2.from_pretrained(offline_model_dir) if mode == "finetune" else shared_model
    torch.manual_seed(0)
    return model, build(mode, model, LABELS, Tokenizer(), 4, mlp)


def trained_state(method):
    return {k: v.detach().clone() for k, v in method.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: f"{s[0]}{'+mlp' if s[1] else ''}-keep-{s[2]}")
def test_resumed_run_ends_where_the_uninterrupted_one_does(setup, offline_model_dir, offline_model, items, tmp_path,
                                                           monkeypatch):
    """Every method, both keep rules: Ctrl-C in epoch 2's held-out pass, then --resume in a fresh process (a fresh
    method, whatever it holds replaced by the saved state) ends with what the uninterrupted run ends with."""
    keep = setup[2]
    model, whole = fresh(setup, offline_model_dir, offline_model)
    run(model, whole, items, tmp_path / "whole", keep=keep)

    model, stopped = fresh(setup, offline_model_dir, offline_model)
    evaluate, calls = trainer.evaluate, []

    def interrupt_in_epoch_2(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)
    monkeypatch.setattr(trainer, "evaluate", interrupt_in_epoch_2)
    out = tmp_path / "resumed"
    history = run(model, stopped, items, out, keep=keep)
    assert history["interrupted"] and history["kept_epoch"] == 1 and not history["finished"]
    assert torch.load(state_path(out), weights_only=True)["epoch"] == 1
    monkeypatch.setattr(trainer, "evaluate", evaluate)

    model, resumed = fresh(setup, offline_model_dir, offline_model)
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    history = run(model, resumed, items, out, resume=True, keep=keep)
    assert history["resumed_at"] == 1 and len(history["val"]) == 3 and history["finished"]
    a, b = trained_state(whole), trained_state(resumed)
    assert a.keys() == b.keys()
    for k in a:  # the same float32 steps; rounding only where a kernel's summation order differs between runs
        assert_near(b[k], a[k], 1e-6, k)
    assert not os.path.exists(state_path(out))  # a finished run leaves no resume state


def test_resume_refuses_another_run_naming_every_difference(offline_model, items, tmp_path):
    out = tmp_path / "p.safetensors"
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=1, keep_state=True)
    with pytest.raises(ValueError) as e:
        run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, resume=True, epochs=2, lr=2e-3,
            batch_size=3, seed=6, run={"data": "other"})
    for name in ("lr = 0.001, this one asks for 0.002", "batch_size = 2", "seed = 5", "data = 't'"):
        assert name in str(e.value), (name, str(e.value))
    assert "epochs" not in str(e.value)  # more epochs extend a run: not a difference
    with pytest.raises(FileNotFoundError, match="no saved state"):
        read_resume_state(tmp_path / "nothing.safetensors", {}, 1)


def test_resume_says_there_is_nothing_to_do_and_extends_a_finished_run(offline_model, items, tmp_path, capsys):
    """A run kept its state (keep_state); --resume with as many epochs has nothing to do; with more it goes on, the
    learning rate following the longer run's schedule from the step it had reached."""
    out = tmp_path / "p.safetensors"
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=2, keep_state=True)
    with pytest.raises(trainer.NothingToResume, match="finished 2 epochs of 2: nothing left to do"):
        run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=2, resume=True)
    seen, step = [], torch.optim.AdamW.step

    def record(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)
    torch.optim.AdamW.step = record
    try:
        history = run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=4, resume=True)
    finally:
        torch.optim.AdamW.step = step
    assert history["resumed_at"] == 2 and len(history["val"]) == 4 and history["kept_epoch"] == 4
    assert seen == pytest.approx([1e-3 * (1 - s / 12) for s in range(6, 12)])  # 4 epochs of 3 steps: steps 6..11
    assert "extending the run from 2 to 4 epochs" in capsys.readouterr().out
    assert not os.path.exists(state_path(out))


def fake_pass(values):
    """A held-out pass that returns the given figures epoch after epoch, and records the method's state."""
    values, states = iter(values), []

    def evaluate(model, method, *a, **kw):
        states.append(trained_state(method))
        return next(values)
    return evaluate, states


@pytest.mark.slow
def test_keep_best_keeps_the_epoch_the_selection_rule_names(offline_model, items, tmp_path, monkeypatch):
    """Two labels: --keep best keeps the epoch with the highest steering margin, whatever the loss says; --keep
    loss the lowest held-out loss; --keep last the last."""
    passes = [{"loss": 3.0, "steer_acc": 0.5, "steer_margin": 0.01}, {"loss": 2.0, "steer_acc": 0.6, "steer_margin": 0.02},
              {"loss": 2.5, "steer_acc": 0.7, "steer_margin": 0.05}, {"loss": 2.2, "steer_acc": 0.6, "steer_margin": 0.03}]
    for keep, epoch in (("best", 3), ("loss", 2), ("last", 4)):
        fake, states = fake_pass(passes)
        monkeypatch.setattr(trainer, "evaluate", fake)
        out = tmp_path / f"{keep}.safetensors"
        history = run(offline_model, fresh_prefix(offline_model), items, out, keep=keep, epochs=4)
        assert history["kept_epoch"] == epoch
        assert history["selected_by"] == {"best": "steer_margin", "loss": "loss", "last": "last"}[keep]
        prefix, meta = load_prefix(out)
        info = meta["info"]
        assert info["epoch"] == epoch and info["steer_margin"] == passes[epoch - 1]["steer_margin"]
        assert info["val_loss"] == passes[epoch - 1]["loss"] and info["selected_by"] == history["selected_by"]
        kept_state = states[epoch - 1]
        with torch.no_grad():
            table = torch.stack([mlp() for mlp in fresh_mlps(kept_state)])
        # the prefix as it was after that epoch (the saved table through the MLP again: the same sums)
        assert_near(prefix.table().view_as(table), table, 1e-6, f"epoch {epoch}'s table")


def fresh_mlps(state):
    prefix = build("kv", GPT2Stub, LABELS, None, 4, True)
    prefix.load_state_dict(state)
    return prefix.mlp


class GPT2Stub:  # what build() needs of a model to make an MLP prefix: its config and device
    from minprefix.gpt2 import GPTConfig
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256)
    device = torch.device("cpu")


def test_keep_best_with_one_label_keeps_the_lowest_held_out_loss(offline_model, items, tmp_path, monkeypatch):
    one = [(ids, start, 0) for ids, start, _ in items]
    fake, _ = fake_pass([{"loss": 3.0}, {"loss": 2.0}, {"loss": 2.5}])
    monkeypatch.setattr(trainer, "evaluate", fake)
    torch.manual_seed(0)
    prefix = build("kv", offline_model, ["task"], Tokenizer(), 4, True)
    history = train(offline_model, prefix, one, one[:2], ["task"], tmp_path / "t.safetensors", epochs=3, lr=1e-3,
                    keep="best")
    assert history["kept_epoch"] == 2 and history["selected_by"] == "loss"


@pytest.mark.slow
def test_steering_measure_ranks_a_prefix_trained_on_swapped_labels_below_the_right_one(offline_model, items,
                                                                                      tmp_path):
    swapped = [(ids, start, 1 - y) for ids, start, y in items]
    got = {}
    for name, data in (("right", items), ("swapped", swapped)):
        prefix = fresh_prefix(offline_model, mlp=False)
        run(offline_model, prefix, data, tmp_path / f"{name}.safetensors", epochs=4, lr=5e-3, run={"data": name})
        got[name] = trainer.evaluate(offline_model, prefix, items, 4, "cpu", trainer.token_nll)  # the true labels
    assert got["right"]["steer_margin"] > 0 > got["swapped"]["steer_margin"]
    assert got["right"]["steer_acc"] > got["swapped"]["steer_acc"]


def test_held_out_pass_scores_each_text_under_every_label(offline_model, items):
    """The steering measure by hand: every text's per-token loss under each label's prefix, from the reference
    loss; and the fast path's pass gives the same figures."""
    from minprefix import fast
    from minprefix.trainer import batch_loss, evaluate, token_nll
    prefix = fresh_prefix(offline_model, mlp=False)
    with torch.no_grad():
        prefix.table_.add_(0.5 * torch.randn_like(prefix.table_))
        wins, margins, total, count = 0, [], 0.0, 0
        for ids, start, y in items:
            (idx, targets, _), = batches([(ids, start, y)], 1)
            n = int((targets != -100).sum())
            losses = [batch_loss(offline_model, prefix, idx, targets, torch.tensor([k])).item() for k in range(2)]
            total, count = total + losses[y] * n, count + n
            wins += losses[y] < losses[1 - y]
            margins.append(losses[1 - y] - losses[y])
    for nll in (token_nll, fast.token_nll):
        got = evaluate(offline_model, prefix, items, 4, "cpu", nll)
        # batch of 4 against 1, summed over texts in another order: float32 rounding, ~1e-6 of the loss
        assert got["loss"] == pytest.approx(total / count, rel=1e-5)
        assert got["steer_acc"] == wins / len(items)
        # a difference of two such losses (~5 nats each): their rounding, relative to the losses, not the margin
        assert got["steer_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-5 * total / count)


def test_learning_rate_decays_linearly_to_zero(offline_model, items, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def record(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, tmp_path / "p.safetensors", lr=0.01)
    n = 3 * 3  # 3 epochs of 3 batches
    assert seen == pytest.approx([0.01 * (1 - s / n) for s in range(n)])
    seen.clear()
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, tmp_path / "w.safetensors", lr=0.01, warmup=3)
    assert seen == pytest.approx([0.01 * f for f in (0, 1 / 3, 2 / 3, 1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6)])  # HF's
    from minprefix.trainer import schedule
    assert [schedule(s, 4, 4) for s in range(6)] == [0, 0.25, 0.5, 0.75, 0, 0]  # warm-up as long as the run


def test_conditional_loss_covers_only_the_text_and_its_end():
    """The paper's layout: ` {table} ` <|endoftext|> ` {text} ` <|endoftext|>; no loss on the table."""
    tok = Tokenizer()
    e = Example("The Eagle is a pub .", "task", "e2e:1", "name : The Eagle | Type : pub")
    (ids, start, label), = encode([e], tok, ["task"], 1024)
    source = tok.encode(" name : The Eagle | Type : pub ")
    text = tok.encode(" The Eagle is a pub . ")
    assert ids == source + [tok.eot] + text + [tok.eot] and start == len(source) + 1 and label == 0
    (idx, targets, _), = batches([(ids, start, label)], 1)
    assert (targets[0, :len(source)] == -100).all()  # predicting the table or the separator: no loss
    assert targets[0, len(source):].tolist() == text + [tok.eot]  # from the separator on: the text, then the end


def test_group_by_length_makes_batches_of_similar_length():
    items = [([0] * n, 1, 0) for n in torch.randint(3, 60, (400,), generator=torch.Generator().manual_seed(0)).tolist()]
    pad = lambda **kw: sum(int((t == -100).sum()) for _, t, _ in batches(items, 4, shuffle=True,
                                                                       generator=torch.Generator().manual_seed(1), **kw))
    assert pad(group_by_length=True) < 0.2 * pad()
    seen = sorted(len(ids) for idx, t, _ in batches(items, 4, shuffle=True, generator=torch.Generator().manual_seed(1),
                                                    group_by_length=True) for ids in idx.tolist())
    assert len(seen) == 400  # every example once


def test_fine_tuned_model_loads_in_minprefix_and_transformers(offline_model_dir, items, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = GPT2.from_pretrained(offline_model_dir)
    folder = tmp_path / "ft"
    history = train(model, FineTune(model, 2), items, items[:2], LABELS, str(folder), epochs=1, batch_size=3, lr=1e-4)
    assert history["kept_epoch"] == 1
    base = GPT2.from_pretrained(offline_model_dir)
    assert not torch.equal(model.h[0].mlp.c_fc.weight, base.h[0].mlp.c_fc.weight)  # every weight trained
    assert not torch.equal(model.wte.weight, base.wte.weight)
    ours = GPT2.from_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert_near(ours(idx), model(idx), 1e-5, "fine-tuned folder against the trained model")  # rounding only
        assert_near(ours(idx), hf(idx).logits, 1e-5, "fine-tuned folder in HF")  # other kernels: rounding
    assert json.loads((folder / "config.json").read_text())["minprefix"]["fine_tuned_from"] == os.path.abspath(offline_model_dir)


def test_max_steps_and_a_held_out_pass_every_n_steps(offline_model, items, tmp_path, monkeypatch):
    """The low-data protocol: stop at max_steps (the schedule reaching 0 there), a held-out pass every N steps and
    at the end, the kept checkpoint the best of those passes, whatever the epochs."""
    fake, states = fake_pass([{"loss": 3.0}, {"loss": 2.0}, {"loss": 2.5}])
    monkeypatch.setattr(trainer, "evaluate", fake)
    seen, step = [], torch.optim.AdamW.step

    def record(self, *a, **kw):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *a, **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    torch.manual_seed(0)
    prefix = build("kv", offline_model, ["task"], Tokenizer(), 4, True)
    one = [(ids, start, 0) for ids, start, _ in items]  # 6 texts, batch 2: 3 steps an epoch
    out = tmp_path / "s.safetensors"
    history = train(offline_model, prefix, one, one[:2], ["task"], out, epochs=99, max_steps=7, eval_every=3,
                    batch_size=2, lr=1e-3, keep="best")
    assert len(history["step_loss"]) == 7 and [v["step"] for v in history["val"]] == [3, 6, 7]
    assert history["kept_step"] == 6 and history["kept_epoch"] == 2 and history["finished"]
    assert seen == pytest.approx([1e-3 * (1 - s / 7) for s in range(7)])
    _, meta = load_prefix(out)
    assert meta["info"]["step"] == 6 and meta["info"]["val_loss"] == 2.0
    assert not os.path.exists(state_path(out))


def test_ctrl_c_names_the_epoch_the_saved_state_holds(offline_model, items, tmp_path, monkeypatch):
    """With a held-out pass every 5 steps and epochs of 3, the resume state is written after epochs 2 and 4 only
    (not after every tiny epoch): Ctrl-C in epoch 4 must name epoch 2, the one --resume continues after (issue 30:
    it said epoch 3, which was never saved)."""
    fake, _ = fake_pass([{"loss": 3.0}, {"loss": 2.0}])

    def second_pass_interrupts(*a, **kw):
        if second_pass_interrupts.calls == 1:
            raise KeyboardInterrupt
        second_pass_interrupts.calls += 1
        return fake(*a, **kw)
    second_pass_interrupts.calls = 0
    monkeypatch.setattr(trainer, "evaluate", second_pass_interrupts)
    torch.manual_seed(0)
    prefix = build("kv", offline_model, ["task"], Tokenizer(), 4, False)
    one = [(ids, start, 0) for ids, start, _ in items]  # 6 texts, batch 2: 3 steps an epoch
    out, said = tmp_path / "s.safetensors", []
    history = train(offline_model, prefix, one, one[:2], ["task"], out, epochs=6, eval_every=5, batch_size=2,
                    lr=1e-3, keep="best", log=said.append)
    assert history["interrupted"] and len(history["step_loss"]) == 10  # the pass at step 10, in epoch 4
    assert torch.load(state_path(out), weights_only=True)["epoch"] == 2
    assert "interrupted in epoch 4" in said[-1] and "--resume continues after epoch 2" in said[-1], said[-1]


def test_resume_after_a_finished_run_says_there_is_nothing_left(offline_model, items, tmp_path):
    """A finished run removes its resume state, but its history says it finished: --resume has nothing to do
    (issue 30: it said "no saved state"), and cannot extend it (the state it would need is gone)."""
    out = tmp_path / "p.safetensors"
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=2)
    assert not os.path.exists(state_path(out)) and trainer.read_history(out)["finished"]
    with pytest.raises(trainer.NothingToResume, match="finished all its 2 epochs: nothing left to do"):
        run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=2, resume=True)
    with pytest.raises(FileNotFoundError, match="cannot be extended to 3"):
        run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=3, resume=True)


def test_move_aside_keeps_every_earlier_run(tmp_path):
    """--overwrite's move: the checkpoint and what lies beside it, renamed to .previous, then .previous2, ...;
    a fine-tuned model's folder the same way."""
    from minprefix.trainer import history_path, loss_plot_path, move_aside
    out = tmp_path / "prefix.safetensors"
    for generation in ("first", "second"):
        for path in (out, history_path(out), loss_plot_path(out), state_path(out)):
            open(path, "w").write(generation)
        moved = move_aside(out)
        assert not any(os.path.exists(p) for p in (out, history_path(out), loss_plot_path(out), state_path(out)))
    assert moved[0] == str(tmp_path / "prefix.previous2.safetensors") and len(moved) == 4
    assert open(tmp_path / "prefix.previous.history.json").read() == "first"
    assert open(tmp_path / "prefix.previous2.resume.pt").read() == "second"
    folder = tmp_path / "finetuned"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert move_aside(str(folder) + "/") == [str(tmp_path / "finetuned.previous")]
    assert (tmp_path / "finetuned.previous" / "config.json").exists() and not folder.exists()
