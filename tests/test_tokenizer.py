"""The tokenizer comes with the model folder: byte-level BPEs trained here (HF tokenizers) and GPT-2's own files,
read by minprefix.Tokenizer.for_model, against HF's GPT2TokenizerFast on the same folder; where the end-of-text id
comes from; what is refused, by name."""
import json
import shutil
import unicodedata

import pytest

from conftest import MULTI_SCRIPT, train_bpe
from minprefix import Tokenizer

transformers = pytest.importorskip("transformers")
CORPUS = MULTI_SCRIPT.splitlines() * 5 + ["Die Suppe war köstlich, der Kellner freundlich.", "寿司とラーメン。"] * 5
TEXTS = [MULTI_SCRIPT, "<|endoftext|>", " <|endoftext|>x", "ß", "\n\n", "   ", "", "🇩🇪🇩🇪 東京", "a\u0301 e\u0301"]


def hf_tokenizer(folder):
    """HF's reference on the same folder (the class its tokenizer_config.json names, else GPT-2's), with
    "<|endoftext|>" in a text read as plain text, as minprefix does."""
    settings = folder / "tokenizer_config.json"
    generic = settings.is_file() and json.loads(settings.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast"
    kind = transformers.PreTrainedTokenizerFast if generic else transformers.GPT2TokenizerFast
    return kind.from_pretrained(str(folder), split_special_tokens=True)


def hf_ids(hf, text):
    return hf(text, add_special_tokens=False)["input_ids"]


def bpe_folder(folder, vocab_size=600, config=None, **kw):
    n = train_bpe(folder, CORPUS, vocab_size, **kw)
    (folder / "config.json").write_text(json.dumps(config if config is not None else {"vocab_size": n}))
    return folder, n


# (the folder's files, trained with add_prefix_space, tokenizer_config.json): as HF loads them, its GPT-2 class (no
# tokenizer_class, or GPT2Tokenizer) takes add_prefix_space from tokenizer_config.json only, and its generic class
# (PreTrainedTokenizerFast) runs tokenizer.json as written, normalizer included
CASES = {"tokenizer.json": ("tokenizer.json", False, {}),
         "vocab+merges": ("vocab+merges", False, {}),
         "vocab+merges, prefix space": ("vocab+merges", True, {"add_prefix_space": True}),
         "tokenizer.json's prefix space, GPT-2 class": ("tokenizer.json", True, {"tokenizer_class": "GPT2Tokenizer"}),
         "tokenizer.json's prefix space and NFC, generic class": ("tokenizer.json", True,
                                                                  {"tokenizer_class": "PreTrainedTokenizerFast"})}


@pytest.mark.parametrize("case", list(CASES))
def test_encode_and_decode_equal_hf_on_a_multi_script_text(tmp_path, case):
    layout, trained_with_space, settings = CASES[case]
    folder, n = bpe_folder(tmp_path, special_tokens=("<pad>", "</s>"), layout=layout,
                           add_prefix_space=trained_with_space, config={"vocab_size": 640, "eos_token_id": 1})
    generic = settings.get("tokenizer_class") == "PreTrainedTokenizerFast"
    if generic:  # a normalizer as well, which HF's generic class applies
        spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        (folder / "tokenizer.json").write_text(json.dumps(dict(spec, normalizer={"type": "NFC"})), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, **settings}))
    ours, hf = Tokenizer.for_model(folder), hf_tokenizer(folder)
    assert ours.eot == 1 and ours.n_vocab == n < 640 and "byte-level BPE" in ours.source
    space = settings.get("add_prefix_space") or (generic and trained_with_space)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == hf_ids(hf, text), (case, text)
        assert ours.decode(ids) == hf.decode(ids)
        written = unicodedata.normalize("NFC", text) if generic else text
        assert ours.decode(ids) == (" " + written if space and text and text[0] != " " else written)
    ids = ours.encode(MULTI_SCRIPT)
    assert len(ids) < len(MULTI_SCRIPT.encode()) / 2  # the merges were used, not just the bytes
    # ids past the tokenizer but within the model's vocab_size (padded rows) and eot decode as HF decodes them (n
    # itself is left out: GPT2TokenizerFast adds its default <|endoftext|> there when the vocabulary lacks one)
    assert ours.decode([5, n + 1, 639, 1, 7]) == hf.decode([5, n + 1, 639, 1, 7]) == "$</s>&"
    pieces = ours.stream_decoder()
    assert "".join(pieces(t) for t in ids) == ours.decode(ids)  # no half character, nothing lost


