"""The auto recipe (``freeze: auto``, the default): what to freeze decided by measurement on the user's data."""
