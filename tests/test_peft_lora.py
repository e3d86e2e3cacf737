"""minprefix.peft on LoRA checkpoints: PEFT LoRA adapters out and back, checked against PEFT itself (peft and
transformers are test-only references here; minprefix never imports them)."""
import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, assert_near, random_hf_gpt2, write_hub_layout
from minprefix import Tokenizer
from minprefix.lora import LoRA, load_lora, save_lora
from minprefix.peft import AdapterError, export_adapters, import_adapters, main
from test_peft import copy_adapter

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# the base models in float64 (see model64; in float32 the two alone already differ by ~1e-6 of the logits'
# magnitude), the LoRA changes in float32, their own dtype (as PEFT computes them): rounding ~2e-8 of the logits'
# magnitude, where a wrong scale, rank or row would move them by ~1e-2 or more
RTOL = 1e-6
LABELS = ["positive", "negative"]
TARGETS = {"qv": ("q", "v"), "all": ("q", "k", "v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
RANK_ALPHA = {"qv": (4, 32.0), "all": (2, 5.0)}  # "all": c_attn's rank 6, alpha 15 go to rank_pattern, alpha_pattern


def hf_model(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def model64(offline_model_dir):
    """The offline model in float64, as hf_model loads it: ours and HF's then differ by ~1e-14 without an adapter,
    so a 1e-5 difference with one is the adapter's, not float32 rounding's."""
    from minprefix import GPT2
    return GPT2.from_pretrained(offline_model_dir, dtype=torch.float64).requires_grad_(False)


def text_ids(text=" The mentors were patient and the labs were well prepared."):
    tok = Tokenizer()
    return torch.tensor([[tok.eot] + tok.encode(text)])


def peft_model(model_dir, folders, caught=None):
    """PeftModel.from_pretrained with the first adapter, load_adapter with the others, named by their folders.
    caught: a set to add the warnings PEFT raised to."""
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_model(model_dir), str(folders[0]), adapter_name=folders[0].name)
        for folder in folders[1:]:
            pm.load_adapter(str(folder), adapter_name=folder.name)
    if caught is not None:
        caught |= {(w.category.__name__, str(w.message)) for w in raised}
    return pm.eval()


def peft_logits(pm, adapter):
    pm.set_adapter(adapter)
    idx = text_ids()
    with torch.no_grad():
        return pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits


def our_logits(model, lora, weights):  # weights (n_labels,)
    with torch.no_grad():
        run, _ = lora.apply(model, torch.as_tensor(weights, dtype=torch.float32)[None])
        return run(text_ids())


def one_hot(n, i):
    return torch.eye(n)[i]


@pytest.fixture(scope="module")
def checkpoints(model64, tmp_path_factory):
    """Our own LoRA checkpoints: {"qv", "all"} -> path, with random non-zero B (a fresh B is zero, which would hide
    a wrong layout)."""
    root = tmp_path_factory.mktemp("lora")
    paths = {}
    for seed, (name, targets) in enumerate(TARGETS.items()):
        torch.manual_seed(seed)
        lora = LoRA(model64.config, len(LABELS), *RANK_ALPHA[name], targets)
        with torch.no_grad():
            for layer in lora.h:
                for pair in layer.values():
                    pair.B.normal_(std=0.02)
        paths[name] = root / f"{name}.safetensors"
        save_lora(paths[name], lora, model64.name_or_path, LABELS, {"note": f"a {name} test checkpoint"})
    return paths


def train_like_peft(model_dir, folder, seed, **config):
    """What a PEFT user gets: get_peft_model with LoraConfig(fan_in_fan_out=True, ...), lora_B random (as after
    training; PEFT starts it at zero), save_pretrained."""
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf_model(model_dir), peft.LoraConfig(task_type="CAUSAL_LM", fan_in_fan_out=True, **config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    pm.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def peft_adapters(offline_model_dir, tmp_path_factory):
    """Adapters PEFT made, one per label, a different rank per label: {"c_attn", "c_attn+c_proj+c_fc"} -> folders.
    The second also has rank_pattern and alpha_pattern entries, applied as PEFT applies them."""
    root = tmp_path_factory.mktemp("peft-lora")
    return {
        "c_attn": [train_like_peft(offline_model_dir, root / "pos-c_attn", 0, target_modules=["c_attn"], r=4, lora_alpha=32),
                   train_like_peft(offline_model_dir, root / "neg-c_attn", 1, target_modules=["c_attn"], r=2, lora_alpha=32)],
        "c_attn+c_proj+c_fc": [
            train_like_peft(offline_model_dir, root / "pos-three", 2, target_modules=["c_attn", "c_proj", "c_fc"], r=4,
                            lora_alpha=32),
            train_like_peft(offline_model_dir, root / "neg-three", 3, target_modules=["c_attn", "c_proj", "c_fc"], r=8,
                            lora_alpha=16, rank_pattern={"h.0.mlp.c_fc": 3}, alpha_pattern={"c_proj": 6})]}


def tensors_of(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ---- export ----

@pytest.mark.parametrize("name", list(TARGETS))
def test_export_loads_in_peft_with_our_logits(offline_model_dir, model64, checkpoints, peft_adapters, tmp_path, name):
    folders = export_adapters(checkpoints[name], tmp_path / "out")
    assert [f.name for f in folders] == LABELS
    assert sorted(p.name for p in folders[0].iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "minprefix.json"]
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    r, alpha = RANK_ALPHA[name]
    if name == "qv":  # one c_attn pair of rank 2r, the same alpha / r
        assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (2 * r, 2 * alpha, {})
    else:
        assert (config["r"], config["lora_alpha"]) == (r, alpha)
        assert (config["rank_pattern"], config["alpha_pattern"]) == ({"attn.c_attn": 3 * r}, {"attn.c_attn": 3 * alpha})
    # every field as PEFT's own LoraConfig writes it, no other
    want = peft.LoraConfig(task_type="CAUSAL_LM", r=config["r"], lora_alpha=config["lora_alpha"], fan_in_fan_out=True,
                           target_modules=config["target_modules"], rank_pattern=config["rank_pattern"],
                           alpha_pattern=config["alpha_pattern"], inference_mode=True,
                           base_model_name_or_path=model64.name_or_path).to_dict()
    want["target_modules"] = sorted(want["target_modules"])
    assert json.loads(json.dumps(want)) == dict(config, target_modules=sorted(config["target_modules"]))
    tensors, _ = tensors_of(folders[0] / "adapter_model.safetensors")
    C, k = model64.config.n_embd, 2 if name == "qv" else 3
    assert tensors["base_model.model.transformer.h.3.attn.c_attn.lora_A.weight"].shape == (k * r, C)
    assert tensors["base_model.model.transformer.h.3.attn.c_attn.lora_B.weight"].shape == (3 * C, k * r)
    if name == "qv":  # key rows zero; query rows on the q columns only
        B = tensors["base_model.model.transformer.h.3.attn.c_attn.lora_B.weight"]
        assert not B[C:2 * C].any() and not B[:C, r:].any() and B[:C, :r].abs().min() > 0
    lora, _ = load_lora(checkpoints[name], model64)
    ours_said, peft_said = set(), set()
    pm = peft_model(offline_model_dir, folders, ours_said)
    peft_model(offline_model_dir, peft_adapters["c_attn"], peft_said)
    assert ours_said == peft_said  # PEFT has nothing more to say about ours than about its own adapters
    module = pm.base_model.model.transformer.h[0].attn.c_attn
    assert module.r[LABELS[0]] == k * r and module.scaling[LABELS[0]] == alpha / r  # PEFT read the patterns as meant
    plain = model64(text_ids()).detach()
    for i, label in enumerate(LABELS):
        ours, theirs = our_logits(model64, lora, one_hot(2, i)), peft_logits(pm, label)
        assert_near(ours, theirs, RTOL, f"export LoRA {name} {label}: logits against PeftModel.from_pretrained")
        assert (ours - plain).abs().max().item() > 0.1  # and the LoRA does change the logits


# ---- import ----

@pytest.mark.parametrize("name", ["c_attn", "c_attn+c_proj+c_fc"])
def test_import_of_peft_made_adapters_matches_peft(offline_model_dir, model64, peft_adapters, tmp_path, name):
    folders = peft_adapters[name]
    out = tmp_path / "imported.safetensors"
    import_adapters(folders, LABELS, out)
    lora, meta = load_lora(out, model64)
    assert meta["labels"] == LABELS and meta["base_model"] == str(offline_model_dir)
    assert meta["targets"] == (["c_attn"] if name == "c_attn" else ["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    assert meta["rank"] == (4 if name == "c_attn" else 8)  # the largest rank; the others zero-padded
    assert meta["info"]["imported_from"] == "peft"
    pm = peft_model(offline_model_dir, folders)
    for i, folder in enumerate(folders):
        ours, theirs = our_logits(model64, lora, one_hot(2, i)), peft_logits(pm, folder.name)
        assert_near(ours, theirs, RTOL, f"import PEFT LoRA {name} {LABELS[i]}: logits against PEFT")


def test_our_mix_is_pefts_cat_of_the_two_adapters(offline_model_dir, model64, peft_adapters, tmp_path):
    folders = peft_adapters["c_attn+c_proj+c_fc"]  # different ranks and patterns: the hard case
    import_adapters(folders, LABELS, tmp_path / "p.safetensors")
    lora, _ = load_lora(tmp_path / "p.safetensors", model64)
    pm = peft_model(offline_model_dir, folders)
    pm.add_weighted_adapter([f.name for f in folders], [0.3, 0.7], "mix", combination_type="cat")
    ours, theirs = our_logits(model64, lora, [0.3, 0.7]), peft_logits(pm, "mix")
    assert_near(ours, theirs, RTOL, "mix 0.3/0.7: logits against PEFT add_weighted_adapter(cat)")
    for i in range(2):  # a mix, not one of the two
        assert (ours - our_logits(model64, lora, one_hot(2, i))).abs().max().item() > 0.05


@pytest.mark.parametrize("name", list(TARGETS))
def test_round_trip_export_import_is_bit_exact(checkpoints, tmp_path, name):
    folders = export_adapters(checkpoints[name], tmp_path / "out")
    import_adapters(folders, LABELS, tmp_path / "back.safetensors")
    before, meta_before = tensors_of(checkpoints[name])
    after, meta_after = tensors_of(tmp_path / "back.safetensors")
    assert meta_after == meta_before  # labels, base model and config, rank, alpha, targets, info: every string
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_sidecar_that_no_longer_fits_the_weights_is_not_trusted(offline_model_dir, model64, checkpoints,
                                                                   tmp_path):
    """Adapters trained on in PEFT after export (here: key rows no longer zero) come in as c_attn, still exact."""
    folders = export_adapters(checkpoints["qv"], tmp_path / "out")
    weights = folders[0] / "adapter_model.safetensors"
    tensors, _ = tensors_of(weights)
    C = model64.config.n_embd
    for k, t in tensors.items():
        if k.endswith("lora_B.weight"):
            t[C:2 * C] = 0.02 * torch.randn_like(t[C:2 * C])
    save_file(tensors, str(weights), metadata={"format": "pt"})
    import_adapters(folders, LABELS, tmp_path / "back.safetensors")
    lora, meta = load_lora(tmp_path / "back.safetensors", model64)
    assert meta["targets"] == ["c_attn"] and meta["info"]["note"] == "a qv test checkpoint"
    pm = peft_model(offline_model_dir, folders[:1])
    assert_near(our_logits(model64, lora, one_hot(2, 0)), peft_logits(pm, LABELS[0]), RTOL,
                "import of an exported adapter changed in PEFT: logits against PEFT")


# ---- refusals: each names the file, the field or tensor, and the value ----

@pytest.mark.parametrize("field,value", [("use_rslora", True), ("use_dora", True), ("bias", "all"), ("lora_bias", True),
                                         ("layers_to_transform", [0, 1]), ("layers_to_transform", 0),
                                         ("layer_replication", [[0, 4]]),
                                         ("modules_to_save", ["lm_head"]), ("target_parameters", ["mlp.c_fc.weight"]),
                                         ("init_lora_weights", "pissa")])
def test_refuses_what_minprefix_lora_cannot_hold(peft_adapters, tmp_path, field, value):
    bad = copy_adapter(peft_adapters["c_attn"][1], tmp_path / "bad", **{field: value})
    with pytest.raises(AdapterError, match=rf"bad/adapter_config\.json: {field} is {value!r}".replace("[", r"\[")):
        import_adapters([peft_adapters["c_attn"][0], bad], LABELS, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("module,name", [("lm_head", "base_model.model.lm_head.lora_A.weight"),
                                         ("wte", "base_model.model.transformer.wte.lora_embedding_A")])
def test_refuses_other_target_modules(peft_adapters, tmp_path, module, name):
    bad = copy_adapter(peft_adapters["c_attn"][0], tmp_path / "bad", target_modules=["c_attn", module])
    tensors, _ = tensors_of(bad / "adapter_model.safetensors")
    tensors[name] = torch.zeros(4, 256)  # the tensor PEFT writes for that module
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=rf"bad/adapter_model\.safetensors: tensor {name} is not a LoRA pair"):
        import_adapters([bad], ["positive"], tmp_path / "x.safetensors")


def test_refuses_another_peft_type_mixed_in(peft_adapters, tmp_path):
    prefix = tmp_path / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"}))
    with pytest.raises(AdapterError, match=r"prefix/adapter_config\.json: peft_type is 'PREFIX_TUNING', expected 'LORA'"):
        import_adapters([peft_adapters["c_attn"][0], prefix], LABELS, tmp_path / "x.safetensors")
    ia3 = copy_adapter(peft_adapters["c_attn"][0], tmp_path / "ia3", peft_type="IA3")
    with pytest.raises(AdapterError, match=r"ia3/adapter_config\.json: peft_type is 'IA3', expected 'PREFIX_TUNING', "
                                           r"'PROMPT_TUNING' \(a soft prompt\) or 'LORA'"):
        import_adapters([ia3], ["positive"], tmp_path / "x.safetensors")


def test_refuses_an_adapter_for_another_base_shape(offline_model_dir, peft_adapters, tmp_path):
    tiny = write_hub_layout(random_hf_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64), tmp_path / "tiny")
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tiny),
                             peft.LoraConfig(task_type="CAUSAL_LM", target_modules=["c_attn"], r=2, fan_in_fan_out=True))
    pm.save_pretrained(str(tmp_path / "tiny-adapter"))
    with pytest.raises(AdapterError, match=r"tiny-adapter/adapter_model\.safetensors: transformer\.h\.0\.attn\.c_attn "
                                           r"has lora_A \(2, 32\), lora_B \(96, 2\), but the base model .*imdb-gpt2-19m "
                                           r"\(n_layer=8, n_embd=256\) with r=2 .* wants lora_A \(2, 256\), lora_B \(768, 2\): this "
                                           r"adapter was made for another base model"):
        import_adapters([tmp_path / "tiny-adapter"], ["positive"], tmp_path / "x.safetensors", str(offline_model_dir))
    # the other way: the adapter names the tiny model, its weights are the offline model's
    bad = copy_adapter(peft_adapters["c_attn"][0], tmp_path / "a", base_model_name_or_path=str(tiny))
    with pytest.raises(AdapterError, match=r"a/adapter_model\.safetensors: transformer\.h\.0\.attn\.c_attn .*tiny \(n_layer=2, "
                                           r"n_embd=32\)"):
        import_adapters([bad], ["positive"], tmp_path / "x.safetensors")
    wrong_r = copy_adapter(peft_adapters["c_attn"][0], tmp_path / "r", r=3)
    with pytest.raises(AdapterError, match=r"with r=3 \(r, rank_pattern in adapter_config\.json\).*does not fit its weights"):
        import_adapters([wrong_r], ["positive"], tmp_path / "x.safetensors")


# ---- the command line ----

@pytest.mark.slow
def test_cli(checkpoints, peft_adapters, tmp_path, capsys):
    assert main(["export", str(checkpoints["qv"]), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and (tmp_path / "out/negative/adapter_model.safetensors").is_file()
    assert "add_weighted_adapter" in out and "dtype=torch.float32" in out and "PeftModel.generate" not in out
    assert main(["import", str(tmp_path / "out/positive"), str(tmp_path / "out/negative"), "--labels",
                 "positive,negative", "--out", str(tmp_path / "back.safetensors")]) == 0
    assert "imported 2 adapters (positive, negative; LoRA r=4, alpha=32 on q, v)" in capsys.readouterr().out
    assert tensors_of(tmp_path / "back.safetensors")[1] == tensors_of(checkpoints["qv"])[1]
    assert main(["import", *map(str, peft_adapters["c_attn"]), "--labels", "a,b", "--out",
                 str(tmp_path / "peft.safetensors")]) == 0
    assert "LoRA r=4, alpha=32 on c_attn" in capsys.readouterr().out
    bad = copy_adapter(peft_adapters["c_attn"][0], tmp_path / "dora", use_dora=True)
    for argv, message in (
            (["import", str(bad), "--labels", "a", "--out", str(tmp_path / "x.safetensors")],
             "dora/adapter_config.json: use_dora is True (DoRA's magnitude vectors), which minprefix's LoRA cannot hold"),
            (["export", str(tmp_path / "missing.safetensors"), str(tmp_path / "o")], "no checkpoint at")):
        p = subprocess.run([sys.executable, "-m", "minprefix.peft", *argv], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 1 and p.stderr.startswith("python -m minprefix.peft: error: ") and message in p.stderr, \
            p.stderr
        assert "Traceback" not in p.stderr
