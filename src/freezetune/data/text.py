"""Text classification data: a ``text,label`` CSV, the texts a trained model predicts on, and the batches a Hugging
Face model reads.

A CSV whose header names a text column (``TEXT_COLUMNS``) and a label column is a text dataset (its rows read by
``data.text_table``); prediction reads a CSV's text column or a text file's lines (``read_texts``); a run may name
its own columns (``Columns``). Batches are
tokenized by the model's own tokenizer when they are collated, padded to their longest text (dynamic padding: a batch
of short texts stays short) and truncated at ``Preprocess.max_length``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from freezetune.config.train_config import TrainConfig
from freezetune.data import json_lines
from freezetune.data.folder import expand_paths, files_under
from freezetune.data.labels import nfc, sorted_labels, warn_similar_labels
from freezetune.data.text_key import TextKey
from freezetune.data.text_table import (
    TABLE_SUFFIXES,
    Columns,
    blank,
    check_rows,
    column_index,
    read_rows,
    table_kind,
)
from freezetune.data.utf8 import where_not_utf8
from freezetune.errors import ConfigError, DataError, MissingExtra, choices
from freezetune.model.hf_bundle import TOKENIZER_FILES
from freezetune.model.preprocess import Preprocess
from freezetune.run.log import warn_once

log = logging.getLogger(__name__)


class TextDataset(Dataset):
    """Texts and their labels; ``classes[i]`` names label ``i``. Items are ``(text, label)``.

    >>> ds = TextDataset(["good", "bad"], torch.tensor([1, 0]), ["neg", "pos"]); ds[0]
    ('good', 1)
    """

    def __init__(self, texts: list[str], targets: torch.Tensor, classes: list[str],
                 same_as: TextKey | None = None) -> None:  # fmt: skip
        self.texts, self.targets, self.classes = list(texts), torch.as_tensor(targets, dtype=torch.long), classes
        self.transform = None  # texts are tokenized per batch (``TokenizeBatch``), not per item
        # one key per input the model reads (copies: ``data.overlap``, ``same_items``); spaces stripped until the
        # data is known to be a model's (``build_datasets``)
        self.same_as = same_as or TextKey(None)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.targets[i])

    def select(self, indices, transform=None) -> TextDataset:
        """A new dataset with the samples at ``indices`` (``transform`` is ignored: text has none)."""
        idx = [int(i) for i in indices]
        return TextDataset([self.texts[i] for i in idx], self.targets[idx], self.classes, self.same_as)

    def joined(self, other: TextDataset) -> TextDataset:
        """This dataset's texts, then ``other``'s."""
        return TextDataset(self.texts + other.texts, torch.cat([self.targets, other.targets]), self.classes,
                           self.same_as)  # fmt: skip


_ALL_DISTINCT_FROM = 10  # rows from which a label of each row's own is named (a handful may be a test's)


def read_text_csv(path: str | Path, classes: list[str] | None = None, columns: Columns = Columns()) -> TextDataset:
    """Read a CSV with a header naming one text column and one label column (any order, other columns ignored), by
    the names ``columns`` gives.

    Raises:
        DataError: unreadable or empty file, no rows, no or several text/label columns, a row with an empty text or
            label, or a label not in ``classes``.

    >>> read_text_csv("reviews.csv").classes  # doctest: +SKIP
    ['neg', 'pos']
    """
    path = Path(path)
    header, rows, lines, run_on = read_rows(path, columns)
    cols = {role: column_index(path, header, role, columns, rows) for role in ("text", "label")}
    if not rows:
        raise DataError(f"{table_kind(path)} '{path}' has no rows under its header; expected a text and its label on "
                        "each row")  # fmt: skip
    check_rows(path, rows, lines, cols, header, run_on=run_on)
    # in NFC, as an image CSV's: "très bien" typed on macOS (decomposed) and on Linux (composed) is one class
    labels = [nfc(r[cols["label"]].strip()) for r in rows]
    if classes is None:
        classes = sorted_labels(set(labels))
        warn_similar_labels(path, classes)
        if len(labels) >= _ALL_DISTINCT_FROM and len(classes) == len(labels):  # the columns swapped, say
            warn_once(log, "%s '%s': each of its %d rows has a label of its own (%d classes of one text): is its "
                      "label column '%s' the texts' column? Name the columns with --text-column and --label-column",
                      table_kind(path), path, len(labels), len(classes), header[cols["label"]])  # fmt: skip
    index = {nfc(c): i for i, c in enumerate(classes)}  # a run's classes from before labels were normalised, too
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(
            f"{table_kind(path)} '{path}' has label(s) {choices(unknown)} that are not training classes: "
            f"{choices(classes)}"
        )
    ds = TextDataset([r[cols["text"]] for r in rows], torch.tensor([index[label] for label in labels]), classes)
    ds.source_files = (os.path.realpath(path),)  # which file it is: one file given as two splits is refused
    return ds


TEXT_FILE_SUFFIXES = (".txt", *TABLE_SUFFIXES)  # what ``list_text_files`` picks from a folder


def read_texts(path: str | Path, columns: Columns = Columns()) -> list[str]:
    """The texts of one file to predict on: a CSV's text column (a label column may be there, and is not read), or
    any other file's lines (UTF-8, one text a line, blank lines skipped).

    Raises:
        DataError: unreadable or non-UTF-8 file, a CSV without exactly one text column or with a row of more columns
            than its header, or no text at all. An empty text in a CSV is one (its row keeps its place).

    >>> read_texts("reviews.txt")  # doctest: +SKIP
    ['a wonderful film', 'a waste of time']
    """
    return [text for _, text in numbered_texts(path, columns)]


def numbered_texts(path: str | Path, columns: Columns = Columns()) -> list[tuple[int, str]]:
    """``read_texts``'s texts with the line of the file each starts on (1 is the first line; a CSV's header is its
    line 1): what ``predict`` reports, so that each prediction points at its text whatever lines were skipped."""
    path = Path(path)
    if json_lines.misnamed(path):  # each object was scored as one text, its braces and keys too
        raise DataError(f"'{path}': texts as JSON objects, one a line, are read from a .jsonl file: rename it (a "
                        "text model reads one text a line from other files)")  # fmt: skip
    if path.suffix.lower() in TABLE_SUFFIXES:
        header, rows, lines, run_on = read_rows(path, columns)
        cols = {"text": column_index(path, header, "text", columns, rows)}
        check_rows(path, rows, lines, cols, header, run_on=run_on, empty_ok=True)
        texts = [(line, r[cols["text"]]) for line, r in zip(lines, rows, strict=True)]
    else:
        try:
            # lines end at \n alone (universal newlines made \r\n and \r one): splitlines() also split a line at a
            # form feed, U+2028 or U+0085, and predicted its halves as two texts, numbering the later lines wrong
            content = path.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError:  # an image given to a text model, or a text in another encoding
            raise DataError(f"cannot read '{path}' as text: {where_not_utf8(path)}; a text model reads UTF-8 texts, "
                            "one a line, or a CSV or .jsonl with a text column") from None  # fmt: skip
        except OSError as e:
            raise DataError(f"cannot read '{path}' ({e}); a text model reads texts, one a line, or a CSV or "
                            ".jsonl with a text column") from e  # fmt: skip
        texts = [(i, line) for i, line in enumerate(content, 1) if not blank(line)]
    if not texts:
        raise DataError(f"'{path}' holds no text")
    return texts


def list_text_files(paths: list[str]) -> list[str]:
    """Files named explicitly, in order, and the ``TEXT_FILE_SUFFIXES`` files under folders (recursive, sorted).

    Raises:
        DataError: a path does not exist, or no file was found at all.

    >>> list_text_files(["a.txt", "more/"])  # doctest: +SKIP
    ['a.txt', 'more/b.csv', 'more/sub/c.txt']
    """

    def under(folder: Path) -> list[Path]:
        return [f for f in files_under(folder) if f.suffix.lower() in TEXT_FILE_SUFFIXES]  # a folder unlisted: refused

    # a text typed where a file goes (predict ... "a chess game") is a file that does not exist: say how texts go
    hint = " (texts themselves go on standard input, one a line: echo 'TEXT' | freezetune predict ... -)"
    return expand_paths(paths, under, "text file", "text files", TEXT_FILE_SUFFIXES, missing_hint=hint)


class TokenizeBatch:
    """``collate_fn`` for text: a list of ``(text, label)`` -> (tokenized tensors padded to the longest, labels)."""

    def __init__(self, tokenizer: str, max_length: int) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise MissingExtra("text models need the transformers package: pip install 'freezetune[hf]'") from e
        local = Path(tokenizer).is_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=local, trust_remote_code=False)
        # a decoder's (GPT-2, Llama) has no padding token: it pads with its end of sequence, as its model is told
        # (model.hf._set_pad_token)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ConfigError(f"the tokenizer of {tokenizer!r} has no padding token and no end-of-sequence token to "
                                  "pad a batch of texts with: add a pad_token to its tokenizer files")  # fmt: skip
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        # a text's own "</s>" or "[SEP]" is not the tokenizer's marker: BART and T5 refused a batch whose texts held
        # different counts of "</s>" (HTML's strikethrough), and BERT read "[PAD]" in a text as its padding. Such a
        # marker found in a text's characters is read as the unknown token; a token the tokenizer was extended with
        # ("<e1>") stays one, as do the markers it adds; none where the unknown token is a marker itself (GPT-2)
        tok, unk = self.tokenizer, self.tokenizer.unk_token_id
        markers = {tok.cls_token_id, tok.sep_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                   tok.mask_token_id} - {None, unk}  # fmt: skip
        self._markers = torch.tensor(sorted(markers)) if unk is not None and markers else None
        # where a token came from: a fast tokenizer's character offsets (a marker it adds spans none), a Python one's
        # mask of what it added (asked to split special tokens instead, ESM's matched none of its residues)
        self._origin = "return_offsets_mapping" if getattr(tok, "is_fast", False) else "return_special_tokens_mask"
        special = self.tokenizer.num_special_tokens_to_add(pair=False)
        if max_length <= special:  # only the special tokens fit: every text trains and predicts as the same input
            raise ConfigError(
                f"max_length {max_length} leaves no token of a text: this tokenizer adds {special} "
                f"special tokens to each; give --max-length {special + 1} or more"
            )

    def __call__(self, items: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        texts, labels = zip(*items, strict=True)
        return self.tokenize(list(texts)), torch.tensor(labels, dtype=torch.long)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The model's input for ``texts``: token ids and masks, padded to the longest, truncated at ``max_length``."""
        asks = {"padding": True, "truncation": True, "max_length": self.max_length, "return_tensors": "pt"}
        if self._markers is None or self._origin is None:
            return dict(self.tokenizer(texts, **asks))
        try:
            batch = dict(self.tokenizer(texts, **asks, **{self._origin: True}))
        except (TypeError, ValueError, NotImplementedError) as exc:  # a tokenizer that cannot say: as it reads them
            if self._origin not in str(exc) and "offset" not in str(exc):
                raise
            self._origin = None
            return dict(self.tokenizer(texts, **asks))
        origin = batch.pop(_RETURNED[self._origin])
        from_text = origin[..., 1] > origin[..., 0] if origin.dim() == 3 else origin == 0
        ids = batch["input_ids"]
        read = batch.get("attention_mask", torch.ones_like(ids)).bool()
        ids[torch.isin(ids, self._markers) & from_text & read] = self.tokenizer.unk_token_id
        return batch


