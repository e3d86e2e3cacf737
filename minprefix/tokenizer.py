"""The model's byte-level BPE (GPT-2's kind of tokenizer), through tiktoken.

Every GPT-2-layout model on the hub keeps its tokenizer beside its weights: `vocab.json` + `merges.txt` (GPT-2's
own files), or one `tokenizer.json` (HF tokenizers' file, holding the same vocabulary and merges). Both spell each
token's bytes as printable characters (GPT-2's byte <-> character map, below: a space is "Ġ", a newline "Ċ"), and
list the merges in the order training found them. Tokenizer.for_model reads them into a tiktoken encoding: the
token ids are the vocabulary's, the text is cut into pieces by GPT-2's pattern, and each piece merged pair by pair,
the merge made earliest first, as HF's byte-level BPE does (tests/test_tokenizer.py holds the two equal).

A model folder without tokenizer files gets GPT-2's own encoding from tiktoken's cache (Tokenizer()).
"""
import codecs
import json
import unicodedata
from pathlib import Path

import tiktoken

# GPT-2's pre-tokenizer (HF tokenizers' ByteLevel with use_regex): contractions, letters, digits, other symbols,
# whitespace (a run before a word leaves its last space to the word); written as tiktoken's gpt2 encoding writes it
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
         "added_tokens.json")
OTHER_KINDS = {"vocab.txt": "a WordPiece vocabulary (BERT's kind)", "spiece.model": "a SentencePiece model",
               "tokenizer.model": "a SentencePiece model", "sentencepiece.bpe.model": "a SentencePiece model"}
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")


