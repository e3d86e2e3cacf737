"""The fast path (minprefix/fast.py) against the reference it replaces: logits, loss and gradients, greedy and
sampled tokens. Float32; the tolerances are relative to the magnitudes compared, and tokens must be identical."""
import pytest
import torch
import torch.nn.functional as F

from conftest import EOT, assert_near
from minprefix import GPT2, KVCache, Tokenizer, fast
from minprefix.generate import generate, pad_left
from minprefix.prefix import KVPrefix, label_weights
from minprefix.trainer import lm_loss, batch_loss

# float32 rounding: DecodeLinear's blocks, oneDNN's packed products and the online softmax sum the same products in
# other orders (seen: ~1e-6 of the logits' and the gradients' magnitude, on AMD EPYC and on Intel Xeon with AMX)
RTOL = 1e-5


@pytest.fixture(scope="module")
def fast_model(offline_model_dir):
    return fast.accelerate(GPT2.from_pretrained(offline_model_dir).requires_grad_(False))


@pytest.fixture(autouse=True)
def two_threads():
    """DecodeLinear splits one row over the threads; with one thread it would not split and test less."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prefix(offline_model):
    torch.manual_seed(0)
    p = KVPrefix(offline_model.config, 2, 6, mlp=True)
    return p


def prompts():
    tok = Tokenizer()
    return [[tok.eot] + tok.encode(t) for t in ("The lectures were", "I went to see this film because my friend", "")]


def test_the_fast_pieces_are_in_place(fast_model, offline_model):
    assert type(fast_model.h[0].attn.c_attn) is fast.DecodeLinear and type(offline_model.h[0].attn.c_attn) is torch.nn.Linear
    assert fast_model.lm_head.weight is fast_model.wte.weight and fast_model.wte.weight.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(fast_model.state_dict().values(), offline_model.state_dict().values()))


@pytest.mark.parametrize("rows", [1, 8, 40])  # 1: rows split over the cores; 8, 40: the packed weight
def test_logits(fast_model, offline_model, rows):
    torch.manual_seed(rows)
    idx = torch.randint(0, 50257, (rows, 1)) if rows <= 8 else torch.randint(0, 50257, (2, rows // 2))
    with torch.no_grad():
        assert_near(fast_model(idx), offline_model(idx), RTOL, f"rows {rows}: logits")


@pytest.mark.parametrize("rows", [1, 3])
def test_few_rows_take_whichever_product_this_cpu_runs_faster(monkeypatch, rows):
    """fastest() times DecodeLinear's own way (one row: the blocked bmm; a few rows: oneDNN's packed product)
    against MKL's F.linear once per shape and row count (the first wins on the AMD EPYC, the second on the Intel
    Xeon), and forward() takes the one it found; each equal to nn.Linear."""
    torch.manual_seed(0)
    linear = fast.DecodeLinear(64, 96).requires_grad_(False)
    x = torch.randn(rows, 1, 64)
    own = "one row" if rows == 1 else "packed"
    key = (64, 96, rows, torch.get_num_threads())
    monkeypatch.setattr(fast, "FASTEST", {})
    want = torch.nn.functional.linear(x, linear.weight, linear.bias)
    with torch.no_grad():
        assert_near(linear(x), want, RTOL, f"{rows} rows, as timed")
        assert fast.FASTEST[key] in (own, "linear") and list(fast.FASTEST) == [key]
        for way in (own, "linear"):
            fast.FASTEST[key] = way
            called = []
            name = "one_row" if rows == 1 else "packed_product"
            product = getattr(fast.DecodeLinear, name)
            monkeypatch.setattr(fast.DecodeLinear, name, lambda self, *a, p=product: called.append(1) or p(self, *a))
            assert_near(linear(x), want, RTOL, f"{rows} rows, {way}")
            monkeypatch.setattr(fast.DecodeLinear, name, product)
            assert bool(called) == (way == own)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_linear_equals_linear_on_gpt2_small_shapes(dtype):
    """Both of DecodeLinear's ways (one row: the weight's rows split over the cores, with lm_head's odd row count;
    more rows: oneDNN's packed weight) against nn.Linear, on GPT-2 small's shapes; and a weight changed in place is
    repacked, not read stale."""
    torch.manual_seed(0)
    # half precision: the same products, each output rounded to 8 (bfloat16) or 11 (float16) bits: 2^-8 of its
    # magnitude, and the order of the float32 sums before that
    rtol = RTOL if dtype == torch.float32 else 2 ** -7
    for out_f, in_f in ((2304, 768), (768, 3072), (50257, 768)):
        ref = torch.nn.Linear(in_f, out_f, bias=out_f != 50257).to(dtype)
        fast_linear = torch.nn.Linear(in_f, out_f, bias=out_f != 50257).to(dtype)
        fast_linear.load_state_dict(ref.state_dict())
        fast_linear.__class__ = fast.DecodeLinear
        for rows in (1, 3, 40):
            x = torch.randn(rows, 1, in_f, dtype=dtype)
            with torch.no_grad():
                assert_near(fast_linear(x).float(), ref(x).float(), rtol, f"{out_f} x {in_f}, {rows} rows")
                if rows == 1 and dtype == torch.float32:  # the way forward() takes for it, called by name
                    assert_near(fast_linear.one_row(x), ref(x), rtol, f"{out_f} x {in_f} one_row")
                gelu = F.gelu(ref(x).float(), approximate="tanh")  # linear_gelu: fused into oneDNN's product
                assert_near(fast.linear_gelu(fast_linear, x).float(), gelu, rtol, f"{out_f} x {in_f} GELU, {rows} rows")
        with torch.no_grad():
            fast_linear.weight.mul_(2)
            ref.weight.mul_(2)
            assert_near(fast_linear(x).float(), ref(x).float(), rtol, "after the weight changed in place")
        y = fast_linear(x)  # with gradients wanted: nn.Linear itself
        assert y.grad_fn is not None


@pytest.mark.slow
@pytest.mark.parametrize("mlp", [False, True])
def test_loss_and_prefix_gradients(fast_model, offline_model, mlp):
    torch.manual_seed(1)
    p = KVPrefix(offline_model.config, 2, 5, mlp=mlp)
    if not mlp:
        with torch.no_grad():
            p.table_.normal_(0, 0.5)
    idx, targets = torch.randint(0, 50257, (2, 16)), torch.randint(0, 50257, (2, 16))
    targets[1, 9:] = -100  # padding
    labels = torch.tensor([0, 1])
    got = []
    for model, loss in ((offline_model, lm_loss), (fast_model, fast.lm_loss)):
        p.zero_grad()
        value = batch_loss(model, p, idx, targets, labels, loss)
        value.backward()
        got.append((value.item(), [q.grad.clone() for q in p.parameters()]))
    (ref_loss, ref_grads), (fast_loss, fast_grads) = got
    assert_near(fast_loss, ref_loss, RTOL, "loss")
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads)):
        assert_near(a, b, RTOL, f"gradient {i}")


def test_loss_gradient_reaches_wte_when_it_is_trained(offline_model_dir):
    """Fine-tuning trains wte, which is also the lm_head: the fast loss must give it the reference's gradient."""
    model = GPT2.from_pretrained(offline_model_dir)  # every weight trainable, the reference layout
    idx, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    targets[0, :4] = -100
    grads = []
    for loss in (lm_loss, fast.lm_loss):
        model.zero_grad()
        loss(model, idx, targets).backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters()})
    for name in grads[0]:
        assert_near(grads[1][name], grads[0][name], RTOL, f"{name} gradient")
    assert grads[1]["wte.weight"].abs().sum() > 0