_RETURNED = {"return_offsets_mapping": "offset_mapping", "return_special_tokens_mask": "special_tokens_mask"}


def truncation_note(dataset: Dataset, preprocess) -> str | None:
    """How many of a text dataset's texts are longer than the ``max_length`` tokens a text keeps, in one line; None
    when none is (or for images). The cut is silent in the tokenizer: what lies past it never trains."""
    if not preprocess.is_text or not len(dataset):
        return None
    texts = [dataset[i][0] for i in range(len(dataset))]
    long, longest = long_texts(texts, TokenizeBatch(preprocess.tokenizer, preprocess.max_length))
    if not long:
        return None
    limit = _max_positions(preprocess.tokenizer)  # the advice must be one that can be followed
    if limit is None:
        more = "--max-length N keeps more (up to the model's own limit)"
    elif preprocess.max_length < limit:
        more = f"--max-length up to {limit} keeps more"
    else:
        more = f"the model reads {limit} tokens at most"
    return (f"note: {long} of {len(texts)} training texts are longer than {preprocess.max_length} tokens (the longest "
            f"{longest}) and are cut there; {more}")  # fmt: skip


def scoring_cut_note(long: int, total: int, longest: int, max_length: int) -> str | None:
    """``truncation_note`` for texts scored by a trained model (eval, predict): ``long`` of ``total`` texts, the
    longest ``longest`` tokens, are over its ``max_length``, the one it trained with, so the note says so instead of
    advising a flag that would change the model's input."""
    if not long:
        return None
    return (f"{long} of {total} texts are longer than the {max_length} tokens this model reads (it trained with "
            f"--max-length {max_length}; the longest is {longest}): each is scored on its first "
            f"{max_length}")  # fmt: skip


