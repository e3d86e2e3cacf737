"""Long texts (docs/long.md): writing past the context's end with the prefix kept (generate.Window), the reference
and the fast path writing the same tokens across re-encodings, <|endoftext|> held back, the prefix boost, and the
mix of labels on a schedule (minprefix/tone.py).

Most tests shorten the offline model's context to 40 positions (the same weights, config.n_positions lowered), so
that a few dozen tokens cross several re-encodings."""
import copy
import dataclasses
import json

import pytest
import torch

from conftest import REPO, run_script

from minprefix import GPT2, GPTConfig, KVCache, Tokenizer, fast
from minprefix.evaluation import prefix_attention
from minprefix.generate import Window, generate, pad_left, replace_prefix
from minprefix.guidance import guide
from minprefix.lora import LoRA
from minprefix.prefix import EmbeddingPrefix, KVPrefix, label_weights
from minprefix.prefix import mix_weights
from minprefix.tone import Tone, parse_schedule

EOT = 50256


@pytest.fixture(scope="module")
def fast_model(offline_model_dir):
    return fast.accelerate(GPT2.from_pretrained(offline_model_dir).requires_grad_(False))


def short(model, n=40):
    """The same model with a context of n positions (the positions' table is the model's own, read up to n)."""
    model = copy.copy(model)
    model.config = dataclasses.replace(model.config, n_positions=n)
    return model


def prompts():
    tok = Tokenizer()
    return [[tok.eot] + tok.encode(t) for t in ("The lectures were", "I went to see this film because my friend", "")]


def random_prefix(config, kind="kv", P=6, seed=0):
    torch.manual_seed(seed)
    prefix = KVPrefix(config, 2, P) if kind == "kv" else EmbeddingPrefix(config, 2, P)
    with torch.no_grad():
        prefix.table_.normal_(std=1.0 if kind == "kv" else 0.1)
    return prefix.requires_grad_(False)


def lora(config, seed=0):
    torch.manual_seed(seed)
    method = LoRA(config, 2, rank=4)
    with torch.no_grad():
        for p in method.parameters():  # B too (it starts at zero): each label changes the model
            p.normal_(std=0.05)
    return method.requires_grad_(False)


# ---- the window ----

def test_the_window_keeps_the_last_part_of_each_row_with_its_padding():
    model = type("M", (), {"config": GPTConfig(n_positions=12)})()
    prefix = KVCache([(torch.zeros(2, 1, 2, 1), torch.zeros(2, 1, 2, 1))])  # P = 2: the text has 10 positions
    idx, real = pad_left([[1, 2, 3, 4], [5, 6]], 0)
    window = Window(model, prefix, idx, real)
    assert window.positions == 10 and window.keep == 5 and window.left() == 6
    for t in range(6):  # 4 + 6 = 10 tokens in the longer row: all fit
        assert window.push(torch.tensor([[10 + t], [20 + t]])) is None
    assert window.left() == 0
    tail_idx, tail_real = window.push(torch.tensor([[99], [98]]))  # the 11th: the last 5 of each row
    assert tail_idx.tolist() == [[12, 13, 14, 15, 99], [22, 23, 24, 25, 98]]
    assert tail_real.all() and window.left() == 5
    with pytest.raises(ValueError, match="keep is the share of the window"):
        Window(model, prefix, idx, real, keep=1.0)


def oracle(model, prefix, prompt, n, keep_share=0.5):
    """Greedy decoding by the definition, one row: each token read off one forward pass over what the window
    shows (the prefix, then the text from where the last re-encoding started), with no cache carried between tokens."""
    positions = model.config.n_positions - prefix.length
    keep = int(keep_share * positions)
    text, start, out = list(prompt), 0, []
    for _ in range(n):
        if len(text) - start > positions:  # the token just fed does not fit: keep the last `keep`
            start = len(text) - keep
        with torch.no_grad():
            logits = model(torch.tensor([text[start:]]), prefix.copy())
        out.append(int(logits[0, -1].argmax()))
        text.append(out[-1])
    return out


