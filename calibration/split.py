"""Disjoint parts of one data source, and the orders samples are drawn in.

Held-out data must never share a *source* with calibration (or with an ``--auto`` selection): a crop
of a photo in the held-out part while another crop of it calibrates, or the same file under two
names on both sides, lets the held-out numbers flatter the model. So a split assigns whole groups
to one part: a group is a source photo for the built-in set (its ``SOURCES.json`` knows them), the
file's content sha256 for a user image folder, a row for tensor files.

- :func:`assign_parts` walks a seeded order and gives each group to exactly one part;
- :func:`grouped_order` shuffles whole groups (when every sample's group is known up front);
- :func:`stratified_order` interleaves the classes of a labelled set, so any prefix samples them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def assign_parts(order: Sequence[int] | np.ndarray, group_of: Callable[[int], str],
                 sizes: Sequence[int | None]) -> list[list[int]]:
    """Fill the parts in turn (at most ``sizes[i]`` samples each; None: no limit) from ``order``.

    A group belongs to the part that first takes one of its samples; a later sample of that group goes
    to the same part, or to none when that part is full, never to another. ``group_of`` is called only
    for the samples visited (a user folder's files are hashed lazily), and the walk stops once every
    part is full.
    """
    parts: list[list[int]] = [[] for _ in sizes]

    def full(p: int) -> bool:
        cap = sizes[p]
        return cap is not None and len(parts[p]) >= cap

    owner: dict[str, int] = {}
    current = 0
    for raw in order:
        idx = int(raw)
        key = group_of(idx)
        part = owner.get(key)
        if part is None:
            while current < len(sizes) and full(current):
                current += 1
            if current == len(sizes):
                break  # every part is full
            owner[key] = part = current
        if not full(part):
            parts[part].append(idx)
    return parts


def grouped_order(groups: Sequence[str], seed: int) -> np.ndarray:
    """Sample indices, whole groups at a time: the groups in seeded order, each group's samples shuffled."""
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members: dict[str, list[int]] = {g: [] for g in names}
    for i, g in enumerate(groups):
        members[g].append(i)
    out: list[int] = []
    for gi in rng.permutation(len(names)):
        idx = members[names[int(gi)]]
        out += [idx[int(j)] for j in rng.permutation(len(idx))]
    return np.asarray(out, dtype=np.int64)


def stratified_order(labels: Sequence[int] | np.ndarray, seed: int) -> np.ndarray:
    """Sample indices with the classes interleaved (one of each class per round, classes in seeded order,
    each class's samples shuffled): the first N of them sample every class when N >= the class count."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = [int(c) for c in np.unique(labels)]
    queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    queues = [queues[int(i)] for i in rng.permutation(len(queues))]
    out: list[int] = []
    for r in range(max((len(q) for q in queues), default=0)):
        out += [int(q[r]) for q in queues if r < len(q)]
    return np.asarray(out, dtype=np.int64)