def test_loss_refuses_targets_out_of_range(fast_model):
    idx = torch.randint(0, 50257, (1, 4))
    for bad in (-1, 50257):
        targets = torch.tensor([[5, bad, 7, -100]])
        with pytest.raises(IndexError):
            F.cross_entropy(torch.zeros(4, 50257), targets[0])  # what the reference does
        with pytest.raises(IndexError, match=f"target {bad} is out of bounds"):
            fast.lm_loss(fast_model, idx, targets)


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])  # True: the GPU's StaticKVCache step, run eagerly here
def test_greedy_tokens_over_64_steps(fast_model, offline_model, prefix, static):
    idx, real = pad_left(prompts(), EOT)
    with torch.no_grad():
        weights = label_weights(2, alpha=0.7).repeat(3, 1)
        ref_cache, fast_cache = prefix.cache(offline_model, weights), prefix.cache(fast_model, weights)
    ref = generate(offline_model, idx, 64, kv_cache=ref_cache, real=real, temperature=0, eot=None)
    got = fast.generate(fast_model, idx, 64, kv_cache=fast_cache, real=real, temperature=0, eot=None,
                        cuda_graph=static)
    assert all(len(r) == 64 for r in ref) and got == ref
    assert fast_cache.length == 6 and fast_cache.real is None  # the caller's cache is left as it was


