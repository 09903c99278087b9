"""Preprocessing is learned state: what it emits, and how it reacts to removals."""

from __future__ import annotations

import numpy as np
import torch

from app.ml.config import FeatureSpec
from app.ml.preprocess import PreprocessorState, fit_preprocessor

SPEC = FeatureSpec(numeric=("age",), categorical=("colour",))


def test_one_hot_and_scaling() -> None:
    cols = {
        "age": np.array([10.0, 20.0, 30.0, np.nan]),
        "colour": np.array(["red", "blue", None, 7], dtype=object),
    }
    state = fit_preprocessor(SPEC, cols)
    assert state.categorical == (("colour", ("7", "blue", "red")),)
    x = state.transform(cols)
    assert x.shape == (4, 4) and x.dtype == torch.float32
    # Missing numeric -> the mean (0 after scaling); None -> no category; 7 -> "7".
    assert x[3, 0] == 0.0
    assert x[:, 1:].tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]]
    unseen = state.transform({"age": np.array([20.0]), "colour": np.array(["green"], dtype=object)})
    assert unseen[0, 1:].sum() == 0


def test_removed_feature_emits_zeros_whatever_its_value() -> None:
    cols = {"age": np.array([1.0, 2.0]), "colour": np.array(["red", "blue"], dtype=object)}
    state = fit_preprocessor(SPEC, cols).with_removed("colour")
    a = state.transform(cols)
    b = state.transform({**cols, "colour": np.array(["blue", "red"], dtype=object)})
    assert torch.equal(a, b) and a[:, 1:].abs().sum() == 0
    assert PreprocessorState.from_dict(state.to_dict()) == state


def test_quantised_statistics_survive_a_small_removal() -> None:
    rng = np.random.default_rng(0)
    age = rng.normal(40, 12, size=2000)
    colour = rng.choice(["red", "blue", "green"], size=2000).astype(object)
    full = fit_preprocessor(SPEC, {"age": age, "colour": colour})
    fewer = fit_preprocessor(SPEC, {"age": age[5:], "colour": colour[5:]})
    assert full.digest() == fewer.digest()  # so SISA keeps the earlier checkpoints
    # A category only the removed rows had disappears from the vocabulary.
    colour[:3] = "violet"
    with_violet = fit_preprocessor(SPEC, {"age": age, "colour": colour})
    without = fit_preprocessor(SPEC, {"age": age[3:], "colour": colour[3:]})
    assert "violet" in dict(with_violet.categorical)["colour"]
    assert "violet" not in dict(without.categorical)["colour"]