def test_past_the_end_each_token_is_read_off_the_prefix_and_the_windows_last_part(offline_model):
    model = short(offline_model)
    prefix = random_prefix(model.config).cache(model, label_weights(2, label=0))
    prompt = prompts()[1]
    got = generate(model, torch.tensor([prompt]), 60, kv_cache=prefix, temperature=0, eot=None)[0]
    assert got == oracle(model, prefix, prompt, 60)  # 34 text positions, 17 kept: re-encoded 3 times


@pytest.mark.parametrize("boost", [0.0, 0.5])
def test_reference_and_fast_write_the_same_tokens_across_reencodings(offline_model, fast_model, boost):
    """Left-padded rows of different lengths, a prefix, several re-encodings: greedy and sampled tokens equal."""
    ref, quick = short(offline_model), short(fast_model)
    idx, real = pad_left(prompts(), EOT)
    cache = random_prefix(ref.config).cache(ref, label_weights(2, alpha=0.7).repeat(3, 1)).boosted(boost)
    for kw in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=4)):
        a = generate(ref, idx, 70, kv_cache=cache, real=real, eot=None, **kw)  # three re-encodings
        assert fast.generate(quick, idx, 70, kv_cache=cache, real=real, eot=None, **kw) == a
        assert [len(r) for r in a] == [70, 70, 70]
    # All rows are re-encoded together, when the longest prompt's row reaches the end: that row is written as it
    # would be alone throughout, a shorter one until then (25 tokens: 34 text positions, a 10-token prompt)
    batched = generate(ref, idx, 70, kv_cache=cache, real=real, temperature=0, eot=None)
    one = random_prefix(ref.config).cache(ref, label_weights(2, alpha=0.7)).boosted(boost)
    alone = [generate(ref, torch.tensor([p]), 70, kv_cache=one, temperature=0, eot=None)[0] for p in prompts()[:2]]
    assert batched[1] == alone[1] and batched[0][:25] == alone[0][:25]


def test_a_whole_window_on_the_offline_model(offline_model, fast_model):
    """The offline model's own context (1,024): prompts of about a thousand tokens after a prefix of 6, and 40 new
    tokens, so that the longer row reaches the end after 9 and both are re-encoded (keeping 509 tokens)."""
    tok = Tokenizer()
    text = tok.encode(" ".join(json.loads(line)["text"] for line in open(REPO / "data" / "train.jsonl")))
    idx, real = pad_left([[EOT] + text[:1008], [EOT] + text[500:1490]], EOT)
    cache = random_prefix(offline_model.config).cache(offline_model, label_weights(2, label=1).repeat(2, 1))
    a = fast.generate(fast_model, idx, 40, kv_cache=cache, real=real, temperature=0, eot=None)
    assert [len(r) for r in a] == [40, 40]
    assert generate(offline_model, idx, 40, kv_cache=cache, real=real, temperature=0, eot=None) == a


def test_min_new_tokens_holds_endoftext_back(offline_model, fast_model):
    from test_generate import EndsAt
    idx = torch.tensor([[EOT, 464]] * 2)
    out = generate(EndsAt(offline_model, [0, 2]), idx, 10, temperature=1.0, seed=0, min_new_tokens=5, eot=EOT)
    assert [len(r) for r in out] == [5, 5]  # both wanted to stop earlier: held back until 5 were written
    out = generate(EndsAt(offline_model, [0, 7]), idx, 10, temperature=0, min_new_tokens=5, eot=EOT)
    assert [len(r) for r in out] == [5, 7] and out[1] == [11] * 7
    with pytest.raises(ValueError, match="min_new_tokens must be between 0 and max_new_tokens"):
        generate(offline_model, idx, 3, min_new_tokens=4, eot=EOT)
    tokens = list(fast.stream(fast_model, idx, 30, temperature=1.0, seed=0, min_new_tokens=30, eot=EOT))
    assert len(tokens) == 30 and not any((t == EOT).any() for t in tokens)


