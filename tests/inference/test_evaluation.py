"""Using a trained model as a library: load and evaluate a checkpoint, write the evaluation (predicting:
test_predict.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _engine_fixtures import CLASSES, confident_checkpoint, make_image_folder
from freezetune.errors import DataError
from freezetune.inference.evaluation import (
    evaluate_checkpoint,
    evaluate_model,
    load_model,
    write_evaluation,
)
from freezetune.inference.predict import predict_files
from freezetune.model.preprocess import Preprocess
from freezetune.run import checkpoint
from freezetune.training.metrics import format_report

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), train=1, val=0, test=4)


@pytest.fixture(scope="module")
def best_pt(tmp_path_factory):
    return confident_checkpoint(tmp_path_factory.mktemp("run"))


def test_evaluate_checkpoint_scores_the_test_split_as_predict_files_ranks_it(best_pt, data):
    result = evaluate_checkpoint(best_pt, data, batch_size=5, device="cpu")
    # which weights it scored, as a run's test_metrics.json says (eval's --metrics file said neither)
    assert result["checkpoint"] == str(best_pt)
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


def test_a_dataset_of_pil_images_is_scored_through_the_checkpoints_transform_and_named_to_evaluate_model(
    best_pt, data, tmp_path
):
    # torchvision's ImageFolder without a transform: a TypeError from a loader worker's collate, in both
    from torchvision.datasets import ImageFolder

    folder = ImageFolder(str(data / "test"))
    assert folder.classes == sorted(CLASSES)
    by_path = evaluate_checkpoint(best_pt, data, device="cpu")
    assert evaluate_checkpoint(best_pt, folder, device="cpu", workers=0)["confusion"] == by_path["confusion"]
    loaded = load_model(best_pt, "cpu")
    with pytest.raises(DataError, match=r"^the dataset yields PIL images \(ImageFolder without a transform to tensors"
                                        r"\): give it transform=ft.eval_transform\(pre\)"):  # fmt: skip
        evaluate_model(loaded.model, folder, num_classes=len(CLASSES))
    # a folder without one class: its labels index its own classes, scored against the checkpoint's of that index
    shutil.copytree(data / "test", tmp_path / "test")
    shutil.rmtree(tmp_path / "test" / sorted(CLASSES)[0])
    with pytest.raises(DataError, match=r"^the dataset's classes .* are not the checkpoint's .*, in that order: "):
        evaluate_checkpoint(best_pt, ImageFolder(str(tmp_path / "test")), device="cpu")


def test_evaluate_checkpoint_scores_at_the_runs_batch_size_unless_given_one(best_pt, data, monkeypatch):
    # the loss's float rounding depends on the batch size on some CPUs (an Intel Xeon's oneDNN convolutions): at the
    # dataclass default, eval of best.pt missed the run's test_metrics.json in the 8th digit
    from freezetune.inference import evaluation as inference

    sizes = []
    real = inference.Loaders
    monkeypatch.setattr(inference, "Loaders", lambda **kw: sizes.append(kw["batch_size"]) or real(**kw))
    record = checkpoint.load(best_pt)
    record["config"] = {**record.get("config", {}), "batch_size": 5}
    evaluate_checkpoint(record, data, device="cpu")
    evaluate_checkpoint(record, data, batch_size=3, device="cpu")
    record["config"].pop("batch_size")  # a checkpoint that does not say: the dataclass default
    evaluate_checkpoint(record, data, device="cpu")
    assert sizes == [5, 3, 32]


def test_evaluate_model_is_the_in_memory_half(best_pt, data):
    loaded = load_model(best_pt, device="cpu")
    assert not loaded.model.training and loaded.classes == sorted(CLASSES)
    from freezetune.data import build_eval_dataset

    dataset = build_eval_dataset(str(data), preprocess=loaded.preprocess, classes=loaded.classes)
    result = evaluate_model(loaded.model, dataset, num_classes=3, precision=loaded.precision, batch_size=7)
    expected = evaluate_checkpoint(best_pt, data, device="cpu")
    assert set(result) == set(expected) - {"classes", "data", "checkpoint", "epoch"}
    assert result["confusion"] == expected["confusion"] and result["n"] == expected["n"]
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_evaluate_model_names_a_head_the_data_does_not_fit():
    # a 5-output model scored as 3 classes was a ValueError from the metrics, not freezetune's user error
    from freezetune.data import InMemoryImageDataset

    ds = InMemoryImageDataset(torch.zeros(2, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]), ["a", "b", "c"])
    ds.transform = lambda img: img.float().flatten()
    with pytest.raises(DataError, match="logits have 5 classes, the meter was built for 3: the model's head"):
        evaluate_model(torch.nn.Linear(4, 5), ds, num_classes=3)


def test_evaluate_model_names_labels_the_model_cannot_score():
    # a label 5 for a 3-class model was torch's IndexError from inside the loss
    from freezetune.data import InMemoryImageDataset

    ds = InMemoryImageDataset(torch.zeros(2, 2, 2, dtype=torch.uint8), torch.tensor([0, 5]), [str(i) for i in range(6)])
    ds.transform = lambda img: img.float().flatten()
    with pytest.raises(DataError, match="label 5 is outside num_classes=3: labels are 0 to 2"):
        evaluate_model(torch.nn.Linear(4, 3), ds, num_classes=3)


@pytest.mark.parametrize("bad", [4, -1])
def test_evaluate_model_names_a_label_it_cannot_score_in_a_dataset_without_targets(bad):
    # a TensorDataset (no ``targets`` to check up front) with a label 4 for a 3-class model was torch's raw
    # "IndexError: Target 4 is out of bounds" from inside the loss; the mistake is named as docs/python-api.md says
    labels = torch.tensor([0, 1, 2, 0, 1, bad])  # in the second batch of 4
    data = torch.utils.data.TensorDataset(torch.randn(6, 4), labels)
    with pytest.raises(DataError, match=rf"label {bad} is outside num_classes=3: labels are 0 to 2"):
        evaluate_model(torch.nn.Linear(4, 3), data, num_classes=3, batch_size=4, workers=0)


@pytest.mark.parametrize("empty", ["dataset", "list"])
def test_evaluate_model_names_data_with_no_samples(empty):
    # a notebook's empty dataset was the metrics' "ClassificationMeter.compute() called before any update()"
    data = (
        torch.utils.data.TensorDataset(torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
        if empty == "dataset"
        else []
    )
    with pytest.raises(DataError, match="the data to evaluate has no samples"):
        evaluate_model(torch.nn.Linear(4, 3), data, num_classes=3, workers=0)


def test_write_evaluation_writes_the_plot_and_json_it_is_given(best_pt, data, tmp_path):
    result = evaluate_checkpoint(best_pt, data, device="cpu")
    text = write_evaluation(result, result["classes"], plot=tmp_path / "c.png", metrics=tmp_path / "m.json")
    assert text == format_report(result, result["classes"])
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(result))
    write_evaluation(result, result["classes"])  # nothing asked, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "m.json"]


def test_an_evaluation_names_the_epoch_that_saved_its_checkpoint(best_pt, data, tmp_path):
    record = {**checkpoint.load(best_pt), "epoch": 3}
    saved = checkpoint.save(record, tmp_path / "best.pt")
    result = evaluate_checkpoint(saved, data, device="cpu")
    assert result["epoch"] == 3 and result["checkpoint"] == str(saved)
    write_evaluation(result, result["classes"], metrics=tmp_path / "m.json")
    assert {k: json.loads((tmp_path / "m.json").read_text())[k] for k in ("checkpoint", "epoch")} == {
        "checkpoint": str(saved),
        "epoch": 3,
    }


def test_write_evaluation_refuses_other_class_names_before_it_writes_a_file(best_pt, data, tmp_path):
    # the metrics file was written, then the class names refused: a refused call left a file behind
    result = evaluate_checkpoint(best_pt, data, device="cpu")
    with pytest.raises(DataError, match=f"got 2 class names for a result with {len(CLASSES)} classes"):
        write_evaluation(result, ["a", "b"], plot=tmp_path / "c.png", metrics=tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_is_loaded_for_inference_in_fp32_on_any_device(best_pt, monkeypatch):
    # the docstring said fp32 (AMP off); resolve_precision's "auto" made eval and predict bf16 on a CUDA card, where
    # exports' fp32 graphs and the numbers on another card differed in the last digits
    from freezetune.inference import evaluation as inference

    asked = []
    real = inference.resolve_precision
    monkeypatch.setattr(
        inference, "resolve_precision", lambda device, amp="auto": asked.append(amp) or real(device, amp)
    )
    loaded = inference.load_model(best_pt, device="cpu")
    assert asked == ["off"] and loaded.precision.amp_dtype is None
