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


def test_string_fast_path_matches_cell_by_cell_normalisation() -> None:
    """Codes and vocabularies from all-string columns (mapped in C) equal those of the
    same columns with one non-string cell (normalised cell by cell)."""
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(40)] + [""], dtype=object)
    strings = rng.choice(words, size=500)
    mixed = strings.copy()
    mixed[7] = np.str_(str(mixed[7]))  # a str subclass takes the general path
    spec = FeatureSpec(categorical=("c",))
    fast, slow = fit_preprocessor(spec, {"c": strings}), fit_preprocessor(spec, {"c": mixed})
    assert fast == slow and "" not in dict(fast.categorical)["c"]
    assert torch.equal(fast.transform({"c": strings}), slow.transform({"c": mixed}))
    # 1, 1.0 and True are one set element but three categories.
    odd = fit_preprocessor(spec, {"c": np.array([1, 1.0, True, None, "x"], dtype=object)})
    assert dict(odd.categorical)["c"] == ("1", "1.0", "True", "x")


def test_one_hot_positions_are_reused_only_for_the_same_array_and_vocabulary() -> None:
    from app.ml import preprocess

    values = np.array(["a", "b", "z", "a"], dtype=object)
    first = preprocess._one_hot(values, ("a", "b"), 4)
    again = preprocess._one_hot(values, ("a", "b"), 4)
    assert again[0] is first[0]  # the same array and vocabulary: not coded again
    assert first[0].tolist() == [0, 1, 3] and first[1].tolist() == [0, 1, 0]
    # Another vocabulary, or an equal array that is another object, is coded afresh.
    other = preprocess._one_hot(values, ("b", "z"), 4)
    assert other[0].tolist() == [1, 2] and other[1].tolist() == [0, 1]
    copy = values.copy()
    fresh = preprocess._one_hot(copy, ("a", "b"), 4)
    assert fresh[0] is not first[0] and fresh[0].tolist() == first[0].tolist()
