"""Group-aware stratified splits, SRC-MT split files, and the labeled subset.

The random split is iterative stratification (Sechidis et al., 2011) over GROUPS: a group (lesion, patient)
goes whole into one split, so no group ever straddles splits. Groups carrying the rarest labels are placed first,
each into the split that most lacks that label; an all-zero label vector ('No Finding') counts as its own
pseudo-label. A repair pass then moves one group into any split that lacks a label while another split holds
that label in two or more groups, so every label is present in every split when the data allow it.
"""

from __future__ import annotations

import os

import numpy as np

from stsc_tf.data.features import SPLITS
from stsc_tf.data.sources import read_csv_rows
from stsc_tf.errors import DataError

DEFAULT_RATIOS = (0.7, 0.1, 0.2)  # train : val : test, the paper's split (after SRC-MT)


def _group_table(labels: np.ndarray, groups: list[str]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Returns (group names, per-group label counts [G, K+1], per-group sizes [G], row -> group index [N])."""
    names, row_group = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    with_none = np.concatenate([labels, (labels.sum(1) == 0)[:, None].astype(labels.dtype)], axis=1)  # [N, K+1]
    counts = np.zeros((len(names), with_none.shape[1]))
    np.add.at(counts, row_group, with_none)
    sizes = np.bincount(row_group, minlength=len(names)).astype(float)
    return list(names), counts, sizes, row_group


def stratified_group_split(labels: np.ndarray, groups: list[str], ratios=DEFAULT_RATIOS, seed: int = 0,
                           names=SPLITS) -> np.ndarray:
    """Assigns every row to a split.

    Args:
      labels: [N, K] one-hot or multi-hot.
      groups: N group ids; rows of a group always share a split.
      ratios: one fraction per split name (normalised to sum 1).
      seed: the shuffle that breaks ties.
      names: the split names, in the order of `ratios`.

    Returns:
      [N] array of split names.
    """
    labels = np.asarray(labels, dtype=float)
    ratios = np.asarray(ratios, dtype=float) / np.sum(ratios)
    rng = np.random.default_rng(seed)
    _, counts, sizes, row_group = _group_table(labels, groups)
    n_groups, n_labels = counts.shape
    want_label = ratios[:, None] * counts.sum(0)[None, :]  # [S, K+1] labels each split still wants
    want_size = ratios * sizes.sum()  # [S]
    assigned = np.full(n_groups, -1)
    order = rng.permutation(n_groups)
    remaining = counts[order].copy()
    left = np.ones(n_groups, bool)
    while left.any():
        label_left = (remaining * left[:, None]).sum(0)
        label_left[label_left == 0] = np.inf
        k = int(np.argmin(label_left))
        if np.isinf(label_left[k]):  # only groups with no labels at all remain (cannot happen with the pseudo-label)
            k = None
        members = np.flatnonzero(left & ((remaining[:, k] > 0) if k is not None else True))
        # Larger groups first, so the small ones can even out the counts.
        members = members[np.argsort(-sizes[order][members], kind="stable")]
        for m in members:
            g = order[m]
            score = want_label[:, k] if k is not None else want_size
            best = np.flatnonzero(score == score.max())
            if len(best) > 1:
                best = best[np.flatnonzero(want_size[best] == want_size[best].max())]
            s = int(rng.choice(best))
            assigned[g] = s
            want_label[s] -= counts[g]
            want_size[s] -= sizes[g]
            left[m] = False
    _repair_missing_labels(assigned, counts, ratios)
    return np.asarray(names, dtype=object)[assigned[row_group]]


def _repair_missing_labels(assigned: np.ndarray, counts: np.ndarray, ratios: np.ndarray) -> None:
    """Moves a group into a split that lacks a label, taking it from a split with >= 2 groups of that label."""
    n_splits = len(ratios)
    for k in range(counts.shape[1]):
        for s in range(n_splits):
            if ratios[s] == 0:
                continue
            has = counts[:, k] > 0
            if (has & (assigned == s)).any():
                continue
            per_split = np.array([(has & (assigned == t)).sum() for t in range(n_splits)])
            donors = [t for t in np.argsort(-per_split) if per_split[t] >= 2]
            if not donors:
                continue
            candidates = np.flatnonzero(has & (assigned == donors[0]))
            # The smallest group carrying the label, to disturb the other counts least.
            g = candidates[np.argmin(counts[candidates].sum(1))]
            assigned[g] = s


def read_split_dir(split_dir: str, ids: set[str]) -> dict[str, str]:
    """Reads SRC-MT style `training.csv`, `validation.csv`, `testing.csv` (first column: image id).

    Returns id -> split. An id listed twice, in two splits, or absent from the source is an error naming it; so is
    a source id that no file lists (the split would be incomplete).
    """
    files = {"train": "training.csv", "val": "validation.csv", "test": "testing.csv"}
    assignment: dict[str, str] = {}
    where: dict[str, str] = {}
    for split, name in files.items():
        path = os.path.join(split_dir, name)
        if not os.path.isfile(path):
            raise DataError(f"split file {path} not found (--split_dir needs {sorted(files.values())})")
        header, rows, lines = read_csv_rows(path)
        if not header or header[0] != "image":
            raise DataError(f"{path}: first column must be 'image'")
        for line_no, row in zip(lines, rows):
            image_id = row[0].strip()
            here = f"{path} row {line_no}"
            if image_id in assignment:
                raise DataError(f"{here}: {image_id!r} already listed at {where[image_id]}")
            if image_id not in ids:
                raise DataError(f"{here}: {image_id!r} is not in the source")
            assignment[image_id] = split
            where[image_id] = here
    unlisted = sorted(ids - set(assignment))
    if unlisted:
        raise DataError(f"split files in {split_dir} are incomplete: {len(unlisted)} source ids are in no split "
                        f"(first: {unlisted[:3]})")
    return assignment


def labeled_subset(labels: np.ndarray, ratio: float, seed: int) -> np.ndarray:
    """Chooses the labeled rows of the train split: stratified, by seed, at least one per present class.

    Args:
      labels: [N, K] labels of the train split (in index order).
      ratio: 0 < ratio <= 1.

    Returns:
      Sorted indices [M] into the train split, M = max(round(ratio * N), number of present classes).
    """
    if not 0.0 < ratio <= 1.0:
        raise DataError(f"labeled ratio must be in (0, 1], got {ratio}")
    n = len(labels)
    if ratio == 1.0:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    split = stratified_group_split(labels, [str(i) for i in range(n)], ratios=(ratio, 1.0 - ratio),
                                   seed=int(rng.integers(2**31)), names=("labeled", "unlabeled"))
    labeled = split == "labeled"
    # The repair pass needs two carriers to move one; a class held by a single row still gets that row labeled.
    for k in np.flatnonzero(np.asarray(labels).sum(0) > 0):
        carriers = np.flatnonzero(np.asarray(labels)[:, k] > 0)
        if not labeled[carriers].any():
            labeled[rng.choice(carriers)] = True
    if not labeled.any():  # only 'No Finding' rows and a ratio too small to pick one
        labeled[rng.integers(n)] = True
    return np.flatnonzero(labeled)
