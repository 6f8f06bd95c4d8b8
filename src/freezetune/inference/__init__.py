"""Using a trained model: load and evaluate a checkpoint, predict on new files, export it."""


def __getattr__(name: str):  # the names the flat layout's freezetune.inference module held (_renamed.py)
    from freezetune import _renamed

    return _renamed.forwarded(__name__, name)
