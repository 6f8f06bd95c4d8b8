"""The worker processes of a CPU ``DataLoader``: how many CPUs they may use, their seeds, the signals they act on
(a Ctrl-C and a group SIGTERM are the main process's to act on, after it saved its step), and the package's one
``DataLoader`` constructor, which starts them so."""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import multiprocessing.resource_tracker
import os
import random
import signal
import threading
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from freezetune.data.scan import quiet_pil_warnings
from freezetune.run.interrupt import pause_point
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or ``taskset``'s limit, not the machine's count).

    >>> usable_cpus() >= 1
    True
    """
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _seed_worker(worker_id: int, *, main: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it so any library is reproducible.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to act on (_WorkersIgnoreCtrlC)
    _signals_from_outside(main)
    atexit.register(_batches_sent_before_exit)
    quiet_pil_warnings()


FEEDER_GRACE_S = 1.0  # a batch is sent in milliseconds; longer, the main process has stopped reading the pipe


def _batches_sent_before_exit() -> None:
    """In a worker that ends by finalizing its interpreter (a spawned one: ``multiprocessing.spawn`` ends in
    ``sys.exit``; a forked one ends in ``os._exit``, without this), let its result queue's feeder thread send the
    last batch first. A worker stopped mid-batch (a Ctrl-C as spawned workers start) puts it and exits at once (torch
    does not wait for the feeder: ``cancel_join_thread``); the feeder, copying a tensor into shared memory, has let go
    of the GIL, and a thread taking it back once finalization has begun is ended by ``pthread_exit``, unwound through
    torch's C++ frame: the worker aborted with "terminate called without an active exception" on the run's stderr
    (pytorch#38228). ``atexit`` hooks run before finalization begins."""
    for thread in threading.enumerate():
        if thread.name == "QueueFeederThread" and thread is not threading.current_thread():
            thread.join(FEEDER_GRACE_S)  # the queue is closed: its feeder ends once what it holds is written


def _signals_from_outside(main: int) -> None:
    """In a loader worker: die of a SIGTERM from the main process (closing the loader, or exiting), live through one
    from anyone else, and through SIGHUP. Sent to the whole process group (``timeout``, a cluster scheduler, an SSH
    session closing: ``interrupt.HANGUP``), the signal killed the workers before the main process had finished its
    step and saved it, and the run crashed on the loader. Ignored from everyone, though, the main process's own
    SIGTERM at exit left it waiting for them forever. The main process stops them when it closes the loader; a worker
    whose main process is gone exits by itself (torch's watchdog). Without ``sigwaitinfo`` (macOS) workers keep the
    default: a group signal kills them. ``main`` is the process that made the loader: a worker's parent is the fork
    server under the forkserver start method (Python 3.14's default on Linux), whose SIGTERM never comes. There a
    thread torch starts in the worker before this init runs does not block the signals, so such a worker dies of
    anyone's SIGTERM (a group signal is not outlived, as under fork; the stop is still reported as one)."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    caught = {signal.SIGTERM, signal.SIGHUP}
    signal.pthread_sigmask(
        signal.SIG_BLOCK, caught
    )  # in this thread and every thread started after: only wait() sees them

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(caught)
            if info.si_signo == signal.SIGTERM and info.si_pid == main:
                os._exit(128 + signal.SIGTERM)

    threading.Thread(target=wait, name="freezetune-signals", daemon=True).start()


class _WorkersIgnoreCtrlC(DataLoader):
    """A ``DataLoader`` whose worker processes are started with SIGINT blocked, so a terminal's Ctrl-C (sent to the
    whole process group) reaches the main process alone, which saves the step and stops (``interrupt``).

    Forked workers inherit the main process's handler, which only records the signal. Spawned ones (the start method
    on macOS and Windows) and those of a fork server (Python 3.14's default on Linux) start with Python's own, and
    died of KeyboardInterrupt, even while importing torch, before ``_seed_worker`` could ignore it: the run crashed on
    "DataLoader worker exited unexpectedly" and lost the step it would have saved. A signal mask is inherited by
    every child, whatever the start method; the main process gets a Ctrl-C that came meanwhile once it unblocks.
    """

    def check_worker_number_rationality(self) -> None:
        """More workers than usable CPUs: said once, in freezetune's words (torch printed its own warning twice an
        epoch, with a source line). Not refused: on slow storage more loader processes than cores can help."""
        cpus = usable_cpus()
        if self.num_workers > cpus and not getattr(self, "_said_cpus", False):  # torch asks twice an iterator
            self._said_cpus = True  # (and a run's, of each loader it builds, once: warn_once)
            warn_once(log, "--workers %d is more than the %d CPU(s) this process may use: the loader processes share "
                      "them with training (more helps only where reading the files waits on storage)",
                      self.num_workers, cpus)  # fmt: skip

    def __iter__(self):
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):  # (Windows: _seed_worker's ignore alone)
            return super().__iter__()
        if (self.multiprocessing_context or multiprocessing.get_context()).get_start_method() != "fork":
            # the first spawned process starts multiprocessing's resource tracker, which unblocks SIGINT after it
            multiprocessing.resource_tracker.ensure_running()
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            batches = super().__iter__()  # starts the workers (a persistent loader's once)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        pause_point("workers")  # (tests: a Ctrl-C while the workers start up)
        return batches


def dataloader(dataset: Dataset, order: Iterable[int], *, batch_size: int, workers: int, pin: bool,
                generator: torch.Generator | None = None, persistent: bool = True,
                collate: Callable | None = None) -> DataLoader:  # fmt: skip
    """The one ``DataLoader`` constructor of the package (training, evaluation and cache-build reads)."""
    return _WorkersIgnoreCtrlC(
        dataset,
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        collate_fn=collate,
        generator=generator if generator is not None else torch.Generator(),
        worker_init_fn=functools.partial(_seed_worker, main=os.getpid()) if workers > 0 else None,
        # Pinned host memory makes .to(device, non_blocking=True) truly asynchronous; useless without CUDA.
        pin_memory=pin,
        persistent_workers=persistent and workers > 0,
    )
