"""The training loop in-process: resuming, keeping the best epoch, the schedule, fine-tuning's saved model,
and the conditional (source -> text) loss."""
import json
import os

import pytest
import torch

import minprefix.trainer as trainer
from minprefix import GPT2, Tokenizer
from minprefix.data import Example, batches, encode
from minprefix.prefix import load_prefix
from minprefix.trainer import build_prefix, read_resume_state, state_path, train

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
    return build_prefix("kv", model, LABELS, 4, mlp, Tokenizer())


def run(model, prefix, items, out, **kw):
    kw = dict(dict(epochs=3, batch_size=2, lr=1e-3, seed=5, keep="last", run={"data": "t"}), **kw)
    return train(model, prefix, items, items[:2], LABELS, out, **kw)


def test_resumed_run_ends_where_the_uninterrupted_one_does(offline_model, items, tmp_path, monkeypatch):
    whole = fresh_prefix(offline_model)
    run(offline_model, whole, items, tmp_path / "whole.safetensors")

    stopped = fresh_prefix(offline_model)
    evaluate, calls = trainer.evaluate, []

    def interrupt_in_epoch_2(*a, **kw):  # Ctrl-C during the second epoch's held-out pass
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **kw)
    monkeypatch.setattr(trainer, "evaluate", interrupt_in_epoch_2)
    out = tmp_path / "resumed.safetensors"
    history = run(offline_model, stopped, items, out)
    assert history["interrupted"] and history["kept_epoch"] == 1
    assert torch.load(state_path(out), weights_only=True)["epoch"] == 1
    monkeypatch.setattr(trainer, "evaluate", evaluate)

    resumed = fresh_prefix(offline_model)  # a new process would start from a fresh prefix too
    resumed.mlp[0].c_fc.weight.data.add_(1.0)  # and whatever it holds is replaced by the saved state
    history = run(offline_model, resumed, items, out, resume=True)
    assert history["resumed_at"] == 1 and len(history["val_loss"]) == 3 and not history["interrupted"]
    with torch.no_grad():
        d = (whole.table() - resumed.table()).abs().max().item()
    assert d <= 1e-6, d
    a, _ = load_prefix(tmp_path / "whole.safetensors")
    b, _ = load_prefix(out)
    assert (a.table() - b.table()).abs().max().item() <= 1e-6


def test_resume_refuses_another_run_by_name(offline_model, items, tmp_path):
    out = tmp_path / "p.safetensors"
    run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, epochs=1)
    for change, name in ((dict(lr=2e-3), "lr"), (dict(batch_size=3), "batch_size"), (dict(epochs=2), "epochs"),
                         (dict(run={"data": "other"}), "data"), (dict(seed=6), "seed")):
        with pytest.raises(ValueError, match=f"{name} = .*this one asks for"):
            run(offline_model, fresh_prefix(offline_model, mlp=False), items, out, resume=True,
                **dict(dict(epochs=1), **change))
    with pytest.raises(FileNotFoundError, match="no saved state"):
        read_resume_state(tmp_path / "nothing.safetensors", {})


def test_keep_best_keeps_the_epoch_with_the_lowest_held_out_loss(offline_model, items, tmp_path, monkeypatch):
    losses, tables = iter([3.0, 2.0, 2.5]), []

    def fake_evaluate(model, prefix, *a, **kw):  # held-out losses that dip at epoch 2
        with torch.no_grad():
            tables.append(prefix.table().clone())
        return next(losses)
    monkeypatch.setattr(trainer, "evaluate", fake_evaluate)
    for keep, epoch in (("best", 2), ("last", 3)):
        losses = iter([3.0, 2.0, 2.5])
        tables.clear()
        out = tmp_path / f"{keep}.safetensors"
        history = run(offline_model, fresh_prefix(offline_model), items, out, keep=keep)
        assert history["kept_epoch"] == epoch
        prefix, meta = load_prefix(out)
        assert meta["info"]["epoch"] == epoch and meta["info"]["val_loss"] == [3.0, 2.0, 2.5][epoch - 1]
        assert torch.equal(prefix.table(), tables[epoch - 1])  # the table as it was after that epoch
        assert not torch.equal(tables[1], tables[2])


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
    history = train(model, None, items, items[:2], ["task"], str(folder), epochs=1, batch_size=3, lr=1e-4)
    assert history["kept_epoch"] == 1
    base = GPT2.from_pretrained(offline_model_dir)
    assert not torch.equal(model.h[0].mlp.c_fc.weight, base.h[0].mlp.c_fc.weight)  # every weight trained
    assert not torch.equal(model.wte.weight, base.wte.weight)
    ours = GPT2.from_pretrained(folder)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        assert (ours(idx) - model(idx)).abs().max().item() <= 1e-5
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4
    assert json.loads((folder / "config.json").read_text())["minprefix"]["fine_tuned_from"] == os.path.abspath(offline_model_dir)
