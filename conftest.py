"""For the whole test session, tests and doctests alike: temporary files go below pytest's own base directory.

The doctests' ``tempfile.mkdtemp()`` and the DDP tests' torchrun (``torchelastic_*``) left about 60 folders in /tmp at
every run; pytest keeps its base directories of the last three runs only.
"""

from __future__ import annotations

import os
import tempfile

import pytest


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and each process a test starts) gets its share of the cores: with
    every worker running as many threads as there are cores, their threads preempted each other and in-process
    training tests ran three times slower than alone."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = threads
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session", autouse=True)
def _temporary_files_below_pytests_base(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("tmp"))
    before = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = base
    os.environ["TMPDIR"] = base  # what the processes the tests start (torchrun, the CLI) use
    yield
    tempfile.tempdir = before[0]
    if before[1] is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before[1]


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test's captured output as UTF-8 text: pytest-xdist sends each report to the main process as UTF-8, and a
    log line naming a file whose name is not UTF-8 (``os.fsdecode``'s surrogate escapes) stopped the whole run."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _printable(text)) for title, text in report.sections]