@pytest.mark.slow
@pytest.mark.parametrize("static", [False, True])
def test_sampled_tokens_for_a_seed(fast_model, offline_model, prefix, static):
    idx, real = pad_left(prompts(), EOT)
    with torch.no_grad():
        weights = label_weights(2, label=0).repeat(3, 1)
        caches = prefix.cache(offline_model, weights), prefix.cache(fast_model, weights)
    kw = dict(real=real, temperature=0.9, top_k=200, top_p=0.95, seed=11, eot=None)
    ref = generate(offline_model, idx, 48, kv_cache=caches[0], **kw)
    assert fast.generate(fast_model, idx, 48, kv_cache=caches[1], cuda_graph=static, **kw) == ref
    assert ref != generate(offline_model, idx, 48, kv_cache=caches[0], **dict(kw, seed=12))


@pytest.mark.slow
def test_static_cache_at_the_context_edges(fast_model, offline_model):
    n = offline_model.config.n_positions
    kw = dict(temperature=0, eot=None, cuda_graph=True)
    assert fast.generate(fast_model, torch.tensor([[50256, 464]]), 0, **kw) == [[]]
    assert fast.generate(fast_model, torch.tensor([[50256, 464]]), 1, **kw) == \
        generate(offline_model, torch.tensor([[50256, 464]]), 1, temperature=0, eot=None)
    idx = torch.randint(0, 50257, (1, n - 3))  # 3 positions left, 8 tokens asked for: re-encoded after the third
    assert fast.generate(fast_model, idx, 8, **kw) == generate(offline_model, idx, 8, temperature=0, eot=None)
    assert len(fast.generate(fast_model, idx, 8, **kw)[0]) == 8
    full = torch.randint(0, 50257, (1, n))
    assert len(fast.generate(fast_model, full, 5, **kw)[0]) == 5
    with pytest.raises(ValueError, match="exceed the context"):
        fast.generate(fast_model, torch.randint(0, 50257, (1, n + 1)), 5, **kw)


def test_reference_switch(monkeypatch):
    for value, on in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv("MINPREFIX_REFERENCE", value)
        assert fast.enabled() is on
    monkeypatch.delenv("MINPREFIX_REFERENCE")
    assert fast.enabled()


