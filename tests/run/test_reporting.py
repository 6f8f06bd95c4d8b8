"""metrics.csv logging (header growth, resume, truncate), TensorBoard, report plot, epoch line and atomic writes."""

from __future__ import annotations

import csv

import pytest
import torch

from freezetune._io import atomic_write_text
from freezetune.run.reporting import MetricsLogger, plot_report, read_metrics, unfreeze_events
from freezetune.training import epoch_log
from freezetune.training.epoch_log import format_epoch_line

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _row(epoch: int, unfrozen: str = "", **extra) -> dict:
    return {
        "epoch": epoch,
        "train_loss": 1.0 / epoch,
        "train_acc": 0.5 + 0.04 * epoch,
        "val_loss": 1.2 / epoch,
        "val_acc": 0.45 + 0.04 * epoch,
        "lr/head": 1e-3,
        "unfrozen": unfrozen,
        **extra,
    }


def test_header_extends_when_a_new_column_appears(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log_epoch({"epoch": 1, "train_loss": 0.5, "lr/head": 1e-3, "unfrozen": ""})
    log.log_epoch({"epoch": 2, "train_loss": 0.4, "lr/head": 1e-3, "unfrozen": ""})
    log.log_epoch({"epoch": 3, "train_loss": 0.3, "lr/head": 1e-3, "lr/layer4": 1e-4, "unfrozen": ["layer4", "layer3"]})
    assert _csv(tmp_path / "metrics.csv") == [
        ["epoch", "train_loss", "lr/head", "unfrozen", "lr/layer4"],
        ["1", "0.5", "0.001", "", ""],
        ["2", "0.4", "0.001", "", ""],
        ["3", "0.3", "0.001", "layer4;layer3", "0.0001"],
    ]


def test_values_round_trip(tmp_path):
    values = {"epoch": 1, "a": 0.1 + 0.2, "b": 1 / 3, "t": torch.tensor(2.5), "s": "x,y", "n": None}
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log_epoch(values)
    (row,) = read_metrics(tmp_path / "metrics.csv")
    assert row == {"epoch": 1, "a": 0.1 + 0.2, "b": 1 / 3, "t": 2.5, "s": "x,y"}  # exact float equality


def test_resume_appends_and_truncate_drops_later_epochs(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for e in (1, 2, 3, 4):
        log.log_epoch(_row(e))
    log.close()

    # The run crashed after logging epoch 4 but its last checkpoint is from epoch 2.
    resumed = MetricsLogger(tmp_path, tensorboard=False)
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3, 4]
    assert resumed.truncate(after_epoch=2) == 2
    assert [r[0] for r in _csv(tmp_path / "metrics.csv")[1:]] == ["1", "2"]
    resumed.log_epoch(_row(3, unfrozen="layer4", **{"lr/layer4": 1e-4}))
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["train_loss"] == 1.0 and rows[2]["lr/layer4"] == 1e-4


def test_resume_repairs_a_line_cut_by_a_crash(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log_epoch(_row(1))
    with open(tmp_path / "metrics.csv", "a") as f:
        f.write("2,0.5")  # partial line, no newline
    resumed = MetricsLogger(tmp_path, tensorboard=False)
    resumed.log_epoch(_row(3))  # appending blindly would glue "3,..." onto the cut line
    resumed.log_epoch(_row(4))
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["train_loss"] == 1 / 3


def test_a_resumed_run_appends_its_rows_to_the_same_file_a_tail_follows(tmp_path):
    # each resume rewrote metrics.csv through a new file: `tail -f runs/r1/metrics.csv` in a tmux pane went on
    # watching the old one, and showed no epoch after it
    log = MetricsLogger(tmp_path, tensorboard=False)
    log.log_epoch(_row(1))
    watched = (tmp_path / "metrics.csv").stat().st_ino
    resumed = MetricsLogger(tmp_path, tensorboard=False)
    resumed.log_epoch(_row(2))
    resumed.log_epoch(_row(3))
    assert (tmp_path / "metrics.csv").stat().st_ino == watched
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3]


def test_log_epoch_requires_epoch(tmp_path):
    with pytest.raises(ValueError, match="no 'epoch' key"):
        MetricsLogger(tmp_path, tensorboard=False).log_epoch({"train_loss": 1.0})


def test_tensorboard_gets_numeric_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        log.log_epoch(_row(1))
        log.log_epoch(_row(2, unfrozen="layer4"))
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train_loss", "val_acc", "lr/head"} <= set(tags)
    assert "unfrozen" not in tags and "epoch" not in tags
    assert [(s.step, round(s.value, 6)) for s in acc.Scalars("train_loss")] == [(1, 1.0), (2, 0.5)]


def test_unfreeze_events_from_csv(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for e, stages in [(1, ""), (2, ""), (3, "layer4"), (4, ""), (5, "layer3;layer2")]:
        log.log_epoch(_row(e, unfrozen=stages))
    assert unfreeze_events(read_metrics(log.path)) == [(3, "layer4"), (5, "layer3;layer2")]


def test_plot_report_writes_png(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for e in range(1, 9):
        lrs = {"lr/layer4": 1e-4 * e} if e >= 4 else {}
        log.log_epoch(_row(e, unfrozen="layer4" if e == 4 else "", **lrs))
    out = plot_report(log.path, tmp_path / "report.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.glob(".*.tmp"))


def test_plot_report_skips_missing_columns(tmp_path):
    atomic_write_text(tmp_path / "metrics.csv", "epoch,val_acc\n1,0.5\n2,0.6\n")
    assert plot_report(tmp_path / "metrics.csv", tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    atomic_write_text(tmp_path / "metrics.csv", "epoch\n")
    assert plot_report(tmp_path / "metrics.csv", tmp_path / "b.png").read_bytes()[:8] == PNG_MAGIC


def test_format_epoch_line():
    row = {
        "epoch": 3,
        "epochs": 10,
        "train_loss": 0.5123,
        "train_acc": 0.8123,
        "val_loss": 0.43,
        "val_acc": 0.85,
        "lr": 1e-3,
        "trainable_params": 1_234_567,
        "total_params": 4_700_000,
        "epoch_time_s": 12.34,
        "img_per_s": 812.4,
        "unfrozen": "layer4",
    }
    assert format_epoch_line(row) == (
        "epoch  3/10  train_loss 0.512 acc 81.2%  val_loss 0.430 acc 85.0%  lr 1.0e-03  trainable 1.2M/4.7M"
        "  12.3s 812 img/s  unfrozen: layer4"
    )
    # under --monitor val_f1 the metric that picks best.pt is on the line (it sat unseen while accuracy stalled)
    assert "  val_loss 0.430 acc 85.0% f1 61.5%  lr" in format_epoch_line({**row, "val_f1": 0.615}, monitor="val_f1")
    assert " f1 " not in format_epoch_line({**row, "val_f1": 0.615})
    # Per-group LRs without a single `lr`: the range of the non-zero ones; missing fields are left out.
    assert format_epoch_line({"epoch": 1, "lr/head": 1e-3, "lr/layer4": 1e-4, "lr/stem": 0.0}) == (
        "epoch 1  lr 1.0e-04..1.0e-03"
    )


def test_gpu_readings_reach_the_row_the_log_line_and_the_csv(tmp_path):
    # on CUDA, TrainProgress adds GpuMonitor's averages to the train stats: they become columns and log text
    from freezetune.training.epoch_log import epoch_row

    train = {"train_loss": 1.0, "train_acc": 0.5, "samples": 8, "gpu_util_pct": 87.0, "gpu_mem_mb": 2048.0}
    row = epoch_row(0, 2, train, None, seconds=1.0, optimizer=None, params=(1, 2), peak_mb=0.0, unfrozen=["layer4"])
    assert row["gpu_util_pct"] == 87.0 and row["gpu_mem_mb"] == 2048.0 and row["unfrozen"] == ["layer4"]
    assert "GPU 87% 2.0 GiB" in format_epoch_line(row)
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        log.log_epoch(row)
    (back,) = read_metrics(tmp_path / "metrics.csv")
    assert back["gpu_util_pct"] == 87.0 and back["unfrozen"] == "layer4"


def _meter_steps(meter, losses, skips=()):
    for i, loss in enumerate(losses):
        if i in skips:
            meter.skip()
            continue
        logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])[: 2 + i % 2]
        meter.update(torch.tensor(loss), logits, torch.tensor([0, 0, 0])[: 2 + i % 2])


def test_an_epochs_meter_sums_its_steps_finds_the_first_non_finite_one_and_resumes_mid_epoch():
    cpu = torch.device("cpu")
    losses = [0.5, 1.5, 2.0, float("nan"), 0.25, float("inf")]
    whole = epoch_log.TrainProgress(len(losses), "e", enabled=False, device=cpu)
    _meter_steps(whole, losses, skips={2})
    assert whole.diverged and whole.step == 6 and whole.skipped == 1
    stats = whole.close()
    # batches of 2, 3, (skipped), 3, 2, 3 of class 0; rows 0 and 2 of the logits say 0: 1 right of 2, 2 of 3
    assert stats["samples"] == 13 and stats["train_acc"] == pytest.approx(8 / 13) and stats["first_bad_step"] == 3
    finite = epoch_log.TrainProgress(3, "e", enabled=False, device=cpu)
    _meter_steps(finite, [0.5, 1.5, 2.0])
    assert not finite.diverged
    assert finite.close()["train_loss"] == pytest.approx((0.5 * 2 + 1.5 * 3 + 2.0 * 2) / 7)
    # a mid-epoch save after 2 steps, loaded by a fresh meter that goes on: the same epoch, summed the same way, and
    # the seconds before the stop kept (the epoch's time and img/s counted the resumed part's seconds alone)
    first = epoch_log.TrainProgress(3, "e", enabled=False, device=cpu)
    first.started -= 150.0  # its steps took two and a half minutes
    _meter_steps(first, [0.5, 1.5])
    resumed = epoch_log.TrainProgress(3, "e", enabled=False, device=cpu)
    resumed.load_state_dict(first.state_dict())
    resumed.update(torch.tensor(2.0), torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]))
    again = resumed.close()
    assert again["train_loss"] == pytest.approx((0.5 * 2 + 1.5 * 3 + 2.0 * 2) / 7) and again["samples"] == 7
    assert again["train_acc"] == pytest.approx(4 / 7) and again["first_bad_step"] == -1
    assert 150.0 <= again["seconds_before"] < 160.0 and finite.close()["seconds_before"] == 0.0


def test_an_epochs_meter_takes_more_batches_than_announced():
    meter = epoch_log.TrainProgress(1, "e", enabled=False, device=torch.device("cpu"))
    _meter_steps(meter, [1.0] * 5)
    assert meter.close()["samples"] == 12


def test_the_report_draws_one_lr_line_a_stage_and_whole_epochs(tmp_path):
    from freezetune.run import reporting

    log = reporting.MetricsLogger(tmp_path, tensorboard=False)
    for e in (1, 2, 3):
        log.log_epoch({"epoch": e, "train_loss": 1 / e, "val_acc": 0.5 + e / 10, "lr/head": 1e-3 / e,
                       "lr/head/no_decay": 1e-3 / e, "lr/layer4": 1e-4 / e})  # fmt: skip
    rows = reporting.read_metrics(tmp_path / "metrics.csv")
    assert reporting._lr_columns(rows) == ["lr/head", "lr/layer4"]  # the twin at the same LR was a second line
    assert reporting.plot_report(tmp_path / "metrics.csv", tmp_path / "r.png").stat().st_size > 0


def test_the_best_epoch_is_named_in_the_accuracy_legend_not_over_the_curves():
    # its label sat 14 points under the ring, across the val_acc line on its way down
    from matplotlib.figure import Figure

    from freezetune.run import reporting

    rows = [{"epoch": e, "train_acc": t, "val_acc": v} for e, t, v in [(1, 0.5, 0.6), (2, 0.8, 0.78), (3, 0.85, 0.77)]]
    ax = Figure().subplots()
    reporting._plot_panel(ax, rows, "accuracy (%)", ["train_acc", "val_acc"], 100.0, False)
    reporting._mark_best(ax, rows)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "train_acc",
        "val_acc",
        "best val acc 78.0% (epoch 2)",
    ]
    assert not ax.texts


def test_the_loss_panel_says_which_loss_each_curve_is():
    # train_loss (label-smoothed, class-weighted) above val_loss (plain cross-entropy) read as underfitting, unlabelled
    from freezetune.run import reporting

    rows = [{"epoch": e, "train_loss": 0.4, "val_loss": 0.2, "train_acc": 1.0, "val_acc": 0.95} for e in (1, 2)]
    legend = [t.get_text() for t in reporting.report_figure(rows, "r").axes[0].get_legend().get_texts()]
    assert legend == ["train_loss (as trained: label smoothing, class weights)", "val_loss (cross-entropy)"]


def test_under_monitor_val_loss_the_ring_marks_best_pts_epoch_on_the_loss_panel():
    # the ring followed the highest accuracy whatever --monitor said: epoch 1 here, where best.pt held epoch 3
    from matplotlib.figure import Figure

    from freezetune.run import reporting

    rows = [{"epoch": e, "val_loss": loss, "val_acc": acc} for e, loss, acc in [(1, 0.9, 0.6), (2, 0.5, 0.5),
                                                                                (3, 0.4, 0.55)]]  # fmt: skip
    ax = Figure().subplots()
    reporting._mark_best(ax, rows, "val_loss")
    assert ax.get_legend().get_texts()[-1].get_text() == "best val loss 0.4 (epoch 3)"
    ax = Figure().subplots()
    reporting._mark_best(ax, rows, "val_acc", epoch=3)  # best.pt's epoch, given by the run, wins over the column
    assert ax.get_legend().get_texts()[-1].get_text() == "best val acc 55.0% (epoch 3)"


def test_under_monitor_val_f1_the_accuracy_panel_draws_macro_f1_and_rings_best_pts_epoch_on_it():
    from freezetune.run import reporting

    rows = [{"epoch": e, "train_loss": 1.0, "val_loss": 0.5, "train_acc": 0.7, "val_acc": acc, "val_f1": f1}
            for e, acc, f1 in [(1, 0.90, 0.40), (2, 0.88, 0.62), (3, 0.91, 0.55)]]  # fmt: skip
    fig = reporting.report_figure(rows, "r", monitor="val_f1")
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert legend == ["train_acc", "val_acc", "val_f1", "best val macro-F1 62.0% (epoch 2)"]
    plain = reporting.report_figure(rows, "r")  # kept by accuracy: no F1 curve, the ring on the best accuracy
    assert [t.get_text() for t in plain.axes[1].get_legend().get_texts()][2:] == ["best val acc 91.0% (epoch 3)"]


def test_without_best_pts_epoch_the_ring_breaks_a_tie_as_best_pt_does():
    # a tie on the monitored metric goes to the epoch with the better other one (Progress.update); the ring sat on
    # the first epoch of the tie
    from freezetune.run import reporting

    rows = [{"epoch": e, "val_f1": f1, "val_loss": loss, "val_acc": 0.5}
            for e, f1, loss in [(1, 0.4, 0.9), (2, 0.6, 0.7), (3, 0.6, 0.5), (4, 0.6, 0.6)]]  # fmt: skip
    for monitor, epoch in (("val_f1", 3), ("val_acc", 3), ("val_loss", 3)):
        fig = reporting.report_figure(rows, "r", monitor=monitor)
        ax = fig.axes[0 if monitor == "val_loss" else 1]
        assert ax.get_legend().get_texts()[-1].get_text().endswith(f"(epoch {epoch})"), monitor


