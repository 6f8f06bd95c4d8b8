"""For the whole test session, tests and doctests alike: temporary files go below pytest's own base directory.

The doctests' ``tempfile.mkdtemp()`` and the DDP tests' torchrun (``torchelastic_*``) left about 60 folders in /tmp at
every run; pytest keeps its base directories of the last three runs only.
"""

from __future__ import annotations

import os
import tempfile

import pytest


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
