"""The prefix: parity with PEFT's prefix-tuning, gradients, mixing, positions, checkpoints."""
import pytest
import torch

from conftest import assert_near
from minprefix import GPT2, KVCache, Tokenizer
from minprefix.prefix import EmbeddingPrefix, KVPrefix, label_weights, load_prefix, make_prefix, save_prefix
from minprefix.method import build
from minprefix.trainer import batch_loss

# float32 logits of one model computed two ways (PEFT's attention and cache, or the prefix as a cache against the
# tokens in front): the same sums in other orders, ~1e-6 of the logits' magnitude; a wrong position, mask or
# layout moves them by ~1
RTOL = 1e-5


def random_kv_prefix(model, n_labels=2, P=7, mlp=False, seed=0):
    torch.manual_seed(seed)
    prefix = KVPrefix(model.config, n_labels, P, mlp=mlp)
    if not mlp:  # keys and values of real tokens, plus noise: a realistic but arbitrary prefix
        prefix.init_from_tokens(model, torch.randint(0, 50257, (n_labels, P)))
        with torch.no_grad():
            prefix.table_.add_(0.3 * torch.randn_like(prefix.table_))
    return prefix


@pytest.mark.parametrize("mlp", [False, True])
def test_kv_injection_matches_peft(offline_model_dir, offline_model, mlp):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.GPT2LMHeadModel.from_pretrained(offline_model_dir, dtype=torch.float32).eval()
    P, label = 7, 1
    prefix = random_kv_prefix(offline_model, P=P, mlp=mlp)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=mlp,
                                     encoder_hidden_size=512)
    pm = peft.get_peft_model(hf, config).eval()
    enc = pm.prompt_encoder["default"]
    with torch.no_grad():  # the same prefix in PEFT's PrefixEncoder: the table, or the label's MLP
        if mlp:
            ours = prefix.mlp[label]
            enc.embedding.weight.copy_(ours.wte.weight)
            for theirs, mine in ((enc.transform[0], ours.c_fc), (enc.transform[2], ours.c_proj)):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
        else:
            enc.embedding.weight.copy_(prefix.table_[label])
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("The mentors were patient and the labs were well prepared.")] * 2)
    with torch.no_grad():
        theirs = pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits
        ours = offline_model(idx, prefix.cache(offline_model, label_weights(2, label=label).repeat(2, 1)))
        plain = offline_model(idx)
    assert_near(ours, theirs, RTOL, f"logits against PEFT ({'MLP' if mlp else 'table'})")
    assert (ours - plain).abs().max().item() > 0.1  # and the prefix does change the logits


@pytest.mark.parametrize("mode", ["kv", "embedding"])
def test_prefix_of_real_tokens_equals_prepending_them(offline_model, mode):
    """Positions: a prefix sits at 0..P-1 and the text at P.. onward. A prefix made of real tokens' keys and
    values (or embeddings) must then give exactly the logits of the text with those tokens in front of it."""
    tok = Tokenizer()
    words = torch.tensor([tok.encode(" The summer school was")[:4], tok.encode(" I will not go back")[:4]])
    prefix = make_prefix(mode, offline_model.config, 2, 4)
    prefix.init_from_tokens(offline_model, words)
    idx = torch.tensor([tok.encode(" and the food was fine")] * 2)
    with torch.no_grad():
        ours = offline_model(idx, prefix.cache(offline_model, torch.eye(2)))
        full = offline_model(torch.cat([words, idx], dim=1))[:, 4:]
    assert_near(ours, full, RTOL, "prefix of real tokens against prepending them")


@pytest.mark.parametrize("mode,mlp", [("kv", False), ("kv", True), ("embedding", False)])
def test_only_the_prefix_learns(offline_model_dir, mode, mlp):
    model = GPT2.from_pretrained(offline_model_dir)  # its own copy: the shared fixture may carry other tests' grads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = build(mode, model, ["positive", "negative"], Tokenizer(), 5, mlp)
    start = {k: v.clone() for k, v in prefix.state_dict().items()}
    opt = torch.optim.AdamW(prefix.parameters(), lr=1e-3)
    model.requires_grad_(False)
    idx, targets = torch.randint(0, 50257, (2, 12)), torch.randint(0, 50257, (2, 12))
    loss = batch_loss(model, prefix, idx, targets, torch.tensor([0, 1]))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prefix.parameters())
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # bitwise unchanged
    assert any(not torch.equal(v, start[k]) for k, v in prefix.state_dict().items())


