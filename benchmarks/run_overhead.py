"""Fixed-cost benchmark (CPU): two things a run pays outside its training steps, each against how it was paid before.

On a few hundred images the default command's fixed costs weigh: on the emoji categories (40 a class, 64 px, 3
epochs) its whole call took about 4.5 s, of which the epochs about 2.7 s.

- *report*: ``report.png`` of a 12-epoch run with validation, drawn as the run draws it (fixed margins, the learning
  rates' axis labelled in plain text) against the same figure with matplotlib's constrained layout and its default
  log labels (mathtext), as freezetune drew it before. Each in a fresh process (a process's first figure pays more
  than its later ones), matplotlib imported before the clock starts, the collector's older objects frozen in both (as
  in a run, below).
- *collector*: one full pass of Python's cyclic garbage collector in a process that has loaded what a ``train``
  command loads (torch, torchvision, timm, the trainer), as a run meets it when its own allocations trigger one: with
  the objects made before the run frozen (``freezetune.run.collector.older_objects_frozen``, what ``train`` does) and
  without.

Each measurement runs ``--repeat`` times in turns, in a fresh process; the fastest counts.

    python benchmarks/run_overhead.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from _common import table

REPORT_PROBE = """
import sys, tempfile, time
from pathlib import Path
import torch, torchvision, timm
import matplotlib.figure, matplotlib.backends.backend_agg
from freezetune.run import reporting
rows = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 1.8 / e, "train_acc": 0.5 + 0.03 * e,
         "val_acc": 0.45 + 0.03 * e, "lr/blocks.4": 3e-3 * 0.6 ** e, "lr/classifier": 3e-3 * 0.6 ** e}
        for e in range(1, 13)]
folder = tempfile.TemporaryDirectory()  # removed as the probe ends
out = Path(folder.name) / "report.png"
from freezetune.run.collector import older_objects_frozen
with older_objects_frozen():  # as in a run: the layout is all that differs
    start = time.perf_counter()
    fig = reporting.report_figure(rows, "run")
    if sys.argv[1] == "before":  # as freezetune drew it before: constrained layout, mathtext labels on the log axis
        from matplotlib.ticker import LogFormatterSciNotation
        fig.set_layout_engine("constrained")
        fig.axes[-1].yaxis.set_major_formatter(LogFormatterSciNotation())
        fig.axes[-1].yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False))
    fig.savefig(out, format="png")
    print(time.perf_counter() - start)
"""

COLLECTOR_PROBE = """
import contextlib, gc, sys, time
import torch, torchvision, timm, freezetune.training.trainer
from freezetune.run.collector import older_objects_frozen
gc.collect()
with older_objects_frozen() if sys.argv[1] == "frozen" else contextlib.nullcontext():
    start = time.perf_counter()
    gc.collect()
    print(time.perf_counter() - start, len(gc.get_objects()))
"""


def probe(code: str, mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, check=True).stdout
    return out.split()


def _ratio(before: float, now: float) -> str:
    return f"{before / now:.1f}x" if now >= 1e-3 else f"{before * 1e3:.0f} ms saved"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    seconds: dict[str, list[float]] = {}
    objects = 0
    for _ in range(args.repeat):  # in turns: a burst of load hits one repeat of each, not every repeat of one
        for mode in ("before", "now"):
            seconds.setdefault(f"report {mode}", []).append(float(probe(REPORT_PROBE, mode)[0]))
        for mode in ("plain", "frozen"):
            took, tracked = probe(COLLECTOR_PROBE, mode)
            seconds.setdefault(f"collector {mode}", []).append(float(took))
            objects = int(tracked) if mode == "plain" else objects  # (frozen ones are not listed)
    best = {k: min(v) for k, v in seconds.items()}
    rows = [
        ["report.png", f"{best['report before']:.3f}", f"{best['report now']:.3f}",
         _ratio(best["report before"], best["report now"])],
        [f"one full collector pass ({objects:,} objects)", f"{best['collector plain']:.3f}",
         f"{best['collector frozen']:.4f}", _ratio(best["collector plain"], best["collector frozen"])],
    ]  # fmt: skip
    print(f"fixed costs of a run, fastest of {args.repeat} (seconds; before = constrained layout and mathtext labels / "
          f"every object walked; now = what a run does)")  # fmt: skip
    print(table(rows, ["what", "before s", "now s", "faster"]))


if __name__ == "__main__":
    main()