def test_the_frequency_penalty_counts_each_use_in_the_window(offline_model, fast_model):
    """penalize: each use of a token among the last REPEAT_WINDOW written lowers its logit by the penalty, in the
    sampling loop both paths share; across re-encodings the reference and the fast path write the same tokens."""
    from minprefix.generate import REPEAT_WINDOW, decode, penalize
    recent = torch.tensor([[1, 1, 3], [4, 4, 4]])
    assert penalize(torch.zeros(2, 5), recent, 0.5).tolist() == [[0, -1, 0, -0.5, 0], [0, 0, 0, 0, -1.5]]
    # a "model" that always prefers token 1 (10) to token 2 (3): greedy, token 1 is written 8 times (its logit
    # then 10 - 8 < 3), then token 2, and so on; over 300 tokens each pick is the argmax of the logits less the
    # counts in the last 64 tokens
    base = torch.tensor([[0.0, 10.0, 3.0, -2.0]])
    got = [int(x) for x in decode(base, lambda x: base, 300, 0, None, None, None, frequency_penalty=1.0)]
    assert got[:9] == [1] * 8 + [2] and len(got) == 300
    want = []
    for _ in range(300):
        counts = torch.bincount(torch.tensor(want[-REPEAT_WINDOW:], dtype=torch.long), minlength=4)
        want.append(int((base[0] - counts).argmax()))
    assert got == want and 3 in want  # token 3, 12 below token 1, is written too
    assert [int(x) for x in decode(base, lambda x: base, 5, 0, None, None, None)] == [1] * 5  # 0: off
    ref, quick = short(offline_model), short(fast_model)
    idx, real = pad_left(prompts(), EOT)
    cache = random_prefix(ref.config).cache(ref, label_weights(2, alpha=0.7).repeat(3, 1))
    for kw in (dict(temperature=0), dict(temperature=0.9, top_p=0.9, seed=4)):
        a = generate(ref, idx, 70, kv_cache=cache, real=real, eot=None, frequency_penalty=0.8, **kw)
        assert fast.generate(quick, idx, 70, kv_cache=cache, real=real, eot=None, frequency_penalty=0.8, **kw) == a
        assert a != generate(ref, idx, 70, kv_cache=cache, real=real, eot=None, **kw)  # it changed the text


# ---- the prefix boost ----

def test_the_boost_multiplies_the_prefixs_attention_weight_as_it_says(offline_model):
    """Layer 0's attention on the prefix (nothing boosted before it changes its queries or keys): with weight
    factor f = 1 + boost * n / P on the prefix's keys, a share s becomes f s / (f s + 1 - s)."""
    prefix = random_prefix(offline_model.config, P=5).cache(offline_model, label_weights(2, label=0))
    prompt, new = prompts()[1], list(range(300, 330))
    plain = prefix_attention(offline_model, prefix, prompt, new, heads=True)[:, 0]  # (30, H)
    boosted = prefix_attention(offline_model, prefix.boosted(0.3), prompt, new, heads=True)[:, 0]
    n = torch.arange(len(prompt), len(prompt) + len(new))[:, None]  # the text's positions each writing query sees
    f = 1 + 0.3 * n / 5
    torch.testing.assert_close(boosted, f * plain / (f * plain + 1 - plain), rtol=1e-4, atol=1e-6)  # float32 softmax
    assert (boosted > plain).all() and prefix.boost == 0  # boosted() made a copy
    zero = prefix_attention(offline_model, prefix.boosted(0.0), prompt, new)
    assert torch.equal(zero, prefix_attention(offline_model, prefix, prompt, new))


