"""The auto recipe's rule (``auto/recipe.py`` runs it): its candidates, their learning rates, and the choice among their
trials, with the measurements behind each number."""

from __future__ import annotations

import math

from freezetune.config.options import DEFAULT_MONITOR
from freezetune.config.train_config import TrainConfig
from freezetune.training.progress import difference_noise

# a trial epoch trains on this share of the training set. Shorter trials cost less and choose worse: with candidates
# 1-3 and default 2, on Fashion-MNIST (100/class, 64 px, 3 epochs, 3 seeds, refit) 0.35 chose the last 2 stages twice
# and reached 83.32 % in 16.5-23.0 s; 0.5 chose the last 3 twice and reached 84.05 % in 17.7-23.8 s (the full
# fine-tune: 81.09 % in 42 s)
TRIAL_FRACTION = 0.5
# Not capped on large data: trials of at most 5 000 images on Fashion-MNIST at 2 000 a class (19 500 training images,
# 64 px, 3 epochs, 2 seeds) took 16 % less time and lost 0.17 and 0.21 points (92.27 % vs 92.46 %): the chosen trial's
# half epoch is part of the run's training. A user who wants shorter epochs (and trials) says so: ``--epoch-images``.
MIN_TRAINED_STAGES, MAX_TRAINED_STAGES = 2, 4  # candidates train the last 2, 3 or 4 stages (and the head)
LR_BOOST = 10  # the learning rate of a candidate training k stages is lr * LR_BOOST * min(1, 2 / k)
# ... but for a Hugging Face text model. Boosted, MiniLM's last encoder layers trained at 6.7e-3 (trial) and 3.3e-3
# (run) and scored 74.8 % on a 5-class task of man-page descriptions (742 training texts, 417 test, 3 epochs); ten
# times lower, 92.1 % (a 20-line full fine-tune at 5e-5: 78.9 %)
TEXT_LR_BOOST = 1
DEFAULT_TRAINED_STAGES = 3  # the candidate kept unless the validation split clearly prefers another


def candidate_lr(lr: float, k: int, boost: float = LR_BOOST) -> float:
    """The learning rate of the candidate that trains the last ``k`` stages (``boost``: ``TEXT_LR_BOOST`` for a
    Hugging Face text model).

    >>> candidate_lr(1e-3, 1), candidate_lr(1e-3, 2), round(candidate_lr(1e-3, 3), 5)
    (0.01, 0.01, 0.00667)
    """
    return lr * boost * min(1.0, 2 / k)


def candidates(cfg: TrainConfig) -> tuple[list[int], str, bool]:
    """How many last stages each candidate trains, the stage the shared cache cuts before, and whether the model is a
    text model (no image preprocessing)."""
    from freezetune.recipes.named import structure_of

    names, text = structure_of(cfg)  # the head is last
    # at least one stage stays frozen (the cache's point), except in a model of one stage and a head, whose only
    # candidate trains it (k = 0, the head alone, would be a linear probe, and has no LR rule)
    deepest = max(1, min(MAX_TRAINED_STAGES, len(names) - 2))
    ks = list(range(min(MIN_TRAINED_STAGES, deepest), deepest + 1))
    return ks, names[-(max(ks) + 1)], text


def default_freeze(model: str, img_size: int | None = None) -> tuple[int, list[int]]:
    """The freeze spec of the auto recipe's default candidate for ``model``, and the candidates' stage counts.

    >>> default_freeze("timm:test_efficientnet", 32)
    (-4, [2, 3, 4])
    """
    ks, _, _ = candidates(TrainConfig(model=model, img_size=img_size))
    return -(default_stages(ks) + 1), ks


def default_stages(ks: list[int]) -> int:
    """The default candidate among ``ks`` (ascending): ``DEFAULT_TRAINED_STAGES``, else the middle one (a model with
    fewer stages).

    >>> default_stages([2, 3, 4]), default_stages([1, 2])
    (3, 2)
    """
    return DEFAULT_TRAINED_STAGES if DEFAULT_TRAINED_STAGES in ks else ks[len(ks) // 2]


def choose(trials: list[dict], n_val: int, metric: str = DEFAULT_MONITOR) -> dict:
    """The default candidate (``DEFAULT_TRAINED_STAGES``), unless another beat it on the validation split by more
    than the noise of a split of ``n_val`` images (one standard error of the difference of two accuracies); among
    several such, the best, the cheaper one on a tie. ``metric``: what the trials are compared by (``val_acc``, or
    ``val_f1`` under ``--monitor val_f1``, held to the same noise: a rule of thumb for it).

    >>> trials = [{"trained_stages": 2, "val_acc": 0.80}, {"trained_stages": 3, "val_acc": 0.83},
    ...           {"trained_stages": 4, "val_acc": 0.86}]
    >>> choose(trials, n_val=100)["trained_stages"], choose(trials, n_val=5000)["trained_stages"]
    (3, 4)
    """
    scored = [t for t in trials if t.get(metric) is not None and math.isfinite(t[metric])]
    default_k = default_stages([t["trained_stages"] for t in trials])
    default = next(t for t in trials if t["trained_stages"] == default_k)
    if not scored or default not in scored:
        return default
    p = default[metric]
    noise = difference_noise(p, n_val)
    better = [t for t in scored if t[metric] > p + noise]
    return max(better, key=lambda t: (t[metric], -t["trained_stages"])) if better else default