def test_gpt2_files_in_a_folder_equal_tiktokens_gpt2(gpt2_bpe_files, tmp_path):
    """GPT-2's vocab.json + merges.txt read from a folder are tiktoken's gpt2 encoding, token for token, and HF's."""
    import tiktoken
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_bpe_files / f, tmp_path / f)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50257, "eos_token_id": 50256}))
    ours, gpt2, hf = Tokenizer.for_model(tmp_path), tiktoken.get_encoding("gpt2"), hf_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == gpt2.encode_ordinary(text) == hf_ids(hf, text), text
    ids = gpt2.encode_ordinary(MULTI_SCRIPT)
    assert ours.decode(ids) == gpt2.decode(ids) == MULTI_SCRIPT
    assert (ours.eot, ours.n_vocab, ours.newlines) == (50256, 50257, (198, 628))
    assert ours.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize("where", ["config", "tokenizer_config", "special_tokens_map", "name"])
def test_the_end_of_text_id_comes_from_the_folder(tmp_path, where):
    folder, n = bpe_folder(tmp_path, special_tokens=("<pad>", "<s>", "</s>", "<|endoftext|>"))
    config = {"vocab_size": n}
    if where == "config":
        config["eos_token_id"] = 2
    elif where == "tokenizer_config":
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    elif where == "special_tokens_map":
        (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    (folder / "config.json").write_text(json.dumps(config))
    assert Tokenizer.for_model(folder).eot == (3 if where == "name" else 2)  # "name": GPT-2's <|endoftext|>


def test_no_end_of_text_token_is_named(tmp_path):
    folder, n = bpe_folder(tmp_path, special_tokens=("<pad>",))
    with pytest.raises(ValueError, match=r"no end-of-text token: config.json has no eos_token_id.*add \"eos_token_id\""):
        Tokenizer.for_model(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<eos>' is not a token of the vocabulary"):
        Tokenizer.for_model(folder)


def test_a_tokenizer_bigger_than_the_models_embedding_is_refused(tmp_path):
    folder, n = bpe_folder(tmp_path, config={"vocab_size": 300, "eos_token_id": 0})
    with pytest.raises(ValueError, match=rf"has {n} tokens, but config.json's vocab_size is 300: the model has no "
                                         rf"embedding for ids 300..{n - 1}"):
        Tokenizer.for_model(folder)
    (folder / "config.json").write_text(json.dumps({"vocab_size": 40000}))  # GPT-2's fallback is bigger still
    for f in ("tokenizer.json",):
        (folder / f).unlink()
    with pytest.raises(ValueError, match=r"has 50257 tokens, but config.json's vocab_size is 40000"):
        Tokenizer.for_model(folder)


def test_other_kinds_of_tokenizer_are_refused_by_name(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers, trainers
    wordpiece = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"],
                                                                    show_progress=False))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000}))
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"model.type is 'WordPiece': minprefix reads byte-level BPE"):
        Tokenizer.for_model(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.txt").write_text("[UNK]\nhallo\n")  # BERT's files, as some Chinese GPT-2s ship
    with pytest.raises(ValueError, match=r"has vocab.txt, a WordPiece vocabulary \(BERT's kind\), not a byte-level"):
        Tokenizer.for_model(tmp_path)
    (tmp_path / "vocab.txt").unlink()
    metaspace = HFTokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    metaspace.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"pre_tokenizer is Metaspace, not GPT-2's"):
        Tokenizer.for_model(tmp_path)
    train_bpe(tmp_path, CORPUS, 400)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
    with pytest.raises(ValueError, match=r"tokenizer_class is BertTokenizer"):
        Tokenizer.for_model(tmp_path)


