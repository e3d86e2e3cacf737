"""minprefix.peft: checkpoints as PEFT adapters and back, checked against PEFT itself (peft and transformers are
test-only references here; minprefix never imports them)."""
import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import REPO, assert_near, random_hf_gpt2, write_hub_layout
from minprefix import Tokenizer
from minprefix.peft import AdapterError, export_adapters, import_adapters, main
from minprefix.prefix import label_weights, load_prefix, make_prefix, save_prefix

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# float32 logits of one model through PEFT's cache and through ours: the same sums in other orders, ~1e-6 of the
# logits' magnitude; a wrong layout, label or position moves them by ~1
RTOL = 1e-5
LABELS = ["positive", "negative"]
TEXTS = {"positive": " A warm, funny and moving film.", "negative": " A dull, lazy and ugly film."}  # short: CPU time


def hf_model(model_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def text_ids(text=" The mentors were patient and the labs were well prepared."):
    tok = Tokenizer()
    return torch.tensor([[tok.eot] + tok.encode(text)])


def peft_logits(model_dir, adapter):
    """PEFT's own forward with the adapter as PeftModel.from_pretrained loads it -> logits of the text's positions,
    and the warnings the loading raised."""
    idx = text_ids()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf_model(model_dir), str(adapter)).eval()
    with torch.no_grad():
        logits = pm(input_ids=idx, attention_mask=torch.ones_like(idx)).logits
    return logits[:, -idx.shape[1]:], {(w.category.__name__, str(w.message)) for w in caught}


def our_logits(model, prefix, label):
    with torch.no_grad():
        return model(text_ids(), prefix.cache(model, label_weights(prefix.n_labels, label=label)))


def train_peft_adapter(model_dir, folder, text, P, projection, seed, steps=3):
    """What a PEFT user does: prefix tuning on the offline model, a few real optimizer steps, save_pretrained."""
    torch.manual_seed(seed)
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
                                     encoder_hidden_size=64)
    pm = peft.get_peft_model(hf_model(model_dir), config)
    init = pm.get_prompt_embedding_to_save("default").clone()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = text_ids(text)
    pm.train()
    for _ in range(steps):
        pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(str(folder))
    trained = pm.get_prompt_embedding_to_save("default")
    assert (trained - init).abs().max().item() > 1e-3  # the weights moved away from their init
    return pm


@pytest.fixture(scope="module")
def peft_adapters(offline_model_dir, tmp_path_factory):
    """Adapters trained and saved by PEFT: {projection: [positive folder, negative folder]}, plus for the
    projection ones a bare PrefixEncoder state dict (its MLP's weights) beside them."""
    root = tmp_path_factory.mktemp("peft")
    out = {}
    for projection in (False, True):
        out[projection] = []
        for seed, label in enumerate(LABELS):
            folder = root / f"{'mlp' if projection else 'table'}-{label}"
            pm = train_peft_adapter(offline_model_dir, folder, TEXTS[label], 5, projection, seed)
            out[projection].append(folder)
            if projection:
                encoder = root / f"encoder-{label}"
                encoder.mkdir()
                shutil.copy(folder / "adapter_config.json", encoder)
                state = {k: v.detach().contiguous() for k, v in pm.prompt_encoder["default"].state_dict().items()}
                save_file(state, str(encoder / "adapter_model.safetensors"))
    return out


