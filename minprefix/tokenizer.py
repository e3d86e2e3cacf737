"""GPT-2's byte-level BPE, through tiktoken."""
import codecs

import tiktoken

EOT = 50256  # <|endoftext|>: GPT-2's document separator; we use it as the start and the end of every text


class Tokenizer:

    def __init__(self):
        try:
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken downloads the BPE files once, then reads its cache
            raise OSError("tiktoken could not load the gpt2 encoding (no network, and not in its cache): set "
                          "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached gpt2 files (on this project's "
                          "offline machines: export TIKTOKEN_CACHE_DIR=../shared/tiktoken)") from e
        self.eot = EOT

    def encode(self, text):  # str -> list[int]; "<|endoftext|>" inside a text is plain text, not the token
        return self.enc.encode_ordinary(text)

    def decode(self, ids):  # list[int] -> str
        return self.enc.decode(list(ids))

    def stream_decoder(self):
        """-> feed(token) -> the new text it completes. A token can end inside a multi-byte character (an emoji,
        a Chinese character): its bytes wait until the character is whole, so a stream never shows half of one."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token: utf8.decode(self.enc.decode_single_token_bytes(token))
