"""Bridges to other training frameworks; each module imports its framework, so import the one you use.

- ``freezetune.integrations.lightning``: ``FreezetuneFinetuning``, a PyTorch Lightning callback (extra ``[lightning]``).
"""
