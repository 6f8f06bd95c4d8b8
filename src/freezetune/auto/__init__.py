"""The auto recipe (``freeze: auto``, the default): what to freeze decided by measurement on the user's data."""


def __getattr__(name: str):  # the names the flat layout's freezetune.auto module held (_renamed.py)
    from freezetune import _renamed

    return _renamed.forwarded(__name__, name)
