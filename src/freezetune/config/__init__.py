"""A run's configuration: its fields and defaults, every choice list, YAML and overrides, the checks."""


def __getattr__(name: str):  # the names the flat layout's freezetune.config module held (_renamed.py)
    from freezetune import _renamed

    return _renamed.forwarded(__name__, name)
