"""Architecture plugins in the engine: SISA is bit-exact with a plugin network, approximate
strategies and feature removal run through the plugin's interface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml import plugins
from app.ml.architectures import build_model, input_layer
from app.ml.config import ArchitectureConfig, SisaConfig
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_shard, train_sisa, unlearn_sisa
from tests.ml.test_sisa import SPEC, TRAIN, make_data, store_at

CPU = torch.device("cpu")
RESMLP = ArchitectureConfig(kind="example-resmlp", params={"width": 8, "blocks": 1})
SISA = SisaConfig(shards=3, slices=3, sharding="subject")


def test_the_example_plugins_are_installed_as_entry_points() -> None:
    assert {"example-resmlp", "example-linear", "example-bilinear"} <= set(plugins.installed())


def test_a_plugin_config_round_trips_with_its_params() -> None:
    d = RESMLP.to_dict()
    assert d == {"kind": "example-resmlp", "width": 8, "blocks": 1}
    assert ArchitectureConfig.from_dict(d) == RESMLP
    # Built-ins keep the dict every existing checkpoint key was hashed from.
    assert ArchitectureConfig(kind="mlp", hidden=(8,)).to_dict() == {"kind": "mlp", "hidden": [8]}


def test_plugin_capabilities_are_found_from_the_module() -> None:
    res = plugins.check_plugin("example-resmlp", 5, 2, {"width": 4})
    assert res.input_layer and not res.linear
    lin = plugins.check_plugin("example-linear", 5, 2, {})
    assert lin.linear and lin.input_layer is False
    bil = plugins.check_plugin("example-bilinear", 5, 3, {})
    assert not bil.linear and not bil.input_layer
    model = build_model(RESMLP, 5, 2)
    assert input_layer(model).in_features == 5
    with pytest.raises(TypeError):
        input_layer(build_model(ArchitectureConfig(kind="example-bilinear"), 5, 2))


def test_unknown_and_broken_plugins_name_the_plugin_and_the_error() -> None:
    with pytest.raises(plugins.PluginError, match="no architecture plugin named 'nope'"):
        plugins.check_plugin("nope", 4, 2, {})
    with pytest.raises(plugins.PluginError, match=r"example-resmlp.*unknown parameters"):
        plugins.check_plugin("example-resmlp", 4, 2, {"depth": 3})


def test_sisa_with_a_plugin_unlearns_bit_exactly(tmp_path: Path) -> None:
    data = make_data(n_subjects=60, seed=4)
    store = store_at(tmp_path / "ckpt")
    shard_of = assign_shards(data, SISA, seed=1)
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    common = {"feature_spec": SPEC, "arch": RESMLP, "training": TRAIN, "sisa": SISA}
    manifest = train_sisa(
        data, shard_of, slice_of, n_classes=2, model_key="p1", store=store, device=CPU, **common
    )
    ids = data.record_ids[data.subjects == data.subjects[3]]
    retained = data.without(ids)
    new, stats = unlearn_sisa(
        manifest,
        retained,
        assign_shards(retained, SISA, seed=1),
        assign_slices(retained.record_ids, SISA.slices, seed=1),
        ids,
        store=store,
        device=CPU,
    )
    assert len(stats.affected_shards) == 1
    shard = stats.affected_shards[0]
    scratch = store_at(tmp_path / "scratch")
    rows = np.flatnonzero(assign_shards(retained, SISA, seed=1) == shard)
    res = train_shard(
        retained.take(rows),
        assign_slices(retained.record_ids[rows], SISA.slices, seed=1),
        shard=shard,
        n_classes=2,
        model_key="p1",
        store=scratch,
        device=CPU,
        **common,
    )
    assert res.final_key == new.entry(shard).final_key
    assert store.read_bytes(res.final_key) == scratch.read_bytes(res.final_key)
    ens = SisaEnsemble.load(new, store, CPU)
    assert ens.predict_proba(retained.columns).shape == (len(retained), 2)


def _mono(tmp_path: Path, arch: ArchitectureConfig) -> tuple[object, object, object]:
    from app.ml.checkpoints import FsspecCheckpointStore

    data = make_data(n_subjects=60, seed=5)
    store = FsspecCheckpointStore.local(str(tmp_path / arch.kind))
    one = SisaConfig(shards=1, slices=1, sharding="random")
    manifest = train_sisa(
        data,
        np.zeros(len(data), dtype=np.int64),
        np.zeros(len(data), dtype=np.int64),
        feature_spec=SPEC,
        arch=arch,
        training=TRAIN,
        sisa=one,
        n_classes=2,
        model_key="pf",
        store=store,
        device=CPU,
    )
    return manifest, data, store


def test_feature_removal_goes_through_the_plugins_input_layer(tmp_path: Path) -> None:
    from app.pipeline.methods import feature_unlearn, load_module
    from app.pipeline.spec import UnlearningConfig

    manifest, data, store = _mono(tmp_path, RESMLP)
    u = UnlearningConfig(mode="monolithic")
    new, info = feature_unlearn(
        manifest,
        data,
        "colour",
        u=u,
        job_id="j1",
        store=store,
        device=CPU,  # type: ignore[arg-type]
    )
    assert info["method"] == "feature_repair"
    model, prep = load_module(new, store, CPU)  # type: ignore[arg-type]
    cols = prep.feature_columns("colour")
    assert bool((input_layer(model).weight[:, cols] == 0).all())
    # The model is blind to the column: any colour scores the same.
    a = dict(data.columns)
    b = dict(a, colour=np.array(["red"] * len(data), dtype=object))
    with torch.no_grad():
        assert torch.equal(model(prep.transform(a)), model(prep.transform(b)))

    # A plugin without an input layer cannot be repaired: the job falls back to retraining.
    manifest, data, store = _mono(tmp_path, ArchitectureConfig(kind="example-bilinear"))
    with pytest.raises(TypeError, match="no input layer"):
        feature_unlearn(manifest, data, "colour", u=u, job_id="j2", store=store, device=CPU)  # type: ignore[arg-type]


def test_a_plugin_that_fails_to_load_is_named_with_its_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real installed distribution (dist-info on sys.path) whose entry points are broken.
    info = tmp_path / "broken_arch-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-arch\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[palimpsest.architectures]\n"
        "broken-import = no_such_module_anywhere:build\n"
        "broken-object = json:dumps\n"
        "broken-output = torch.nn:Identity\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plugins.refresh()
    try:
        assert {"broken-import", "broken-object"} <= set(plugins.installed())
        with pytest.raises(plugins.PluginError, match=r"'broken-import'.*ModuleNotFoundError"):
            plugins.check_plugin("broken-import", 4, 2, {})
        with pytest.raises(plugins.PluginError, match=r"'broken-object' raised TypeError"):
            plugins.check_plugin("broken-object", 4, 2, {})
        with pytest.raises(plugins.PluginError, match="'broken-output'"):
            plugins.check_plugin("broken-output", 4, 2, {})
    finally:
        monkeypatch.undo()
        plugins.refresh()
