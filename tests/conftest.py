"""Shared fixtures: the offline model, and HF reference models written to disk in the hub's layouts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINPREFIX_SHARED", REPO.parent / "shared"))
EOT = 50256  # <|endoftext|> in GPT-2's vocabulary: the offline model's, and the HF models' made here
# .ci/run points this at ../shared/models/imdb-gpt2-19m: a small GPT-2-architecture LM, NOT GPT-2
OFFLINE_MODEL = Path(os.environ.get("MINPREFIX_TEST_MODEL", SHARED / "models" / "imdb-gpt2-19m"))
# tiktoken's GPT-2 BPE, offline: ../shared/tiktoken where it exists and nothing else was set (the scripts the tests
# start inherit it)
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


def run_script(script, *args, check=True):
    """python REPO/script args... in a subprocess, from the checkout's root -> CompletedProcess (text); with check,
    a non-zero exit fails the test with the script's output."""
    p = subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=900)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def assert_near(actual, expected, rtol, what="values"):
    """max |actual - expected| <= rtol * max |expected|: a float tolerance stated relative to the magnitude compared.

    Where rounding is the only difference (the same products summed in another order: another kernel, batch size or
    CPU, e.g. AVX-512 on AMD EPYC against AMX on Intel Xeon), float32 results differ by a few units of 2^-24 of the
    sums' magnitude, growing with the length of the sums and the layers they pass through: seen up to ~2e-6 of the
    logits' magnitude. A real defect (a wrong mask, a dropped bias, another label's prefix) moves the result by a
    sizable fraction of it. Each call's rtol, and the comment beside it, says which it is and where the rounding
    comes from."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} against {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    print(f"{what}: max |difference| {err:.2e} = {err / scale if scale else float('inf'):.1e} of max |expected| "
          f"{scale:.2e}")
    assert err <= rtol * scale, f"{what}: max |difference| {err:.2e} > {rtol:g} x max |expected| {scale:.2e}"


@pytest.fixture(scope="session")
def offline_model_dir():
    if not (OFFLINE_MODEL / "model.safetensors").is_file():
        pytest.skip(f"no offline model at {OFFLINE_MODEL} (set MINPREFIX_TEST_MODEL)")
    return OFFLINE_MODEL


@pytest.fixture(scope="session")
def offline_model(offline_model_dir):
    from minprefix import GPT2
    return GPT2.from_pretrained(offline_model_dir).requires_grad_(False)  # shared: frozen, so no test leaves grads


@pytest.fixture(scope="session")
def offline_hf(offline_model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(offline_model_dir, dtype=torch.float32).eval()


def random_hf_gpt2(seed=0, **config):
    """An HF GPT2LMHeadModel with every weight random, LayerNorms and biases included (HF inits those to 1 and 0,
    which would hide a swapped or dropped bias)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model


def write_hub_layout(model, folder, prefixed=False, with_lm_head=False, dtype=None):
    """The hub's file layout: config.json + model.safetensors with bare GPT2Model keys (prefixed=False),
    or the `transformer.` keys that save_pretrained writes (prefixed=True), optionally with lm_head.weight."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight" and not with_lm_head:
            continue
        name = k if prefixed or k == "lm_head.weight" else k.removeprefix("transformer.")
        tensors[name] = (v if dtype is None else v.to(dtype)).contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    return folder


# ---- tokenizers in the hub's layouts (tests/test_tokenizer.py, tests/test_languages.py) ----

# every script and whitespace case a byte-level BPE must get right (written for these tests)
MULTI_SCRIPT = ("Grüße aus Köln! Die Straßenbahn fährt um 7:45 Uhr, öfter als früher; Jörg's Äpfel kosten 3,50 €.\n"
                "北京今天下雨了，我们在咖啡馆里看书。\n"
                "東京の春は桜がきれいです。カタカナとひらがな、そして漢字。\n"
                "Emoji: 😀👍🏽🇩🇪 🧑‍🚀 — naïve café, résumé.\n"
                "   leading spaces, tabs\t\tand runs of    spaces\n\n\n  and blank lines   \n"
                "A <|endoftext|> inside a text is plain text, and so is </s>.\n"
                "it's we'll they've I'm you'd DON'T 12345 678.9 0x1F ")


def train_bpe(folder, texts, vocab_size=500, special_tokens=("<|endoftext|>",), layout="tokenizer.json",
              add_prefix_space=False):
    """A byte-level BPE trained on `texts` by HF tokenizers (test-only), all 256 bytes in its alphabet, saved into
    `folder` as tokenizer.json, or as vocab.json + merges.txt (layout="vocab+merges"). -> its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "tokenizer.json":
        bpe.save(str(folder / "tokenizer.json"))
    else:
        bpe.model.save(str(folder))
    return bpe.get_vocab_size()


@pytest.fixture(scope="session")
def gpt2_bpe_files(tmp_path_factory):
    """GPT-2's vocab.json + merges.txt (the hub's gpt2 files), rebuilt from tiktoken's gpt2 encoding: each token
    spelled with HF's byte -> character map, and each merge recovered as the two tokens that BPE, with only the
    earlier merges, leaves of the token. -> the folder holding them."""
    import tiktoken
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    enc = tiktoken.get_encoding("gpt2")
    ranks, chars = enc._mergeable_ranks, bytes_to_unicode()
    spell = lambda token: "".join(chars[b] for b in token)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])[256:]:
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the earliest-ranked pair, among merges made before this token
            r, i = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
            assert r < rank, token
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(" ".join(map(spell, parts)))
    folder = tmp_path_factory.mktemp("gpt2-bpe")
    vocab = {spell(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": enc.eot_token}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder
