"""A run's ``best.pt`` and ``last.pt`` put on disk: in a background thread from snapshots on an accelerator, so that
an epoch shorter than its checkpoint write does not wait for the disk; in turn on a CPU. What the files hold is
``run/checkpoint.py``'s.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

from freezetune.run import checkpoint
from freezetune.run.checkpoint import BEST, LAST
from freezetune.run.interrupt import pause_point


class Writer:
    """Writes a run's ``best.pt`` and ``last.pt`` in a background thread, so that an epoch shorter than its checkpoint
    write (a head on cached features, a small dataset on a GPU) does not wait for the disk.

    ``submit`` takes a snapshot of what it is given (every tensor copied to the CPU), so the training that goes on
    cannot change a checkpoint while it is written. One save waits at most: a save submitted while another waits
    replaces it, keeping the waiting one's ``best.pt`` when it brings none. The files on disk thus never fall more
    than two saves behind the run, and at most two snapshots are held. Each save writes ``best.pt`` before
    ``last.pt``: a ``last.pt`` that names epoch N the best never outlives a missing ``best.pt``. Every write is atomic;
    a process killed mid-write leaves the previous file (see ``_io``).

    ``wait`` returns once everything submitted is on disk and raises what a write raised; so does the next
    ``submit``: a full disk stops the run at its next save, not at its end.

    ``background`` False writes in the calling thread, at ``submit``, with no copy: for a run on the CPU, whose
    cores a writer thread would take from the training (on 2 cores, Fashion-MNIST at 10 a class, 64 px, 10 epochs,
    the run took 3.40-3.42 s with the thread against 3.30-3.32 s without).

    >>> import tempfile
    >>> writer = Writer(Path(tempfile.mkdtemp()))
    >>> writer.submit(best={"state_dict": {"w": torch.ones(2)}, "epoch": 1}, last=None)
    >>> writer.wait()
    >>> torch.load(writer.run_dir / BEST)["epoch"]
    1
    """

    def __init__(self, run_dir: str | Path, *, background: bool = True) -> None:
        self.run_dir, self.background = Path(run_dir), background
        self._pending: dict[str, dict | None] | None = None
        self._writing = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()

    def submit(self, *, best: dict[str, Any] | None, last: dict[str, Any] | None) -> None:
        """Queue ``best.pt`` and/or ``last.pt`` (either may be None), snapshotted now, written in the background (or
        written now, without ``background``)."""
        self._raise_error()
        if not self.background:
            self._write(best, last)
            return
        job = {"best": _snapshot(best), "last": _snapshot(last)}
        with self._changed:
            if self._pending is not None and job["best"] is None:
                job["best"] = self._pending["best"]  # the newest best.pt still has to reach the disk
            self._pending = job
            if not self._writing:
                self._writing = True
                threading.Thread(target=self._drain, name="freezetune-checkpoint", daemon=True).start()

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until every submitted save is on disk; raise the first error a write met (or, with ``raise_error``
        False, for a run already failing for another reason, drop it)."""
        with self._changed:
            self._changed.wait_for(lambda: not self._writing)
        if raise_error:
            self._raise_error()
        else:
            self._error = None

    def _raise_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _drain(self) -> None:
        while True:
            with self._changed:
                job, self._pending = self._pending, None
                if job is None:
                    self._writing = False
                    self._changed.notify_all()
                    return
            try:
                self._write(job["best"], job["last"])
            except BaseException as exc:  # handed to the training thread: a thread's exception would only be printed
                self._error = self._error or exc

    def _write(self, best: dict[str, Any] | None, last: dict[str, Any] | None) -> None:
        if best is not None:
            checkpoint.save(best, self.run_dir / BEST)
        if last is not None:
            pause_point("checkpoint")
            checkpoint.save(last, self.run_dir / LAST)


def _snapshot(value: Any) -> Any:
    """A copy of ``value`` whose tensors are new CPU tensors and whose containers are new: nothing the run goes on
    changing in place (weights, optimizer moments, lists in a scheduler's state) is shared with it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_snapshot(v) for v in value]
    if isinstance(value, tuple):
        items = [_snapshot(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # a namedtuple takes fields
    return value
