"""Steering that wins: guidance at the logits with the labels' prefixes as experts (minprefix/guidance.py), and the
contrastive term in training (trainer.contrastive_loss): each against a hand computation, the fast path against
the reference, and what they are for (a margin that grows)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import EOT, REPO, assert_near
from conftest import run_script as run  # a script in a subprocess
from minprefix import Tokenizer, fast
from minprefix.data import encode, label_names, read_jsonl
from minprefix.generate import generate, pad_left
from minprefix.guidance import FILTER_P, Guided, guide
from minprefix.lora import LoRA
from minprefix.method import build
from minprefix.prefix import KVPrefix, label_weights
from minprefix.trainer import batch_loss, contrastive_loss, evaluate, lm_loss, token_nll, train

LABELS = ["positive", "negative"]


def random_prefix(model, n_labels=2, P=5, seed=0):
    torch.manual_seed(seed)
    prefix = KVPrefix(model.config, n_labels, P)
    with torch.no_grad():
        prefix.table_.normal_(0, 0.5)
    return prefix.requires_grad_(False)


def in_nucleus(logits, p):
    """(..., V) -> the likeliest tokens until their probability reaches p, by hand: sorted, cumulative sum."""
    probs = logits.softmax(-1)
    values, order = probs.sort(-1, descending=True)
    keep_sorted = (values.cumsum(-1) - values) < p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def prompts():
    tok = Tokenizer()
    return [[tok.eot] + tok.encode(t) for t in ("The lectures were", "I went to see this film because", "The")]


# ---- guidance at the logits ----

@pytest.mark.parametrize("n_labels,anchor", [(2, "bare"), (2, "mix"), (3, "bare"), (3, "mix")])
def test_guided_logits_are_the_formula_on_each_labels_own_logits(offline_model, n_labels, anchor):
    """z = z_anchor + strength * n/(n-1) * (sum_i w_i z_i - mean_i z_i), each z from its own forward pass (the
    anchor: the model without a prefix, or the K/V mix); with two labels z_anchor + strength * (2 alpha - 1) *
    (z_0 - z_1); -inf outside the anchor's nucleus of FILTER_P (DExperts' filter)."""
    prefix = random_prefix(offline_model, n_labels)
    idx, real = pad_left(prompts(), EOT)
    w = torch.softmax(torch.randn(3, n_labels), -1)  # a different mix per row
    with torch.no_grad():
        run, cache = guide(prefix, offline_model, w, 1.5, anchor)
        got = run(idx, cache.copy(), real)
        alone = lambda weights: offline_model(idx, prefix.cache(offline_model, weights), real)
        z_mix = alone(w) if anchor == "mix" else offline_model(idx, None, real)
        z = [alone(F.one_hot(torch.full((3,), k), n_labels).float()) for k in range(n_labels)]
        mean_z = sum(z) / n_labels
        want = z_mix + 1.5 * n_labels / (n_labels - 1) * (sum(w[:, k, None, None] * z[k] for k in range(n_labels)) - mean_z)
        nucleus = in_nucleus(z_mix, FILTER_P)
        assert torch.equal(got.isfinite(), nucleus) and 1 <= nucleus.sum(-1).min() and nucleus.sum(-1).max() < 50257
        # the same rows in one batch of (1 + n) * 3 against four batches of 3: rounding only
        assert_near(got[nucleus], want[nucleus], 1e-5, "guided logits")
        if n_labels == 2:
            a = w[:, :1, None]
            assert_near(got[nucleus], (z_mix + 1.5 * (2 * a - 1) * (z[0] - z[1]))[nucleus], 1e-5, "two labels")


def test_guidance_leaves_the_end_of_text_to_the_anchor(offline_model):
    """Given eot, guidance steers what is written and not when it ends: <|endoftext|>'s guided logit is the anchor's
    (where it is in the anchor's nucleus), every other token's is guided as before."""
    prefix = random_prefix(offline_model)
    idx = torch.tensor([prompts()[0], prompts()[0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    with torch.no_grad():
        free = guide(prefix, offline_model, w, 2.0)
        held = guide(prefix, offline_model, w, 2.0, eot=EOT)
        a, b = free[0](idx, free[1]), held[0](idx, held[1])
        bare = offline_model(idx)
    others = torch.ones(50257, dtype=torch.bool)
    others[EOT] = False
    assert torch.equal(a[..., others], b[..., others])
    inside = b[..., EOT].isfinite()
    assert inside.any()
    assert_near(b[..., EOT][inside], bare[..., EOT][inside], 1e-5, "eot's logit")  # a batch of 6 rows against 2
    assert not torch.equal(a[..., EOT][inside], b[..., EOT][inside])  # unheld, it is guided like any token


class Fixed(torch.nn.Module):
    """A "model" whose every position's logits are the rows given: ((1 + n) * B, V), guidance's row order."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.config = logits, None

    def forward(self, idx, kv_cache=None, real=None):
        return self.logits[:, None, :].expand(-1, idx.size(1), -1)


def test_an_end_the_anchor_is_sure_of_still_leaves_tokens_to_write():
    """Where the anchor's nucleus is <|endoftext|> alone, the other tokens' own nucleus joins it: held back
    (min_new_tokens), a text goes on with a token the anchor finds likely, where it once had none to draw (NaN).
    Every other row's nucleus is DExperts' own."""
    from minprefix.generate import decode, probabilities
    V, eot = 6, 5
    sure = torch.tensor([2.0, 1.0, 0.0, -5.0, -5.0, 12.0])  # p(eot) > 0.9999
    plain = torch.tensor([2.0, 1.5, 0.5, 0.0, -1.0, 1.0])
    labels = torch.randn(4, V)  # two labels x two rows
    guided = Guided(Fixed(torch.cat([torch.stack([sure, plain]), labels])), torch.tensor([[0.0, 1.0]] * 2), 1.0,
                    eot=eot, probabilities=probabilities)
    out = guided(torch.zeros(2, 1, dtype=torch.long))[:, -1]  # (2, V)
    rest = sure.clone()
    rest[eot] = float("-inf")
    want = in_nucleus(rest, FILTER_P)
    want[eot] = True
    assert torch.equal(out[0].isfinite(), want) and want.sum() == 3  # the end, tokens 0 and 1
    assert torch.equal(out[1].isfinite(), in_nucleus(plain, FILTER_P))
    assert out[0, eot] == sure[eot]  # the end keeps the anchor's logit
    tokens = list(decode(out, lambda x: out, 20, 1.0, None, None, eot, seed=0, min_new_tokens=20))
    assert all(int(t[0]) in (0, 1) for t in tokens)  # no NaN: the held-back row writes the anchor's likely tokens
    assert Guided(Fixed(torch.cat([torch.stack([sure, plain]), labels])), torch.tensor([[0.0, 1.0]] * 2), 1.0,
                  probabilities=probabilities)(torch.zeros(2, 1, dtype=torch.long))[0, -1].isfinite().sum() == 1


@pytest.mark.parametrize("mode", ["kv", "embedding", "lora"])
def test_at_strength_zero_the_kv_mix_and_at_an_even_mix_the_anchor(offline_model, mode):
    """No guidance is method.apply itself; at alpha 0.5 the labels' weights cancel and what is left is the anchor:
    the bare model (for every method: a prefix's positions masked out, a LoRA's change zero) or the K/V mix."""
    torch.manual_seed(0)
    steer = build(mode, offline_model, LABELS, Tokenizer(), 4, False, init="random")
    with torch.no_grad():
        for q in steer.parameters():
            q.normal_(0, 0.3)
    idx = torch.tensor([prompts()[0]])
    w = label_weights(2, alpha=0.5)
    with torch.no_grad():
        run, cache = guide(steer, offline_model, w, 0.0)
        assert isinstance(run, type(steer.apply(offline_model, w)[0])) and not isinstance(run, Guided)
        mix = run(idx, cache)
        for anchor, want in (("mix", mix), ("bare", offline_model(idx))):
            run, cache = guide(steer, offline_model, w, 3.0, anchor)
            assert isinstance(run, Guided)
            got, nucleus = run(idx, cache), in_nucleus(want, FILTER_P)
            assert torch.equal(got.isfinite(), nucleus)
            assert_near(got[nucleus], want[nucleus], 1e-5, f"alpha 0.5 from the {anchor}")  # 3 rows against 1
        pushed = guide(steer, offline_model, label_weights(2, alpha=1.0), 3.0)
        plain = offline_model(idx)
        nucleus = in_nucleus(plain, FILTER_P)
        assert (pushed[0](idx, pushed[1])[nucleus] - plain[nucleus]).abs().max() > 0.1  # and at an end it pushes


@pytest.mark.parametrize("method", ["kv", "lora"])
def test_fast_guided_decoding_writes_the_references_tokens(offline_model, method):
    """fast.stream unwraps Guided and decodes its rows in one batch: greedy tokens and a seeded sample identical to
    the reference loop's, on left-padded prompts with a mix per row; for LoRA every row its own mix (unmerged)."""
    model = fast.accelerate(type(offline_model).from_pretrained(offline_model.name_or_path).requires_grad_(False))
    if method == "kv":
        steer = random_prefix(offline_model)
    else:
        torch.manual_seed(0)
        steer = LoRA(offline_model.config, 2, 4, 32, ("q", "v"))
        with torch.no_grad():
            for p in steer.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    idx, real = pad_left(prompts(), EOT)
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]])
    with torch.no_grad():  # the bare anchor: its rows masked in the cache (a prefix) or with a zero change (LoRA)
        reference, fast_run = guide(steer, offline_model, w, 2.0, "bare"), guide(steer, model, w, 2.0, "bare")
        plain = guide(steer, model, w, 0.0)
    for kw in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=3)):
        want = generate(reference[0], idx, 24, kv_cache=reference[1], real=real, eot=EOT, **kw)
        got = fast.generate(fast_run[0], idx, 24, kv_cache=fast_run[1], real=real, eot=EOT, **kw)
        assert got == want, kw
    greedy = generate(reference[0], idx, 24, kv_cache=reference[1], real=real, temperature=0, eot=EOT)
    assert fast.generate(plain[0], idx, 24, kv_cache=plain[1], real=real, temperature=0, eot=EOT) != greedy  # it steers


