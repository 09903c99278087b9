"""Tree ensembles as SISA shard models: `architecture.kind` "gbdt" and "random_forest".

scikit-learn's HistGradientBoostingClassifier and RandomForestClassifier, wrapped in an
`nn.Module` so that a tree model is stored, versioned, served, verified and purged like
any network: `forward` maps preprocessed inputs to logits (log-odds, or log-probabilities
for several classes) and the state is the estimator serialised with skops (a secure
format: nothing is unpickled; loading refuses any type outside scikit-learn and NumPy),
held as a uint8 tensor in the same safetensors checkpoint as every other model's weights.

Trees do not train by gradient steps, so they do not continue from a checkpoint: a tree
shard model has one slice, is fitted once with a seed derived from (model, shard), and is
unlearned exactly by fitting its shard again on the retained records. Approximate methods
do not apply to them (a monolithic tree model falls back to retraining).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

TREE_KINDS: tuple[str, ...] = ("gbdt", "random_forest")

# Keys of the architecture body each kind accepts, with their defaults. Fixed defaults
# (rather than scikit-learn's, which change between releases) keep a stored model's
# meaning stable; `early_stopping` is off because its validation split would train the
# model on fewer rows than the shard holds.
GBDT_DEFAULTS: dict[str, Any] = {
    "max_iter": 100,
    "learning_rate": 0.1,
    "max_leaf_nodes": 31,
    "max_depth": None,
    "min_samples_leaf": 20,
    "l2_regularization": 0.0,
    "max_bins": 255,
}
FOREST_DEFAULTS: dict[str, Any] = {
    "n_estimators": 100,
    "max_depth": None,
    "min_samples_leaf": 1,
    "max_features": "sqrt",
    "bootstrap": True,
}
DEFAULTS: dict[str, dict[str, Any]] = {"gbdt": GBDT_DEFAULTS, "random_forest": FOREST_DEFAULTS}
_EPS = 1e-7


def is_tree(kind: str) -> bool:
    return kind in TREE_KINDS


def tree_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The estimator's keyword arguments: defaults overridden by `params` (ValueError on
    an unknown key or a value scikit-learn refuses)."""
    defaults = DEFAULTS[kind]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} parameters {unknown}; known: {sorted(defaults)}")
    return {**defaults, **params}


def _estimator(kind: str, params: dict[str, Any], seed: int) -> Any:
    if kind == "gbdt":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(
            **params, early_stopping=False, random_state=seed % 2**32
        )
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(**params, n_jobs=1, random_state=seed % 2**32)


def validate(kind: str, params: dict[str, Any]) -> None:
    """Fit the configured estimator on a tiny problem: scikit-learn's own parameter
    validation, so a bad value is refused at model creation instead of in a job."""
    merged = tree_params(kind, params)
    _estimator(kind, merged, 0)._validate_params()  # scikit-learn's own constraints
    x = np.array([[0.0], [1.0], [0.0], [1.0]] * 5, dtype=np.float32)
    y = np.array([0, 1, 0, 1] * 5)
    est = _estimator(kind, {**merged, **_small(kind)}, 0)
    est.fit(x, y)


def _small(kind: str) -> dict[str, Any]:
    return {"max_iter": 2} if kind == "gbdt" else {"n_estimators": 2}


class _Constant:
    """A shard that holds one class only: that class with certainty."""

    def __init__(self, label: int) -> None:
        self.label = label


def _trusted_loads(blob: bytes) -> Any:
    import skops.io as sio

    untrusted = sio.get_untrusted_types(data=blob)
    bad = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
    if bad:
        raise ValueError(f"a tree checkpoint holds types outside scikit-learn: {bad}")
    return sio.loads(blob, trusted=untrusted)


class TreeEnsemble(nn.Module):
    """A scikit-learn tree ensemble behind the network interface: x (N, d) -> logits.

    `anchor` is an empty parameter so that code asking a model for its device gets one;
    the estimator lives in the `skops` buffer (its serialised bytes).
    """

    def __init__(
        self, kind: str, n_inputs: int, n_classes: int, params: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if not is_tree(kind):
            raise ValueError(f"not a tree kind: {kind!r}")
        self.kind = kind
        self.n_inputs = n_inputs
        self.n_classes = n_classes
        self.params = tree_params(kind, dict(params or {}))
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        self.skops: torch.Tensor
        self.register_buffer("skops", torch.zeros(0, dtype=torch.uint8))
        self.estimator: Any = None

    def fit_tree(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        seed: int,
        sample_weight: torch.Tensor | None = None,
    ) -> TreeEnsemble:
        """Fit from scratch on (x, y) with `seed` (deterministic: same data, same bytes)."""
        import skops.io as sio

        xs = x.detach().cpu().numpy().astype(np.float32)
        ys = y.detach().cpu().numpy().astype(np.int64)
        classes = np.unique(ys)
        if len(classes) < 2:
            est: Any = {"constant": int(classes[0]) if len(classes) else 0}
        else:
            est = _estimator(self.kind, self.params, seed)
            w = None if sample_weight is None else sample_weight.detach().cpu().numpy()
            est.fit(xs, ys, sample_weight=w)
        blob = sio.dumps(est)
        self.skops = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
        self.estimator = est
        return self

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        blob = state_dict["skops"]
        self.skops = blob.detach().to("cpu", torch.uint8).contiguous().clone()
        self.estimator = _trusted_loads(bytes(self.skops.numpy().tobytes())) if len(blob) else None
        return nn.modules.module._IncompatibleKeys([], [])

    def proba(self, x: torch.Tensor) -> np.ndarray:
        """Class probabilities (N, n_classes) over every class of the model, float64."""
        n = x.shape[0]
        out = np.zeros((n, self.n_classes), dtype=np.float64)
        est = self.estimator
        if est is None:
            raise RuntimeError("the tree model has not been fitted")
        if isinstance(est, dict):
            out[:, int(est["constant"])] = 1.0
            return out
        p = est.predict_proba(x.detach().cpu().numpy().astype(np.float32))
        out[:, np.asarray(est.classes_, dtype=np.int64)] = p
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = np.clip(self.proba(x), _EPS, 1.0 - _EPS)
        # Two classes: the log-odds (one logit); more: log-probabilities (softmax-exact).
        logits = np.log(p[:, 1:2]) - np.log(p[:, 0:1]) if self.n_classes == 2 else np.log(p)
        return torch.from_numpy(logits.astype(np.float32)).to(x.device)