# ---- on a GPU (run where one is present; skipped on a CPU, and not counted as coverage there) ----

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graph_tokens_equal_eager(offline_model_dir):
    model = GPT2.from_pretrained(offline_model_dir, device="cuda").requires_grad_(False)
    idx, real = pad_left(prompts(), EOT, device="cuda")
    eager = fast.generate(model, idx, 64, real=real, temperature=0, eot=None, cuda_graph=False)
    assert fast.generate(model, idx, 64, real=real, temperature=0, eot=None, cuda_graph=True) == eager
    reference = generate(model, idx, 64, real=real, temperature=0, eot=None)
    assert reference == eager
    kw = dict(real=real, temperature=0.9, top_p=0.9, seed=5, eot=None)
    assert fast.generate(model, idx, 48, cuda_graph=True, **kw) == generate(model, idx, 48, **kw)
    n = model.config.n_positions
    full = torch.randint(0, 50257, (1, n), device="cuda")
    assert len(fast.generate(model, full, 5, temperature=0, eot=None)[0]) == 5
    assert fast.generate(model, idx, 0, real=real, eot=EOT) == [[], [], []]
    with pytest.raises(ValueError, match="exceed the context"):
        fast.generate(model, torch.randint(0, 50257, (1, n + 1), device="cuda"), 5, eot=EOT)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_cuda_graph_on_a_second_gpu(offline_model_dir):
    model = GPT2.from_pretrained(offline_model_dir, device="cuda:1").requires_grad_(False)
    idx = torch.tensor([prompts()[1]], device="cuda:1")
    assert fast.generate(model, idx, 32, temperature=0, eot=None) == generate(model, idx, 32, temperature=0, eot=None)


@pytest.mark.slow
def test_half_precision_runs_through_both_paths(offline_model_dir):
    """bfloat16 weights, a float32 prefix: the cache comes in the model's dtype, both decoders run (the static
    cache's buffers take that dtype too), and the fast loss stays close to the reference's."""
    model = GPT2.from_pretrained(offline_model_dir, dtype=torch.bfloat16).requires_grad_(False)
    torch.manual_seed(0)
    p = KVPrefix(model.config, 2, 4, mlp=True)
    idx, real = pad_left(prompts(), EOT)
    weights = label_weights(2, alpha=0.5).repeat(3, 1)
    with torch.no_grad():
        cache = p.cache(model, weights)
    assert cache.layers[0][0].dtype == torch.bfloat16 and p.table().dtype == torch.float32
    full = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)  # the same weights, float32
    with torch.no_grad():
        full_cache = KVCache([(k.float(), v.float()) for k, v in cache.layers])
    want = generate(full, idx, 16, kv_cache=full_cache, real=real, temperature=0, eot=None)
    for out in (generate(model, idx, 16, kv_cache=cache, real=real, temperature=0, eot=None),
                fast.generate(model, idx, 16, kv_cache=cache, real=real, temperature=0, eot=None, cuda_graph=True)):
        assert [len(r) for r in out] == [16, 16, 16]
        # bfloat16 picks float32's greedy tokens until the first near-tie, then the texts part ways: the first
        # tokens of every row agree, and they are real words, not one token repeated
        assert all(a[:3] == b[:3] for a, b in zip(out, want)), (out, want)
        assert all(len(set(r)) > 2 for r in out)
    sampled = fast.generate(model, idx, 16, kv_cache=cache, real=real, temperature=0.8, top_p=0.9, seed=0, eot=None)
    assert [len(r) for r in sampled] == [16, 16, 16] and all(len(set(r)) > 4 for r in sampled)
    targets = torch.randint(0, 50257, (2, 10))
    x = torch.randint(0, 50257, (2, 10))
    a = batch_loss(model, p, x, targets, torch.tensor([0, 1]), lm_loss)
    b = batch_loss(model, p, x, targets, torch.tensor([0, 1]), fast.lm_loss)
    # the same bfloat16 model's logits taken whole or chunk by chunk (online softmax over the vocabulary): each
    # logit rounded to bfloat16's 8 bits (2^-8 of its magnitude), then summed in another order
    assert_near(b.item(), a.item(), 2 ** -8, "bfloat16 loss, fast against reference")
    assert a.dtype == b.dtype == torch.float32
    b.backward()
    assert all(q.grad is not None and q.grad.dtype == torch.float32 for q in p.parameters())


