"""Expert saliency (docs/METHOD.md, section 5: Eq. 9), in numpy.

    S[l,e,p] = f[l,e] * g[l,e,p] / (r[l,e,p] + 1) ** gamma

f is the routing frequency of the expert, g the rank importance of the module
(the mean of its per-rank importance EMAs over its active ranks) and r its
active rank. ``mode`` switches off one signal for the paper's ablations.
"""

from __future__ import annotations

import numpy as np

SALIENCY_MODES = ("both", "frequency", "importance")


def module_importance(rank_importance: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """g per module: the mean of the per-rank EMAs over the active ranks.

    ``rank_importance`` is (..., r_max), ``ranks`` (...) the active ranks; ranks
    are prefix-shaped, so rank j is active when j < r.
    """
    rank_importance = np.asarray(rank_importance, dtype=np.float64)
    ranks = np.asarray(ranks)
    active = np.arange(rank_importance.shape[-1]) < ranks[..., None]
    total = np.where(active, rank_importance, 0.0).sum(-1)
    return total / np.maximum(ranks, 1)


def saliency(
    frequency: np.ndarray,
    importance: np.ndarray,
    ranks: np.ndarray,
    gamma: float,
    mode: str = "both",
) -> np.ndarray:
    """Eq. 9 for arrays of modules (frequency already expanded to modules)."""
    frequency = np.asarray(frequency, dtype=np.float64)
    importance = np.asarray(importance, dtype=np.float64)
    penalty = (np.asarray(ranks, dtype=np.float64) + 1.0) ** gamma
    if mode == "both":
        score = frequency * importance
    elif mode == "frequency":
        score = frequency
    elif mode == "importance":
        score = importance
    else:
        raise ValueError(f"saliency must be one of {SALIENCY_MODES}, got {mode!r}")
    return score / penalty
