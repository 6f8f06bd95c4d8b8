"""The versions a run ran under: Python and the libraries that decide its numbers, written into its log's header and
its checkpoints, so a result can be traced to what produced it (a later torch or timm may train the same command
differently)."""

from __future__ import annotations

import functools
import platform
from importlib import metadata

from freezetune import __version__

# what decides a run's numbers, beside freezetune: the kernels (torch), the models and their weights' transforms
# (torchvision, timm, transformers), the data's arrays (numpy, Pillow)
LIBRARIES = ("torch", "torchvision", "timm", "transformers", "numpy", "pillow")


@functools.cache
def versions() -> dict[str, str]:
    """``{name: version}`` of freezetune, Python and each of ``LIBRARIES`` installed (one not installed is left out).

    >>> v = versions()
    >>> v["freezetune"] == __version__ and v["python"] == platform.python_version() and "torch" in v
    True
    """
    found = {"freezetune": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def versions_line() -> str:
    """Python's and the libraries' versions, as the log's header says them after freezetune's.

    >>> versions_line().startswith("python ")
    True
    """
    return ", ".join(f"{name} {version}" for name, version in versions().items() if name != "freezetune")