def test_guidance_refuses_what_it_cannot_do(offline_model):
    from minprefix.beam import beam_search
    one = random_prefix(offline_model, n_labels=1)
    with pytest.raises(ValueError, match="two or more labels"):
        guide(one, offline_model, torch.ones(1, 1), 1.0)
    two = random_prefix(offline_model)
    run, cache = guide(two, offline_model, label_weights(2, alpha=1.0), 1.0)
    with pytest.raises(ValueError, match="guidance at the logits is for sampling"):
        beam_search(run, torch.tensor([prompts()[0]]), 3, 5, kv_cache=cache, eot=EOT)


# ---- the contrastive term ----

@pytest.fixture(scope="module")
def items():
    tok = Tokenizer()
    texts = ["The labs were great and the mentors kind.", "The food was cold and the rooms were noisy.",
             "I learned more in a week than in a term.", "Nobody answered our emails about the grants."]
    from minprefix.data import Example
    return encode([Example(t, LABELS[i % 2], f"t:{i}") for i, t in enumerate(texts)], tok, LABELS, 1000)


def batch(items):
    from minprefix.data import batches
    return next(batches(items, len(items)))


def test_contrastive_gradient_is_the_hand_computation(offline_model, items):
    """d/d theta [LM + lam * CE(s, y)] with s_k = -(mean loss per token under label k), built from separate
    backward passes: d CE / d s_k = (softmax(s)_k - [k = y]) / B, times d s_k / d theta of each text alone."""
    torch.manual_seed(0)
    prefix = build("kv", offline_model, LABELS, Tokenizer(), 4, True)  # through the MLP: a real chain rule
    idx, targets, y = batch(items)
    lam = 0.7
    params = list(prefix.parameters())
    loss = contrastive_loss(offline_model, prefix, idx, targets, y, lam)
    got = torch.autograd.grad(loss, params)

    B = idx.size(0)
    s, ds = torch.zeros(B, 2), []  # each text's s_k and its gradient
    for b in range(B):
        row = []
        for k in range(2):
            n = (targets[b] != -100).sum()
            mean_loss = batch_loss(offline_model, prefix, idx[b:b + 1], targets[b:b + 1], torch.tensor([k]), lm_loss)
            s[b, k] = -mean_loss.detach()
            row.append([-g * 1 for g in torch.autograd.grad(mean_loss, params)])
        ds.append(row)
    p = s.softmax(-1)
    want = [torch.zeros_like(q) for q in params]
    lm = batch_loss(offline_model, prefix, idx, targets, y, lm_loss)
    for w, g in zip(want, torch.autograd.grad(lm, params)):
        w += g
    for b in range(B):
        for k in range(2):
            c = lam * (p[b, k] - float(k == y[b])) / B
            for w, g in zip(want, ds[b][k]):
                w += c * g
    assert_near(loss.detach(), lm.detach() + lam * F.cross_entropy(s, y), 1e-5, "loss")
    for i, (a, b) in enumerate(zip(got, want)):
        assert_near(a, b, 1e-4, f"gradient {i}")  # a batch of 8 rows against 1-row passes: float32 rounding


