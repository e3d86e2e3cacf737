"""LoRA, the reference: the paper's equation by hand, merged equals unmerged, one-hot mixes equal one adapter,
rows with different mixes, gradients, checkpoints. (PEFT parity: tests/test_peft_lora.py.)"""
import math

import pytest
import torch

from conftest import EOT, assert_near
from minprefix import GPT2, Tokenizer, fast
from minprefix.lora import LoRA, key, load_lora, save_lora
from minprefix.method import build, load
from minprefix.prefix import label_weights
from minprefix.trainer import batch_loss, train

LABELS = ["positive", "negative"]
ALL = ("q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def random_lora(model, targets=("q", "v"), n_labels=2, rank=4, alpha=32, seed=0):
    """B starts at zero, which would hide every mistake: here both A and B are random."""
    torch.manual_seed(seed)
    lora = LoRA(model.config, n_labels, rank, alpha, targets)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return lora.requires_grad_(False)


def tokens():
    tok = Tokenizer()
    return torch.tensor([[tok.eot] + tok.encode("The mentors were patient and the labs were well prepared.")] * 2)


def test_starts_as_the_base_model_and_a_is_initialized_as_peft_does(offline_model):
    torch.manual_seed(0)
    lora = LoRA(offline_model.config, 2, 4, 32, ALL)
    idx = tokens()
    with torch.no_grad():
        run, cache = lora.apply(offline_model, label_weights(2, alpha=0.3).repeat(2, 1))
        assert cache is None and torch.equal(run(idx), offline_model(idx))
        for t in ALL:  # kaiming-uniform with a = sqrt(5) on (r, in): bound 1 / sqrt(in)
            A = lora.h[0][key(t)].A
            bound = 1 / math.sqrt(A.size(-1))
            assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound and not lora.h[0][key(t)].B.any()


def test_the_papers_equation_on_the_query_and_value_rows(offline_model):
    """c_attn's output under a q, v LoRA is W x + (alpha / r) B A x on the query and the value rows, and W x alone
    on the key rows; a mix of labels adds sum_i w_i (alpha / r) B_i A_i x."""
    lora = random_lora(offline_model, ("q", "v"))
    C = offline_model.config.n_embd
    w = torch.tensor([[0.3, 0.7]])
    run = lora.unmerged(offline_model, w)
    x = torch.randn(1, 5, C)
    base = offline_model.h[2].attn.c_attn
    with torch.no_grad():
        got = run.h[2].attn.c_attn(x)
        plain = base(x)
        want = plain.clone()
        for t, rows in (("q", slice(0, C)), ("v", slice(2 * C, 3 * C))):
            pair = lora.h[2][key(t)]
            for i in range(2):
                want[..., rows] += w[0, i] * (32 / 4) * x @ (pair.B[i] @ pair.A[i]).t()
    assert_near(got, want, 1e-5, "c_attn under LoRA against the equation")  # (B A) x against B (A x): rounding
    assert torch.equal(got[..., C:2 * C], plain[..., C:2 * C])  # no key pair: the keys are the base model's


@pytest.mark.parametrize("targets", [("q", "v"), ALL, ("c_attn",)], ids=["qv", "all", "c_attn"])
def test_merged_equals_unmerged_and_the_base_model_is_left_as_it_was(offline_model, targets):
    lora = random_lora(offline_model, targets)
    before = {k: v.clone() for k, v in offline_model.state_dict().items()}
    idx = tokens()
    w = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        merged = lora.merged(offline_model, w)(idx)
        unmerged = lora.unmerged(offline_model, w[None])(idx)
        applied = lora.apply(offline_model, w.repeat(2, 1))[0](idx)  # no gradient, one mix: merged
    # (W + dW) x against W x + dW x: float32 rounding of the sum W + dW, ~1e-6 of the logits after the layers
    assert_near(merged, unmerged, 1e-5, f"merged against unmerged ({', '.join(targets)})")
    assert torch.equal(applied, merged)
    assert (merged - offline_model(idx)).abs().max().item() > 0.1  # and the LoRA does change the logits
    assert all(torch.equal(v, before[k]) for k, v in offline_model.state_dict().items())


def test_a_one_hot_mix_equals_that_label_alone(offline_model):
    lora = random_lora(offline_model, ALL)
    alone = LoRA(offline_model.config, 1, 4, 32, ALL)
    with torch.no_grad():
        for ours, one in zip(lora.parameters(), alone.parameters()):
            one.copy_(ours[1:2])  # label 1's pairs alone
    idx = tokens()
    with torch.no_grad():
        for form in ("merged", "unmerged"):
            w = torch.tensor([0.0, 1.0])
            a = getattr(lora, form)(offline_model, w if form == "merged" else w[None])(idx)
            w1 = torch.tensor([1.0])
            b = getattr(alone, form)(offline_model, w1 if form == "merged" else w1[None])(idx)
            # the same pairs through einsums over 2 labels against 1 (a zero weight adds exact zeros; the sums'
            # blocking differs): float32 rounding only, ~1e-6 of the logits
            assert_near(a, b, 1e-5, form)


def test_rows_with_different_mixes_each_get_their_own(offline_model):
    lora = random_lora(offline_model, ("q", "v", "mlp.c_fc"))
    idx = tokens()
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8]])
    with torch.no_grad():
        both = lora.apply(offline_model, w)[0](idx)  # unmerged: the rows differ
        for r in range(2):
            alone = lora.merged(offline_model, w[r])(idx[r:r + 1])
            assert_near(both[r], alone[0], 1e-5, f"row {r} unmerged in a batch against merged alone")  # rounding


