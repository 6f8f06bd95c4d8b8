"""When two texts are one input to a model: what its tokenizer's normalizer and pre-tokenizer make of them.

Copies across splits are warned of and kept on one side of an automatic hold-out (``data.overlap``,
``data.validation.same_items``). Compared with spaces stripped alone, an uncased model's "A JOY TO WATCH" in the test
split was not a copy of its training "a joy to watch", though the model reads both as the same tokens, and the test
accuracy on such copies, 100 %, went unremarked.
"""

from __future__ import annotations

import functools
from pathlib import Path

from freezetune.data.scan import file_stamp


class TextKey:
    """``key(text)``: one string per input the tokenizer named ``tokenizer`` makes of a text (its normalizer's text,
    split as its pre-tokenizer splits it); a slow tokenizer, or none at hand, compares texts with spaces stripped.
    Pickled by the tokenizer's name (DataLoader workers, torchrun ranks).

    >>> TextKey(None)("  a joy ")
    'a joy'
    """

    def __init__(self, tokenizer: str | None) -> None:
        self.tokenizer = tokenizer
        self._stamp = _files_stamp(tokenizer) if tokenizer else None  # a folder's tokenizer saved over: loaded again

    def __call__(self, text: str) -> str:
        steps = _steps(self.tokenizer, self._stamp) if self.tokenizer else None
        if steps is None:
            return text.strip()
        normalizer, pre_tokenizer = steps
        text = text.strip()  # a byte-level tokenizer's "Ġ" made " a joy " no copy of "a joy", as the CSV's spaces are
        text = normalizer.normalize_str(text) if normalizer is not None else text
        words = pre_tokenizer.pre_tokenize_str(text) if pre_tokenizer is not None else [(text.strip(), None)]
        return "\0".join(word for word, _ in words)


def _files_stamp(tokenizer: str) -> tuple | None:
    """What tells a local tokenizer's files from others saved over them (None: a hub id's, or none there)."""
    try:
        files = sorted(str(p) for p in Path(tokenizer).iterdir() if p.name.startswith(_TOKENIZER_FILES))
    except OSError:
        return None
    return tuple(file_stamp(path) for path in files)


_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "spiece", "sentencepiece", "spm")


@functools.lru_cache(maxsize=4)
def _steps(tokenizer: str, _stamp: tuple | None = None) -> tuple | None:
    """A fast tokenizer's normalizer and pre-tokenizer (each None where it has none), loaded once per name; None for
    a tokenizer without them (a slow one) or one that does not load here (its error is the run's, said where the
    batches are tokenized)."""
    from freezetune.model import download

    # a hub id offline from the local cache only, as the model is built (model.hf): 46 s of retries otherwise
    local = Path(tokenizer).is_dir() or download.hub_offline() or not download.can_reach(download.HF_HOST)
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(tokenizer, local_files_only=local, trust_remote_code=False)
    except (ImportError, OSError, ValueError):  # reported where the batches are tokenized (TokenizeBatch)
        return None
    backend = getattr(loaded, "backend_tokenizer", None)
    return None if backend is None else (backend.normalizer, backend.pre_tokenizer)