def test_a_failed_tensorboard_write_is_said_in_one_line_and_the_run_goes_on(tmp_path, monkeypatch, caplog, capfd):
    # the events file filled a quota first: its writer thread printed a traceback and the next add_scalar raised, which
    # ended the run before the epoch's checkpoint; metrics.csv holds the same numbers
    from tensorboard.summary.writer import record_writer

    def write(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", write)
    log = MetricsLogger(tmp_path)
    with caplog.at_level("WARNING", logger="freezetune"):
        for epoch in (1, 2, 3):
            log.log_epoch(_row(epoch))
        log.close()
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3]
    said = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert said == ["TensorBoard events are no longer written ([Errno 28] No space left on device); metrics.csv holds "
                    "every epoch, and the run goes on"]  # fmt: skip
    assert "Traceback" not in capfd.readouterr().err


def test_the_epoch_lines_of_a_long_run_keep_their_columns():
    # epoch 9/30 then 10/30, acc 9.0% then 88.0%: each line shifted, and 50 of them did not read as columns
    lines = [format_epoch_line({**_row(epoch), "epochs": 30, "train_acc": acc, "val_acc": acc})
             for epoch, acc in ((9, 0.09), (10, 0.885))]  # fmt: skip
    assert lines[0].startswith("epoch  9/30") and lines[1].startswith("epoch 10/30")
    for column in ("train_loss", "val_loss", "lr"):
        assert lines[0].index(column) == lines[1].index(column), lines


