"""Seeded, per-class index selection: few-shot subsets and stratified validation splits.

Both work on a ``targets`` LongTensor and return indices, so they apply to any dataset that exposes ``.targets``
and can ``select`` a subset of itself.
"""

from __future__ import annotations

import torch

from freezetune.options import check, fraction_problem, positive_int_problem


def _indices_by_class(targets: torch.Tensor) -> dict[int, torch.Tensor]:
    # Sorting by class keeps the iteration order (and so the random draws) independent of dataset order quirks.
    return {int(c): torch.nonzero(targets == c).flatten() for c in torch.unique(targets, sorted=True)}


def per_class_indices(targets: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, dict[int, int]]:
    """Pick ``k`` random indices of every class (all of a class that has fewer).

    Args:
        targets: class index of every sample (1-D integer tensor).
        k: images wanted per class (>= 1).
        seed: the same seed and targets always give the same indices.

    Returns:
        The chosen indices in ascending order, and how many were taken per class (``{class: count}``), so the caller
        can report classes that had fewer than ``k``.

    >>> idx, counts = per_class_indices(torch.tensor([0, 0, 0, 1]), k=2, seed=0)
    >>> len(idx), counts
    (3, {0: 2, 1: 1})
    """
    check(positive_int_problem("per_class", k))
    gen = torch.Generator().manual_seed(seed)
    chosen, counts = [], {}
    for cls, idx in _indices_by_class(targets).items():
        pick = idx[torch.randperm(len(idx), generator=gen)[:k]]
        chosen.append(pick)
        counts[cls] = len(pick)
    if not chosen:
        return torch.empty(0, dtype=torch.long), counts
    return torch.sort(torch.cat(chosen)).values, counts


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
            the same side, and the shares above count keys. Without it every sample is its own key (the same draws).

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
    for idx in _indices_by_class(targets).values():
        perm = idx[torch.randperm(len(idx), generator=gen)].tolist()
        units: dict[object, list[int]] = {}  # key -> its samples, in the order the permutation met the key
        for i in perm:
            units.setdefault(i if groups is None else groups[i], []).append(i)
        n = len(units)
        n_val = min(max(round(fraction * n), 1), n - 1, max_per_class or n)
        listed = list(units.values())
        val.extend(i for unit in listed[:n_val] for i in unit)
        train.extend(i for unit in listed[n_val:] for i in unit)
    return torch.tensor(sorted(train), dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)