def test_contrastive_loss_fast_equals_reference(offline_model, items):
    """The fast path's loss and gradients against the reference run in float64 (the exact values, to float32's
    eyes). Not against the float32 reference: PyTorch's float32 cross_entropy over the 50,257 logits is itself
    off by up to ~2e-4 nats a token on this CPU (the fast path's online softmax by ~5e-6), and the term's softmax
    over labels turns such per-token errors into gradients ~5e-5 apart."""
    name = offline_model.name_or_path
    model = fast.accelerate(type(offline_model).from_pretrained(name).requires_grad_(False))
    exact = type(offline_model).from_pretrained(name, dtype=torch.float64).requires_grad_(False)
    idx, targets, y = batch(items)
    targets[1, 6:] = -100
    got = []
    for m, nll, dtype in ((exact, token_nll, torch.float64), (model, fast.token_nll, torch.float32)):
        torch.manual_seed(0)
        prefix = build("kv", m, LABELS, Tokenizer(), 4, True).to(dtype)
        loss = contrastive_loss(m, prefix, idx, targets, y, 0.5, nll)
        got.append((loss.detach(), torch.autograd.grad(loss, list(prefix.parameters()))))
    assert_near(got[1][0], got[0][0], 1e-5, "loss")  # float32 rounding of the sums, ~1e-7 of the loss
    for i, (a, b) in enumerate(zip(got[1][1], got[0][1])):
        assert_near(a, b, 1e-5, f"gradient {i}")  # seen ~1e-6 of the gradients' magnitude