def expected_kv(table, weights, config):
    """The mixed keys and values, read off the (n_labels, P, L*2*C) table by hand in PEFT's layout: for layer i,
    columns [2iC, 2iC+C) are the keys of all heads, [2iC+C, 2iC+2C) the values; head h is D columns of those."""
    C, H = config.n_embd, config.n_head
    mixed = sum(w * table[n] for n, w in enumerate(weights))  # (P, L*2*C)
    layers = []
    for i in range(config.n_layer):
        k = mixed[:, 2 * i * C:2 * i * C + C].reshape(-1, H, C // H).transpose(0, 1)  # (H, P, D)
        v = mixed[:, 2 * i * C + C:2 * i * C + 2 * C].reshape(-1, H, C // H).transpose(0, 1)
        layers.append((k, v))
    return layers


@pytest.mark.parametrize("mlp", [False, True])
def test_kv_mixing_and_layout(offline_model, mlp):
    torch.manual_seed(0)
    prefix = make_prefix("kv", offline_model.config, 2, 6, mlp=mlp)
    if not mlp:
        with torch.no_grad():
            prefix.table_.normal_()
    with torch.no_grad():
        table = prefix.table()
        for weights in ([1.0, 0.0], [0.0, 1.0], [0.3, 0.7], [1.5, -0.5]):
            got = prefix.cache(offline_model, torch.tensor([weights])).layers
            want = expected_kv(table, weights, offline_model.config)
            for (k, v), (wk, wv) in zip(got, want):
                assert k.shape == (1, 4, 6, 64)
                if 0.0 in weights:  # a pure prefix is its table, exactly
                    assert torch.equal(k[0], wk) and torch.equal(v[0], wv)
                else:  # einsum's sum of two products against the hand-written one: a rounding of the last bit
                    assert_near(k[0], wk, 1e-6, "keys")
                    assert_near(v[0], wv, 1e-6, "values")
        pos = prefix.cache(offline_model, label_weights(2, label=0)).layers[3][1]
        assert torch.equal(prefix.cache(offline_model, label_weights(2, alpha=1.0)).layers[3][1], pos)
        assert not torch.equal(prefix.cache(offline_model, label_weights(2, alpha=0.0)).layers[3][1], pos)


def test_embedding_mixing_mixes_the_vectors(offline_model):
    """The soft prompt is mixed before the model, so its keys and values are the model's on the mixed vectors."""
    torch.manual_seed(0)
    prefix = make_prefix("embedding", offline_model.config, 2, 4)
    with torch.no_grad():
        prefix.table_.normal_(0, 0.1)
        mixed = 0.25 * prefix.table_[0] + 0.75 * prefix.table_[1]  # (P, C)
        want = KVCache()
        offline_model.hidden(mixed[None], want)
        got = prefix.cache(offline_model, label_weights(2, alpha=0.25))
    assert got.length == 4
    for i, ((k, v), (wk, wv)) in enumerate(zip(got.layers, want.layers)):
        # the mixed vectors through the model, einsum's mix against the hand-written one: float32 rounding of the
        # mix, carried through the layers (~1e-7 of the keys' magnitude)
        assert_near(k, wk, 1e-5, f"layer {i} keys")
        assert_near(v, wv, 1e-5, f"layer {i} values")


def test_three_labels_mix_by_one_weight_each(offline_model):
    prefix = KVPrefix(offline_model.config, 3, 4)
    with torch.no_grad():
        prefix.table_.normal_()
    w = label_weights(3, weights=[0.2, 0.3, 0.5])
    got = prefix.cache(offline_model, w).layers[0][0]
    want = sum(wi * prefix.cache(offline_model, label_weights(3, label=i)).layers[0][0] for i, wi in enumerate([0.2, 0.3, 0.5]))
    assert_near(got, want, 1e-6, "three-label mix")  # one einsum against three products summed: rounding
    with pytest.raises(ValueError, match="alpha mixes two labels"):
        label_weights(3, alpha=0.5)


def test_alpha_weighs_the_label_called_positive_whatever_the_order():
    """mix_weights: alpha goes to the label named "positive", 1 - alpha to the other, in the checkpoint's order
    (issue 30: a checkpoint stored negative-first had its dial reversed); a label by name; weights as given."""
    from minprefix.prefix import mix_weights
    assert torch.equal(mix_weights(["positive", "negative"], alpha=0.75), torch.tensor([[0.75, 0.25]]))
    assert torch.equal(mix_weights(["negative", "positive"], alpha=0.75), torch.tensor([[0.25, 0.75]]))
    assert torch.equal(mix_weights(["negative", "positive"], label="negative"), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(mix_weights(["a", "b", "c"], weights=[0.25, 0.5, 0.25]), torch.tensor([[0.25, 0.5, 0.25]]))
    assert torch.equal(mix_weights(["task"]), torch.tensor([[1.0]]))  # nothing asked: one label alone, two evenly
    assert torch.equal(mix_weights(["a", "b"]), torch.tensor([[0.5, 0.5]]))
    for labels in (["good", "bad"], ["positive", "negative", "neutral"], ["task"]):
        with pytest.raises(ValueError, match="give one weight per label") as e:
            mix_weights(labels, alpha=0.5)
        assert ", ".join(labels) in str(e.value)
    with pytest.raises(ValueError, match="unknown label 'neutral': this checkpoint's labels are negative, positive"):
        mix_weights(["negative", "positive"], label="neutral")
    with pytest.raises(ValueError, match="2 weights for 3 labels: give one per label"):
        mix_weights(["a", "b", "c"], weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="one of alpha, label, weights"):
        mix_weights(["negative", "positive"], alpha=0.5, label="positive")


def test_prefix_len_checked(offline_model):
    for bad in (0, -3, offline_model.config.n_positions):
        with pytest.raises(ValueError, match="prefix_len must be between 1 and"):
            KVPrefix(offline_model.config, 2, bad)
        with pytest.raises(ValueError, match="prefix_len must be between 1 and"):
            EmbeddingPrefix(offline_model.config, 2, bad)


def test_checkpoint_round_trip(offline_model, tmp_path):
    prefix = random_kv_prefix(offline_model, P=5, mlp=True)
    path = tmp_path / "p.safetensors"
    saved = save_prefix(path, prefix, offline_model.name_or_path, ["positive", "negative"], {"note": "test"})
    c = offline_model.config
    assert saved == 2 * 5 * c.n_layer * 2 * c.n_embd < 0.01 * offline_model.num_params()
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left behind
    loaded, meta = load_prefix(path, offline_model)
    assert loaded.mlp is None and meta["labels"] == ["positive", "negative"] and meta["info"] == {"note": "test"}
    with torch.no_grad():
        assert torch.equal(loaded.table(), prefix.table())


def test_checkpoint_for_another_base_model(offline_model, tmp_path):
    from minprefix.gpt2 import GPTConfig
    other = GPT2(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_positions=64))
    other.name_or_path = "tiny-random"
    path = tmp_path / "p.safetensors"
    save_prefix(path, KVPrefix(other.config, 2, 3), other.name_or_path, ["positive", "negative"])
    with pytest.raises(ValueError, match=r"trained for base model tiny-random.*but the model loaded is .*imdb-gpt2-19m"):
        load_prefix(path, offline_model)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-prefix"])
def test_corrupt_checkpoint(offline_model, tmp_path, damage):
    path = tmp_path / "p.safetensors"
    save_prefix(path, KVPrefix(offline_model.config, 2, 3), offline_model.name_or_path, ["positive", "negative"])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        from safetensors.torch import save_file
        save_file({"prefix": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="p.safetensors: not a"):
        load_prefix(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="train one with train.py"):
        load_prefix(tmp_path / "nothing.safetensors")