def test_merges_whose_ids_do_not_rise_are_refused(tmp_path):
    folder, n = bpe_folder(tmp_path, layout="vocab+merges", config={"vocab_size": 1000, "eos_token_id": 0})
    lines = (folder / "merges.txt").read_text().splitlines()
    header = [l for l in lines if l.startswith("#")]
    merges = [l for l in lines if l and not l.startswith("#")]
    (folder / "merges.txt").write_text("\n".join(header + merges[1:2] + merges[:1] + merges[2:]) + "\n")
    with pytest.raises(ValueError, match=r"merge 2 \(.*\) makes id \d+, but an earlier merge made id \d+"):
        Tokenizer.for_model(folder)


def test_a_folder_without_tokenizer_files_takes_gpt2s(tmp_path):
    import tiktoken
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50304}))  # padded, as GPT-2 runs often are
    tok = Tokenizer.for_model(tmp_path)
    assert tok.eot == 50256 and "has no tokenizer files" in tok.source
    assert tok.encode(MULTI_SCRIPT) == tiktoken.get_encoding("gpt2").encode_ordinary(MULTI_SCRIPT)
    assert tok.decode([464, 50300]) == "The"  # a padded row writes nothing


def test_hub_names_read_the_hub_cache_and_fall_back_offline(tmp_path, monkeypatch, gpt2_bpe_files):
    """A hub repository's tokenizer files come from the hub cache (as its weights do); offline with none cached, a
    GPT-2 name falls back to tiktoken's gpt2 encoding and another repository is refused with what to do; gpt2's
    files in the hub cache need no tiktoken cache."""
    import tiktoken
    from huggingface_hub import constants
    reference_gpt2 = tiktoken.get_encoding("gpt2")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--someone--tiny-german" / "snapshots" / ("0" * 40)
    bpe_folder(snapshot, special_tokens=("<pad>", "</s>"), config={"vocab_size": 700, "eos_token_id": 1})
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    tok, reference = Tokenizer.for_model("someone/tiny-german"), Tokenizer.for_model(snapshot)
    assert tok.eot == 1 and tok.encode(MULTI_SCRIPT) == reference.encode(MULTI_SCRIPT)
    assert "someone/tiny-german" in tok.source
    gpt2 = Tokenizer.for_model("gpt2")
    assert gpt2.eot == 50256 and "openai-community/gpt2's tokenizer files are not in the hub cache" in gpt2.source
    with pytest.raises(OSError, match=r"someone/other: no tokenizer files .* in the hub cache, and the hub is "
                                      r"unreachable: run once on a machine with internet"):
        Tokenizer.for_model("someone/other")
    # without tiktoken's cache either, the error says what to set; with gpt2's files in the hub cache, no need

    def no_network(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(OSError, match=r"set TIKTOKEN_CACHE_DIR .* or give the model folder its tokenizer files"):
        Tokenizer.for_model("gpt2")
    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / ("1" * 40)
    snapshot.mkdir(parents=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(gpt2_bpe_files / f, snapshot / f)
    (snapshot / "config.json").write_text(json.dumps({"vocab_size": 50257, "eos_token_id": 50256}))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("1" * 40)
    gpt2 = Tokenizer.for_model("gpt2")
    assert "openai-community/gpt2's byte-level BPE (vocab.json + merges.txt)" in gpt2.source
    assert gpt2.encode(MULTI_SCRIPT) == reference_gpt2.encode_ordinary(MULTI_SCRIPT)


def test_real_gpt2_tokenizer_files_when_cached():
    import tiktoken
    from huggingface_hub import try_to_load_from_cache
    if not isinstance(try_to_load_from_cache("openai-community/gpt2", "vocab.json"), str):
        pytest.skip("the official gpt2's tokenizer files are not in the local Hugging Face cache (no hub access "
                    "here); run once with internet to cache them and this test runs")
    tok = Tokenizer.for_model("gpt2")
    assert "byte-level BPE" in tok.source and tok.eot == 50256
    assert tok.encode(MULTI_SCRIPT) == tiktoken.get_encoding("gpt2").encode_ordinary(MULTI_SCRIPT)
