"""Which current lesion is which prior lesion: one-to-one matching by overlap or centroid distance.

Inputs are on the current grid: the current lesion label map and the prior's lesion label map
mapped into it (dicomnode.imaging.registration, nearest neighbour), both numbered 1..N, and the
lesions' centroids in the current space (mm; the prior's mapped through the registration).

A pair may match when the two overlap with a Dice coefficient of at least MATCH_MIN_DICE, or
when their centroids lie at most MATCH_MAX_CENTROID_MM apart (a lesion that shrank to a small
part of its former self may no longer overlap much). Among the pairs that may match, the
assignment is one-to-one and minimises the summed cost (1 - Dice) + distance /
MATCH_MAX_CENTROID_MM over the pairs (the Hungarian method: scipy.optimize.linear_sum_assignment).
A current lesion left unmatched is new; a prior lesion left unmatched has resolved.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np
from scipy.optimize import linear_sum_assignment

MATCH_MIN_DICE = 0.1
MATCH_MAX_CENTROID_MM = 15.0
_UNMATCHABLE = 1e6


class MatchStatus(Enum):
    MATCHED = "matched"
    NEW = "new"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class LesionPair:
    status: MatchStatus
    current: int | None  # lesion number in the current study
    prior: int | None  # lesion number in the prior study
    dice: float | None = None
    distance_mm: float | None = None

    def as_json(self) -> dict:
        return {"status": self.status.value, "current": self.current, "prior": self.prior, "dice": self.dice,
                "distance_mm": self.distance_mm}


def dice_matrix(current_labels: np.ndarray, prior_labels: np.ndarray, n_current: int, n_prior: int) -> np.ndarray:
    """(n_current, n_prior) Dice coefficients between numbered lesions on one grid."""
    current = np.asarray(current_labels, dtype=np.int64).ravel()
    prior = np.asarray(prior_labels, dtype=np.int64).ravel()
    joint = np.bincount(current * (n_prior + 1) + prior, minlength=(n_current + 1) * (n_prior + 1))
    joint = joint.reshape(n_current + 1, n_prior + 1)
    sizes_current = joint.sum(axis=1)[1:]
    sizes_prior = joint.sum(axis=0)[1:]
    overlap = joint[1:, 1:].astype(np.float64)
    denominator = sizes_current[:, None] + sizes_prior[None, :]
    return np.divide(2.0 * overlap, denominator, out=np.zeros_like(overlap), where=denominator > 0)


def match_lesions(current_labels: np.ndarray, prior_labels_on_current: np.ndarray,
                  current_centroids_mm: np.ndarray, prior_centroids_mm: np.ndarray) -> tuple[LesionPair, ...]:
    """The matching table: matched pairs (by current number), then new, then resolved lesions."""
    current_centroids_mm = np.asarray(current_centroids_mm, dtype=np.float64).reshape(-1, 3)
    prior_centroids_mm = np.asarray(prior_centroids_mm, dtype=np.float64).reshape(-1, 3)
    n_current, n_prior = len(current_centroids_mm), len(prior_centroids_mm)
    pairs: list[LesionPair] = []
    matched_current: set[int] = set()
    matched_prior: set[int] = set()
    if n_current and n_prior:
        dice = dice_matrix(current_labels, prior_labels_on_current, n_current, n_prior)
        distance = np.linalg.norm(current_centroids_mm[:, None, :] - prior_centroids_mm[None, :, :], axis=2)
        eligible = (dice >= MATCH_MIN_DICE) | (distance <= MATCH_MAX_CENTROID_MM)
        cost = np.where(eligible, (1.0 - dice) + distance / MATCH_MAX_CENTROID_MM, _UNMATCHABLE)
        for i, j in zip(*linear_sum_assignment(cost)):
            if eligible[i, j]:
                pairs.append(LesionPair(MatchStatus.MATCHED, int(i) + 1, int(j) + 1, float(dice[i, j]),
                                        float(distance[i, j])))
                matched_current.add(int(i) + 1)
                matched_prior.add(int(j) + 1)
    pairs.sort(key=lambda p: p.current or 0)
    pairs += [LesionPair(MatchStatus.NEW, k, None) for k in range(1, n_current + 1) if k not in matched_current]
    pairs += [LesionPair(MatchStatus.RESOLVED, None, k) for k in range(1, n_prior + 1) if k not in matched_prior]
    return tuple(pairs)