@pytest.mark.parametrize("monitor", ["val_acc", "val_f1"])
@pytest.mark.parametrize("validated", [True, False])
def test_every_label_and_legend_of_the_report_lies_inside_its_figure(monitor, validated):
    # the margins are fixed (the constrained layout drew the figure once more to measure it): the two-line LR label,
    # "1e-08" ticks, the two-line title of a run without validation, an unfreeze's label must still fit on the page
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from freezetune.run import reporting

    rows = []
    for e in range(1, 13):
        row = {"epoch": e, "train_loss": 12.5 / e, "train_acc": 0.5 + 0.04 * e, "lr/blocks.4": 3e-3 * 0.5**e,
               "lr/classifier": 1e-2 * 0.1**e, "unfrozen": "blocks.3;blocks.2" if e == 5 else ""}  # fmt: skip
        if validated:
            row.update(val_loss=1.2 / e, val_acc=0.45 + 0.04 * e, val_f1=0.4 + 0.04 * e)
        rows.append(row)
    fig = reporting.report_figure(rows, "run-2026-12-07_09-30-00", monitor=monitor)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # as savefig draws it
    renderer = canvas.get_renderer()
    page = fig.bbox
    # each panel with what it draws around it: ticks, axis labels, legend, the unfreeze's label; and the title
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes] + [fig._suptitle.get_window_extent(renderer)]
    for box in boxes:
        assert page.x0 - 1 <= box.x0 and box.x1 <= page.x1 + 1 and page.y0 - 1 <= box.y0 and box.y1 <= page.y1 + 1, (
            box, page)  # fmt: skip
    assert boxes[-1].y0 >= max(box.y1 for box in boxes[:-1]) - 1  # the title above the panels, not across the first
    assert "learning rate" in fig.axes[-1].get_ylabel()
    panels = sorted((ax.get_window_extent(renderer) for ax in fig.axes), key=lambda b: -b.y0)
    assert all(upper.y0 > lower.y1 for upper, lower in zip(panels, panels[1:], strict=False))  # none overlaps
    ylabels = [ax.yaxis.label.get_window_extent(renderer).x1 for ax in fig.axes]
    assert max(ylabels) - min(ylabels) < 2  # aligned, whatever the width of each panel's ticks


@pytest.mark.parametrize("lrs", [[1e-2 * 0.1**e for e in range(1, 6)], [1e-3 * (1 + 0.2 * e) for e in range(1, 6)]],
                         ids=["decades", "narrow"])  # fmt: skip
def test_the_learning_rate_axis_is_labelled_in_plain_text_that_tells_its_ticks_apart(lrs):
    # matplotlib's default log labels are mathtext ($10^{-3}$), whose parser took 0.1 s of the draw to build; the plain
    # LogFormatter said "1e-03" for 0.0012, 0.0014 and 0.0016 alike
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from freezetune.run import reporting

    rows = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5, "lr": lr} for e, lr in enumerate(lrs, 1)]
    fig = reporting.report_figure(rows, "r")
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[-1]
    low, high = ax.get_ylim()
    ticks = [t for t in [*ax.get_yticklabels(), *ax.get_yticklabels(minor=True)] if t.get_text()]
    shown = {t.get_position()[1]: t.get_text() for t in ticks if low <= t.get_position()[1] <= high}
    assert len(shown) >= 2, shown
    assert len(set(shown.values())) == len(shown), shown  # no two ticks said alike
    for value, text in shown.items():
        assert float(text.replace("\u2212", "-")) == pytest.approx(value, rel=0.05), (value, text)  # no "$"
