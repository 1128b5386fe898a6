"""Which unlabeled images to label next: uncertainty from the student and teacher, spread by feature diversity.

The mean-teacher pair gives two cheap uncertainty signals per unlabeled image: the teacher's predictive entropy
(the model is unsure) and the student-teacher disagreement (the prediction is unstable under perturbation and
weight averaging). They are combined by percentile rank and a greedy selection trades them against similarity
to what is already chosen or labeled, so the labeling budget is not spent on near-duplicates of one confusing
case. Pure numpy: this module must not import TensorFlow or Keras.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_WEIGHTS = {"entropy": 0.5, "disagreement": 0.5}
# Labeled-set similarities are computed for this many (candidate, labeled) pairs at a time:
# 2**24 float32 values = 64 MiB, whatever N and M are.
CHUNK_ELEMENTS = 2**24


def _check_probs(name: str, p: np.ndarray) -> None:
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"{name} must lie in [0, 1]")


def _plogp(p: np.ndarray) -> np.ndarray:
    """p log p with the limit 0 at p = 0 (no log(0) warning)."""
    return p * np.log(np.where(p > 0, p, 1.0))


def uncertainty_components(p_student: np.ndarray, p_teacher: np.ndarray, *, multi_label: bool
                           ) -> dict[str, np.ndarray]:
    """Per-image uncertainty signals, each in [0, 1].

    "entropy" (of the teacher, the better-calibrated EMA model): single-label H(p) / log K with
    H(p) = -sum_k p_k log p_k; multi-label the mean over classes of the binary entropy
    -(p log p + (1 - p) log(1 - p)) / log 2. 0 log 0 is taken as 0, so p = 0 or 1 is safe.
    "disagreement": single-label the total variation distance 0.5 * sum_k |p_s,k - p_t,k|; multi-label the mean
    over classes of |p_s,k - p_t,k|.

    Args:
      p_student, p_teacher: [N, K] probabilities (softmax rows single-label, sigmoids multi-label).

    Returns:
      {"entropy": [N], "disagreement": [N]} float64.
    """
    p_s, p_t = np.asarray(p_student, np.float64), np.asarray(p_teacher, np.float64)
    _check_probs("p_student", p_s)
    _check_probs("p_teacher", p_t)
    if p_s.shape != p_t.shape:
        raise ValueError(f"p_student and p_teacher shapes differ: {p_s.shape} vs {p_t.shape}")
    k = p_t.shape[1]
    if multi_label:
        binary_entropy = -(_plogp(p_t) + _plogp(1.0 - p_t)) / math.log(2.0)  # [N, K]
        entropy = binary_entropy.mean(axis=1)
        disagreement = np.abs(p_s - p_t).mean(axis=1)
    else:
        if k < 2:
            raise ValueError(f"single-label probabilities need K >= 2 classes, got K = {k}")
        entropy = -_plogp(p_t).sum(axis=1) / math.log(k)
        disagreement = 0.5 * np.abs(p_s - p_t).sum(axis=1)
    # Rounding can leave a uniform row's entropy a few ulp above 1; the documented range is [0, 1].
    return {"entropy": np.clip(entropy, 0.0, 1.0), "disagreement": np.clip(disagreement, 0.0, 1.0)}


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1]: (average rank - 1) / (N - 1), ties sharing their average rank.

    The smallest value maps to 0 and the largest to 1; a constant input (no information) maps to 0.5 everywhere,
    as does a single value.
    """
    values = np.asarray(values, np.float64)
    n = len(values)
    if n == 1:
        return np.full(1, 0.5)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Runs of equal values: start index of each run in sorted order, and the run each sorted item belongs to.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    run = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    ends = np.r_[starts[1:], n]  # exclusive
    average = (starts + ends - 1) / 2.0  # mean 0-based position of each run
    ranks = np.empty(n)
    ranks[order] = average[run]
    return ranks / (n - 1)


def uncertainty_score(components: dict[str, np.ndarray], weights: dict[str, float] | None = None) -> np.ndarray:
    """One uncertainty per image: the weighted mean of the components' percentile ranks, in [0, 1].

    Ranks rather than raw values because the components live on different scales: student-teacher disagreement
    is typically an order of magnitude smaller than normalised entropy, so a raw weighted sum would be entropy
    alone whatever the weights. Ranks make each weight mean what it says, are invariant to any monotone rescaling
    of a component, and put the score on the same [0, 1] scale as the cosine-similarity penalty of
    `select_diverse`. Ranks are relative to the pool passed in: scores from different pools are not comparable.

    Args:
      components: name -> [N] values, larger = more uncertain (e.g. `uncertainty_components`' output).
      weights: name -> weight >= 0 (not all 0); only the named components are used. Default: entropy and
        disagreement, 0.5 each.

    Returns:
      [N] sum_c w_c * rank_c / sum_c w_c.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    missing = sorted(set(weights) - set(components))
    if missing:
        raise ValueError(f"weights name components that are absent: {missing}")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {weights}")
    lengths = {name: np.shape(components[name]) for name in weights}
    if len(set(lengths.values())) != 1 or len(next(iter(lengths.values()))) != 1:
        raise ValueError(f"components must be 1-D arrays of one length N, got shapes {lengths}")
    total = sum(weights.values())
    score = np.zeros(next(iter(lengths.values()))[0])
    for name, weight in weights.items():
        values = np.asarray(components[name], np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"component {name!r} contains non-finite values")
        score += weight * percentile_rank(values)
    return score / total


def _normalise_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm in place; an all-zero row stays zero (similarity 0 to everything)."""
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # [N, 1]; np.linalg.norm would square x into a copy
    np.divide(x, norm, out=x, where=norm > 0)
    return x


