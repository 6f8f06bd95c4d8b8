"""Seeded, per-class index selection: few-shot subsets and stratified validation splits.

Both work on a ``targets`` LongTensor and return indices, so they apply to any dataset that exposes ``.targets``
and can ``select`` a subset of itself.
"""

from __future__ import annotations

import torch

from freezetune.config.options import check, fraction_problem, positive_int_problem


def _indices_by_class(targets: torch.Tensor) -> dict[int, torch.Tensor]:
    # Sorting by class keeps the iteration order (and so the random draws) independent of dataset order quirks.
    return {int(c): torch.nonzero(targets == c).flatten() for c in torch.unique(targets, sorted=True)}


def per_class_indices(targets: torch.Tensor, k: int, seed: int = 0,
                      groups: list | None = None) -> tuple[torch.Tensor, dict[int, int]]:  # fmt: skip
    """Pick ``k`` random indices of every class (all of a class that has fewer).

    Args:
        targets: class index of every sample (1-D integer tensor).
        k: images wanted per class (>= 1).
        seed: the same seed and targets always give the same indices.
        groups: a key per sample, as ``stratified_split``'s: ``k`` counts keys (one file listed twice is one image,
            taken with both of its listings). Without it every sample is its own key (the same draws).

    Returns:
        The chosen indices in ascending order, and how many were taken per class (``{class: count}``, in keys), so
        the caller can report classes that had fewer than ``k``.

    >>> idx, counts = per_class_indices(torch.tensor([0, 0, 0, 1]), k=2, seed=0)
    >>> len(idx), counts
    (3, {0: 2, 1: 1})
    """
    check(positive_int_problem("per_class", k))
    gen = torch.Generator().manual_seed(seed)
    chosen, counts = [], {}
    for cls, idx in _indices_by_class(targets).items():
        units = _units(idx[torch.randperm(len(idx), generator=gen)].tolist(), groups)[:k]
        chosen.extend(i for unit in units for i in unit)
        counts[cls] = len(units)
    return torch.tensor(sorted(chosen), dtype=torch.long), counts


def _units(perm: list[int], groups: list | None) -> list[list[int]]:
    """``perm``'s samples gathered by key (``groups``), in the order the permutation meets each key."""
    units: dict[object, list[int]] = {}
    for i in perm:
        units.setdefault(i if groups is None else groups[i], []).append(i)
    return list(units.values())


def stratified_split(targets: torch.Tensor, fraction: float, seed: int = 0, max_per_class: int | None = None,
                     groups: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Split indices into (train, val) so that every class gives about ``fraction`` of its samples to val.

    A class with at least two samples always keeps one in train and gives at least one to val; a class with a single
    sample stays in train. The two index sets never overlap.

    Args:
        targets: class index of every sample (1-D integer tensor).
        fraction: share of each class that goes to val, strictly between 0 and 1.
        seed: the same seed and targets always give the same split.
        max_per_class: at most this many of a class go to val.
        groups: a key per sample; samples of one key (one file listed twice, byte-identical copies, one text) go to
            the same side, and the shares above count keys; a key under two or more classes stays in train (held
            out, its copy in train would score the model on an input it trained on). Without it every sample is its
            own key (the same draws).

    Returns:
        ``(train_indices, val_indices)``, each in ascending order.

    >>> tr, va = stratified_split(torch.tensor([0] * 10 + [1] * 10), fraction=0.2, seed=0)
    >>> len(tr), len(va)
    (16, 4)
    >>> stratified_split(torch.tensor([0, 0, 0]), fraction=0.5, groups=["a", "b", "a"])[1].tolist()
    [0, 2]
    """
    check(fraction_problem("val_split", fraction))
    gen = torch.Generator().manual_seed(seed)
    train, val = [], []
    spanning = spanning_keys(targets, groups)
    for idx in _indices_by_class(targets).values():
        units = _units(idx[torch.randperm(len(idx), generator=gen)].tolist(), groups)
        n = len(units)
        # drawn in the same order as without such keys, so data without them splits as it always did
        free = [unit for unit in units if groups is None or groups[unit[0]] not in spanning]
        n_val = min(max(round(fraction * n), 1), n - 1, max_per_class or n, len(free))
        held = {unit[0] for unit in free[:n_val]}
        val.extend(i for unit in units if unit[0] in held for i in unit)
        train.extend(i for unit in units if unit[0] not in held for i in unit)
    return torch.tensor(sorted(train), dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)


def spanning_keys(targets: torch.Tensor, groups: list | None) -> set:
    """The keys of ``groups`` whose samples have two or more classes (one text labelled both "pos" and "neg")."""
    if groups is None:
        return set()
    classes: dict[object, set[int]] = {}
    for key, y in zip(groups, targets.tolist(), strict=True):
        classes.setdefault(key, set()).add(y)
    return {key for key, ys in classes.items() if len(ys) > 1}