def long_texts(texts: list[str], tokenize: TokenizeBatch, chunk: int = 1000) -> tuple[int, int]:
    """How many of ``texts`` ``tokenize`` cuts at its ``max_length`` tokens, and the longest's length in tokens;
    ``chunk`` texts at a time, so 100 000 long documents never hold all their token ids at once."""
    long = longest = 0
    for start in range(0, len(texts), chunk):
        ids = tokenize.tokenizer(texts[start : start + chunk], truncation=False, verbose=False)["input_ids"]
        lengths = [len(i) for i in ids]
        long += sum(n > tokenize.max_length for n in lengths)
        longest = max(longest, *lengths)
    return long, longest


# The TrainConfig fields only one kind of model reads, and what each does: given to the other kind, ignored, the user
# would believe them applied (img_size, read as the model is built, is refused there: model.create.create_model)
TEXT_SETTINGS = {"max_length": "sets the tokens a text keeps", "text_column": "names a text CSV's column",
                 "label_column": "names a text CSV's column"}  # fmt: skip
IMAGE_SETTINGS = {"aug": "augments images", "cache_views": "sets the augmented image views the feature cache stores",
                  "decode": "sets where image files are decoded",
                  "skip_bad": "leaves out image files that cannot be read",
                  "channels_last": "sets an image batch's memory layout"}  # fmt: skip


