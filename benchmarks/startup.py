"""Start-up and exit benchmark (CPU): what a ``freezetune`` command costs around its work.

- *exit*: a process that has loaded what a ``train`` command loads (torch, torchvision, timm,
``freezetune.training.trainer``)
  ends, with and without ``gc.freeze()`` first (what the console entry point ``freezetune.cli.main.run`` does): the
  interpreter's exit-time collections walk every object those libraries made. Measured from the process's last line
  to its end.
- *--version*: ``python -m freezetune --version``, start to end.
- *imports*: whether ``freezetune.cli.main`` (every command's parser) and ``freezetune.inference.evaluation`` (predict,
eval) load
  matplotlib, which only the plots need.

Each measurement runs ``--repeat`` times in turns; the fastest counts.

    python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import table

EXIT_PROBE = """
import gc, sys, time
import torch, torchvision, timm, freezetune.training.trainer
if sys.argv[1] == "frozen":
    gc.freeze()
print(repr(time.time()), flush=True)
"""


def exit_seconds(mode: str) -> float:
    """From the probe's last line to its end, in a fresh process."""
    proc = subprocess.Popen([sys.executable, "-c", EXIT_PROBE, mode], stdout=subprocess.PIPE, text=True)
    said = float(proc.stdout.readline())
    proc.wait()
    return time.time() - said


def version_seconds() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "freezetune", "--version"], check=True, capture_output=True)
    return time.perf_counter() - start


def loads_matplotlib(module: str) -> bool:
    probe = f"import sys, {module}; print('matplotlib' in sys.modules)"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "True"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of each, in turns [default: %(default)s]")
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {"exit, plain": [], "exit, gc.freeze() first": [], "freezetune --version": []}
    for _ in range(args.repeat):
        times["exit, plain"].append(exit_seconds("plain"))
        times["exit, gc.freeze() first"].append(exit_seconds("frozen"))
        times["freezetune --version"].append(version_seconds())
    print(f"startup: fastest of {args.repeat}")
    print(table([[name, f"{min(t):.2f}"] for name, t in times.items()], ["measurement", "s"]))
    plain, frozen = min(times["exit, plain"]), min(times["exit, gc.freeze() first"])
    print(f"exit: gc.freeze() first saves {plain - frozen:.2f} s ({plain / frozen:.1f}x faster)")
    for module in ("freezetune.cli.main", "freezetune.inference.evaluation"):
        print(f"import {module} loads matplotlib: {loads_matplotlib(module)}")


if __name__ == "__main__":
    main()
