"""minprefix: a small GPT-2 that learns continuous prefixes (Li & Liang, 2021) to steer what it writes."""
from minprefix.gpt2 import GPT2, GPTConfig, KVCache
from minprefix.generate import generate
from minprefix.tokenizer import Tokenizer

__all__ = ["GPT2", "GPTConfig", "KVCache", "generate", "Tokenizer"]