def test_top_k_and_logsumexp_equal_torchs():
    """best_pairs' two pieces against torch.topk and torch.logsumexp: ties across blocks, the values past the last
    whole block, banned (-inf) entries, rows of -inf and +inf, float32 and bfloat16 input."""
    torch.manual_seed(0)
    x = torch.randn(7, 50257) * 4
    x[1, 100:300] = 30.0  # ties spanning blocks
    x[2, -5:] = 40.0  # the best in the 17 values after the last block of 64
    x[3, 64:128] = float("-inf")
    for k in (1, 10, 64):
        want, got = x.topk(k), fast.top_k(x, k)
        assert torch.equal(got[0], want.values)
        assert torch.equal(x.gather(1, got[1]), want.values)  # indices of equal values: ties in any order
    assert torch.equal(fast.top_k(x[:, :300], 10)[0], x[:, :300].topk(10).values)  # 4 blocks, k = 10: torch's own
    for rows in (x, x.bfloat16()):
        # exp2 of the logits scaled by log2(e) against exp: each term rounded in float32, ~1e-7 of the result
        torch.testing.assert_close(fast.logsumexp(rows), torch.logsumexp(rows.float(), -1, keepdim=True),
                                   atol=0, rtol=1e-6)
    edge = torch.tensor([[float("-inf")] * 3, [0.0, float("inf"), 1.0], [-1e4, -1e4, 0.0]])
    assert torch.equal(fast.logsumexp(edge), torch.logsumexp(edge, -1, keepdim=True))


@pytest.mark.slow
def test_bfloat16_prefix_mlp_in_a_training_step(offline_model_dir, tmp_path):
    """for_training swaps HalfPrefixMLP into a prefix trained on a bfloat16 model on a CPU (into nothing else):
    in a step its products run in bfloat16 and its gradients land float32, close to the float32 MLP's; with
    gradients off (held-out passes, saving) it is PrefixMLP exactly."""
    from minprefix.prefix import PrefixMLP, load_prefix
    model = GPT2.from_pretrained(offline_model_dir, dtype=torch.bfloat16).requires_grad_(False)
    torch.manual_seed(0)
    half, plain = KVPrefix(model.config, 2, 5, mlp=True), KVPrefix(model.config, 2, 5, mlp=True)
    plain.load_state_dict(half.state_dict())
    fast.for_training(model, half)
    assert all(type(m) is fast.HalfPrefixMLP for m in half.mlp) and type(model.h[0].attn) is fast.FloatAttention
    full = fast.for_training(GPT2.from_pretrained(offline_model_dir).requires_grad_(False), plain)  # float32
    assert all(type(m) is PrefixMLP for m in plain.mlp)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    table = half.table()
    assert table.dtype == torch.bfloat16 and table.requires_grad
    # the MLP's two products in bfloat16 (8 bits) against float32: 2^-8 of each product's magnitude, twice over
    assert_near(table.float(), plain.table().detach(), 2 ** -6, "bfloat16 MLP table")
    x, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    fast.lm_loss(model, x, targets, half.cache(model, w)).backward()
    fast.lm_loss(full, x, targets, plain.cache(full, w)).backward()
    for (name, a), b in zip(half.named_parameters(), plain.parameters()):
        assert a.grad.dtype == torch.float32, name
        cos = F.cosine_similarity(a.grad.flatten(), b.grad.flatten(), dim=0)
        assert cos > 0.99, (name, cos)  # the same direction, to bfloat16 rounding
    with torch.no_grad():
        assert half.table().dtype == torch.float32 and torch.equal(half.table(), plain.table())
    half.save(tmp_path / "p.safetensors", model, ["a", "b"])
    saved, _ = load_prefix(tmp_path / "p.safetensors")
    assert torch.equal(saved.table(), plain.table().detach())  # what is saved is float32's table


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True])
def test_half_precision_step_attends_to_the_written_slots_only(offline_model_dir, padded):
    """In bfloat16 StaticKVCache.cpu_step reads each layer's whole buffers (a slice of them would be copied to
    make it contiguous), masking the slots not written yet: filled with large keys and values, they change
    nothing. Its logits against float32's reference step on the same cache, to bfloat16 rounding."""
    model = fast.accelerate(GPT2.from_pretrained(offline_model_dir, dtype=torch.bfloat16).requires_grad_(False))
    full = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)
    idx, real = pad_left(prompts(), EOT) if padded else (torch.tensor([prompts()[0]] * 2), None)
    cache = KVCache()
    with torch.no_grad():
        model.hidden(model.wte(idx), cache, real)
        full_cache = KVCache([(k.float(), v.float()) for k, v in cache.layers], cache.real)
        static = fast.StaticKVCache(cache, capacity=cache.length + 6)
        for t in static.k + static.v:
            t[:, :, cache.length:] = 50.0  # never written: what a step must not attend to
        x = torch.full((len(idx), 1), 262)
        got = static.cpu_step(model, x).float()
        want = full.lm_head(full.hidden(full.wte(x), full_cache)[:, -1])
    assert (got.argmax(-1) == want.argmax(-1)).all()
    # bfloat16 weights and activations through every layer against float32: a few 2^-8 of the logits' magnitude;
    # attending to the garbage slots would move them by the logits' own size
    assert_near(got, want, 2 ** -4, "bfloat16 step against float32")


