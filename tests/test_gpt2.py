"""Parity with code we did not write: HF transformers' GPT2LMHeadModel, in float32, max |dlogit| within RTOL of the
logits' magnitude."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import EOT, assert_near, random_hf_gpt2, write_hub_layout
from minprefix import GPT2, KVCache, Tokenizer, generate

transformers = pytest.importorskip("transformers")
# Two implementations of the same float32 model: HF's Conv1D is addmm on (in, out) weights, ours F.linear on
# (out, in), and its attention another kernel: the same sums in other orders, ~1e-6 of the logits' magnitude on
# both CPUs. A real difference (a transposed weight, a missing bias, a wrong mask) is of the order of the logits.
RTOL = 1e-5


def same_logits(ours, hf, idx):
    with torch.no_grad():
        assert_near(ours(idx), hf(idx).logits, RTOL, "logits against HF")


def test_tiny_random_config(tmp_path):
    hf = random_hf_gpt2(n_layer=3, n_head=4, n_embd=64, vocab_size=500, n_positions=48)
    ours = GPT2.from_pretrained(write_hub_layout(hf, tmp_path))
    idx = torch.randint(0, 500, (3, 40))
    same_logits(ours, hf, idx)


@pytest.fixture(scope="module")
def small_hf():  # GPT-2 small's shape (124M), random weights
    return random_hf_gpt2(seed=1)


@pytest.mark.parametrize("layout", ["hub", "transformer-prefixed", "prefixed-with-lm_head"])
def test_gpt2_small_shaped(small_hf, tmp_path, layout):
    folder = write_hub_layout(small_hf, tmp_path, prefixed=layout != "hub", with_lm_head=layout == "prefixed-with-lm_head")
    ours = GPT2.from_pretrained(folder)
    assert ours.num_params() == 124_439_808
    same_logits(ours, small_hf, torch.randint(0, 50257, (2, 64)))


def test_sharded_checkpoint(tmp_path):
    hf = random_hf_gpt2(n_layer=2, n_head=2, n_embd=32, vocab_size=300, n_positions=32)
    tensors = load_file(str(write_hub_layout(hf, tmp_path / "one") / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (folder / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    same_logits(GPT2.from_pretrained(folder), hf, torch.randint(0, 300, (2, 20)))


def test_offline_model(offline_model, offline_hf):
    # imdb-gpt2-19m: GPT-2's architecture, trained on movie reviews; stored in float16, loaded as float32
    p = next(offline_model.parameters())
    assert p.dtype == torch.float32 and p.device.type == "cpu" and not offline_model.training
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("The acting was wooden, but the score made up for it. I would watch it again")])
    same_logits(offline_model, offline_hf, idx)
    same_logits(offline_model, offline_hf, torch.randint(0, 50257, (2, 128)))


def test_real_gpt2_when_cached():
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache("openai-community/gpt2", "model.safetensors"), str):
        pytest.skip("the official gpt2 is not in the local Hugging Face cache (no hub access here); "
                    "run once with internet to cache it and this parity test runs")
    ours = GPT2.from_pretrained("gpt2")
    hf = transformers.GPT2LMHeadModel.from_pretrained("openai-community/gpt2", dtype=torch.float32).eval()
    tok = Tokenizer()
    idx = torch.tensor([tok.encode("Hello, I'm a language model, and today I will tell you about prefixes")])
    same_logits(ours, hf, idx)
    assert generate(ours, idx, 20, temperature=0, eot=tok.eot)[0] == hf.generate(idx, max_new_tokens=20, do_sample=False)[0, idx.size(1):].tolist()


def test_kv_cache_matches_full_forward(offline_model):
    idx = torch.randint(0, 50257, (2, 24))
    with torch.no_grad():
        full = offline_model(idx)
        cache = KVCache()
        parts = [offline_model(idx[:, :10], cache)]  # a prompt, then one token at a time
        parts += [offline_model(idx[:, t:t + 1], cache) for t in range(10, 24)]
    assert cache.length == 24
    # the cache's attention sums over S+T keys in pieces, the full forward in one: rounding only
    assert_near(torch.cat(parts, dim=1), full, RTOL, "cached against full forward")


def test_greedy_tokens_match_hf(offline_model, offline_hf):
    tok = Tokenizer()
    idx = torch.tensor([[tok.eot] + tok.encode("I went to see this film because")])
    ours = generate(offline_model, idx, max_new_tokens=20, temperature=0, eot=-1)[0]
    theirs = offline_hf.generate(idx, max_new_tokens=20, do_sample=False, pad_token_id=tok.eot,
                                 eos_token_id=None, attention_mask=torch.ones_like(idx))[0, idx.size(1):].tolist()
    assert len(ours) == 20 and ours == theirs


# ---- loader errors: each names what is wrong ----

def tiny_folder(tmp_path, **kw):
    hf = random_hf_gpt2(n_layer=1, n_head=2, n_embd=16, vocab_size=100, n_positions=16)
    return write_hub_layout(hf, tmp_path, **kw)


def test_error_offline_and_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError) as e:
        GPT2.from_pretrained("gpt2-medium")
    msg = str(e.value)
    assert "hub is unreachable" in msg and str(tmp_path / "empty-cache") in msg and "local folder" in msg
    assert "MINPREFIX_MODEL=" in msg and "../shared/models/imdb-gpt2-19m" in msg  # the variable and the folder


def test_error_shape_mismatch(tmp_path):
    folder = tiny_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["h.0.mlp.c_fc.weight"] = torch.zeros(16, 48)  # (n_embd, 4*n_embd) would be (16, 64)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"h\.0\.mlp\.c_fc\.weight has shape \(16, 48\).*expects \(16, 64\)"):
        GPT2.from_pretrained(folder)


def test_error_missing_tensor(tmp_path):
    folder = tiny_folder(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["ln_f.bias"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(KeyError, match=r"tensor ln_f\.bias is missing"):
        GPT2.from_pretrained(folder)


def test_error_unknown_name():
    with pytest.raises(ValueError, match="unknown model name 'gpt3'.*gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT2.from_pretrained("gpt3")


def test_error_no_such_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no folder at"):
        GPT2.from_pretrained(str(tmp_path / "nowhere"))


def test_dtype_on_disk_and_asked(tmp_path):
    folder = tiny_folder(tmp_path, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for p in GPT2.from_pretrained(folder).parameters())
    assert all(p.dtype == torch.bfloat16 for p in GPT2.from_pretrained(folder, dtype=torch.bfloat16).parameters())


def test_config_refuses_variants_it_does_not_implement():
    from minprefix.gpt2 import config_from_hf
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=16)
    assert config_from_hf(dict(base, activation_function="gelu_pytorch_tanh", n_inner=128)).n_embd == 32
    for field, value in [("activation_function", "relu"), ("n_inner", 100), ("scale_attn_weights", False),
                         ("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True),
                         ("tie_word_embeddings", False)]:
        with pytest.raises(ValueError, match=f"cfg.json: {field}={value!r} is a GPT-2 variant"):
            config_from_hf(dict(base, **{field: value}), "cfg.json")


def test_folder_is_recorded_as_an_absolute_path(tmp_path, monkeypatch):
    tiny_folder(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    model = GPT2.from_pretrained("model")
    assert model.name_or_path == str(tmp_path / "model")
    monkeypatch.chdir("/")  # a prefix trained on it names a folder that loads from anywhere
    assert GPT2.from_pretrained(model.name_or_path).config == model.config


def test_prompt_longer_than_the_context(tmp_path):
    model = GPT2.from_pretrained(tiny_folder(tmp_path))  # n_positions 16
    with pytest.raises(ValueError, match="10 cached \\+ 7 new positions exceed the context of 16"):
        model(torch.zeros(1, 7, dtype=torch.long), KVCache([(torch.zeros(1, 2, 10, 8),) * 2]))
    with pytest.raises(ValueError, match="0 cached \\+ 17 new positions exceed the context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_left_padding_gives_each_row_its_own_logits(offline_model):
    """Prompts of different lengths share a batch, padded on the left: each row's logits are its logits alone."""
    from minprefix.generate import pad_left
    prompts = [[50256, 464, 3290, 373, 257], [50256, 40], [50256, 1212, 2646]]
    idx, real = pad_left(prompts, EOT)
    with torch.no_grad():
        batched = offline_model(idx, None, real)
        for row, p in enumerate(prompts):
            alone = offline_model(torch.tensor([p]))[0]
            # a batch of 3 and a batch of 1 take other kernel blockings (AMX/AVX-512): rounding only; a padding
            # position leaking into a row's attention would move its logits by ~1
            assert_near(batched[row, -len(p):], alone, RTOL, f"row {row} batched against alone")


def test_offline_errors_name_the_variable_and_the_folder(monkeypatch):
    """Both settings an offline machine needs are named by the errors that ask for them."""
    import tiktoken
    from minprefix import Tokenizer

    def no_network(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(OSError, match=r"TIKTOKEN_CACHE_DIR=\.\./shared/tiktoken"):
        Tokenizer()