def test_contrastive_training_widens_the_held_out_margin(offline_model, tmp_path):
    """A seeded short run on the project's data, the same steps with and without the term: with it, the held-out
    steering margin (each text's loss under the other label minus under its own) is larger."""
    tok = Tokenizer()
    train_set = read_jsonl(REPO / "data/train.jsonl")[:80]
    labels = label_names(train_set)
    held = read_jsonl(REPO / "data/test.jsonl", labels)[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, va = (encode(s, tok, labels, 1000) for s in (train_set, held))
    margins = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        prefix = build("kv", offline_model, labels, tok, 5, True)
        train(offline_model, prefix, tr, va, labels, tmp_path / f"{lam}.safetensors", epochs=1, batch_size=4,
              lr=3e-3, seed=0, keep="last", contrastive=lam, log=lambda *a: None)
        margins[lam] = evaluate(offline_model, prefix, va, 8, "cpu")["steer_margin"]
    assert margins[1.0] > margins[0.0] + 0.01, margins


def test_contrastive_needs_labels_to_tell_apart(offline_model, items, tmp_path):
    prefix = build("kv", offline_model, ["task"], Tokenizer(), 4, False)
    with pytest.raises(ValueError, match="needs two or more labels"):
        train(offline_model, prefix, items, items, ["task"], tmp_path / "t.safetensors", epochs=1, contrastive=1.0)


# ---- the scripts ----

@pytest.fixture(scope="module")
def saved_prefix(offline_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("steer") / "p.safetensors"
    random_prefix(offline_model, P=4).save(path, offline_model, LABELS)
    return path


def test_sample_guidance_writes_the_libraries_guided_text(offline_model, saved_prefix, tmp_path):
    out = tmp_path / "s.jsonl"
    run("sample.py", "--prefix", saved_prefix, "--alpha", 1, "--guidance", 2, "--temperature", 0, "--n", 1,
        "--prompt", "The lectures", "--max-new-tokens", 12, "--output", out)
    import json
    row = json.loads(out.read_text())
    assert row["guidance"] == 2.0
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("The lectures")])
    with torch.no_grad():
        run_model, cache = guide(random_prefix(offline_model, P=4), offline_model, label_weights(2, alpha=1.0), 2.0)
        want = tok.decode(generate(run_model, idx, 12, kv_cache=cache, temperature=0, eot=EOT)[0])
    assert row["text"] == want
    p = run("sample.py", "--prefix", saved_prefix, "--guidance", 2, "--num-beams", 3, check=False)
    assert p.returncode == 2 and "--guidance does not apply to beam search" in p.stderr
    p = run("sample.py", "--prefix", saved_prefix, "--guidance", -1, check=False)
    assert p.returncode == 2 and "--guidance" in p.stderr


