"""The data files: the shipped splits, and bad input, each a clear error that names file and line."""
import json

import pytest

from conftest import REPO, SHARED
from minprefix import Tokenizer
from minprefix.data import batches, encode, label_names, read_jsonl


def write(tmp_path, lines):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(text="The labs were great.", sentiment="positive"):
    return json.dumps({"text": text, "sentiment": sentiment})


def test_shipped_splits():
    train, test = read_jsonl(REPO / "data/train.jsonl"), read_jsonl(REPO / "data/test.jsonl")
    assert len(train) >= 200 and len(test) >= 40
    assert label_names(train) == ["positive", "negative"]  # positive -> 0, negative -> 1
    for split in (train, test):
        counts = [sum(e.label == l for e in split) for l in ("positive", "negative")]
        assert counts[0] == counts[1]
    assert not {e.text for e in train} & {e.text for e in test}  # training never sees the held-out texts


def test_bad_json_names_file_and_line(tmp_path):
    path = write(tmp_path, [row(), row(), '{"text": "oops", "sentiment": '])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(path)


def test_missing_field(tmp_path):
    path = write(tmp_path, [row(), json.dumps({"text": "no label here"})])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'sentiment'"):
        read_jsonl(path)


def test_unknown_label(tmp_path):
    path = write(tmp_path, [row(), row(sentiment="neutral")])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: unknown sentiment 'neutral'; known: positive, negative"):
        read_jsonl(path, labels=["positive", "negative"])


def test_empty_text(tmp_path):
    path = write(tmp_path, [row(), row(text="   ")])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: empty text"):
        read_jsonl(path)


def test_any_labels_in_order(tmp_path):
    path = write(tmp_path, [row(sentiment="neutral"), row(sentiment="negative"), row(sentiment="positive")])
    assert label_names(read_jsonl(path)) == ["positive", "negative", "neutral"]


def test_too_long_text_is_truncated_with_a_warning(tmp_path):
    tok = Tokenizer()
    path = write(tmp_path, [row(), row(text="word " * 300)])
    examples = read_jsonl(path)
    with pytest.warns(UserWarning, match=r"d\.jsonl:2: text of 300 tokens truncated to 99"):
        items = encode(examples, tok, ["positive", "negative"], max_tokens=100)
    assert len(items[1][0]) == 100 and items[0][0][-1] == tok.eot


def test_batches_pad_right_and_mask_targets():
    items = [([50256, 1, 2, 3, 50256], 1, 0), ([50256, 7, 50256], 1, 1)]
    (idx, targets, labels), = batches(items, 2)
    assert idx.tolist() == [[50256, 1, 2, 3], [50256, 7, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 50256], [7, 50256, -100, -100]]
    assert labels.tolist() == [0, 1]


def write_e2e(tmp_path, lines, name="e2e.txt"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_e2e_files_read_as_the_paper_reads_them():
    from minprefix.data import read_data, tables
    examples = read_data(SHARED / "data/e2e/test.txt.gz")
    assert len(examples) == 4693 and examples[0].source.startswith("name : ") and examples[0].label == "task"
    grouped = tables(examples)
    assert len(grouped) == 630 and sum(len(refs) for _, refs in grouped) == 4693
    assert grouped[0][0] == examples[0].source and examples[0].text in grouped[0][1]


@pytest.mark.parametrize("line,message", [
    ("name : The Eagle | Type : pub", r"e2e\.txt:2: expected one 'table\|\|text' pair, found 0 '\|\|' separators"),
    ("a||b||c", r"e2e\.txt:2: expected one 'table\|\|text' pair, found 2"),
    ("   ||The Eagle is a pub .", r"e2e\.txt:2: empty table before '\|\|'"),
    ("name : The Eagle||  ", r"e2e\.txt:2: empty text after '\|\|'"),
])
def test_bad_e2e_lines(tmp_path, line, message):
    from minprefix.data import read_data
    path = write_e2e(tmp_path, ["name : X | Type : pub||X is a pub .", line])
    with pytest.raises(ValueError, match=message):
        read_data(path)


def test_source_jsonl(tmp_path):
    from minprefix.data import read_data
    path = write(tmp_path, [json.dumps({"source": "a : b", "text": "A is b ."}), json.dumps({"text": "no source"})])
    with pytest.raises(ValueError, match=r"d\.jsonl:2: missing field 'source'"):
        read_data(path)
    path = write(tmp_path, [json.dumps({"source": "a : b", "text": "A is b ."})])
    (e,) = read_data(path)
    assert (e.source, e.text, e.label) == ("a : b", "A is b .", "task")


# ---- the kind of a JSON Lines file is read off every row, not guessed from the first ----

def test_labelled_rows_with_a_source_field_are_refused_unless_the_format_says(tmp_path):
    """Rows with both 'sentiment' and 'source' could be either kind: refused, naming the line and --format; with
    --format labelled they are labelled text (the sentiments kept), with --format source source -> text."""
    from minprefix.data import read_data
    both = [json.dumps({"text": "The labs were great.", "sentiment": "positive", "source": "review site"}),
            json.dumps({"text": "The food was cold.", "sentiment": "negative", "source": "email"})]
    path = write(tmp_path, both)
    with pytest.raises(ValueError, match=r"d\.jsonl:1: the row has both 'sentiment' and 'source'.*--format labelled"):
        read_data(path)
    examples = read_data(path, format="labelled")
    assert [(e.label, e.source) for e in examples] == [("positive", None), ("negative", None)]
    examples = read_data(path, format="source")
    assert [(e.label, e.source) for e in examples] == [("task", "review site"), ("task", "email")]


def test_a_file_mixing_the_two_kinds_is_refused_at_the_first_row_that_differs(tmp_path):
    from minprefix.data import read_data
    path = write(tmp_path, [row(), row(), json.dumps({"source": "a : b", "text": "A is b ."}), row()])
    with pytest.raises(ValueError, match=r"d\.jsonl:3: a source row .* but .*d\.jsonl:1 is labelled.*--format"):
        read_data(path)


@pytest.mark.parametrize("first", ["5", "[1, 2]", '"text"', "null"])
def test_a_first_line_that_is_json_but_no_object_is_named(tmp_path, first):
    from minprefix.data import read_data
    path = write(tmp_path, [first, row()])
    with pytest.raises(ValueError, match=r"d\.jsonl:1: expected a JSON object"):
        read_data(path)


def test_format_flag_is_checked(tmp_path):
    from minprefix.data import read_data
    with pytest.raises(ValueError, match="format must be one of labelled, source"):
        read_data(write(tmp_path, [row()]), format="table")
    e2e = tmp_path / "t.txt"
    e2e.write_text("name : X||X is a pub .\n")
    with pytest.raises(ValueError, match="--format labelled needs JSON Lines"):
        read_data(e2e, format="labelled")
