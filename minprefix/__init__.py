"""minprefix: a small GPT-2 that learns continuous prefixes (Li & Liang, 2021) to steer what it writes."""
from minprefix import fast
from minprefix.generate import generate as reference_generate
from minprefix.gpt2 import GPT2, GPTConfig, KVCache
from minprefix.prefix import mix_weights
from minprefix.tokenizer import Tokenizer


def generate(model, idx, max_new_tokens=50, **kw):
    """The decoding sample.py runs: minprefix.fast.generate, with the fast pieces swapped into `model` in place on
    first use (same parameters, same tokens as the reference), unless MINPREFIX_REFERENCE=1, which runs
    minprefix.generate.generate, the reference, on the model as it is. Arguments as minprefix.generate.generate's."""
    if not fast.enabled():
        return reference_generate(model, idx, max_new_tokens, **kw)
    return fast.generate(fast.accelerate(model), idx, max_new_tokens, **kw)


__all__ = ["GPT2", "GPTConfig", "KVCache", "generate", "mix_weights", "Tokenizer"]