def test_eval_reports_the_ends_from_neutral_prompts_at_each_strength(saved_prefix, tmp_path):
    import json
    out = tmp_path / "eval"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The lectures\nThe food\n")
    run("eval.py", "--prefix", saved_prefix, "--n-samples", 0, "--sweep-samples", 2, "--sweep-prompts", prompts,
        "--alphas", 0, 1, "--guidance", 0, 2, "--max-new-tokens", 8, "--out", out)
    rows = json.loads((out / "eval.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0] == "base model, no prefix" and names[2].endswith("guidance 2")
    for r in rows[:3]:
        n = r["neutral"]
        assert n["n"] == 4 and 0 <= n["VADER"]["positive"] <= 1 and 0 <= n["AFINN"]["negative"] <= 1
        assert n["perplexity"] > 1 and "distinct3" in n
    assert "bleu" not in rows[1]  # --n-samples 0: the neutral prompts only
    assert (out / "frontier.png").stat().st_size > 10_000
    assert "x the bare model's own" in (out / "eval.md").read_text()


def test_train_records_the_contrastive_weight_and_refuses_it_without_labels(offline_model_dir, tmp_path):
    import sys
    sys.path.insert(0, str(REPO))
    import train as train_script
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join('{"text": "%s", "sentiment": "%s"}' % (t, s) for t, s in
                              [("Great labs.", "positive"), ("Cold food.", "negative")] * 3) + "\n")
    out = tmp_path / "p.safetensors"
    run("train.py", "--model", offline_model_dir, "--data", data, "--val-data", data, "--prefix-len", 3, "--mlp",
        "--max-steps", 2, "--contrastive", 0.5, "--out", out)
    assert load_meta(out)["info"]["contrastive"] == 0.5
    for mode, args in (("kv", ["--prefix-len", 3, "--mlp"]), ("lora", ["--mode", "lora"])):  # the defaults, by mode
        out = tmp_path / f"{mode}.safetensors"
        run("train.py", "--model", offline_model_dir, "--data", data, "--val-data", data, *args, "--max-steps", 1,
            "--out", out)
        assert (load_meta(out)["info"]["contrastive"] or 0.0) == train_script.CONTRASTIVE[mode]
    assert train_script.CONTRASTIVE["kv"] > 0 and train_script.CONTRASTIVE["lora"] == 0  # what the frontier chose
    p = run("train.py", "--model", offline_model_dir, "--data", data, "--val-data", data, "--mode", "finetune",
            "--contrastive", 1, "--max-steps", 1, "--out", tmp_path / "ft", check=False)
    assert p.returncode == 2 and "fine-tuning trains one model for every label" in p.stderr
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "Great labs.", "sentiment": "positive"}\n')
    p = run("train.py", "--model", offline_model_dir, "--data", one, "--val-data", one, "--contrastive", 1,
            "--max-steps", 1, "--out", tmp_path / "o.safetensors", check=False)
    assert p.returncode == 2 and "has one label (positive)" in p.stderr


def load_meta(path):
    from minprefix.method import read_meta
    return read_meta(path)