@pytest.fixture(scope="module")
def checkpoints(offline_model, tmp_path_factory):
    """Our own checkpoints, one per mode: realistic (real tokens' keys and values, plus noise) but arbitrary."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for mode in ("kv", "embedding"):
        torch.manual_seed(0)
        prefix = make_prefix(mode, offline_model.config, 2, 6)
        prefix.init_from_tokens(offline_model, torch.randint(0, 50257, (2, 6)))
        with torch.no_grad():
            prefix.table_.add_(0.3 * torch.randn_like(prefix.table_))
        paths[mode] = root / f"{mode}.safetensors"
        save_prefix(paths[mode], prefix, offline_model.name_or_path, LABELS, {"note": f"a {mode} test checkpoint"})
    return paths


def copy_adapter(src, dst, **fields):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(fields)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


# ---- export ----

@pytest.mark.parametrize("mode", ["kv", "embedding"])
def test_export_loads_in_peft_with_our_logits(offline_model_dir, offline_model, checkpoints, peft_adapters, tmp_path, mode):
    folders = export_adapters(checkpoints[mode], tmp_path / "out")
    assert [f.name for f in folders] == LABELS
    assert sorted(p.name for p in folders[0].iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "minprefix.json"]  # PEFT ignores the third
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    peft_config = peft.PrefixTuningConfig() if mode == "kv" else peft.PromptTuningConfig()
    assert set(config) == set(peft_config.to_dict())  # every field PEFT 0.21 writes, no other
    c = offline_model.config
    assert config["peft_type"] == ("PREFIX_TUNING" if mode == "kv" else "PROMPT_TUNING")
    assert (config["task_type"], config["num_virtual_tokens"], config["num_transformer_submodules"]) == ("CAUSAL_LM", 6, 1)
    assert (config["num_layers"], config["token_dim"], config["num_attention_heads"]) == (c.n_layer, c.n_embd, c.n_head)
    assert config["inference_mode"] is True and config["base_model_name_or_path"] == offline_model.name_or_path
    if mode == "kv":
        assert config["prefix_projection"] is False
    with safe_open(str(folders[0] / "adapter_model.safetensors"), framework="pt") as f:
        width = c.n_layer * 2 * c.n_embd if mode == "kv" else c.n_embd
        assert list(f.keys()) == ["prompt_embeddings"] and tuple(f.get_tensor("prompt_embeddings").shape) == (6, width)
    _, peft_own_warnings = peft_logits(offline_model_dir, peft_adapters[False][0])
    prefix, _ = load_prefix(checkpoints[mode], offline_model)
    plain = offline_model(text_ids()).detach()
    for i, folder in enumerate(folders):
        theirs, caught = peft_logits(offline_model_dir, folder)
        ours = our_logits(offline_model, prefix, i)
        assert_near(ours, theirs, RTOL, f"export {mode} {folder.name}: logits against PeftModel.from_pretrained")
        assert (ours - plain).abs().max().item() > 0.1  # and the prefix does change the logits
        assert caught == peft_own_warnings  # PEFT has nothing more to say about ours than about its own adapters


def test_export_refuses_a_label_that_is_no_folder_name(offline_model, tmp_path):
    path = tmp_path / "p.safetensors"
    save_prefix(path, make_prefix("kv", offline_model.config, 2, 3), offline_model.name_or_path, ["good", "../bad"])
    with pytest.raises(ValueError, match=r"label '\.\./bad' cannot name an adapter folder"):
        export_adapters(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "bad").exists()  # checked before anything is written


# ---- import ----

@pytest.mark.parametrize("projection", [False, True])
def test_import_of_peft_trained_adapters_matches_peft(offline_model_dir, offline_model, peft_adapters, tmp_path, projection):
    out = tmp_path / "imported.safetensors"
    import_adapters(peft_adapters[projection], LABELS, out)
    prefix, meta = load_prefix(out, offline_model)
    assert meta["labels"] == LABELS and meta["mode"] == "kv" and meta["prefix_len"] == 5
    assert meta["base_model"] == str(offline_model_dir) and meta["info"]["prefix_projection"] == [projection] * 2
    plain = offline_model(text_ids()).detach()
    for i, folder in enumerate(peft_adapters[projection]):
        theirs, _ = peft_logits(offline_model_dir, folder)
        ours = our_logits(offline_model, prefix, i)
        assert_near(ours, theirs, RTOL, f"import {'prefix_projection' if projection else 'table'} {LABELS[i]}: "
                    f"logits against PEFT")
        assert (ours - plain).abs().max().item() > 0.1
    with torch.no_grad():  # the two labels are two different prefixes
        assert (prefix.table()[0] - prefix.table()[1]).abs().max().item() > 1e-3


def test_import_runs_a_prefix_encoders_mlp(offline_model, peft_adapters, tmp_path):
    """A bare PrefixEncoder state dict (embedding + transform MLP): the MLP is run, giving what PEFT saves."""
    enc = [f.parent / f"encoder-{label}" for f, label in zip(peft_adapters[True], LABELS)]
    import_adapters(enc, LABELS, tmp_path / "mlp.safetensors")
    import_adapters(peft_adapters[True], LABELS, tmp_path / "saved.safetensors")
    a, _ = load_prefix(tmp_path / "mlp.safetensors", offline_model)
    b, _ = load_prefix(tmp_path / "saved.safetensors", offline_model)
    assert_near(a.table(), b.table(), 1e-6, "MLP run on import against PEFT's saved table")  # one MLP, rounding


@pytest.mark.parametrize("mode", ["kv", "embedding"])
def test_round_trip_export_import(offline_model, checkpoints, tmp_path, mode):
    folders = export_adapters(checkpoints[mode], tmp_path / "out")
    import_adapters(folders, LABELS, tmp_path / "back.safetensors")
    before, m0 = load_prefix(checkpoints[mode], offline_model)
    after, m1 = load_prefix(tmp_path / "back.safetensors", offline_model)
    assert m1["mode"] == m0["mode"] and m1["labels"] == m0["labels"] and m1["base_model"] == m0["base_model"]
    assert m1["trained_with_mlp"] == m0["trained_with_mlp"] and m1["info"]["note"] == m0["info"]["note"]
    assert torch.equal(after.table(), before.table())  # bit for bit


@pytest.mark.slow
def test_a_conditional_prefix_survives_the_round_trip_and_eval_takes_it(offline_model, tmp_path):
    """An E2E (source -> text) task prefix, exported and imported back, is still conditional (eval.py --task e2e
    takes it); adapters PEFT itself trained on tables come in as conditional with --conditional."""
    import subprocess
    import sys
    from conftest import REPO, SHARED
    torch.manual_seed(0)
    prefix = make_prefix("kv", offline_model.config, 1, 5, mlp=True)
    ckpt = tmp_path / "e2e.safetensors"
    save_prefix(ckpt, prefix, offline_model.name_or_path, ["task"], {"conditional": True, "task": "source -> text"})
    folders = export_adapters(ckpt, tmp_path / "out")
    import_adapters(folders, ["task"], tmp_path / "back.safetensors")
    _, meta = load_prefix(tmp_path / "back.safetensors", offline_model)
    assert meta["info"]["conditional"] is True and meta["trained_with_mlp"] == "true"
    for f in folders:  # as PEFT would have saved them: no minprefix.json
        (f / "minprefix.json").unlink()
    import_adapters(folders, ["task"], tmp_path / "plain.safetensors")
    assert not load_prefix(tmp_path / "plain.safetensors")[1]["info"].get("conditional")
    main(["import", str(folders[0]), "--labels", "task", "--conditional", "--out", str(tmp_path / "peft.safetensors")])
    assert load_prefix(tmp_path / "peft.safetensors")[1]["info"]["conditional"] is True
    p = subprocess.run([sys.executable, str(REPO / "eval.py"), "--task", "e2e", "--prefix",
                        str(tmp_path / "peft.safetensors"), "--data", str(SHARED / "data/e2e/test.txt.gz"),
                        "--limit", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "eval")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "eval/eval.json").read_text())["settings"]["tables"] == 1


def test_old_adapter_model_bin(offline_model, peft_adapters, tmp_path):
    folders = []
    for src in peft_adapters[False]:
        dst = copy_adapter(src, tmp_path / src.name)
        with safe_open(str(dst / "adapter_model.safetensors"), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        (dst / "adapter_model.safetensors").unlink()
        torch.save(state, dst / "adapter_model.bin")
        folders.append(dst)
    import_adapters(folders, LABELS, tmp_path / "bin.safetensors")
    import_adapters(peft_adapters[False], LABELS, tmp_path / "st.safetensors")
    a, _ = load_prefix(tmp_path / "bin.safetensors", offline_model)
    b, _ = load_prefix(tmp_path / "st.safetensors", offline_model)
    assert torch.equal(a.table(), b.table())
    torch.save({"prompt_embeddings": state["prompt_embeddings"], "not_a_tensor": object()}, dst / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"adapter_model\.bin: not a state dict of tensors"):
        import_adapters(folders, LABELS, tmp_path / "evil.safetensors")  # weights_only refuses the pickled object


def test_imported_prefixes_mix_like_ours(offline_model, peft_adapters, tmp_path):
    import_adapters(peft_adapters[True], LABELS, tmp_path / "p.safetensors")
    prefix, _ = load_prefix(tmp_path / "p.safetensors", offline_model)
    with torch.no_grad():
        pos, neg, half = (prefix.cache(offline_model, w).layers for w in
                          (label_weights(2, label=0), label_weights(2, label=1), label_weights(2, alpha=0.5)))
        for hl, pl, nl in zip(half, pos, neg):
            for h, p, n in zip(hl, pl, nl):
                assert_near(h, (p + n) / 2, 1e-6, "half mix")  # einsum's 0.5 p + 0.5 n against (p + n) / 2: rounding
        mixed = offline_model(text_ids(), prefix.cache(offline_model, label_weights(2, alpha=0.5)))
        assert (mixed - our_logits(offline_model, prefix, 0)).abs().max().item() > 1e-3


# ---- refusals: each names the file, the field, the value and what was expected ----

def test_refuses_another_peft_type(offline_model_dir, peft_adapters, tmp_path):
    lora = peft.get_peft_model(hf_model(offline_model_dir), peft.LoraConfig(task_type="CAUSAL_LM", r=2,
                                                                          target_modules=["c_attn"]))
    lora.save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(AdapterError, match=r"lora/adapter_config\.json: peft_type is 'LORA', expected 'PREFIX_TUNING'"):
        import_adapters([peft_adapters[False][0], tmp_path / "lora"], LABELS, tmp_path / "x.safetensors")


def test_refuses_two_transformer_submodules(peft_adapters, tmp_path):
    bad = copy_adapter(peft_adapters[False][1], tmp_path / "seq2seq", num_transformer_submodules=2)
    with pytest.raises(AdapterError, match=r"seq2seq/adapter_config\.json: num_transformer_submodules is 2, expected 1"):
        import_adapters([peft_adapters[False][0], bad], LABELS, tmp_path / "x.safetensors")


def test_refuses_an_adapter_for_another_base_model(offline_model_dir, peft_adapters, tmp_path):
    tiny = write_hub_layout(random_hf_gpt2(n_layer=2, n_head=2, n_embd=32, n_positions=64), tmp_path / "tiny")
    # the adapter's own base_model_name_or_path names the tiny model: its shapes are not the tiny model's
    bad = copy_adapter(peft_adapters[False][0], tmp_path / "a", base_model_name_or_path=str(tiny))
    gone = copy_adapter(peft_adapters[False][0], tmp_path / "gone", base_model_name_or_path=str(tmp_path / "gone-model"))
    with pytest.raises(FileNotFoundError, match=r"no folder at .*gone-model.*named by base_model_name_or_path in "
                                                r".*gone/adapter_config\.json; pass --base-model"):
        import_adapters([gone], ["positive"], tmp_path / "x.safetensors")
    with pytest.raises(AdapterError, match=r"a/adapter_config\.json: num_layers is 8, but the base model .*tiny "
                                           r"has n_layer=2: this adapter was made for another base model"):
        import_adapters([bad], ["positive"], tmp_path / "x.safetensors")
    # an adapter made for the tiny model, checked against the offline model given by --base-model
    pm = peft.get_peft_model(transformers.GPT2LMHeadModel.from_pretrained(tiny),
                             peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    pm.save_pretrained(str(tmp_path / "tiny-adapter"))
    with pytest.raises(AdapterError, match=r"tiny-adapter/adapter_config\.json: num_layers is 2, but the base model "
                                           r".*imdb-gpt2-19m has n_layer=8.*tiny', says the adapter"):
        import_adapters([tmp_path / "tiny-adapter"], ["positive"], tmp_path / "x.safetensors", str(offline_model_dir))


def test_refuses_a_label_count_that_is_not_the_adapter_count(peft_adapters, tmp_path):
    with pytest.raises(ValueError, match=r"1 labels \(positive\) for 2 adapters"):
        import_adapters(peft_adapters[False], ["positive"], tmp_path / "x.safetensors")


def test_refuses_adapters_of_different_lengths(offline_model_dir, peft_adapters, tmp_path):
    pm = peft.get_peft_model(hf_model(offline_model_dir), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                 num_virtual_tokens=7))
    pm.save_pretrained(str(tmp_path / "seven"))
    with pytest.raises(AdapterError, match=r"seven/adapter_config\.json: num_virtual_tokens is 7, but .*table-positive"
                                           r"/adapter_config\.json has 5: the prefixes of one checkpoint share one length"):
        import_adapters([peft_adapters[False][0], tmp_path / "seven"], LABELS, tmp_path / "x.safetensors")


def test_refuses_weights_that_do_not_fit_the_config(peft_adapters, tmp_path):
    bad = copy_adapter(peft_adapters[False][1], tmp_path / "bad")
    save_file({"prompt_embeddings": torch.zeros(5, 100)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"bad/adapter_model\.safetensors: tensor prompt_embeddings has shape "
                                           r"\(5, 100\), expected \(5, 4096\)"):
        import_adapters([peft_adapters[False][0], bad], LABELS, tmp_path / "x.safetensors")
    save_file({"something_else": torch.zeros(5, 4096)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"holds tensors \['something_else'\], expected 'prompt_embeddings'"):
        import_adapters([peft_adapters[False][0], bad], LABELS, tmp_path / "x.safetensors")
    (bad / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has neither adapter_model.safetensors nor adapter_model.bin"):
        import_adapters([peft_adapters[False][0], bad], LABELS, tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json: not a PEFT adapter folder"):
        import_adapters([peft_adapters[False][0], tmp_path], LABELS, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---- the command line ----

def test_cli(offline_model, checkpoints, peft_adapters, tmp_path, capsys):
    assert main(["export", str(checkpoints["kv"]), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and (tmp_path / "out/negative/adapter_model.safetensors").is_file()
    assert "PeftModel.generate drops it" in out and "dtype=torch.float32" in out  # what a PEFT user must know
    assert main(["export", str(checkpoints["kv"]), str(tmp_path / "hub"), "--base-model", "openai-community/gpt2"]) == 0
    assert json.loads((tmp_path / "hub/positive/adapter_config.json").read_text())["base_model_name_or_path"] == \
        "openai-community/gpt2"
    assert main(["import", str(tmp_path / "out/positive"), str(tmp_path / "out/negative"), "--labels",
                 "positive,negative", "--out", str(tmp_path / "back.safetensors")]) == 0
    assert "imported 2 adapters (positive, negative; P=6)" in capsys.readouterr().out
    a, _ = load_prefix(tmp_path / "back.safetensors", offline_model)
    b, _ = load_prefix(checkpoints["kv"], offline_model)
    assert torch.equal(a.table(), b.table())
    for argv, message in (
            (["import", *map(str, peft_adapters[False]), "--labels", "positive", "--out", "x"], "--labels names 1 labels"),
            (["import", "a", "b", "--labels", "p,p", "--out", "x"], "--labels 'p,p': the names must be distinct"),
            (["import", "a", "--labels", "p"], "the following arguments are required: --out"),
            (["export", "ckpt"], "the following arguments are required: OUT_DIR"),
            ([], "the following arguments are required")):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f"python -m minprefix.peft: error: {message}" in err, err
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "export" in out and "import" in out and "PeftModel.from_pretrained" in out


def test_cli_errors_without_traceback(peft_adapters, tmp_path):
    p = subprocess.run([sys.executable, "-m", "minprefix.peft", "import", *map(str, peft_adapters[False]), "--labels",
                        "a,b", "--out", str(tmp_path / "x.safetensors"), "--base-model", str(tmp_path / "nowhere")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and p.stderr.startswith("python -m minprefix.peft: error: no folder at"), p.stderr
    assert "Traceback" not in p.stderr
