"""The mechanism: a short prefix-tuning run on the data makes the two prefixes write differently, in the
direction of their labels, by a judge this project did not train (VADER). Offline model, fixed seeds."""
import warnings

import pytest
import torch

from conftest import REPO
from minprefix import Tokenizer
from minprefix.generate import generate  # the reference: the shared model stays as it is
from minprefix.data import batches, encode, label_names, read_jsonl
from minprefix.evaluation import Judge
from minprefix.prefix import label_weights
from minprefix.method import build
from minprefix.trainer import batch_loss, train

pytestmark = pytest.mark.slow  # a training run, then sampling: python -m pytest -m "not slow" leaves it out


@pytest.fixture(scope="module")
def tuned(offline_model, tmp_path_factory):
    torch.manual_seed(0)
    tok = Tokenizer()
    train_set = read_jsonl(REPO / "data/train.jsonl")
    labels = label_names(train_set)
    test_set = read_jsonl(REPO / "data/test.jsonl", labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = [encode(s, tok, labels, 1000) for s in (train_set, test_set)]
    prefix = build("kv", offline_model, labels, tok, 10, False)
    out = tmp_path_factory.mktemp("mech") / "p.safetensors"
    history = train(offline_model, prefix, *items, labels, out, epochs=2, lr=2e-2, seed=0)
    return prefix.requires_grad_(False), labels, items[1], history


def test_each_prefix_explains_its_own_label_better(offline_model, tuned):
    """Held-out texts: lower loss under their own label's prefix than under the other's."""
    prefix, labels, held_out, history = tuned
    assert history["val_loss"][-1] < history["val_loss"][0]
    with torch.no_grad():
        for true in range(2):
            losses = []
            for used in range(2):
                rows = [it for it in held_out if it[2] == true]
                (idx, targets, _), = batches(rows, len(rows))
                losses.append(batch_loss(offline_model, prefix, idx, targets, torch.full((len(rows),), used)).item())
            print(f"{labels[true]} texts: loss {losses[true]:.3f} under their own prefix, {losses[1 - true]:.3f} under the other")
            assert losses[true] < losses[1 - true] - 0.01


def test_positive_prefix_writes_more_positive_text(offline_model, tuned):
    prefix, labels, _, _ = tuned
    tok, judge, n = Tokenizer(), Judge(), 96
    idx = torch.tensor([[tok.eot]] * n)
    scores = {}
    for label in range(2):  # the same seed for both: with the prefix ignored, the two lists would be identical
        cache = prefix.cache(offline_model, label_weights(2, label=label).repeat(n, 1))
        texts = [tok.decode(t) for t in generate(offline_model, idx, 40, kv_cache=cache, temperature=0.7,
                                                  top_p=0.9, seed=0, eot=tok.eot)]
        scores[labels[label]] = sum(judge.score(t) for t in texts) / n
    print("mean VADER compound:", scores)
    assert scores["positive"] > scores["negative"] + 0.15
