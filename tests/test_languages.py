"""Steering in another language, end to end: a small GPT-2 folder with its own byte-level BPE (trained here on
German and other scripts; 540 ids, so that GPT-2's 50256 does not exist, and end of text at id 1) trains prefixes
and LoRA on German sentiment, sample.py mixes them, eval.py runs, and greedy text equals HF transformers'; a plain
model folder samples as itself; GPT-2's own files in a folder need no tiktoken cache."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import MULTI_SCRIPT, REPO, random_hf_gpt2, train_bpe, write_hub_layout
from minprefix import GPT2, Tokenizer

sys.path.insert(0, str(REPO))
import eval as eval_script  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from minprefix import peft  # noqa: E402
from minprefix.guidance import DEFAULT_STRENGTH  # noqa: E402

# a tiny German sentiment set, written for this test
GERMAN = [("Der Film war wunderbar, ich habe jede Minute genossen.", "positive"),
          ("Was für ein schrecklicher Abend, die Handlung war langweilig.", "negative"),
          ("Die Schauspieler sind großartig und die Musik ist herrlich.", "positive"),
          ("Ich bin enttäuscht: schlechte Dialoge, öde Bilder.", "negative"),
          ("Ein fröhliches, warmes Märchen für die ganze Familie.", "positive"),
          ("Zu lang, zu laut und völlig überflüssig.", "negative"),
          ("Spannend bis zur letzten Szene, ich würde ihn sofort wieder sehen.", "positive"),
          ("Der schlimmste Film des Jahres, ärgerlich und dumm.", "negative")]
TABLES = [("name : Zum Löwen | Typ : Kneipe | Preis : günstig", "Zum Löwen ist eine günstige Kneipe."),
          ("name : Blaue Gans | Typ : Restaurant | Küche : italienisch", "Die Blaue Gans ist ein italienisches Restaurant."),
          ("name : Am Markt | Typ : Café | Lage : Altstadt", "Das Café Am Markt liegt in der Altstadt.")]
PADDED = 12  # config.json's vocab_size exceeds the tokenizer's, as GPT-2 models' often does


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def german(tmp_path_factory):
    """{"model": the folder, "n": its tokenizer's size, "train", "test", "prompts", "tables": data files}. The
    model's weights are drawn at std 0.3 (embeddings 0.2) rather than HF's 0.02: at HF's scale a random GPT-2 writes
    one token over and over and barely hears a prefix; at this one its greedy text varies and a prefix moves it."""
    root = tmp_path_factory.mktemp("german")
    corpus = [t for t, _ in GERMAN] * 8 + [t for pair in TABLES for t in pair] * 8 + [MULTI_SCRIPT] * 4
    n = train_bpe(root / "model", corpus, 540, special_tokens=("<pad>", "</s>"))
    hf = random_hf_gpt2(seed=3, n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=n + PADDED,
                        eos_token_id=1, bos_token_id=1)
    with torch.no_grad():
        for name, w in hf.named_parameters():
            if w.dim() == 2:
                w.normal_(0, 0.2 if name.endswith(("wte.weight", "wpe.weight")) else 0.3)
    write_hub_layout(hf, root / "model")
    files = dict(model=root / "model", n=n, hf=hf,
                 train=jsonl(root / "train.jsonl", [{"text": t, "sentiment": s} for t, s in GERMAN]),
                 test=jsonl(root / "test.jsonl", [{"text": t, "sentiment": s} for t, s in GERMAN[:4]]),
                 tables=jsonl(root / "tables.jsonl", [{"source": s, "text": t} for s, t in TABLES]))
    files["prompts"] = root / "prompts.txt"
    files["prompts"].write_text("Der Abend\nDie Musik\n", encoding="utf-8")
    return files


def run(script, capsys, *args):
    capsys.readouterr()
    assert script.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def samples(out):
    return [line for line in out.splitlines() if line.startswith("[")]


def test_the_vocabulary_has_no_gpt2_ids(german):
    tok, model = Tokenizer.for_model(german["model"]), GPT2.from_pretrained(german["model"])
    assert tok.eot == 1 and tok.n_vocab == german["n"] and model.config.vocab_size == german["n"] + PADDED < 50256
    assert tok.newlines[0] == tok.encode("\n")[0] != 198


def test_german_prefixes_and_lora_train_mix_and_evaluate(german, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # train.py records weights/latest here
    common = ["--model", german["model"], "--data", german["train"], "--val-data", german["test"], "--batch-size", 4]
    out = run(train, capsys, *common, "--max-steps", 4, "--out", "kv.safetensors")
    assert "byte-level BPE (tokenizer.json); end of text: token 1" in out and "steering" in out
    out = run(train, capsys, *common, "--mode", "lora", "--lr", 0.05, "--max-steps", 4, "--out", "lora.safetensors")
    assert "LoRA (r=4" in out
    for ckpt in ("kv.safetensors", "lora.safetensors"):
        texts = {}
        for tone in (("--alpha", 1.0), ("--alpha", 0.0), ("--alpha", 0.5), ("--sentiment", "positive")):
            out = run(sample, capsys, "--prefix", ckpt, *tone, "--n", 2, "--max-new-tokens", 10, "--seed", 1,
                      "--prompt", "Der Film")
            texts[tone] = samples(out)
            assert len(texts[tone]) == 2 and all(s.startswith(("[1] Der Film", "[2] Der Film")) for s in texts[tone])
        assert texts[("--alpha", 1.0)] == texts[("--sentiment", "positive")]
        assert len({tuple(texts[t]) for t in (("--alpha", 1.0), ("--alpha", 0.0), ("--alpha", 0.5))}) == 3, ckpt
    streamed = run(sample, capsys, "--prefix", "kv.safetensors", "--alpha", 0.7, "--n", 1, "--max-new-tokens", 10,
                   "--stream", "--prompt", "Die Musik")
    batched = run(sample, capsys, "--prefix", "kv.safetensors", "--alpha", 0.7, "--n", 1, "--max-new-tokens", 10,
                  "--no-stream", "--prompt", "Die Musik")
    assert samples(streamed) == samples(batched)  # pieces of multi-byte characters held back, nothing lost
    beams = samples(run(sample, capsys, "--prefix", "lora.safetensors", "--alpha", 0.5, "--num-beams", 3, "--n", 2,
                        "--max-new-tokens", 8, "--prompt", "Der Film"))
    assert len(beams) == 2
    run(eval_script, capsys, "--prefix", "kv.safetensors", "lora.safetensors", "--data", german["test"], "--limit", 2,
        "--n-samples", 1, "--sweep-samples", 1, "--sweep-prompts", german["prompts"], "--max-new-tokens", 4,
        "--out", "eval")
    rows = {r["name"]: r for r in json.loads((tmp_path / "eval/eval.json").read_text())["rows"]}
    g = f", guidance {DEFAULT_STRENGTH:g}" if DEFAULT_STRENGTH else ""  # eval.py's default guidance names its rows
    assert {"base model, no prefix", "K/V prefix, P=10" + g, "LoRA r=4 on q, v" + g} <= set(rows)
    assert set(rows["K/V prefix, P=10" + g]["alpha_sweep"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    # PEFT adapters out and back: the same mix writes the same text
    peft.main(["export", "kv.safetensors", "adapters"])
    peft.main(["import", "adapters/positive", "adapters/negative", "--labels", "positive,negative", "--out", "back.st"])
    again = run(sample, capsys, "--prefix", "back.st", "--alpha", 0.7, "--n", 1, "--max-new-tokens", 10, "--no-stream",
                "--prompt", "Die Musik")
    assert samples(again) == samples(batched)


def test_german_tables_to_text_with_beams_and_the_tokenizers_newlines(german, tmp_path, monkeypatch, capsys):
    """Source -> text: the separator, the beams' stop and the banned newlines all come from the folder's BPE; a
    fine-tuned folder carries the tokenizer files and end-of-text id along."""
    monkeypatch.chdir(tmp_path)
    tok = Tokenizer.for_model(german["model"])
    common = ["--model", german["model"], "--data", german["tables"], "--val-data", german["tables"], "--max-steps", 2]
    run(train, capsys, *common, "--out", "e2e.safetensors")
    out = run(eval_script, capsys, "--task", "e2e", "--prefix", "e2e.safetensors", "--data", german["tables"],
              "--max-new-tokens", 8, "--out", "eval")
    result = json.loads((tmp_path / "eval/eval.json").read_text())
    assert result["settings"]["banned"] == list(tok.newlines) and result["settings"]["tables"] == 3
    assert len((tmp_path / "eval/e2e_outputs.txt").read_text(encoding="utf-8").splitlines()) == 3
    run(train, capsys, *common, "--mode", "finetune", "--out", "ft")
    assert {"tokenizer.json", "config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "ft"))
    config = json.loads((tmp_path / "ft/config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 1
    tuned = Tokenizer.for_model(tmp_path / "ft")
    assert tuned.eot == 1 and tuned.encode(MULTI_SCRIPT) == tok.encode(MULTI_SCRIPT)
    out = run(sample, capsys, "--prefix", "ft", "--num-beams", 3, "--max-new-tokens", 8, "--prompt", TABLES[0][0])
    assert len(samples(out)) == 1


def test_greedy_text_equals_hf_generate(german):
    """The folder's BPE and end of text, the model's padded vocabulary: the same tokens and text as HF's generate
    with HF's tokenizer, on the reference path and the fast one."""
    import transformers
    from minprefix import generate
    from minprefix.generate import generate as reference_generate
    hf, hf_tok = german["hf"], transformers.GPT2TokenizerFast.from_pretrained(str(german["model"]),
                                                                             split_special_tokens=True)
    tok, model = Tokenizer.for_model(german["model"]), GPT2.from_pretrained(german["model"]).requires_grad_(False)
    written = []
    for prompt in ("Der Film war", "Ein fröhliches Märchen 🙂", "東京の春", ""):
        ids = [tok.eot] + tok.encode(prompt)
        assert ids == [1] + hf_tok(prompt, add_special_tokens=False)["input_ids"]
        idx = torch.tensor([ids])
        theirs = hf.generate(idx, max_new_tokens=24, do_sample=False, eos_token_id=1, pad_token_id=1,
                             attention_mask=torch.ones_like(idx))[0, idx.size(1):].tolist()
        theirs = theirs[:theirs.index(1)] if 1 in theirs else theirs
        ours = reference_generate(model, idx, 24, temperature=0, eot=tok.eot)[0]
        assert ours == theirs and generate(model, idx, 24, temperature=0, eot=tok.eot)[0] == theirs
        assert tok.decode(ours) == hf_tok.decode(theirs)
        written.append(tok.decode(ours))
    assert len(set(" ".join(written).split())) > 5, written  # more than one token over and over


def test_a_plain_model_folder_samples_as_itself(german, tmp_path, monkeypatch, capsys):
    """sample.py given any GPT-2-layout folder writes with that model alone: greedy, the model's own tokens."""
    monkeypatch.chdir(tmp_path)
    from minprefix.generate import generate
    out = run(sample, capsys, "--prefix", german["model"], "--temperature", 0, "--n", 1, "--max-new-tokens", 12,
              "--prompt", "Die Musik")
    assert out.splitlines()[0].startswith(f"# base {german['model']} on {german['model']}: no mix")
    tok, model = Tokenizer.for_model(german["model"]), GPT2.from_pretrained(german["model"])
    new = generate(model, torch.tensor([[tok.eot] + tok.encode("Die Musik")]), 12, temperature=0, eot=tok.eot)[0]
    assert samples(out) == [f"[1] Die Musik{tok.decode(new)}"]
    for script, args, message in ((sample, ["--alpha", "0.5"], "is a model used as it is: it has no labels to mix"),
                                  (eval_script, ["--out", "e"], "is a model used as it is, with nothing to steer by")):
        with pytest.raises(SystemExit) as e:
            script.main(["--prefix", str(german["model"]), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_gpt2_files_in_the_folder_need_no_tiktoken_cache(offline_model_dir, gpt2_bpe_files, tmp_path):
    """The offline model with GPT-2's vocab.json + merges.txt beside it trains and samples with an empty tiktoken
    cache and no network (a proxy that refuses every connection), and sample.py writes with the folder alone."""
    import tiktoken
    folder, empty = tmp_path / "gpt2-layout", tmp_path / "empty-tiktoken-cache"
    folder.mkdir()
    empty.mkdir()
    shutil.copy(offline_model_dir / "config.json", folder)
    os.symlink(offline_model_dir / "model.safetensors", folder / "model.safetensors")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_bpe_files / f, folder)
    tok = Tokenizer.for_model(folder)
    assert tok.encode(MULTI_SCRIPT) == tiktoken.get_encoding("gpt2").encode_ordinary(MULTI_SCRIPT)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(empty), HF_HUB_OFFLINE="1", HTTPS_PROXY="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9")

    def script(*args):
        p = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        return p.stdout
    out = script(REPO / "train.py", "--model", folder, "--data", REPO / "data/train.jsonl", "--val-data",
                 REPO / "data/test.jsonl", "--limit", 4, "--val-limit", 2, "--max-steps", 1, "--out", "p.safetensors")
    assert "byte-level BPE (vocab.json + merges.txt); end of text: token 50256" in out
    assert len(samples(script(REPO / "sample.py", "--prefix", "p.safetensors", "--n", 2, "--max-new-tokens", 8))) == 2
    out = script(REPO / "sample.py", "--prefix", folder, "--n", 1, "--max-new-tokens", 8, "--prompt", "The film")
    assert "# base" in out and len(samples(out)) == 1
    assert os.listdir(empty) == []  # tiktoken was never asked