def byte_chars():
    """GPT-2's byte -> character map: the printable bytes stand for themselves, the other 68 (controls, space,
    0x7f-0xa0, 0xad) for chr(256), chr(257), ... in byte order, so that every token is a printable string."""
    printable = [*range(0x21, 0x7f), *range(0xa1, 0xad), *range(0xae, 0x100)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    return chars


class Tokenizer:
    """encode(text) -> ids, decode(ids) -> text, eot: the end-of-text id, which minprefix also starts every text
    with. Tokenizer(): GPT-2's BPE from tiktoken's cache; Tokenizer.for_model(name_or_path): the model's own."""

    def __init__(self, encoding=None, eot=None, source=None, extra=None, prefix_space=False, normalizer=None,
                 files=None):
        if encoding is None:
            try:
                encoding = tiktoken.get_encoding("gpt2")
            except Exception as e:  # tiktoken downloads the BPE files once, then reads its cache
                raise OSError("tiktoken could not load the gpt2 encoding (no network, and not in its cache): set "
                              "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files (on this "
                              "project's offline machines: export TIKTOKEN_CACHE_DIR=../shared/tiktoken), or give "
                              "the model folder its tokenizer files (vocab.json + merges.txt, or tokenizer.json)"
                              ) from e
            eot, source = encoding.eot_token, source or "GPT-2's BPE (tiktoken's gpt2 encoding)"
        self.enc, self.eot, self.source = encoding, eot, source
        # ids tiktoken cannot decode: vocabulary entries no merge makes (their bytes) and gaps in the ids (nothing)
        self.extra = extra or {}
        self.n_vocab = max(encoding.max_token_value, eot, *self.extra) + 1
        self.prefix_space, self.normalizer = prefix_space, normalizer
        self.files = files or {}  # {file name: path} it was read from: copied beside a fine-tuned model

    @classmethod
    def for_model(cls, name_or_path, cache_dir=None):
        """The tokenizer of a hub name or a local model folder: its byte-level BPE files (tokenizer.json, else
        vocab.json + merges.txt) and its end-of-text id (config.json's eos_token_id, else the eos_token its
        tokenizer_config.json or special_tokens_map.json names, else GPT-2's <|endoftext|>). Refuses a tokenizer
        of another kind, and one that writes ids past the model's vocab_size (a model's vocab_size may be larger:
        the rows past the tokenizer's are never written).

        A hub repository's files come from the hub cache, else the hub. Without tokenizer files, GPT-2's BPE from
        tiktoken's cache: for a folder, and for GPT-2's own hub names, where it is tried before the hub (it is the
        same BPE, token for token, and offline the hub would be waited for)."""
        from minprefix.hub import HUB_REPOS, model_files
        names = FILES + tuple(OTHER_KINDS) + ("config.json",)
        found, where, repo = model_files(name_or_path, names, cache_dir, download=False)
        has_bpe = lambda files: "tokenizer.json" in files or ("vocab.json" in files and "merges.txt" in files)
        gpt2 = None
        if repo is not None and not has_bpe(found):
            if repo in HUB_REPOS.values():
                try:
                    gpt2 = cls(source=f"GPT-2's BPE (tiktoken's gpt2 encoding): {repo}'s tokenizer files are not in "
                                      f"the hub cache")
                except OSError:
                    pass
            if gpt2 is None:
                found, where, repo = model_files(name_or_path, names, cache_dir)
        config = json.loads(Path(found["config.json"]).read_text()) if "config.json" in found else {}
        if has_bpe(found):
            tok = read_bpe({k: Path(v) for k, v in found.items() if k in FILES}, config, where)
        elif gpt2 is not None:
            tok = gpt2
        else:
            kinds = [f"{name}, {OTHER_KINDS[name]}" for name in OTHER_KINDS if name in found]
            if kinds:
                raise ValueError(f"{where} has {kinds[0]}, not a byte-level BPE (vocab.json + merges.txt, or "
                                 f"tokenizer.json): minprefix reads GPT-2's kind of tokenizer only")
            if repo is not None and repo not in HUB_REPOS.values():  # GPT-2's BPE would be another language's
                raise OSError(f"{where}: no tokenizer files (vocab.json + merges.txt, or tokenizer.json) in the hub "
                              f"cache, and the hub is unreachable: run once on a machine with internet, or download "
                              f"the repository's files into a folder and pass that folder")
            tok = cls(source=f"GPT-2's BPE (tiktoken's gpt2 encoding): {where} has no tokenizer files")
            if config.get("eos_token_id") is not None:
                tok.eot = first(config["eos_token_id"])
                if tok.eot >= tok.n_vocab:
                    raise ValueError(f"{where}/config.json: eos_token_id {tok.eot} is no token of GPT-2's BPE "
                                     f"(0..{tok.n_vocab - 1}), which it falls back to without tokenizer files")
        check_vocab_size(tok, config.get("vocab_size"), where)
        return tok

    def encode(self, text):  # str -> list[int]; "<|endoftext|>" inside a text is plain text, not the token
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        if self.prefix_space and text and not text.startswith(" "):  # the folder's add_prefix_space, as HF's
            text = " " + text
        return self.enc.encode_ordinary(text)

    def token_bytes(self, token):
        if token in self.extra or not 0 <= token < self.n_vocab:
            return self.extra.get(token, b"")  # a model's vocab_size may exceed the tokenizer's: those write nothing
        return self.enc.decode_single_token_bytes(token)

    def decode(self, ids):  # list[int] -> str
        ids = list(ids)
        if all(0 <= i < self.n_vocab and i not in self.extra for i in ids):
            return self.enc.decode(ids)
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")

    @property
    def newlines(self):
        """The ids of "\\n" and "\\n\\n" (GPT-2's 198 and 628), those the vocabulary has: E2E's decoding bans them."""
        found = []
        for text in (b"\n", b"\n\n"):
            try:
                found.append(self.enc.encode_single_token(text))
            except KeyError:
                pass
        return tuple(found)

    def stream_decoder(self):
        """-> feed(token) -> the new text it completes. A token can end inside a multi-byte character (an emoji,
        a Chinese character): its bytes wait until the character is whole, so a stream never shows half of one."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: utf8.decode(self.token_bytes(token))


def read_bpe(files, config, where):
    """{file name: path} of a model's tokenizer files, its config.json dict -> its Tokenizer."""
    settings = json.loads(files["tokenizer_config.json"].read_text()) if "tokenizer_config.json" in files else {}
    kind = settings.get("tokenizer_class")
    if kind and kind.removesuffix("Fast") not in ("GPT2Tokenizer", "PreTrainedTokenizer"):
        raise ValueError(f"{files['tokenizer_config.json']}: tokenizer_class is {kind}: minprefix reads GPT-2's kind "
                         f"of tokenizer (a byte-level BPE) only")
    # HF transformers' GPT-2 class (tokenizer_class GPT2Tokenizer, or none named) builds GPT-2's tokenizer from the
    # vocabulary and merges, add_prefix_space from tokenizer_config.json; its generic class (PreTrainedTokenizerFast)
    # runs tokenizer.json as written, with its normalizer and its pre-tokenizer's add_prefix_space. As HF does:
    generic = kind == "PreTrainedTokenizerFast"
    prefix_space, normalizer = bool(settings.get("add_prefix_space", False)), None
    if "tokenizer.json" in files:
        path = files["tokenizer.json"]
        spec = json.loads(path.read_text(encoding="utf-8"))
        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{path}: model.type is {model.get('type')!r}: minprefix reads byte-level BPE "
                             f"tokenizers (GPT-2's kind) only")
        pre = spec.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
            what = pre.get("type") if pre.get("type") != "ByteLevel" else "ByteLevel without use_regex"
            raise ValueError(f"{path}: pre_tokenizer is {what}, not GPT-2's (ByteLevel, splitting the text with "
                             f"GPT-2's pattern): not a byte-level BPE that minprefix reads")
        norm = spec.get("normalizer") if generic else None
        if generic:
            prefix_space = bool(pre.get("add_prefix_space", False))
        if norm is not None:
            if norm.get("type") not in NORMALIZERS:
                raise ValueError(f"{path}: normalizer {norm.get('type')!r}: minprefix applies none but "
                                 f"{', '.join(NORMALIZERS)}")
            normalizer = norm["type"]
        odd = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
                           "ignore_merges") if model.get(k)]  # each changes how words are cut, when set
        if odd:
            raise ValueError(f"{path}: model.{odd[0]} is {model[odd[0]]!r}: not GPT-2's byte-level BPE")
        vocab = model["vocab"]
        merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
        added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
        matched = [t["content"] for t in spec.get("added_tokens", []) if not t.get("special", True)]
        where_bpe = path
    else:
        where_bpe = files["vocab.json"]
        vocab = json.loads(files["vocab.json"].read_text(encoding="utf-8"))
        lines = files["merges.txt"].read_text(encoding="utf-8").splitlines()
        merges = [line.split(" ") for line in lines if line and not line.startswith("#version")]
        decoder = settings.get("added_tokens_decoder", {})
        added = {t["content"]: int(i) for i, t in decoder.items()}
        matched = [t["content"] for t in decoder.values() if not t.get("special", True)]
        if "added_tokens.json" in files:
            added.update(json.loads(files["added_tokens.json"].read_text(encoding="utf-8")))
    if matched:  # HF finds these in the text, as whole tokens; encode_ordinary would not
        raise ValueError(f"{where}: added token {matched[0]!r} is not special (HF matches it inside a text): "
                         f"minprefix's encoding does not")
    ranks = merge_ranks(vocab, merges, where_bpe)
    chars = {c: b for b, c in byte_chars().items()}
    specials, extra, known = {}, {}, set(ranks.values())
    for text, i in list(vocab.items()) + list(added.items()):  # tokens no merge makes: <|endoftext|>, <pad>, ...
        if i in known:
            continue
        known.add(i)
        raw = bytes(chars[c] for c in text) if all(c in chars for c in text) and text not in added else text.encode()
        special = raw.decode("utf-8", errors="replace")
        if special.encode() == raw and special not in specials:  # tiktoken's special tokens: one id per text
            specials[special] = i
        else:
            extra[i] = raw
    encoding = tiktoken.Encoding(str(where), pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    extra.update({i: b"" for i in range(max(known)) if i not in known})  # gaps in the ids
    eot = end_of_text(config, files, {**vocab, **added}, where)
    if eot not in known:
        raise ValueError(f"{where}: the end-of-text id {eot} is no token of the tokenizer in {where_bpe}")
    names = " + ".join(n for n in ("tokenizer.json",) if n in files) or "vocab.json + merges.txt"
    return Tokenizer(encoding, eot, f"{where}'s byte-level BPE ({names})", extra, prefix_space, normalizer, files)


def merge_ranks(vocab, merges, where):
    """-> {token bytes: id} for tiktoken: the 256 bytes, then what each merge makes. tiktoken merges the pair
    whose result has the lowest id first, so the ids of the merges' results must rise in the merges' order, as BPE
    training writes them."""
    chars = byte_chars()
    to_bytes = {c: b for b, c in chars.items()}
    ranks = {}
    for b, c in chars.items():
        if c not in vocab:
            raise ValueError(f"{where}: the byte {b:#04x} ({c!r}) is not in the vocabulary: a byte-level BPE holds "
                             f"all 256 bytes")
        ranks[bytes([b])] = vocab[c]
    last = -1
    for n, pair in enumerate(merges, start=1):
        if len(pair) != 2:
            raise ValueError(f"{where}: merge {n} is {' '.join(pair)!r}, not two tokens")
        token = "".join(pair)
        if token not in vocab:
            raise ValueError(f"{where}: merge {n} ({' '.join(pair)}) makes {token!r}, which is not in the vocabulary")
        try:
            raw = bytes(to_bytes[c] for c in token)
        except KeyError as e:
            raise ValueError(f"{where}: merge {n} ({' '.join(pair)}) holds {e.args[0]!r}, which stands for no byte "
                             f"in GPT-2's byte-level alphabet: not a byte-level BPE") from None
        if vocab[token] <= last:
            raise ValueError(f"{where}: merge {n} ({' '.join(pair)}) makes id {vocab[token]}, but an earlier merge "
                             f"made id {last}: tiktoken needs the merges' ids to rise in their order")
        last = ranks[raw] = vocab[token]
    return ranks


def end_of_text(config, files, tokens, where):
    """The end-of-text id: config.json's eos_token_id, else the eos_token that tokenizer_config.json or
    special_tokens_map.json names, else GPT-2's <|endoftext|> if the vocabulary has it."""
    if config.get("eos_token_id") is not None:
        return first(config["eos_token_id"])
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if name in files:
            token = json.loads(files[name].read_text(encoding="utf-8")).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            if token:
                if token not in tokens:
                    raise ValueError(f"{files[name]}: eos_token {token!r} is not a token of the vocabulary")
                return tokens[token]
    if "<|endoftext|>" in tokens:
        return tokens["<|endoftext|>"]
    raise ValueError(f"{where}: no end-of-text token: config.json has no eos_token_id, no eos_token is named in "
                     f"tokenizer_config.json or special_tokens_map.json, and the vocabulary has no <|endoftext|>: add "
                     f"\"eos_token_id\": <its id> to {where}/config.json")


def check_vocab_size(tok, vocab_size, where):
    if vocab_size is None:
        return
    if tok.n_vocab > vocab_size:  # (the end-of-text id is among them)
        raise ValueError(f"{where}: the tokenizer ({tok.source}) has {tok.n_vocab} tokens, but config.json's "
                         f"vocab_size is {vocab_size}: the model has no embedding for ids {vocab_size}.."
                         f"{tok.n_vocab - 1}")


def first(ids):  # config.json's eos_token_id: an id, or a list of them (the first is the one texts end with)
    return int(ids[0] if isinstance(ids, list) else ids)