@pytest.mark.slow
@pytest.mark.parametrize("with_prefix", [False, True])
def test_fast_beam_search_finds_the_references_hypotheses(fast_model, offline_model, with_prefix):
    """StaticSteps + best_pairs against beam.py's reference pieces: the same hypotheses with the same scores, for a
    left-padded batch, a prefix, banned tokens and min_new_tokens."""
    from minprefix.beam import hypotheses
    idx, real = pad_left(prompts(), EOT)
    cache = None
    if with_prefix:
        torch.manual_seed(0)
        p = KVPrefix(offline_model.config, 2, 4, mlp=True)
        with torch.no_grad():
            cache = p.cache(offline_model, label_weights(2, alpha=0.3).repeat(3, 1))
    kw = dict(num_beams=4, max_new_tokens=24, min_new_tokens=3, banned=(198, 628), kv_cache=cache, real=real,
              eot=EOT)
    want = hypotheses(offline_model, idx, **kw)
    got = hypotheses(fast_model, idx, steps=fast.StaticSteps, pairs=fast.best_pairs, **kw)
    for w, g in zip(want, got):
        assert [t for _, t in w] == [t for _, t in g]
        # scores: means of up to 24 float32 log-probs, each a logit minus a log-sum-exp over 50,257 logits of
        # magnitude ~10 (best_pairs' exp2 against log_softmax): ~1e-6 of the logits each, ~1e-5 of a score
        assert_near([s for s, _ in g], [s for s, _ in w], 1e-4, "beam scores")
    assert fast.beam_search(fast_model, idx, **kw) == [h[0][1][:-1] if h[0][1][-1:] == [EOT] else h[0][1]
                                                        for h in want]


def test_beam_reorder_moves_only_what_the_beams_wrote():
    """StaticKVCache.reorder(rows, same_below=S) leaves the first S positions, which a prompt's beams share, and
    gives each row the positions after them from its new source row: the same cache as reordering everything."""
    torch.manual_seed(0)
    prompt = [(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 4, 8)) for _ in range(2)]  # 2 prompts, 2 layers, S=4
    beams = torch.tensor([0, 0, 1, 1])  # two beams per prompt
    caches = [fast.StaticKVCache(KVCache(prompt).select(beams), capacity=7) for _ in range(2)]
    written = [(torch.randn(4, 3, 2, 8), torch.randn(4, 3, 2, 8)) for _ in range(2)]  # each beam's own 2 tokens
    for c in caches:
        for i, (k, v) in enumerate(written):
            c.k[i][:, :, 4:6], c.v[i][:, :, 4:6] = k, v
        c.n = 6
    rows = torch.tensor([1, 1, 3, 2])  # survivors stay within their prompt
    caches[0].reorder(rows, same_below=4)
    caches[1].reorder(rows)
    for i, (k, v) in enumerate(written):
        assert torch.equal(caches[0].k[i], caches[1].k[i]) and torch.equal(caches[0].v[i], caches[1].v[i])
        assert torch.equal(caches[0].k[i][:, :, 4:6], k[rows]) and torch.equal(caches[0].v[i][:, :, :4],
                                                                               prompt[i][1][beams])


