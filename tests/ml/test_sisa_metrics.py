"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import torch

from app.ml.metrics import accuracy, auc, tpr_at_fpr


def test_accuracy() -> None:
    proba = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert accuracy(proba, np.array([0, 1, 1, 1])) == 0.75


def test_auc_ranks_with_ties() -> None:
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == 1.0
    assert math.isnan(auc(np.array([1.0]), np.array([1])))
    rng = np.random.default_rng(0)
    s, y = rng.normal(size=300), rng.integers(0, 2, size=300)
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y == 1] for b in s[y == 0]]
    assert abs(auc(s, y) - float(np.mean(pairs))) < 1e-12


def test_tpr_at_fpr() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 0, 1, 1, 0, 0])
    assert tpr_at_fpr(scores, labels, 0.0) == 1 / 3
    assert tpr_at_fpr(scores, labels, 1 / 3) == 1.0
    # Ties cannot be split: both tied rows cross the threshold together.
    assert tpr_at_fpr(np.array([0.9, 0.9, 0.1]), np.array([1, 0, 0]), 0.4) == 0.0
