"""The worker's ModelCache: models kept between jobs, least recently used unloaded first when
`[node] model_memory_gb` is exceeded. Three "models" are three single folds of the demo model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import load_config
from dicomnode.pipeline.model_cache import ModelCache

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "demo-petct"


def _config(tmp_path: Path, memory_gb: float | None):
    node = "" if memory_gb is None else f"model_memory_gb = {memory_gb}"
    models = "".join(f"""
[[models]]
name = "{name}"
path = "{MODEL_DIR}"
folds = [{fold}]
device = "cpu"
use_mirroring = false
""" for fold, name in enumerate("abc"))
    path = tmp_path / "config.toml"
    path.write_text(f"[node]\ndata_dir = \"var\"\n{node}\n{models}")
    return load_config(path)


@pytest.fixture(scope="module")
def one_model_bytes() -> int:
    from inference import SegmentationModel

    return SegmentationModel(MODEL_DIR, folds=(0,), device="cpu").memory_bytes()


def test_memory_is_estimated_on_cpu_and_freed_by_unload(one_model_bytes):
    from inference import SegmentationModel

    model = SegmentationModel(MODEL_DIR, folds=(0, 1), device="cpu")
    assert model.footprint.basis == "estimated"
    weights = sum(p.numel() * 4 for p in model._predictor.network.parameters())
    assert model.memory_bytes() > weights + model.footprint.estimated_working_bytes
    assert model.memory_bytes() > one_model_bytes  # two folds' weights held, not one
    model.unload()
    assert not model.loaded
    with pytest.raises(RuntimeError, match="unloaded"):
        model.predict(np.zeros((2, 8, 8, 8), np.float32), (3.0, 4.0, 4.0))


def test_least_recently_used_model_is_unloaded_first(tmp_path, caplog, one_model_bytes):
    cache = ModelCache(_config(tmp_path, memory_gb=2.5 * one_model_bytes / 1e9))  # two fit, not three
    caplog.set_level(logging.INFO, logger="dicomnode.worker")
    a, b = cache.get("a"), cache.get("b")
    assert cache.get("a") is a  # a is now the most recently used
    c = cache.get("c")
    assert cache.loaded() == ["a", "c"]
    assert not b.loaded and a.loaded and c.loaded
    assert cache.memory_bytes() <= cache.budget_bytes
    cache.get("b")  # back again: loaded anew, and a (least recently used) goes
    assert cache.loaded() == ["c", "b"]
    loads = [r.getMessage().split()[1] for r in caplog.records if " loaded in " in r.getMessage()]
    unloads = [r.getMessage().split()[1] for r in caplog.records if " unloaded " in r.getMessage()]
    assert (loads, unloads) == (["a", "b", "c", "b"], ["b", "a"])


def test_models_are_reused_between_jobs_without_reloading(tmp_path, caplog):
    from inference.check import dry_run

    cache = ModelCache(_config(tmp_path, memory_gb=None))
    caplog.set_level(logging.INFO, logger="dicomnode.worker")
    first = cache.get("a")
    for name in ("b", "c", "a", "b"):  # one job each
        cache.get(name)
    assert cache.loaded() == ["c", "a", "b"] and cache.get("a") is first
    assert dry_run(first, shape=(16, 24, 24)).shape == (16, 24, 24)  # still usable
    assert [r.getMessage().split()[1] for r in caplog.records if " loaded in " in r.getMessage()] == ["a", "b", "c"]
    assert not [r for r in caplog.records if " unloaded " in r.getMessage()]


def test_placement_worker_device_overrides_auto_and_cuda():
    from dicomnode.pipeline.model_cache import place

    assert place("auto", "cuda:1") == "cuda:1"
    assert place("cuda", "cuda:1") == "cuda:1"
    assert place("auto", "cpu") == "cpu"
    assert place("cpu", "cuda:1") == "cpu"  # a model kept on the CPU stays there
    assert place("cuda:0", "cuda:1") == "cuda:0"  # a model pinned to a GPU stays there
    assert place("auto", None, 1) == "auto"  # no GPU here: [node] workers share the model's own device


def test_worker_cache_places_models_on_its_device_and_spreads_fold_parallel_ones(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(f"""[node]\ndata_dir = "var"\n
[[models]]\nname = "fast"\npath = "{MODEL_DIR}"\nfolds = [0, 1, 2]\ndevice = "auto"\nuse_mirroring = false
fold_parallel = true
[[models]]\nname = "plain"\npath = "{MODEL_DIR}"\nfolds = [0]\nuse_mirroring = false
[[workers]]\ndevice = "cpu"\n[[workers]]\ndevice = "cpu"\n""")
    config = load_config(path)
    cache = ModelCache(config, device="cpu", worker_index=1)
    assert cache.placement("fast") == cache.placement("plain") == "cpu"
    fast = cache.get("fast")
    assert (fast.device, fast.fold_devices) == ("cpu", ("cpu", "cpu"))
    assert [r.folds for r in fast._replicas] == [(0, 2), (1,)]
    plain = cache.get("plain")
    assert (plain.device, plain.fold_devices) == ("cpu", ())
    assert cache.budget_bytes is None  # the CPU: no budget unless model_memory_gb says one