def refuse_other_settings(model: str, given: dict[str, object], *, text_model: bool) -> None:
    """Refuse the settings ``given`` (those set to other than their defaults) that only the other kind of model reads:
    ``IMAGE_SETTINGS`` for a text model (``text_model``), ``TEXT_SETTINGS`` for an image model.

    >>> refuse_other_settings("timm:resnet18", {"text_column": "review"}, text_model=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    freezetune.errors.ConfigError: text_column 'review' names a text CSV's column; ... image model: drop --text-column
    >>> refuse_other_settings("hf:minilm", {"cache_views": 2}, text_model=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    freezetune.errors.ConfigError: cache_views 2 sets the augmented ...; hf:minilm is a text model: drop --cache-views
    """
    reads = IMAGE_SETTINGS if text_model else TEXT_SETTINGS
    if given:
        said = "; ".join(f"{k} {v!r} {reads[k]}" for k, v in given.items())
        flags = " and ".join(f"--{k.replace('_', '-')}" for k in given)
        raise ConfigError(f"{said}; {model} is {'a text' if text_model else 'an image'} model: drop {flags}")


def text_preprocess(name: str, max_length: int = TrainConfig.max_length, *, text_column: str | None = None,
                    label_column: str | None = None) -> Preprocess:  # fmt: skip
    """The preprocessing of a Hugging Face text classifier ``hf:DIR_OR_ID``: its own tokenizer, and the CSV columns
    its texts and labels are read from (``None``: the usual names, ``Columns``).

    Raises:
        ConfigError: ``name`` is not a Hugging Face model (only those have a tokenizer here), or is a local directory
            without tokenizer files: transformers would build an empty tokenizer from the config alone (5 tokens for
            BERT), and every text would train as unknown tokens.
    """
    library, _, arch = name.partition(":")
    if library != "hf" or not arch:
        raise ConfigError(f"{name} has no image preprocessing and no tokenizer; text models are hf:DIR_OR_ID")
    if Path(arch).is_dir() and not any((Path(arch) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{arch!r} holds no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...): save the model's "
                          "tokenizer beside it (tokenizer.save_pretrained(DIR))")  # fmt: skip
    limit = _max_positions(arch)
    if limit is not None and max_length == TrainConfig.max_length > limit:  # the default, for a model that reads
        max_length = limit  # fewer tokens: inspect, which takes no --max-length, was refused for it
    if limit is not None and max_length > limit:  # past it the position embeddings have no row: an IndexError
        raise ConfigError(f"max_length {max_length} is over {name}'s {limit} positions; give --max-length {limit} "
                          "or less")  # fmt: skip
    # a folder by its absolute path: checkpoints keep this, and are read from other directories (hf:mdl from elsewhere
    # found no tokenizer, or another folder's)
    tokenizer = os.path.abspath(arch) if Path(arch).is_dir() else arch
    if max_length <= _FEW_TOKENS:  # refused here, before the run dir is made, when it leaves no token of a text
        TokenizeBatch(tokenizer, max_length)
    return Preprocess(tokenizer=tokenizer, max_length=max_length, text_column=text_column, label_column=label_column)