def test_the_fast_path_keeps_its_layout_when_merged(offline_model_dir, offline_model):
    model = fast.accelerate(GPT2.from_pretrained(offline_model_dir))
    lora = random_lora(model, ALL)
    idx = tokens()
    w = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        run = lora.merged(model, w)
        assert all(type(m) is fast.DecodeLinear and m.weight.is_contiguous()
                   for m in (run.h[0].attn.c_attn, run.h[0].mlp.c_proj))  # still the fast piece, its layout kept
        want = lora.merged(offline_model, w)(idx)
        assert_near(run(idx), want, 1e-5, "fast merged against reference merged")  # DecodeLinear's sums: rounding
        step = fast.generate(run, idx[:1], 12, temperature=0, eot=EOT)
        assert step == fast.generate(lora.unmerged(model, w[None]), idx[:1], 12, temperature=0, eot=EOT)


def test_only_the_pairs_learn(offline_model_dir):
    model = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)
    torch.manual_seed(0)
    lora = build("lora", model, LABELS, Tokenizer(), lora_targets=("q", "v", "mlp.c_proj"))
    idx = tokens()
    loss = batch_loss(model, lora.requires_grad_(True), idx[:, :-1], idx[:, 1:], torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    pair = lora.h[3][key("q")]
    assert pair.B.grad is not None and pair.B.grad.abs().sum() > 0  # B gets the gradient first (A x is not zero)
    assert pair.A.grad.abs().sum() == 0  # while B is zero, d loss / d A = B^T (...) is zero, as in the paper


def test_training_lowers_the_loss_of_each_label(offline_model, tmp_path):
    from minprefix.data import Example, encode
    tok = Tokenizer()
    texts = {"positive": "The labs were wonderful and the mentors kind.", "negative": "The food was awful and cold."}
    items = encode([Example(t, l, "t") for l, t in texts.items()] * 4, tok, LABELS, 1000)
    torch.manual_seed(0)
    lora = build("lora", offline_model, LABELS, tok)
    history = train(offline_model, lora, items, items[:2], LABELS, tmp_path / "l.safetensors", epochs=3,
                    batch_size=2, lr=3e-3, keep="last")
    assert history["val"][-1]["loss"] < history["val"][0]["loss"] - 0.2
    assert history["val"][-1]["steer_acc"] == 1.0  # each text explained best by its own label's pairs
    back, meta = load(tmp_path / "l.safetensors", offline_model)
    assert meta["mode"] == "lora" and meta["labels"] == LABELS and meta["targets"] == ["q", "v"]
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), lora.state_dict().values()))


