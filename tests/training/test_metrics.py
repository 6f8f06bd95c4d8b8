"""ClassificationMeter against sklearn, the text report and the confusion plot."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, top_k_accuracy_score

from freezetune.errors import DataError
from freezetune.training.metrics import ClassificationMeter, format_report, plot_confusion

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _random_batches(num_classes: int, sizes: list[int], seed: int = 0, skip_class: int | None = None):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for b in sizes:
        logits = torch.randn(b, num_classes, generator=g)
        targets = torch.randint(0, num_classes, (b,), generator=g)
        if skip_class is not None:  # a class that is never a target and never predicted
            targets[targets == skip_class] = (skip_class + 1) % num_classes
            logits[:, skip_class] = -100.0
        # Make predictions better than chance so every metric is away from its trivial value.
        logits[torch.arange(b), targets] += 1.0
        batches.append((logits, targets))
    return batches


def _accumulate(batches, num_classes=None) -> dict:
    meter = ClassificationMeter(num_classes)
    for logits, targets in batches:
        meter.update(logits, targets)
    return meter.compute()


@pytest.mark.parametrize("skip_class", [None, 3])
def test_meter_matches_sklearn_over_several_batches(skip_class):
    c = 7
    batches = _random_batches(c, [32, 17, 1, 50], skip_class=skip_class)
    result = _accumulate(batches, c)
    logits = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).numpy()
    pred = logits.argmax(1).numpy()

    assert result["n"] == len(y)
    assert result["acc"] == pytest.approx(accuracy_score(y, pred))
    # Classes absent from targets and predictions are left out of the mean, as sklearn does without `labels`.
    assert result["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert result["confusion"] == confusion_matrix(y, pred, labels=list(range(c))).tolist()
    assert result["top5"] == pytest.approx(top_k_accuracy_score(y, logits.numpy(), k=5, labels=list(range(c))))
    recall = recall_score(y, pred, average=None, labels=list(range(c)), zero_division=0)
    for i, acc in enumerate(result["per_class_acc"]):
        if skip_class == i:
            assert acc is None  # no samples: accuracy undefined, not 0
        else:
            assert acc == pytest.approx(recall[i])


def test_a_class_predicted_but_never_a_target_counts_in_macro_f1_as_zero():
    # the meter's F1 averaged over the classes that were targets alone would read higher than sklearn's (and than the
    # docstring's promise) exactly when the model mistakes images for a class absent from the split
    batches = _random_batches(5, [40, 23], seed=2)
    for logits, targets in batches:
        targets[targets == 4] = 0  # class 4 is never a target...
        logits[:3, 4] = 100.0  # ...and is predicted for a few images
    result = _accumulate(batches, 5)
    y = torch.cat([b[1] for b in batches]).numpy()
    pred = torch.cat([b[0] for b in batches]).argmax(1).numpy()
    assert 4 in pred and 4 not in y
    assert result["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert result["per_class_acc"][4] is None


def test_low_precision_logits_and_inferred_classes():
    batches = _random_batches(4, [8, 8], seed=1)
    ref = _accumulate(batches, 4)
    half = _accumulate([(lg.to(torch.bfloat16), t) for lg, t in batches])  # num_classes inferred
    assert half["confusion"] == ref["confusion"]


def test_topk_uses_min_5_c():
    meter = ClassificationMeter(3)
    # True class ranked 3rd of 3: a top-3 hit, a top-1 miss.
    meter.update(torch.tensor([[3.0, 2.0, 1.0]]), torch.tensor([2]))
    r = meter.compute()
    assert (r["acc"], r["top5"], r["topk"]) == (0.0, 1.0, 3)

    meter = ClassificationMeter(10)
    logits = torch.arange(10.0).flip(0)[None].repeat(2, 1)  # class 0 scores highest, class 9 lowest
    meter.update(logits, torch.tensor([4, 5]))  # ranks 5 and 6
    assert meter.compute()["top5"] == 0.5


def test_loss_is_mean_per_sample_across_uneven_batches():
    meter = ClassificationMeter(2)
    meter.update(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), loss=1.0)  # batch mean of 3 samples
    meter.update(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), loss=torch.tensor(5.0))
    meter.update(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), loss=torch.tensor([2.0, 4.0]))  # per sample
    assert meter.compute()["loss"] == pytest.approx((3 * 1.0 + 5.0 + 2.0 + 4.0) / 6)


def test_loss_is_none_without_losses_and_reset_clears():
    meter = ClassificationMeter(2)
    meter.update(torch.zeros(2, 2), torch.tensor([0, 1]))
    assert meter.compute()["loss"] is None
    meter.reset()
    with pytest.raises(ValueError, match="before any update"):
        meter.compute()


def test_bad_inputs_raise_clear_errors():
    meter = ClassificationMeter(3)
    with pytest.raises(DataError, match="label 3 is outside num_classes=3: labels are 0 to 2"):
        meter.update(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(DataError, match="4 classes"):
        meter.update(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="2 rows of logits but 3 targets"):
        meter.update(torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_format_report_shows_names_metrics_and_matrix():
    classes = ["cat", "dog", "sea turtle"]
    meter = ClassificationMeter(3)
    meter.update(torch.eye(3)[[0, 1, 1, 2]] * 5, torch.tensor([0, 1, 2, 2]), loss=0.25)
    text = format_report(meter.compute(), classes)
    for name in classes:
        assert name in text
    assert "loss 0.2500" in text and "top-1  75.0%" in text and "top-3 100.0%" in text
    assert "macro-F1" in text
    # Row of true class 2 ("sea turtle"): one predicted as 1, one as 2.
    assert any(line.split()[-3:] == ["0", "1", "1"] and "sea turtle" in line for line in text.splitlines())


def test_format_report_truncates_many_classes():
    c = 60
    classes = [f"class_{i:02d}" for i in range(c)]
    result = _accumulate(_random_batches(c, [400], seed=2), c)
    text = format_report(result, classes, max_classes=20)
    assert "worst 20 of 60" in text
    assert "most frequent confusions" in text
    assert len(text.splitlines()) < 40
    worst = min((a, i) for i, a in enumerate(result["per_class_acc"]) if a is not None)[1]
    assert classes[worst] in text


def _columns(line: str) -> int:
    """The columns a terminal gives ``line``: two a wide East Asian character, none a combining mark."""
    import unicodedata

    return sum(0 if unicodedata.combining(ch) else 1 + (unicodedata.east_asian_width(ch) in "WF") for ch in line)


def test_class_names_with_control_characters_print_as_escapes_in_rows_that_line_up():
    # folder names may hold an ANSI escape, a newline, a bidi override: printed raw they recoloured the terminal and
    # broke the table's rows; a wide East Asian name or a combining accent pushed its row's columns out of line
    classes = ["\x1b[31mRED\x1b[0m", "line1\nline2", "\u202eevil", "猫", "cafe\u0301"]
    meter = ClassificationMeter(5)
    meter.update(torch.eye(5) * 5, torch.arange(5))
    lines = format_report(meter.compute(), classes).splitlines()
    assert not any(ch in "\n".join(lines) for ch in "\x1b\u202e") and len(lines) == 2 + 5 + 2 + 5
    rows, matrix = lines[2:7], lines[9:]
    assert [row.split()[0] for row in rows] == [
        "\\x1b[31mRED\\x1b[0m",
        "line1\\nline2",
        "\\u202eevil",
        "猫",
        "cafe\u0301",
    ]
    assert len({_columns(row) for row in rows}) == 1 and len({_columns(row) for row in matrix}) == 1  # as displayed
    assert matrix[3].startswith("  3 猫 ") and matrix[3].endswith(" 0 0 0 1 0")


def test_the_matrix_rows_names_start_in_one_column_from_the_tenth_class_on():
    # "  9 tools" above "  10 transportation": the names started one column apart
    classes = [f"c{i}" for i in range(11)]
    meter = ClassificationMeter(11)
    meter.update(torch.eye(11) * 5, torch.arange(11))
    matrix = format_report(meter.compute(), classes).splitlines()[-11:]
    assert matrix[0].startswith("   0 c0 ") and matrix[10].startswith("  10 c10 ")
    assert len({row.index("c") for row in matrix}) == 1 and len({len(row) for row in matrix}) == 1


def test_class_names_an_ascii_terminal_cannot_print_are_measured_as_it_prints_them(monkeypatch):
    # PYTHONIOENCODING=ascii: Python writes 'café' as 'caf\xe9', four columns wider than the report measured it
    import io
    import sys

    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="backslashreplace"))
    meter = ClassificationMeter(2)
    meter.update(torch.eye(2) * 5, torch.arange(2))
    rows = format_report(meter.compute(), ["café", "dog"]).splitlines()[2:4]
    assert rows == ["  caf\\xe9  100.0%  (n=1)", "  dog      100.0%  (n=1)"]


def test_format_report_rejects_wrong_class_count():
    result = _accumulate(_random_batches(3, [5]), 3)
    with pytest.raises(DataError, match="2 class names .* 3 classes"):
        format_report(result, ["a", "b"])


@pytest.mark.parametrize("c", [4, 30])
def test_plot_confusion_writes_png(tmp_path, c):
    result = _accumulate(_random_batches(c, [64], seed=3), c)
    out = plot_confusion(result, [f"c{i}" for i in range(c)], tmp_path / "sub" / "cm.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # no temp file left behind


def test_a_class_name_not_utf8_is_drawn_and_printed_as_its_escape(tmp_path):
    # a class folder named in Latin-1 bytes ("d\xf6g") is the str 'd\udcf6g' on Linux: matplotlib's set_text raised a
    # TypeError on it, the end of train's final test and of eval, after the training
    import matplotlib

    meter = ClassificationMeter(2)
    meter.update(torch.eye(2), torch.tensor([0, 1]))
    result, classes = meter.compute(), ["cat", "d\udcf6g"]
    assert plot_confusion(result, classes, tmp_path / "cm.png").read_bytes()[:8] == PNG_MAGIC
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # the labels written as text, not as glyph outlines
        drawn = plot_confusion(result, classes, tmp_path / "cm.svg").read_text()
    assert ">d\\udcf6g<" in drawn  # as the terminal and train.log show it
    rows = format_report(result, classes).splitlines()
    assert rows[2:4] == ["  cat       100.0%  (n=1)", "  d\\udcf6g  100.0%  (n=1)"]  # columns kept


def test_class_names_the_plot_font_lacks_are_named_once_not_as_matplotlib_warnings(tmp_path, caplog, recwarn,
                                                                                     monkeypatch):  # fmt: skip
    # Chinese class names printed a raw "UserWarning: Glyph 29483 (...) missing from font(s) DejaVu Sans" per glyph
    meter = ClassificationMeter(3)
    meter.update(torch.eye(3), torch.tensor([0, 1, 2]))
    with caplog.at_level(logging.WARNING, logger="freezetune"):
        plot_confusion(meter.compute(), ["猫", "犬", "bird"], tmp_path / "cm.png")
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    (line,) = [r.getMessage() for r in caplog.records if "glyph" in r.getMessage()]
    assert line.startswith("cm.png: its font has no glyph for '猫', '犬' in the class names")
    # another warning while the plot is saved still follows the user's own filters: one they silenced stays silent
    from matplotlib.figure import Figure

    real = Figure.savefig

    def savefig(fig, *args, **kwargs):
        warnings.warn_explicit("a matplotlib deprecation", DeprecationWarning, "m.py", 1, module="matplotlib.x")
        warnings.warn("a warning they see", UserWarning, stacklevel=1)
        return real(fig, *args, **kwargs)

    shown = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="matplotlib")
        monkeypatch.setattr(Figure, "savefig", savefig)
        monkeypatch.setattr(warnings, "showwarning", lambda message, *args: shown.append(str(message)))
        plot_confusion(meter.compute(), ["a", "b", "c"], tmp_path / "cm2.png")
    assert shown == ["a warning they see"]


def test_a_plot_path_without_a_format_or_that_is_a_folder_says_which(tmp_path):
    from freezetune.errors import ConfigError
    from freezetune.training.metrics import plot_format

    with pytest.raises(ConfigError, match=r"is a directory: name a file in it, e\.g\. '.*confusion\.png'"):
        plot_format(tmp_path)  # it said "no suffix is none of them"
    with pytest.raises(ConfigError, match=r"by its suffix; it has none$"):
        plot_format(tmp_path / "cm")
    with pytest.raises(ConfigError, match=r"by its suffix; \.gif is none of them$"):
        plot_format(tmp_path / "cm.gif")
