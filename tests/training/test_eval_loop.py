"""Evaluation and prediction: metrics over batches, model outputs of every library, and untouched model state."""

from __future__ import annotations

import copy
import math
import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from freezetune.data import InMemoryImageDataset, Loaders
from freezetune.device.distributed import DistInfo
from freezetune.device.precision import resolve_precision
from freezetune.inference.evaluation import evaluate_model
from freezetune.model.preprocess import Preprocess
from freezetune.training.eval_loop import evaluate, logits_of, predict_probs, to_device

CPU = resolve_precision(torch.device("cpu"), "off")


class _Fixed(nn.Module):
    """Returns the logits it is given as input: the test controls exactly what the model predicts."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x)  # identity in eval mode; evaluate must switch to it


def test_evaluate_counts_accuracy_loss_and_confusion():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [3.0, 0.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 2, 1])
    batches = [(logits[:3], targets[:3]), (logits[3:], targets[3:])]  # uneven batches
    model = _Fixed().train()
    result = evaluate(model, batches, CPU, num_classes=3)
    assert result["n"] == 5 and result["acc"] == pytest.approx(3 / 5)
    assert result["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert result["per_class_acc"] == pytest.approx([1.0, 0.5, 0.5])
    expected_loss = nn.functional.cross_entropy(logits, targets).item()
    assert result["loss"] == pytest.approx(expected_loss)
    assert model.training  # restored


def test_evaluate_runs_without_autograd():
    model = nn.Linear(4, 2)
    seen = []
    model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    evaluate(model, [(torch.randn(3, 4), torch.tensor([0, 1, 0]))], CPU, num_classes=2)
    assert seen == [False]


def test_logits_of_tensors_dicts_and_output_objects():
    t = torch.ones(2, 3)
    assert logits_of(t) is t
    assert logits_of({"logits": t}) is t
    assert logits_of(SimpleNamespace(logits=t, hidden_states=None)) is t


def test_predict_probs_are_softmax_and_keep_the_model_mode():
    model = _Fixed().train()
    probs = predict_probs(model, torch.tensor([[0.0, math.log(3.0)]]), CPU)
    assert probs[0].tolist() == pytest.approx([0.25, 0.75])
    assert model.training


def test_to_device_channels_last_only_for_images():
    images = to_device(torch.zeros(2, 3, 4, 4), torch.device("cpu"), channels_last=True)
    assert images.is_contiguous(memory_format=torch.channels_last)
    tokens = to_device(torch.zeros(2, 7, dtype=torch.long), torch.device("cpu"), channels_last=True)
    assert tokens.shape == (2, 7) and tokens.is_contiguous()


# --- sharded evaluation (the DDP final test) ----------------------------------------------------------------------


def _ranks_in_threads(world: int, run):
    """Run ``run(rank)`` for every rank at once, threads standing in for processes and ``all_gather`` for gloo's."""
    from freezetune.training import eval_loop as evaluate_module

    slots, results, meet = [None] * world, [None] * world, threading.Barrier(world, timeout=30)

    def fake_all_gather(value, info):
        slots[info.rank] = value
        meet.wait()  # every rank has put its meter in
        gathered = list(slots)
        meet.wait()  # every rank has read them
        return gathered

    def body(rank):
        try:
            results[rank] = run(rank)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread, which raises it
            results[rank] = exc
            meet.abort()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate_module, "all_gather", fake_all_gather)
        threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


@pytest.mark.parametrize(
    ("n", "world"), [(10, 2), (9, 3), (3, 2), (17, 4), (301, 3)]
)  # (3, 2): one batch, rank 0 gets none
def test_sharded_evaluation_equals_one_process_exactly(n, world):
    g = torch.Generator().manual_seed(n)
    ds = InMemoryImageDataset(torch.randint(0, 256, (n, 4, 4), dtype=torch.uint8, generator=g),
                              torch.randint(0, 3, (n,), generator=g), ["a", "b", "c"])  # fmt: skip
    ds.transform = lambda img: img.float().flatten() / 255
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def loaders(rank, world):
        return Loaders(batch_size=3, device=torch.device("cpu"), seed=0, preprocess=Preprocess(), decode="cpu",
                       workers=0, dist=DistInfo(rank, world))  # fmt: skip

    whole = evaluate_model(model, ds, num_classes=3, precision=CPU, loaders=loaders(0, 1), shard=True)
    blocks = [list(loaders(r, world).eval(ds, shard=True)) for r in range(world)]
    assert sum(len(b) for b in blocks) == -(-n // 3)  # whole batches, each scored by one rank
    models = [copy.deepcopy(model) for _ in range(world)]  # one per rank, as in processes (evaluate flips its mode)
    merged = _ranks_in_threads(world, lambda rank: evaluate_model(models[rank], ds, num_classes=3, precision=CPU,
                                                                  loaders=loaders(rank, world),
                                                                  shard=True))  # fmt: skip
    assert merged == [whole] * world, (merged, whole)  # every rank gets the whole set's numbers, loss to the last bit
    assert whole["n"] == n
