"""Click-model metrics: ROC AUC and normalized entropy (He et al., "Practical Lessons from
Predicting Clicks on Ads at Facebook", 2014), written here because they are ten lines each and
torchmetrics' versions would add a state-sync layer we do not need (we gather scores first)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney U) formula; tied scores get their average rank.

    Args:
        scores: [N] any real scores (logits or probabilities).
        labels: [N] in {0, 1}.
    """
    scores, labels = scores.double().flatten(), labels.double().flatten()
    n_pos = labels.sum().item()
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    upper = counts.cumsum(0).double()
    avg_rank = upper - (counts.double() - 1) / 2  # 1-based average rank of each unique score
    rank_sum = avg_rank[inverse][labels > 0.5].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def normalized_entropy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean log loss divided by the entropy of the empirical click rate (lower is better; 1.0 is
    no better than predicting the base rate).

    Args:
        logits: [N] predicted logits.
        labels: [N] in {0, 1}.
    """
    logits, labels = logits.double().flatten(), labels.double().flatten()
    ll = F.binary_cross_entropy_with_logits(logits, labels).item()
    p = labels.mean().item()
    if p <= 0 or p >= 1:
        return float("nan")
    return ll / -(p * math.log(p) + (1 - p) * math.log(1 - p))
