"""Shared fixtures: the offline model, and HF reference models written to disk in the hub's layouts."""
import json
import os
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
