"""What a checkpoint of a Hugging Face model from a local folder carries besides its weights: the folder's config and
tokenizer files, so that ``best.pt`` rebuilds the model and its tokenizer on a machine without that folder.

A checkpoint names its model by path (``hf:/models/minilm``); its weights alone cannot rebuild the architecture or
tokenize a text. The files are small next to the weights (MiniLM's: 0.9 MB beside 90 MB) and are written back, once,
into a folder named by their content under the user's cache, whenever the named folder is not there.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import os
import re
from pathlib import Path

from freezetune._io import atomic_output, process_running
from freezetune.config.options import HF_PREFIX
from freezetune.errors import CheckpointError, choices
from freezetune.model.text_pooling import declaration_files, inside_folder

log = logging.getLogger(__name__)

# A saved Hugging Face tokenizer has at least one of these (fast, WordPiece, BPE, SentencePiece vocabularies; those of
# tokenizers without a tokenizer.json too: DeBERTa-v3's spm.model, whose checkpoint and export held no vocabulary, so a
# model whose folder was gone could not tokenize; XLM's and PhoBERT's bpe.codes. Not a fairseq dict.txt, which alone
# is no tokenizer, nor LUKE's entity vocabulary, tens of MB in every checkpoint)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model", "merges.txt", "spm.model", "bpe.codes")  # fmt: skip
# config.json builds the architecture; an image model's preprocessor_config.json its processor (a checkpoint keeps its
# own preprocessing, but a folder rebuilt without it warned that it had none); the rest are the tokenizer's
BUNDLED_FILES = ("config.json", "preprocessor_config.json", *TOKENIZER_FILES, "special_tokens_map.json",
                 "added_tokens.json")  # fmt: skip


def bundle(model: str) -> dict[str, str] | None:
    """The config, image processor and tokenizer files of an ``hf:DIR`` model, base64-encoded by name; None for any
    other model (a hub id is rebuilt from the hub or its cache).

    >>> bundle("timm:resnet18") is None
    True
    """
    folder = Path(model.removeprefix(HF_PREFIX))
    if not model.startswith(HF_PREFIX) or not folder.is_dir():
        return None
    names = [*BUNDLED_FILES, *declaration_files(folder)]  # a sentence-transformers model's pooling too (its own)
    files = {n: base64.b64encode((folder / n).read_bytes()).decode("ascii") for n in names
             if (folder / n).is_file()}  # fmt: skip
    return files or None


def rebuilt_folder(model: str, files: dict[str, str] | None) -> str | None:
    """The folder to build ``model`` from when its own is gone, or holds other versions of the bundled ``files``
    than the run read (a tokenizer edited since: eval and predict tokenized otherwise than the run, in silence):
    those ``files`` written under the user's cache (once; a folder per content). None when the model's folder holds
    them as they were, or nothing was bundled."""
    if not files or not model.startswith(HF_PREFIX):
        return None
    own = Path(model.removeprefix(HF_PREFIX))
    if own.is_dir():
        # (the pooling's declaration files are as the checkpoint pooled, not as the folder declares: text_pooling)
        changed = [n for n, data in files.items() if n in BUNDLED_FILES and not _holds_file(own / n, data)]
        if not changed:
            return None
        log.warning("%s: %s changed since the run; the model is built from the files its checkpoint carries",
                    own, ", ".join(changed))  # fmt: skip
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "freezetune" / "hf-bundles" / digest
    try:
        write(files, folder, keep=True)
    except OSError as exc:  # a read-only home (a container, a cluster node): the files go to the temp dir instead
        import tempfile

        log.info("cannot write %s (%s): the bundled files go to the temp dir", folder, exc.strerror or exc)
        folder = _private_temp_folder(Path(tempfile.gettempdir()) / f"freezetune-hf-bundles-{_user()}") / digest
        write(files, folder, keep=True)
    return str(folder)


def _private_temp_folder(folder: Path) -> Path:
    """``folder`` in the temp dir, which every user may write in, where it is this user's alone (made so); else a new
    private one: another user's folder of that name could have its files changed between their check and their read.
    """
    import stat
    import tempfile

    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = folder.lstat()
        # Windows has no uids (every file's st_uid is 0), and its temp dir is the user's own
        if stat.S_ISDIR(st.st_mode) and (not hasattr(os, "getuid") or st.st_uid == os.getuid()):
            if st.st_mode & 0o077:  # this user's, made under a looser umask: its own again
                folder.chmod(0o700)
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix=f"{folder.name}-"))


def _user() -> str:
    """This user, as a folder of the temp dir names it: the uid, or where there is none (Windows) the login name."""
    if hasattr(os, "getuid"):
        return str(os.getuid())
    import getpass

    try:
        return getpass.getuser()
    except (ImportError, KeyError, OSError):  # no name in the environment or the password database
        return "user"


def _holds_file(path: Path, data: str) -> bool:
    try:
        return path.read_bytes() == base64.b64decode(data)
    except OSError:  # gone, or a folder
        return False


def foreign_names(files: object) -> list[str]:
    """The names among a checkpoint's bundled ``files`` that name no file of the model's folder: a bundle holds files
    of the folder itself and a pooling module's ``config.json`` in a folder inside it. Written back by their names, a
    crafted checkpoint's ``/home/me/.bashrc`` or ``../../x`` replaced a file anywhere the user could write.

    >>> foreign_names({"config.json": "", "dict.txt": "", "1_Pooling/config.json": "", "../../.bashrc": "", "/x": ""})
    ['../../.bashrc', '/x']
    """
    if not isinstance(files, dict):
        return [repr(files)]
    return [str(name) for name in files if not _bundled_name(name)]


def refuse_foreign_names(files: object, checkpoint: str) -> None:
    """Refuse the bundled ``files`` of ``checkpoint`` (how a message names it) where ``foreign_names`` finds any."""
    if foreign := foreign_names(files):
        raise CheckpointError(f"{checkpoint} carries file(s) {choices(foreign, 5)} besides its model's config and "
                              "tokenizer files, which freezetune writes back by name: refused (not a checkpoint "
                              "freezetune wrote)")  # fmt: skip


def _bundled_name(name: object) -> bool:
    # a file's name in the model folder (an earlier freezetune bundled LUKE's entity_vocab.json, fairseq's dict.txt),
    # or a pooling module's config in a folder inside it
    if not isinstance(name, str) or name in ("", ".", ".."):
        return False
    if "/" not in name:  # (not Windows' D:x, which is the current folder of drive D, nor its C:\x)
        return inside_folder(name)
    folder, _, base = name.rpartition("/")
    return base == "config.json" and inside_folder(folder)


def write(files: dict[str, str], folder: Path, *, keep: bool = False) -> None:
    """The bundled ``files`` as files in ``folder``, each written whole (``atomic_output``: another process may read
    it); ``keep``: a file already there that holds its bundled bytes is left as it is (a folder named by content).
    Names no bundle holds (``foreign_names``) are refused before anything is written."""
    refuse_foreign_names(files, "the checkpoint")
    for name, data in files.items():
        # kept only as bundled: a file another user placed in the shared temp dir's folder changed the model built
        if not (keep and _holds_file(folder / name, data)):
            with atomic_output(folder / name) as tmp:
                tmp.write_bytes(base64.b64decode(data))


def write_anew(files: dict[str, str], folder: Path) -> None:
    """``files`` as the whole of ``folder``: written into a new folder beside it, which then takes its name (written
    into it, an earlier export's files that these do not include stayed: its sentence pooling's ``modules.json``
    rebuilt a model of another pooling from an export of a model without one). A stop leaves hidden leftovers, which
    the next export of that name removes; one between the two renames leaves no folder of that name."""
    import shutil

    for leftover in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):  # an earlier export's, stopped mid-swap
        found = re.fullmatch(rf"\.{re.escape(folder.name)}\.(\d+)\.(new|old)\.tmp", leftover.name)
        # a live export's (one to the same target) is its own; this process's is an earlier call's, stopped (a
        # notebook's cell, a container's pid 1 run again)
        if found and (int(found[1]) == os.getpid() or not process_running(int(found[1]))):
            shutil.rmtree(leftover, ignore_errors=True)
    new, old = (folder.with_name(f".{folder.name}.{os.getpid()}.{kind}.tmp") for kind in ("new", "old"))
    write(files, new)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def with_classes(files: dict[str, str], classes: list[str], *, text: bool = False) -> dict[str, str]:
    """``files`` with their ``config.json`` giving the run's classes (``id2label``, ``label2id``, ``num_labels``):
    the folder's config still had the pretrained model's labels, which a model built from it would not load the
    fine-tuned weights into (a size mismatch of the classifier). Its ``architectures`` name the class the weights are
    (a sentence-transformers folder's said ``BertModel`` of a ``BertForSequenceClassification``'s weights; ``text``:
    a text model's).

    >>> cfg = json.loads(base64.b64decode(with_classes({"config.json": "e30="}, ["cat", "dog"])["config.json"]))
    >>> cfg["id2label"], cfg["num_labels"]
    ({'0': 'cat', '1': 'dog'}, 2)
    """
    if "config.json" not in files:
        return files
    config = json.loads(base64.b64decode(files["config.json"]))
    # single-label: the head trained with cross-entropy; a source's multi-label or regression problem_type made a model
    # built from the file score with sigmoids (or refuse class labels) where predict used softmax
    config.update(id2label={str(i): c for i, c in enumerate(classes)}, label2id={c: i for i, c in enumerate(classes)},
                  num_labels=len(classes), problem_type="single_label_classification")  # fmt: skip
    if config.get("pad_token_id", 0) is None and isinstance(config.get("eos_token_id"), int):  # as it trained
        config["pad_token_id"] = config["eos_token_id"]  # (model.hf._set_pad_token): batches of texts pad with it
    if (task := _task_class(config.get("model_type"), text)) is not None:
        config["architectures"] = [task]
    written = json.dumps(config, indent=2, sort_keys=True) + "\n"
    return {**files, "config.json": base64.b64encode(written.encode()).decode("ascii")}


def with_pad_token(files: dict[str, str]) -> dict[str, str]:
    """A text model's ``files`` whose tokenizer, as transformers loads them, has no padding token (GPT-2's, Llama's:
    their class has none either), told to pad with its end-of-sequence token, as the run's did
    (``data.text.TokenizeBatch``): an exported GPT-2's tokenizer refused to pad a batch of two texts, its config naming
    a pad_token_id all the same. One that has a padding token, in its files or as its class's default (RoBERTa's and
    T5's ``<pad>``), is left as it is. Loads the tokenizer from a temporary copy of ``files``."""
    import tempfile

    try:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            write(files, Path(tmp))
            tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
    except (ImportError, OSError, ValueError):  # no tokenizer to load from them: nothing to tell it
        return files
    if tokenizer.pad_token is not None or tokenizer.eos_token is None:
        return files
    old = files.get("tokenizer_config.json")
    config = {**(json.loads(base64.b64decode(old)) if old else {}), "pad_token": tokenizer.eos_token}
    written = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return {**files, "tokenizer_config.json": base64.b64encode(written.encode()).decode("ascii")}


def _task_class(model_type: str | None, text: bool) -> str | None:
    """The transformers class a freezetune model of ``model_type`` is, as ``model.create.create_model`` builds it
    (``AutoModelForSequenceClassification``'s for text, ``AutoModelForImageClassification``'s for images); None where
    transformers or the type is unknown."""
    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )
    except ImportError:
        return None
    names = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES if text else MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    name = names.get(model_type)
    return name if isinstance(name, str) else None


def holds(folder: Path, files: dict[str, str]) -> bool:
    """Whether ``folder`` holds exactly ``files`` (another export of the same checkpoint wrote it)."""
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else None
    return names == set(files) and all(_holds_file(folder / n, d) for n, d in files.items())
