"""Named fine-tuning recipes and ``freezetune sweep``, which runs several and keeps the evidence."""


def __getattr__(name: str):  # the names the flat layout's freezetune.recipes module held (_renamed.py)
    from freezetune import _renamed

    return _renamed.forwarded(__name__, name)
