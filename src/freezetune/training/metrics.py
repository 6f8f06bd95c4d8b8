"""Classification metrics accumulated over batches: loss, top-1/top-k, per-class accuracy, macro-F1, confusion.

The meter keeps a C x C confusion matrix and a top-k hit count, never the logits, so evaluating a large validation
set costs O(C^2) memory. Accuracies are fractions in [0, 1]; the report and plots format them as percentages.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch

from freezetune._io import atomic_output
from freezetune.errors import ConfigError, DataError
from freezetune.run.display import output_encoding, padded, printable, width

log = logging.getLogger(__name__)

_MAX_TOPK = 5


def check_labels(targets: torch.Tensor, num_classes: int) -> None:
    """Refuse class labels outside ``[0, num_classes)``, naming the lowest or highest: a user's dataset with one was
    torch's "IndexError: Target 4 is out of bounds" from inside the loss (a device-side assert on a GPU). One min/max
    pass, cheap enough for every batch scored.

    >>> check_labels(torch.tensor([0, 2, 1]), 3)
    >>> check_labels(torch.tensor([0, 4]), 3)
    Traceback (most recent call last):
    freezetune.errors.DataError: label 4 is outside num_classes=3: labels are 0 to 2
    """
    if not targets.numel():
        return
    low, high = (int(v) for v in torch.aminmax(targets))
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise DataError(f"label {bad} is outside num_classes={num_classes}: labels are 0 to {num_classes - 1}")


class ClassificationMeter:
    """Accumulate classification metrics over batches; works in any training loop.

    Args:
        num_classes: Number of classes C; inferred from the first batch of logits when ``None``.

    >>> meter = ClassificationMeter(3)
    >>> meter.update(torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.2, 3.0]]), torch.tensor([0, 1]), loss=0.5)
    >>> r = meter.compute()
    >>> r["acc"], r["n"], r["confusion"][1]
    (0.5, 2, [0, 0, 1])
    """

    def __init__(self, num_classes: int | None = None) -> None:
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen so far (e.g. between epochs)."""
        c = self.num_classes
        self._confusion = None if c is None else torch.zeros(c, c, dtype=torch.long)
        self._topk_hits = 0
        self._n = 0
        self._loss_parts: list[float] = []  # each batch's loss sum, in batch order (see ``merge``)
        self._loss_n = 0

    @property
    def n(self) -> int:
        """The samples seen since the last ``reset``."""
        return self._n

    @property
    def topk(self) -> int:
        """The k of the top-k accuracy: min(5, C)."""
        return min(_MAX_TOPK, self.num_classes or _MAX_TOPK)

    def update(self, logits: torch.Tensor, targets: torch.Tensor, loss: float | torch.Tensor | None = None) -> None:
        """Add one batch.

        Args:
            logits: ``[B, C]`` scores, any float dtype and device (moved to CPU float32 here).
            targets: ``[B]`` integer class indices in ``[0, C)``.
            loss: Either the batch *mean* loss (float or 0-d tensor; weighted by B so ``compute`` gives the mean per
                sample even with a short last batch), or ``[B]`` per-sample losses. ``None`` skips loss tracking.
        """
        logits = logits.detach().to("cpu", torch.float32)
        targets = targets.detach().to("cpu", torch.long).reshape(-1)
        self._check_batch(logits, targets)
        c, b = self.num_classes, targets.numel()
        preds = logits.argmax(dim=1)
        self._confusion += torch.bincount(targets * c + preds, minlength=c * c).reshape(c, c)
        top = logits.topk(self.topk, dim=1).indices
        self._topk_hits += int((top == targets[:, None]).any(dim=1).sum())
        self._n += b
        if loss is not None:
            self._add_loss(loss, b)

    def _check_batch(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        if logits.dim() != 2:
            raise DataError(f"the model's output must be [batch, classes] scores, got shape {tuple(logits.shape)}")
        if logits.shape[0] != targets.numel():
            raise DataError(f"{logits.shape[0]} rows of logits but {targets.numel()} targets")
        if self.num_classes is None:
            self.num_classes = logits.shape[1]
            self.reset()
        if logits.shape[1] != self.num_classes:
            raise DataError(f"logits have {logits.shape[1]} classes, the meter was built for {self.num_classes}: the "
                            "model's head and the data disagree on the number of classes")  # fmt: skip
        check_labels(targets, self.num_classes)

    def _add_loss(self, loss: float | torch.Tensor, batch_size: int) -> None:
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().to("cpu", torch.float64)
            if loss.numel() == batch_size and batch_size != 1:
                self._loss_parts.append(float(loss.sum()))
                self._loss_n += batch_size
                return
            if loss.numel() != 1:
                raise ValueError(
                    f"loss must be a scalar or have one value per sample ({batch_size}), got {loss.numel()}"
                )
            loss = float(loss)
        self._loss_parts.append(float(loss) * batch_size)
        self._loss_n += batch_size

    def merge(self, other: ClassificationMeter) -> None:
        """Add the batches ``other`` saw after the ones this meter saw (the next DDP rank's shard of an evaluation).

        Counts add exactly and the loss is summed batch by batch in the merged order, so meters over consecutive
        blocks of batches, merged in order, give exactly the numbers of one meter that saw every batch.

        >>> a, b, whole = ClassificationMeter(2), ClassificationMeter(2), ClassificationMeter(2)
        >>> batches = [(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 0.3), (torch.eye(2), torch.tensor([1, 1]), 0.7)]
        >>> for meter, batch in ((a, batches[0]), (b, batches[1])): meter.update(*batch)
        >>> for batch in batches: whole.update(*batch)
        >>> a.merge(b); a.compute() == whole.compute()
        True
        """
        if other.num_classes is None:  # it saw no batch
            return
        if self.num_classes is None:
            self.num_classes = other.num_classes
            self.reset()
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge a meter of {other.num_classes} classes into one of {self.num_classes}")
        self._confusion += other._confusion
        self._topk_hits += other._topk_hits
        self._n += other._n
        self._loss_parts += other._loss_parts
        self._loss_n += other._loss_n

    def compute(self) -> dict:
        """Return the metrics of every batch since the last ``reset``.

        Returns:
            ``loss`` (mean per sample, ``None`` if no batch passed a loss), ``acc`` (top-1), ``top5`` (top-k with
            ``k = topk = min(5, C)``), ``per_class_acc`` (recall per class; ``None`` for a class with no samples),
            ``macro_f1``, ``confusion`` (C x C ints, rows = true class, columns = predicted), ``n``, ``topk``.
            ``macro_f1`` averages F1 over classes that occur as a target *or* a prediction: a class that is absent
            from both has undefined F1 and is left out (the convention of ``sklearn.metrics.f1_score`` with
            ``average="macro"`` and no ``labels``); a class predicted but never present counts as F1 = 0.

        Raises:
            ValueError: if no batch was added.
        """
        if self._n == 0:
            raise ValueError("ClassificationMeter.compute() called before any update()")
        loss_sum = 0.0
        for part in self._loss_parts:  # in order, one by one (sum() compensates from Python 3.12 on): see ``merge``
            loss_sum += part
        cm = self._confusion.double()
        tp, support, predicted = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
        per_class = [None if s == 0 else float(t / s) for t, s in zip(tp.tolist(), support.tolist(), strict=True)]
        denom = support + predicted  # 2TP + FP + FN
        seen = denom > 0
        macro_f1 = float((2 * tp[seen] / denom[seen]).mean()) if seen.any() else 0.0
        return {
            "loss": loss_sum / self._loss_n if self._loss_n else None,
            "acc": float(tp.sum() / self._n),
            "top5": self._topk_hits / self._n,
            "topk": self.topk,
            "per_class_acc": per_class,
            "macro_f1": macro_f1,
            "confusion": self._confusion.tolist(),
            "n": self._n,
        }


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def _shown(result: dict, classes: list[str], encoding: str | None = None) -> list[str]:
    """The class names as the report and the plot show them, one for each class of ``result``: a control character
    (an ANSI escape, a newline in a folder's name) and a name's byte that is not UTF-8 (a class folder's, on Linux) as
    its escape (``run.display.printable``); raw, an escape recoloured the terminal and a newline broke the table's rows,
    and matplotlib raised on a lone surrogate. ``encoding``: the stream's, whose escapes (``caf\\xe9`` in ASCII) the
    report's columns are measured on."""
    check_class_names(result, classes)
    return [printable(name, encoding) for name in classes]


def check_class_names(result: dict, classes: list[str]) -> None:
    """Refuse class names that are not one for each class of ``result`` (its confusion matrix's rows)."""
    c = len(result["confusion"])
    if len(classes) != c:
        raise DataError(f"got {len(classes)} class names for a result with {c} classes")


def format_report(result: dict, classes: list[str], max_classes: int = 20) -> str:
    """Format a ``ClassificationMeter.compute()`` result as a text block for the terminal.

    Up to ``max_classes`` classes the full per-class table and confusion matrix are shown. Beyond that the table lists
    the ``max_classes`` worst classes (the ones worth looking at) and the matrix is replaced by the most frequent
    confusions.

    Args:
        result: Output of ``ClassificationMeter.compute()``.
        classes: Class names, index-aligned with the confusion matrix; a control character in one (an ANSI escape, a
            newline), a byte that is not UTF-8 (a Linux folder name) and a character standard output cannot encode
            are shown as their escapes (``run.display.printable``).
        max_classes: Largest class count shown in full.

    Returns:
        A multi-line string without a trailing newline.

    >>> m = ClassificationMeter(2)
    >>> m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> print(format_report(m.compute(), ["cat", "dog"]).splitlines()[0])
    n 2  loss n/a  top-1  50.0%  top-2 100.0%  macro-F1 0.3333
    """
    classes = _shown(result, classes, output_encoding())
    c = len(classes)
    loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
    lines = [
        f"n {result['n']}  loss {loss}  top-1 {_pct(result['acc'])}  top-{result.get('topk', 5)} {_pct(result['top5'])}"
        f"  macro-F1 {result['macro_f1']:.4f}"
    ]
    lines += _per_class_lines(result, classes, max_classes)
    lines += _confusion_lines(result["confusion"], classes) if c <= max_classes else _top_confusions(result, classes)
    return "\n".join(lines)


def _per_class_lines(result: dict, classes: list[str], max_classes: int) -> list[str]:
    support = [sum(row) for row in result["confusion"]]
    order = list(range(len(classes)))
    header = "per-class accuracy:"
    if len(classes) > max_classes:
        # Classes without samples have no accuracy; sort them last so the worst real classes come first.
        order.sort(key=lambda i: (result["per_class_acc"][i] is None, result["per_class_acc"][i] or 0.0))
        order = order[:max_classes]
        header = f"per-class accuracy (worst {max_classes} of {len(classes)}):"
    columns = max(width(classes[i]) for i in order)  # a wide East Asian character takes two
    lines = [header]
    lines += [f"  {padded(classes[i], columns)}  {_pct(result['per_class_acc'][i])}  (n={support[i]})" for i in order]
    return lines


def _confusion_lines(confusion: list[list[int]], classes: list[str]) -> list[str]:
    # Columns carry indices, not names: names would make the matrix too wide to read; rows give index and name, the
    # index right-aligned so that the names start in one column from the tenth class on
    iw = len(str(len(classes) - 1))
    labels = [f"{i:>{iw}} {name}" for i, name in enumerate(classes)]
    lw = max(width(s) for s in labels)
    cw = max(len(str(v)) for row in confusion for v in row + [len(classes) - 1])
    lines = ["confusion matrix (rows = true, columns = predicted):"]
    lines.append("  " + " " * lw + "".join(f" {j:>{cw}}" for j in range(len(classes))))
    lines += [
        "  " + padded(label, lw) + "".join(f" {v:>{cw}}" for v in row)
        for label, row in zip(labels, confusion, strict=True)
    ]
    return lines


def _top_confusions(result: dict, classes: list[str], limit: int = 10) -> list[str]:
    cm = result["confusion"]
    pairs = [(cm[i][j], i, j) for i in range(len(cm)) for j in range(len(cm)) if i != j and cm[i][j] > 0]
    pairs.sort(reverse=True)
    lines = [f"most frequent confusions (true -> predicted), top {min(limit, len(pairs))} of {len(pairs)}:"]
    lines += [f"  {classes[i]} -> {classes[j]}: {n}" for n, i, j in pairs[:limit]]
    return lines


def plot_confusion(result: dict, classes: list[str], path: str | Path) -> Path:
    """Save the confusion matrix as a PNG: colour = fraction of each true class, counts written in cells if C <= 20.

    Uses a standalone matplotlib ``Figure`` (Agg canvas), so it needs no display and leaves pyplot state untouched.

    Args:
        result: Output of ``ClassificationMeter.compute()``.
        classes: Class names, index-aligned with the confusion matrix; a control character in one and a byte that is
            not UTF-8 (a Linux folder name) are shown as their escapes (``run.display.printable``).
        path: Destination PNG; written atomically.

    Returns:
        ``path`` as a ``Path``.

    >>> import tempfile
    >>> m = ClassificationMeter(2)
    >>> m.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    >>> plot_confusion(m.compute(), ["cat", "dog"], Path(tempfile.mkdtemp()) / "cm.png").read_bytes()[:4]
    b'\\x89PNG'
    """
    from matplotlib.figure import Figure  # half a second: not for the commands that score without plotting

    classes = _shown(result, classes)
    c = len(classes)
    counts = torch.tensor(result["confusion"], dtype=torch.float64)
    frac = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    side = min(4.0 + 0.45 * c, 24.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(frac.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    if c <= 50:  # beyond that tick labels overlap into a black bar
        ax.set_xticks(range(c), classes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_yticks(range(c), classes)
    if c <= 20:
        for i in range(c):
            for j in range(c):
                dark = frac[i, j] > 0.5
                ax.text(
                    j, i, int(counts[i, j]), ha="center", va="center", fontsize=8, color="white" if dark else "black"
                )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix  (top-1 {100 * result['acc']:.1f}%, n={result['n']})")
    fmt = plot_format(path)
    with atomic_output(path) as tmp, warnings.catch_warnings(record=True) as caught:
        # the user's filters stay: every glyph warning is caught over them, each once a plot
        warnings.filterwarnings("always", message=_GLYPH.pattern, category=UserWarning)
        fig.savefig(tmp, format=fmt, **_marked(fmt))
    _say_missing_glyphs(caught, Path(path).name)
    return Path(path)


# Written into every confusion plot's metadata, so that eval may replace a plot it drew (a batch job run again) and
# nothing else: a user's photo or PDF at the --plot path is refused without --force.
CONFUSION_MARK = "freezetune confusion matrix"
_MARKED_MAX_BYTES = 64 << 20  # a plot of ours is far smaller: a larger file is not read through to find the mark


def _marked(fmt: str) -> dict:
    """``savefig``'s arguments that put ``CONFUSION_MARK`` in the file: a title in PNG, PDF and SVG metadata, a JPEG
    comment (matplotlib writes no JPEG metadata)."""
    return (
        {"pil_kwargs": {"comment": CONFUSION_MARK.encode()}}
        if fmt == "jpg"
        else {"metadata": {"Title": CONFUSION_MARK}}
    )


def drawn_confusion(path: str | Path) -> bool:
    """Whether ``path`` holds a confusion plot that ``plot_confusion`` drew (its metadata's mark).

    >>> drawn_confusion("no/such/plot.png")
    False
    """
    try:
        path = Path(path)
        return path.stat().st_size <= _MARKED_MAX_BYTES and CONFUSION_MARK.encode() in path.read_bytes()
    except OSError:
        return False


_GLYPH = re.compile(r"Glyph (\d+) \(.*\) missing from ")


def _say_missing_glyphs(caught: list[warnings.WarningMessage], name: str) -> None:
    """One line for the characters of class names the plot's font cannot draw (CJK names in DejaVu Sans), where
    matplotlib printed a raw UserWarning for each; any other warning, which passed the user's filters, is shown."""
    missing = []
    for w in caught:
        found = _GLYPH.match(str(w.message))
        if found:
            missing.append(repr(chr(int(found.group(1)))))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if missing:
        shown = ", ".join(dict.fromkeys(missing))
        shown = shown if len(shown) <= 80 else shown[:79] + "…"
        log.warning("%s: its font has no glyph for %s in the class names (drawn as boxes; the names are right in "
                    "classes.json and the metrics)", name, shown)  # fmt: skip


PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}


def plot_format(path: str | Path) -> str:
    """The image format a plot path asks for by its suffix (PNG data in a ``.jpg`` file would be a lie).

    >>> plot_format("cm.svg")
    'svg'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS and Path(path).is_dir():  # it said "no suffix is none of them"
        raise ConfigError(f"plot {str(path)!r} is a directory: name a file in it, e.g. "
                          f"{str(Path(path) / 'confusion.png')!r}")  # fmt: skip
    if suffix not in PLOT_FORMATS:
        raise ConfigError(f"plot {str(path)!r}: a plot is written as {', '.join(PLOT_FORMATS)} by its suffix; "
                          f"{suffix + ' is none of them' if suffix else 'it has none'}")  # fmt: skip
    return PLOT_FORMATS[suffix]
