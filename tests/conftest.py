"""Shared fixtures: the offline model, and HF reference models written to disk in the hub's layouts."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINPREFIX_SHARED", REPO.parent / "shared"))
# .ci/run points this at ../shared/models/imdb-gpt2-19m: a small GPT-2-architecture LM, NOT GPT-2
OFFLINE_MODEL = Path(os.environ.get("MINPREFIX_TEST_MODEL", SHARED / "models" / "imdb-gpt2-19m"))
# tiktoken's GPT-2 BPE, offline: ../shared/tiktoken where it exists and nothing else was set (the scripts the tests
# start inherit it)
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")


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
