"""The worker processes of a CPU ``DataLoader``: how many CPUs they may use, their seeds, the signals they act on
(a Ctrl-C and a group SIGTERM are the main process's to act on, after it saved its step), the shared memory they pass
batches through, what their death means in one line (``worker_failure``), and the package's one ``DataLoader``
constructor, which starts them so."""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import multiprocessing.resource_tracker
import os
import random
import re
import shutil
import signal
import threading
import traceback
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


SHARED_MEMORY = "/dev/shm"
# Workers hand their batches over through /dev/shm: a few batches each in flight, 20 MB a batch of 32 images of 224 px.
# A container's default (Docker's, Kubernetes') is 64 MB: the default workers failed there at the first batches.
SHARED_MEMORY_NEEDED = 256 << 20


def shared_memory_short() -> int | None:
    """The free bytes of ``/dev/shm`` where they are too few for loader workers (``SHARED_MEMORY_NEEDED``); None where
    there is room, or no such folder (macOS, Windows: torch shares memory otherwise)."""
    try:
        free = shutil.disk_usage(SHARED_MEMORY).free
    except OSError:
        return None
    return free if free < SHARED_MEMORY_NEEDED else None


def note_no_workers(free: int) -> None:
    """Say once that the default loader reads in the main process, for want of shared memory."""
    warn_once(log, "%s has %d MiB free (a container's default?): loader workers pass their batches through it, so the "
              "data is read in the main process; give the container more (docker run --shm-size 2g) for workers, or "
              "set --workers N", SHARED_MEMORY, free >> 20)  # fmt: skip


def worker_failure(exc: BaseException) -> str | None:
    """A loader worker's failure in words, with what to do, or None when ``exc`` is none. Torch reports a worker out of
    shared memory, or killed (the kernel's out-of-memory killer), as a 60-line traceback, or as "Connection reset by
    peer" when the batch was in transit.

    >>> print(worker_failure(RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed. ")))
    a data loader worker (pid 123) was killed (SIGKILL: the machine's out-of-memory killer?); try --workers 0 or a smaller --batch-size
    >>> worker_failure(RuntimeError("bug")) is None
    True
    """
    text = str(exc)
    if "unable to allocate shared memory" in text or "insufficient shared memory" in text or "Bus error" in text:
        free = shared_memory_short()
        room = f" ({SHARED_MEMORY}: {free >> 20} MiB free)" if free is not None else ""
        return (f"data loader workers ran out of shared memory{room}; try --workers 0, or give the container more "
                "(docker run --shm-size 2g)")  # fmt: skip
    found = re.search(
        r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\) (?:is killed by signal: (\w+)|exited unexpectedly)", text
    )
    if found is not None:
        who, signame = f"a data loader worker (pid {found.group(1).strip()})", found.group(2)
        how = "was killed (SIGKILL: the machine's out-of-memory killer?)" if signame == "Killed" else \
            f"was killed by signal {signame}" if signame else "exited unexpectedly (killed? out of memory?)"  # fmt: skip
    elif isinstance(exc, (ConnectionResetError, EOFError)) and _in_the_loader(exc):
        who, how = "a data loader worker", "was gone mid-batch (killed? out of memory?)"
    else:
        return None
    return f"{who} {how}; try --workers 0 or a smaller --batch-size"


def worker_death(exc: BaseException) -> str | None:
    """``worker_failure(exc)``, with the loader it was raised in disarmed when it is one (``disarm_the_loader_of``).
    Torch's SIGCHLD handler, run meanwhile, may raise the same worker's death again: that error is read instead."""
    try:
        said = worker_failure(exc)
        if said is not None:
            disarm_the_loader_of(exc)
    except RuntimeError as again:
        said = worker_failure(again)
        if said is None:
            raise
        disarm_the_loader_of(exc)
    return said


def shut_down(iterator) -> None:
    """Stop a DataLoader iterator's workers. Torch's SIGCHLD handler stays armed for them while it joins them: with one
    dead already (killed, out of memory), a child's exit during the join raised "DataLoader worker (pid N) is killed"
    again, over the one-line error being reported. Disarmed first (torch's own shutdown would, once they are joined)."""
    _disarm(iterator)
    iterator._shutdown_workers()


def disarm_the_loader_of(exc: BaseException) -> None:
    """Disarm torch's SIGCHLD handler for the loader ``exc`` was raised in (a worker's death): the signal of that death,
    still pending as "Connection reset by peer" is reported, raised "DataLoader worker is killed" over it."""
    tb = exc.__traceback__
    while tb is not None:
        iterator = tb.tb_frame.f_locals.get("self")
        if getattr(iterator, "_worker_pids_set", False):
            _disarm(iterator)
            return
        tb = tb.tb_next


def _disarm(iterator) -> None:
    if getattr(iterator, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        with contextlib.suppress(AttributeError, ValueError):  # a torch without these: its own shutdown does it
            signal_handling._remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False


def _in_the_loader(exc: BaseException) -> bool:
    """Whether ``exc`` was raised receiving a batch from a worker process (multiprocessing's pipes): a dataset of the
    user's own, read in the main process (``--workers 0``), may raise a ConnectionResetError of its own."""
    return any("multiprocessing/" in f.filename for f in traceback.extract_tb(exc.__traceback__))


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
        if self.num_workers == 0:
            return super().__iter__()
        if not hasattr(signal, "pthread_sigmask"):  # Windows: _seed_worker's ignore alone; a Ctrl-C before it kills
            batches = super().__iter__()  # them, and the run reports its stop (interrupt.WORKERS_KILLED)
        else:
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
