"""The out-references each row is scored under: only references that never trained on
it, a fixed choice per record (the same on every run and in every job), spread evenly."""

from __future__ import annotations

import numpy as np

from app.verification.forgetting import _pick


def test_only_references_that_never_saw_the_row_are_picked_and_the_choice_is_fixed() -> None:
    rng = np.random.default_rng(0)
    k, n, k_use = 16, 3000, 6
    out = rng.random((k, n)) > 0.3
    out[:, :k_use] = True  # every row has at least k_use out-references
    for i in range(n):
        while out[:, i].sum() < k_use:
            out[rng.integers(k), i] = True
    ids = rng.permutation(10**6)[:n].astype(np.int64)
    chosen = _pick(out, ids, k_use)
    assert chosen.shape == (k_use, n)
    assert out[chosen, np.arange(n)[None, :]].all()
    assert all(len(set(chosen[:, i])) == k_use for i in range(n))  # distinct per row
    # The same record gets the same references whatever rows it comes with.
    again = _pick(out[:, ::-1][:, ::-1], ids, k_use)
    assert np.array_equal(chosen, again)
    sub = _pick(out[:, 100:200], ids[100:200], k_use)
    assert np.array_equal(sub, chosen[:, 100:200])
    # Spread: with every reference available, each is picked about k_use/k of the time.
    full = _pick(np.ones((k, n), dtype=bool), ids, k_use)
    share = np.bincount(full.ravel(), minlength=k) / (n * k_use)
    assert np.allclose(share, 1 / k, atol=0.02), share