def _labeled_max_similarity(candidates: np.ndarray, labeled: np.ndarray, chunk_rows: int) -> np.ndarray:
    """[N] max over the labeled rows of the cosine similarity, `chunk_rows` candidates at a time.

    Both inputs are already centred and normalised. A chunk's [chunk_rows, M] block is the only large temporary,
    so memory stays bounded for N = 100,000 candidates and M = 20,000 labeled images.
    """
    out = np.empty(len(candidates), np.float64)
    for start in range(0, len(candidates), chunk_rows):
        block = candidates[start:start + chunk_rows] @ labeled.T  # [chunk, M]
        out[start:start + chunk_rows] = block.max(axis=1)
    return out


def select_diverse(uncertainty: np.ndarray, features: np.ndarray, budget: int, *,
                   labeled_features: np.ndarray | None = None, diversity: float = 1.0,
                   chunk_rows: int | None = None) -> dict:
    """Greedy uncertainty-with-diversity selection of `budget` unlabeled images.

    Features are centred on the mean of the candidates and the labeled images together (backbone features after
    a ReLU are all non-negative, so raw cosine similarities are uniformly high and barely discriminate) and
    L2-normalised. With s_i the running max cosine similarity of candidate i to the images chosen so far and the
    labeled images (-inf while there are none), each step picks

        argmax_i  uncertainty_i - diversity * max(0, s_i)

    over the candidates not yet chosen (ties: the lowest index), then updates s with one [N] x [D] product.
    Negative similarity is not rewarded: an image unlike everything chosen gets no bonus, only no penalty. With
    uncertainty in [0, 1] (`uncertainty_score`) and diversity = 1, a near-duplicate of a chosen image loses about
    as much as the whole uncertainty range; diversity = 0 is pure uncertainty ranking.

    Args:
      uncertainty: [N] larger = more worth labeling.
      features: [N, D] embeddings of the candidates (e.g. pooled backbone features).
      budget: how many to select, >= 1; more than N selects all N.
      labeled_features: [M, D] embeddings of the already labeled images, or None.
      diversity: weight of the similarity penalty, >= 0.
      chunk_rows: candidates per block when computing the labeled-set similarities; by default as many as keep
        a block at CHUNK_ELEMENTS values.

    Returns:
      {"order": [B] candidate indices in selection order, "score": [B] the criterion's value when picked,
      "max_similarity": [B] s_i when picked (NaN for a first pick with nothing to compare to),
      "uncertainty": [B] uncertainty of the picked}, B = min(budget, N).
    """
    uncertainty = np.asarray(uncertainty, np.float64)
    if uncertainty.ndim != 1:
        raise ValueError(f"uncertainty must be 1-D [N], got shape {uncertainty.shape}")
    features = np.asarray(features)
    if features.ndim != 2 or len(features) != len(uncertainty):
        raise ValueError(f"features must be [N, D] with N = {len(uncertainty)}, got shape {features.shape}")
    if not isinstance(budget, (int, np.integer)) or budget <= 0:
        raise ValueError(f"budget must be an integer >= 1, got {budget!r}")
    if not math.isfinite(diversity) or diversity < 0:
        raise ValueError(f"diversity must be a finite number >= 0, got {diversity}")
    if not np.all(np.isfinite(uncertainty)) or not np.all(np.isfinite(features)):
        raise ValueError("uncertainty and features must be finite")
    if labeled_features is not None:
        labeled_features = np.asarray(labeled_features)
        if labeled_features.ndim != 2 or labeled_features.shape[1] != features.shape[1]:
            raise ValueError(f"labeled_features must be [M, D] with D = {features.shape[1]}, "
                             f"got shape {labeled_features.shape}")
        if not np.all(np.isfinite(labeled_features)):
            raise ValueError("labeled_features must be finite")
        if len(labeled_features) == 0:
            labeled_features = None
    n = len(uncertainty)

    # float32 working copies: cosine similarities need no more than float32's 7 digits, and it halves the memory
    # of a [100,000, 1,024] candidate matrix. The mean is accumulated in float64.
    total = features.sum(axis=0, dtype=np.float64)
    count = n
    if labeled_features is not None:
        total += labeled_features.sum(axis=0, dtype=np.float64)
        count += len(labeled_features)
    mean = (total / count).astype(np.float32)  # [D]
    candidates = features.astype(np.float32, copy=True)  # [N, D], centred in place: no second [N, D] temporary
    candidates -= mean
    _normalise_rows(candidates)

    max_similarity = np.full(n, -np.inf)  # [N] float64, max over an empty set
    if labeled_features is not None:
        labeled = labeled_features.astype(np.float32, copy=True)  # [M, D]
        labeled -= mean
        _normalise_rows(labeled)
        rows = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // len(labeled))
        if rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        max_similarity = _labeled_max_similarity(candidates, labeled, rows)

    chosen = np.zeros(n, bool)
    picks = min(budget, n)
    order, scores, similarities = np.empty(picks, np.int64), np.empty(picks), np.empty(picks)
    for step in range(picks):
        criterion = uncertainty - diversity * np.maximum(max_similarity, 0.0)  # [N]
        criterion[chosen] = -np.inf
        i = int(np.argmax(criterion))  # the first maximum: ties go to the lowest index
        order[step], scores[step] = i, criterion[i]
        similarities[step] = max_similarity[i] if np.isfinite(max_similarity[i]) else math.nan
        chosen[i] = True
        np.maximum(max_similarity, candidates @ candidates[i], out=max_similarity)  # [N] x [D] -> [N]
    return {"order": order, "score": scores, "max_similarity": similarities, "uncertainty": uncertainty[order]}
