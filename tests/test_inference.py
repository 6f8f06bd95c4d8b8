"""Using a trained model as a library: evaluate a checkpoint, write the evaluation, predict image files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import freezetune as ft
from _engine_fixtures import CLASSES, make_image_folder
from freezetune import checkpoint
from freezetune.errors import ConfigError, DataError
from freezetune.inference import (
    evaluate_checkpoint,
    evaluate_model,
    format_predictions,
    load_model,
    predict_files,
    write_evaluation,
)
from freezetune.metrics import format_report
from freezetune.models import create_model
from freezetune.preprocess import Preprocess

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=1, val=0, test=4)


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    """An untrained 3-class tiny model whose BatchNorm statistics moved: its predictions differ between images."""
    torch.manual_seed(0)
    model, _ = create_model("timm:test_efficientnet", "none")
    ft.replace_head(model, len(CLASSES))
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 32, 32))
        model.get_classifier().weight.mul_(50)  # confident predictions: no near-ties for batching to flip
    record = checkpoint.model_record(model, {"model": "timm:test_efficientnet"}, sorted(CLASSES), Preprocess(32))
    return checkpoint.save(record, tmp_path_factory.mktemp("run") / "best.pt")


def test_evaluate_checkpoint_scores_the_test_split_as_predict_files_ranks_it(best_pt, data):
    result = evaluate_checkpoint(best_pt, data, batch_size=5, device="cpu")
    assert result["classes"] == sorted(CLASSES) and result["n"] == 4 * len(CLASSES)  # data/test, not data/train
    records = predict_files(best_pt, [data / "test"], topk=1, device="cpu")
    hits = [r["top"][0]["class"] == r["path"].split("/")[-2] for r in records]
    assert result["acc"] == pytest.approx(sum(hits) / len(hits))


def test_evaluate_checkpoint_takes_a_record_and_a_dataset(best_pt, data):
    from freezetune.data import build_eval_dataset

    record = checkpoint.load(best_pt)
    dataset = build_eval_dataset(str(data), preprocess=Preprocess(32), classes=record["classes"])
    by_path = evaluate_checkpoint(best_pt, data, device="cpu")
    by_record = evaluate_checkpoint(record, dataset, batch_size=1, device="cpu")
    assert by_record["confusion"] == by_path["confusion"]
    assert by_record["loss"] == pytest.approx(by_path["loss"], rel=1e-5)


def test_evaluate_model_is_the_in_memory_half(best_pt, data):
    loaded = load_model(best_pt, device="cpu")
    assert not loaded.model.training and loaded.classes == sorted(CLASSES)
    from freezetune.data import build_eval_dataset

    dataset = build_eval_dataset(str(data), preprocess=loaded.preprocess, classes=loaded.classes)
    result = evaluate_model(loaded.model, dataset, num_classes=3, precision=loaded.precision, batch_size=7)
    expected = evaluate_checkpoint(best_pt, data, device="cpu")
    assert set(result) == set(expected) - {"classes", "data"}
    assert result["confusion"] == expected["confusion"] and result["n"] == expected["n"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_model_names_labels_the_model_cannot_score():
    # a label 5 for a 3-class model was torch's IndexError from inside the loss
    from freezetune.data import InMemoryImageDataset
    from freezetune.errors import DataError

    ds = InMemoryImageDataset(torch.zeros(2, 2, 2, dtype=torch.uint8), torch.tensor([0, 5]), [str(i) for i in range(6)])
    ds.transform = lambda img: img.float().flatten()
    with pytest.raises(DataError, match="labels run from 0 to 5, and num_classes is 3: labels are 0 to 2"):
        evaluate_model(torch.nn.Linear(4, 3), ds, num_classes=3)


def test_write_evaluation_writes_the_plot_and_json_it_is_given(best_pt, data, tmp_path):
    result = evaluate_checkpoint(best_pt, data, device="cpu")
    text = write_evaluation(result, result["classes"], plot=tmp_path / "c.png", metrics=tmp_path / "m.json")
    assert text == format_report(result, result["classes"])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(result))
    write_evaluation(result, result["classes"])  # nothing asked, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "m.json"]


def test_predict_files_ranks_every_image_in_path_order(best_pt, data):
    files = sorted(str(p) for p in (data / "test" / "red").glob("*.png"))
    loaded = load_model(best_pt, device="cpu")
    records = predict_files(loaded, files, topk=9, batch_size=3)
    assert [r["path"] for r in records] == files
    for r in records:
        probs = [p["prob"] for p in r["top"]]
        assert {p["class"] for p in r["top"]} == set(CLASSES)  # topk beyond the classes: all of them
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
    one_by_one = predict_files(best_pt, files, topk=9, batch_size=1, device="cpu")  # batching changes nothing
    assert [[p["class"] for p in r["top"]] for r in one_by_one] == [[p["class"] for p in r["top"]] for r in records]
    probs = [p["prob"] for r in one_by_one for p in r["top"]]
    assert probs == pytest.approx([p["prob"] for r in records for p in r["top"]], abs=1e-5)
    assert json.loads(json.dumps(records)) == records
    folder = str(data / "test" / "red")  # one path as a string: the folder, not its characters
    assert [r["path"] for r in predict_files(loaded, folder, topk=1)] == files
    assert [r["path"] for r in predict_files(loaded, data / "test" / "red", topk=1)] == files
    # a glob no shell expanded (quoted, a script's, a Windows prompt's): "does not exist"
    assert [r["path"] for r in predict_files(loaded, [str(data / "test" / "red" / "*.png")], topk=1)] == files
    # a file named outright keeps its spelling ("./a.png", "a//b.png"), so each record joins back to its input
    typed = [files[0].replace("/red/", "/red//"), files[1].replace("/test/", "/test/./")]
    assert [r["path"] for r in predict_files(loaded, typed, topk=1)] == typed


def test_predict_reads_a_photo_as_evaluation_does_its_jpeg_reduced_by_the_models_decode_side(best_pt, data, tmp_path):
    import numpy as np
    from PIL import Image

    from freezetune.data import build_eval_dataset
    from freezetune.evaluate import predict_probs

    photo = tmp_path / "photos" / "red" / "big.jpg"
    photo.parent.mkdir(parents=True)
    noise = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(photo, quality=90)
    loaded = load_model(best_pt, device="cpu")
    dataset = build_eval_dataset(str(tmp_path / "photos"), preprocess=loaded.preprocess, classes=loaded.classes)
    assert dataset.min_side == loaded.preprocess.decode_side
    expected = predict_probs(loaded.model, dataset[0][0][None], loaded.precision)[0]
    (record,) = predict_files(loaded, [photo], topk=3)
    got = {p["class"]: p["prob"] for p in record["top"]}
    assert [got[c] for c in loaded.classes] == pytest.approx(expected.tolist(), abs=1e-6)


def test_predict_files_user_errors(best_pt, data):
    with pytest.raises(ConfigError, match="topk must be >= 1, got 0"):
        predict_files(best_pt, [data], topk=0, device="cpu")
    with pytest.raises(DataError, match="nothere.png"):
        predict_files(best_pt, [data / "nothere.png"], device="cpu")
    with pytest.raises(DataError, match=r"image path pattern '.*\*.jpg' matches no file ending in"):
        predict_files(best_pt, [str(data / "test" / "*.jpg")], device="cpu")


def test_a_recursive_glob_predicts_each_image_once_and_skips_other_files(best_pt, data, tmp_path):
    # "shots/**" matched the folders too, whose images were listed again (2 and 3 times); a .txt failed the command
    import shutil

    (tmp_path / "shots" / "sub").mkdir(parents=True)
    shutil.copy(data / "test" / "red" / "red_0.png", tmp_path / "shots" / "a.png")
    shutil.copy(data / "test" / "red" / "red_1.png", tmp_path / "shots" / "sub" / "b.png")
    (tmp_path / "shots" / "notes.txt").write_text("not an image")
    for pattern in ("**", "**/*", "*"):
        records = predict_files(best_pt, [str(tmp_path / "shots" / pattern)], device="cpu")
        got = sorted(Path(r["path"]).name for r in records)
        assert got == (["a.png", "b.png"] if "**" in pattern else ["a.png"]), (pattern, got)
        assert all("error" not in r for r in records)


def test_format_predictions_one_line_per_image():
    records = [{"path": "a.png", "top": [{"class": "red", "prob": 0.75}, {"class": "blue", "prob": 0.25}]},
               {"path": "b.png", "top": [{"class": "blue", "prob": 1.0}]}]  # fmt: skip
    assert format_predictions(records) == "a.png  red 75.0%  blue 25.0%\nb.png  blue 100.0%"