def test_int8_linear_is_the_rounded_weight_times_its_scale(monkeypatch):
    """Int8Linear's product is x @ (q * scale)^T + b with q = round(w / scale), |q| <= 127, one scale per output
    row; so it is within half a step of the float weight's product. Each kernel: fbgemm's, whose rounding of the
    input to 8 bits (7 on a CPU without VNNI) costs about 1% (2%) of the product, and the weight-only fallback,
    exact in its bfloat16 input."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(768, 2304)
    x = torch.randn(3, 768)
    for kernel, reduce_range, bound in (("fbgemm", False, 0.012), ("fbgemm", True, 0.024), ("weight only", 0, 0.005)):
        monkeypatch.setattr(fast, "REDUCE_RANGE", reduce_range)
        if kernel == "weight only":
            monkeypatch.setattr(fast, "int8_packed", lambda *a: None)
        q8 = fast.Int8Linear(ref)
        assert (q8.packed is not None) == (kernel == "fbgemm"), "x86 PyTorch has fbgemm"
        q = q8.rounded_weight()
        assert q.dtype == torch.int8 and q.shape == (2304, 768) and q.abs().max() == 127
        w = q.float() * q8.scale[:, None]
        assert (w - ref.weight).abs().max() <= 0.51 * q8.scale.max()
        with torch.no_grad():
            got = q8(x)
            want = (x.bfloat16().float() if kernel == "weight only" else x) @ w.t() + ref.bias
        assert got.dtype == torch.float32 and got.shape == (3, 2304)
        err = ((got - want).norm() / want.norm()).item()
        assert err < bound, f"{kernel}, reduce_range {reduce_range}: relative error {err:.4f}"


@pytest.mark.slow
def test_int8_decoding_picks_float32s_tokens_mostly(offline_model_dir):
    """The whole model in int8 (CPU), teacher-forced over the held-out texts: its next-token argmax agrees with
    float32's at nearly every position (greedy texts then part ways at the first near-tie, like bfloat16's)."""
    from conftest import REPO
    from minprefix.data import batches, encode, read_jsonl
    model = fast.decoding_model(offline_model_dir, "int8")
    assert type(model.h[0].mlp.c_fc) is fast.Int8Linear and type(model.lm_head) is fast.Int8Linear
    full = fast.decoding_model(offline_model_dir, "float32")
    items = encode(read_jsonl(REPO / "data/test.jsonl")[:20], Tokenizer(), ["positive", "negative"], 1000)
    (idx, targets, _), = batches(items, 20)
    with torch.no_grad():
        a = model(idx).float().argmax(-1)[targets != -100]
        b = full(idx).argmax(-1)[targets != -100]
    agree = (a == b).float().mean().item()
    print(f"int8 picks float32's next token at {agree:.1%} of {a.numel()} positions")
    assert agree > 0.95
    with pytest.raises(ValueError, match="int8 decoding runs a float32 model"):
        fast.quantize_int8(GPT2.from_pretrained(offline_model_dir, dtype=torch.bfloat16))


@pytest.mark.slow
def test_the_package_generate_takes_the_fast_path_unless_told(offline_model_dir, monkeypatch):
    import minprefix
    model = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)
    idx = torch.tensor([prompts()[0]])
    want = generate(model, idx, 10, temperature=0, eot=EOT)
    monkeypatch.setenv("MINPREFIX_REFERENCE", "1")
    assert minprefix.generate(model, idx, 10, temperature=0, eot=EOT) == want
    assert type(model.h[0].attn.c_attn) is torch.nn.Linear  # the reference leaves the model as it is
    monkeypatch.setenv("MINPREFIX_REFERENCE", "0")
    assert minprefix.generate(model, idx, 10, temperature=0, eot=EOT) == want
    assert type(model.h[0].attn.c_attn) is fast.DecodeLinear  # the fast pieces, swapped in


def test_half_precision_warns_only_where_the_cpu_has_no_bfloat16_units(monkeypatch):
    monkeypatch.setattr(fast, "cpu_has_bfloat16", lambda: False)
    note = fast.half_precision_note("bfloat16", "cpu")
    assert note and "no bfloat16 dot-product units" in note and "--dtype bfloat16" in note
    assert fast.half_precision_note("float32", "cpu") is None
    assert fast.half_precision_note("int8", "cpu") is None  # a float32 model around int8 products
    assert fast.half_precision_note("bfloat16", "cuda") is None  # GPUs are not read from /proc/cpuinfo
    monkeypatch.setattr(fast, "cpu_has_bfloat16", lambda: True)
    assert fast.half_precision_note("bfloat16", "cpu") is None
    monkeypatch.setattr(fast, "cpu_has_bfloat16", lambda: None)  # unknown: no warning rather than a wrong one
    assert fast.half_precision_note("bfloat16", "cpu") is None


def test_the_library_leaves_malloc_alone_and_the_scripts_opt_in(offline_model_dir, tmp_path, monkeypatch):
    """keep_freed_memory changes glibc's malloc for the whole process: minprefix.generate, decoding_model and
    trainer.train never call it (issue 30: a program calling minprefix.generate had its malloc changed); train.py
    and sample.py do, for their own process."""
    import minprefix
    import sample
    import train
    from minprefix.data import Example, encode
    from minprefix.trainer import train as train_loop
    asked = []
    monkeypatch.setattr(fast, "glibc", lambda name: asked.append(name) or (lambda *a: 0))
    model = GPT2.from_pretrained(offline_model_dir).requires_grad_(False)
    minprefix.generate(model, torch.tensor([[50256, 464]]), 3, temperature=0, eot=EOT)
    fast.decoding_model(offline_model_dir)
    items = encode([Example("The labs were fine.", "task", "t:0")], Tokenizer(), ["task"], 100)
    prefix = KVPrefix(model.config, 1, 2)
    train_loop(model, prefix, items, items, ["task"], tmp_path / "p.safetensors", epochs=1, batch_size=1)
    assert "mallopt" not in asked
    monkeypatch.chdir(tmp_path)  # train.py records its checkpoint in weights/latest, here
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The labs were fine.", "sentiment": "positive"}\n'
                    '{"text": "The food was cold.", "sentiment": "negative"}\n')
    assert train.main(["--model", str(offline_model_dir), "--data", str(data), "--val-data", str(data),
                       "--max-steps", "1", "--out", str(tmp_path / "q.safetensors")]) == 0
    assert asked.count("mallopt") == 1
    assert sample.main(["--prefix", str(tmp_path / "q.safetensors"), "--n", "1", "--max-new-tokens", "2"]) == 0
    assert asked.count("mallopt") == 2


def test_the_nucleus_from_a_top_k_draws_the_references_tokens():
    """fast.sample against generate.sample, the same generator: flat and peaked rows (a nucleus of a few tokens and
    one of thousands, past the first top-k of 256), with top-k before top-p and without."""
    from minprefix.generate import sample
    torch.manual_seed(0)
    for trial, scale in enumerate((0.3, 1.0, 3.0, 10.0) * 5):
        logits = torch.randn(16, 50257) * scale
        for kw in (dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_p=0.5, top_k=300),
                   dict(temperature=0.7, top_p=0.999), dict(temperature=0.9, top_p=1.0), dict(temperature=0)):
            draw = lambda f: f(logits, generator=torch.Generator().manual_seed(trial), **kw)
            assert torch.equal(draw(fast.sample), draw(sample)), (scale, kw)