def test_checkpoint_round_trip_and_refusals(offline_model, tmp_path):
    lora = random_lora(offline_model, ALL, rank=3, alpha=12)
    path = tmp_path / "l.safetensors"
    n = save_lora(path, lora, offline_model.name_or_path, LABELS, {"note": "x"})
    assert n == sum(p.numel() for p in lora.parameters())
    back, meta = load_lora(path, offline_model)
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["info"]) == (3, 12.0, list(ALL), {"note": "x"})
    assert all(torch.equal(a, b) for a, b in zip(back.parameters(), lora.parameters()))
    from minprefix.gpt2 import GPTConfig
    other = GPT2(GPTConfig(n_layer=2, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="was trained for base model"):
        load_lora(path, other)
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=dict(meta, targets='["q", "lm_head"]'))
    with pytest.raises(ValueError, match="unknown LoRA target 'lm_head'"):
        load_lora(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="unknown LoRA target 'x'"):
        LoRA(offline_model.config, 2, 4, 32, ("q", "x"))
    with pytest.raises(ValueError, match="c_attn .* overlaps q"):
        LoRA(offline_model.config, 2, 4, 32, ("c_attn", "q"))


def test_beam_search_with_a_lora(offline_model):
    """One mix: the merged model in beam search, as the unmerged one with rows of one mix (which follows the beams)."""
    from minprefix.beam import beam_search
    lora = random_lora(offline_model)
    idx = tokens()[:1, :4]
    w = label_weights(2, alpha=0.7)
    with torch.no_grad():
        merged = beam_search(lora.apply(offline_model, w)[0], idx, 3, 10, eot=EOT)
        unmerged = beam_search(lora.unmerged(offline_model, w), idx, 3, 10, eot=EOT)
    assert merged == unmerged
    with pytest.raises(ValueError, match="decode rows of one mix together"):
        beam_search(lora.unmerged(offline_model, torch.tensor([[1.0, 0.0], [0.0, 1.0]])), tokens()[:, :4], 3, 4, eot=EOT)


def test_half_precision_model_float32_pairs(offline_model_dir):
    """--dtype bfloat16: the frozen model in bfloat16, the pairs (and their gradients) in float32, the loss close
    to float32's."""
    model = GPT2.from_pretrained(offline_model_dir, dtype=torch.bfloat16).requires_grad_(False)
    full = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)
    lora = random_lora(full, ("q", "v", "mlp.c_fc")).requires_grad_(True)
    idx = tokens()
    labels = torch.tensor([0, 1])
    half = batch_loss(model, lora, idx[:, :-1], idx[:, 1:], labels)
    half.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in lora.parameters())
    with torch.no_grad():
        assert abs(half.item() - batch_loss(full, lora, idx[:, :-1], idx[:, 1:], labels).item()) < 0.05


def test_an_int8_model_runs_the_lora_unmerged(offline_model_dir):
    """--dtype int8: fast.Int8Linear has no float weight to merge a change into, so the pairs run beside it,
    unmerged; its logits follow the same LoRA merged into the float32 model's weights, and not the int8 model's
    own."""
    full = fast.decoding_model(offline_model_dir, "float32")
    q8 = fast.decoding_model(offline_model_dir, "int8")
    lora = random_lora(full, ("q", "v", "mlp.c_fc"))
    weights = label_weights(2, alpha=0.3)
    idx = tokens()[:1]
    with torch.no_grad():
        run8, cache = lora.apply(q8, weights)
        assert cache is None and type(run8.h[0].attn.c_attn).__name__ == "LoRALinear"
        want = lora.apply(full, weights)[0](idx).float()
        got, plain = run8(idx).float(), q8(idx).float()
    assert (got - want).abs().max() < 0.5 * (plain - want).abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