_FEW_TOKENS = 16  # a max_length this short is checked against the tokenizer's special tokens (BERT adds 2) at once


def _max_positions(arch: str) -> int | None:
    """How many tokens the model at ``arch`` reads at most (``max_position_embeddings``), when its config says; the
    RoBERTa family numbers positions from ``pad_token_id + 1``, so its 514 positions hold 512 tokens."""
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(arch, local_files_only=Path(arch).is_dir(), trust_remote_code=False)
    except (ImportError, OSError, ValueError):
        return None  # create_model names what is wrong with the model
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "model_type", None) not in _OFFSET_POSITIONS:
        return positions
    pad = _FIXED_PADDING_INDEX.get(config.model_type, getattr(config, "pad_token_id", None) or 0)
    return positions - pad - 1


# model types whose position ids start after the padding index (transformers' create_position_ids_from_input_ids)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "roberta-prelayernorm",
                     "data2vec-text", "ibert", "xmod", "mpnet", "luke")  # fmt: skip
# ... from a padding index of their own, whatever the config's pad_token_id: MPNet's embeddings number from 1 (a config
# with pad_token_id 0 was told "--max-length up to 129 keeps more" of 130 positions, and 129 failed with an IndexError)
_FIXED_PADDING_INDEX = {"mpnet": 1}


def noun(ds: Dataset) -> str:
    """What the items of ``ds`` are called in messages: "texts" for a text dataset, else "images".

    >>> noun(TextDataset(["fine"], torch.tensor([0]), ["a"]))
    'texts'
    """
    return "texts" if isinstance(ds, TextDataset) else "images"