def test_prefix_attention_reads_each_query_as_it_was_written(offline_model):
    """Across re-encodings (a 40-position context), the share measured window by window equals the one read off
    the reference's own decoding step by step (a hook on its attention, at each step's last query)."""
    model = short(offline_model)
    prefix = random_prefix(model.config).cache(model, label_weights(2, label=0))
    prompt = prompts()[0]
    new = generate(model, torch.tensor([prompt]), 50, kv_cache=prefix, temperature=0, eot=None)[0]
    seen = []

    def hook(attn, args, output):
        x, mask, cache, layer = args
        if layer == 0:
            C, H = x.size(-1), attn.n_head
            q = attn.c_attn(x[:, -1:])[..., :C].view(1, 1, H, C // H).transpose(1, 2)
            w = (q @ cache.layers[0][0].transpose(-1, -2) * (C // H) ** -0.5).masked_fill(~mask[:, :, -1:], -1e30)
            seen.append(w.softmax(-1)[..., :prefix.length].sum(-1).mean().item())

    handle = model.h[0].attn.register_forward_hook(hook)
    try:
        generate(model, torch.tensor([prompt]), 50, kv_cache=prefix, temperature=0, eot=None)
    finally:
        handle.remove()
    measured = prefix_attention(model, prefix, prompt, new)
    assert measured.shape == (50, model.config.n_layer)
    torch.testing.assert_close(measured[:, 0], torch.tensor(seen), rtol=1e-4, atol=1e-6)


# ---- tone on a schedule ----

def test_schedules_read_and_refuse_as_they_say():
    s = parse_schedule("0:0,600:1")
    assert [s.at(t) for t in (0, 300, 600, 5000)] == [0.0, 0.5, 1.0, 1.0] and not s.constant
    assert parse_schedule("0.7").constant and parse_schedule("0.7").at(123) == 0.7
    s = parse_schedule("100:1, 200:0 ,300:0.5")
    assert [s.at(t) for t in (0, 150, 200, 250, 999)] == [1.0, 0.5, 0.0, 0.25, 0.5] and str(s) == "100:1,200:0,300:0.5"
    for bad, message in (("warm", "is not a number or a schedule"), ("0:0,x:1", "point 'x:1' is not TOKEN:ALPHA"),
                         ("0:0,600", "point '600' is not TOKEN:ALPHA"), ("10:0,5:1", "the tokens must increase"),
                         ("-5:0,5:1", "negative"), ("0:0,600:1.5", "--alpha must be in [0, 1]"),
                         ("nan", "not a finite number")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_schedule(bad)
    assert parse_schedule("0:0,600:1.5", extrapolate=True).at(600) == 1.5


def test_a_schedule_weighs_the_label_called_positive():
    """A schedule's alpha is mix_weights's, as a constant --alpha is: the label called positive, whatever the
    checkpoint's order; refused where no label is called so."""
    for labels, want in ((["positive", "negative"], [[0.8, 0.2]]), (["negative", "positive"], [[0.2, 0.8]])):
        seen = []
        method = type("Method", (), {"apply": lambda self, model, w: seen.append(w) or (model, None)})()
        model = type("Model", (), {"device": torch.device("cpu")})()  # only its device is read
        Tone(method, model, labels, parse_schedule("0.8"), 1).start()
        torch.testing.assert_close(seen[0], torch.tensor(want))
    with pytest.raises(ValueError, match="called positive"):
        mix_weights(["bright", "bleak"], alpha=1.0)


def test_a_new_mix_rewrites_the_prefix_positions_only(offline_model):
    prefix = random_prefix(offline_model.config)
    old, new = (prefix.cache(offline_model, label_weights(2, label=i)) for i in (0, 1))
    cache = old.copy()
    offline_model(torch.tensor([prompts()[0]]), cache)
    swapped = replace_prefix(cache, new)
    for (k, v), (k2, v2), (nk, nv) in zip(cache.layers, swapped.layers, new.layers):
        assert torch.equal(k2[:, :, :6], nk) and torch.equal(v2[:, :, :6], nv)
        assert torch.equal(k2[:, :, 6:], k[:, :, 6:]) and torch.equal(v2[:, :, 6:], v[:, :, 6:])
    assert replace_prefix(cache, KVCache()) is cache  # LoRA's: no prefix to rewrite


@pytest.mark.parametrize("kind", ["kv", "embedding", "lora"])
def test_a_schedule_writes_the_same_tokens_on_both_paths_for_every_method(offline_model, fast_model, kind):
    """One face: the schedule goes through method.apply whatever the method; a ramp from 0 to 1 across re-encodings,
    left-padded rows, greedy, the reference and the fast path agreeing; the text before the ramp moves is alpha 0's."""
    ref, quick = short(offline_model), short(fast_model)
    method = lora(ref.config) if kind == "lora" else random_prefix(ref.config, kind)
    idx, real = pad_left(prompts(), EOT)
    labels = ["positive", "negative"]
    out = []
    for model in (ref, quick):
        tone = Tone(method, model, labels, parse_schedule("20:0,70:1"), rows=3)
        run, cache = tone.start()
        decode = generate if model is ref else fast.generate
        out.append(decode(run, idx, 90, kv_cache=cache, real=real, temperature=0, eot=None, tone=tone))
        assert tone.changes == 50  # alpha moves by 0.02 a token from token 20 to 70: a new mix at each
    assert out[0] == out[1]
    run, cache = method.apply(ref, mix_weights(labels, alpha=0.0).repeat(3, 1))
    still = generate(run, idx, 21, kv_cache=cache, real=real, temperature=0, eot=None)
    assert [r[:21] for r in out[0]] == still  # the first mix change is for token 21
    run, cache = method.apply(ref, mix_weights(labels, alpha=1.0).repeat(3, 1))
    assert out[0] != generate(run, idx, 90, kv_cache=cache, real=real, temperature=0, eot=None)


def test_guidance_goes_past_the_window_and_follows_a_schedule(offline_model, fast_model):
    """Guidance at the logits (minprefix/guidance.py: 1 + n rows a sample) composes with the window, the boost and
    a schedule: the reference and the fast path write the same tokens across re-encodings, from either anchor."""
    ref, quick = short(offline_model), short(fast_model)
    method, labels = random_prefix(ref.config), ["positive", "negative"]
    idx, real = pad_left(prompts(), EOT)
    for anchor in ("bare", "mix"):
        out = []
        for model, decode in ((ref, generate), (quick, fast.generate)):
            run, cache = guide(method, model, mix_weights(labels, alpha=0.8).repeat(3, 1), 1.5, anchor)
            out.append(decode(run, idx, 60, kv_cache=cache.boosted(0.3), real=real, temperature=0, eot=None))
        assert out[0] == out[1] and [len(r) for r in out[0]] == [60, 60, 60]
    out = []
    for model, decode in ((ref, generate), (quick, fast.generate)):
        tone = Tone(method, model, labels, parse_schedule("10:0,40:1"), 3, guidance=1.5, anchor="mix")
        run, cache = tone.start()
        out.append(decode(run, idx, 60, kv_cache=cache, real=real, temperature=0, eot=None, tone=tone))
    assert out[0] == out[1]


def test_a_slow_schedule_changes_the_mix_every_step_of_alpha():
    calls = []
    method = type("Counting", (), {"apply": lambda self, model, w: calls.append(w[0, 0].item()) or (model, None)})()
    model = type("M", (), {"device": torch.device("cpu")})()
    tone = Tone(method, model, ["positive", "negative"], parse_schedule("0:0,1000:1,1500:0.995"), rows=1)
    tone.start()
    changed = [j for j in range(1, 2000) if tone(j) is not None]
    assert len(changed) == 100 + 1  # every 10 tokens to token 1000 (alpha moved by 0.01), then 0.995 at the end
    assert changed[:2] == [10, 20] and changed[-1] == 1500 and calls[-1] == pytest.approx(0.995)


# ---- sample.py ----

def run(*args, check=True):  # sample.py in a subprocess
    return run_script("sample.py", *args, check=check)


@pytest.fixture(scope="module")
def checkpoints(offline_model, tmp_path_factory):
    """A random two-label K/V prefix and LoRA, saved as train.py saves them (the tone is not what is tested)."""
    from minprefix.lora import save_lora
    from minprefix.prefix import save_prefix
    folder = tmp_path_factory.mktemp("long")
    labels = ["positive", "negative"]
    save_prefix(folder / "prefix.safetensors", random_prefix(offline_model.config, P=10), offline_model.name_or_path,
                labels)
    save_lora(folder / "lora.safetensors", lora(offline_model.config), offline_model.name_or_path, labels)
    tok = Tokenizer()
    text = tok.encode(" ".join(json.loads(line)["text"] for line in open(REPO / "data" / "train.jsonl")))
    (folder / "long.txt").write_text(f" {tok.decode(text[:990])}\n {tok.decode(text[1000:1950])}\n".replace("\n ", "\n"))
    return folder


def test_sample_writes_every_token_asked_for_past_the_window(checkpoints, tmp_path):
    """Two prompts of about 950-990 tokens after a 10-position prefix, 40 new tokens each: the window's end comes
    within the first 30, and every sample still has its 40 (<|endoftext|> held back), batched and streamed."""
    out = {}
    for how in ("--no-stream", "--stream"):
        path = tmp_path / f"{how}.jsonl"
        run("--prefix", checkpoints / "prefix.safetensors", "--prompts-file", checkpoints / "long.txt",
            "--max-new-tokens", 40, "--min-new-tokens", 40, "--temperature", 0, how, "--output", path)
        out[how] = [json.loads(line) for line in path.read_text().splitlines()]
        assert [r["new_tokens"] for r in out[how]] == [40, 40]
    longer = max(range(2), key=lambda i: len(out["--stream"][i]["prompt"]))
    assert out["--stream"][longer]["text"] == out["--no-stream"][longer]["text"]  # the row that sets the re-encoding
    p = run("--prefix", checkpoints / "prefix.safetensors", "--prompts-file", checkpoints / "long.txt",
            "--num-beams", 2, "--max-new-tokens", 40, check=False)
    assert p.returncode == 1 and "beam search stops at the context's end" in p.stderr and "Traceback" not in p.stderr


def test_sample_takes_a_schedule_and_names_what_is_wrong(checkpoints, tmp_path):
    prefix, out = checkpoints / "prefix.safetensors", tmp_path / "s.jsonl"
    p = run("--prefix", prefix, "--alpha", "0:0,20:1", "--n", 2, "--max-new-tokens", 30, "--min-new-tokens", 30,
            "--output", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["alpha"] for r in rows] == ["0:0,20:1"] * 2 and [r["new_tokens"] for r in rows] == [30, 30]
    assert "alpha 0:0,20:1 over the new tokens" in p.stdout
    for args, message in ((["--alpha", "0:0,x:1"], "point 'x:1' is not TOKEN:ALPHA"),
                          (["--alpha", "0:0,20:1", "--num-beams", 2], "a schedule is for sampling"),
                          (["--alpha", "0:0,20:2"], "--alpha must be in [0, 1]"),
                          (["--min-new-tokens", 50, "--max-new-tokens", 10], "--min-new-tokens must be between 0 and"),
                          (["--prefix-boost", -1], "--prefix-boost must be >= 0")):
        p = run("--prefix", prefix, *args, check=False)
        assert p.returncode == 2 and message in p.stderr, (args, p.stderr[-300:])
    p = run("--prefix", checkpoints / "lora.safetensors", "--prefix-boost", 0.1, "--n", 1, check=False)
    assert p.returncode == 2 and "--prefix-boost amplifies attention to a prefix" in p.stderr
    run("--prefix", checkpoints / "lora.safetensors", "--alpha", "0:1,10:0", "--n", 1, "--max-new-tokens", 15)
    # the boost turns the default guidance off (it would undo the boost over long texts); asked for, it is on
    header = lambda *a: run("--prefix", prefix, "--n", 1, "--max-new-tokens", 15, *a).stdout.splitlines()[0]
    assert "guidance" not in header("--prefix-boost", 0.2)
    assert "guidance 1 from the bare model" in header()
    assert "guidance 2 from the bare model" in header("--prefix-boost", 0.2, "--guidance", 2)
