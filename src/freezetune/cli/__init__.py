"""The ``freezetune`` command line: parse -> config -> library call. No logic lives only here."""


def __getattr__(name: str):  # the names the flat layout's freezetune.cli module held (_renamed.py)
    from freezetune import _renamed

    return _renamed.forwarded(__name__, name)
