"""Replica placement: CPU replicas split the cores, GPU sets per listed GPU, ORT spinning off by default."""

from __future__ import annotations

import pytest

from tensorwire.repository import parse_model_config
from tensorwire.server.backends import Placement
from tensorwire.server.errors import ModelLoadError
from tensorwire.server.model_version import placements_for


def config(**fields):
    return parse_model_config({"backend": "onnxruntime", **fields})


def test_cpu_replicas_split_the_cores_and_do_not_spin_by_default():
    placements = placements_for(config(instance_group=[{"kind": "cpu", "count": 2}]), cores=4, gpus=0)
    assert placements == [Placement("cpu", 2, False), Placement("cpu", 2, False)]


def test_threads_and_spin_wait_are_taken_from_the_config():
    group = {"kind": "cpu", "count": 1, "threads": 3, "spin_wait": True}
    assert placements_for(config(instance_group=[group]), cores=2, gpus=0) == [Placement("cpu", 3, True)]


def test_auto_is_cpu_without_gpus_and_one_set_per_gpu_with_them():
    assert placements_for(config(), cores=2, gpus=0) == [Placement("cpu", 2, False)]
    group = {"kind": "gpu", "count": 2}
    devices = [p.device for p in placements_for(config(instance_group=[group]), cores=2, gpus=2)]
    assert devices == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_asking_for_a_gpu_that_is_not_there_is_a_load_error():
    with pytest.raises(ModelLoadError, match="GPUs"):
        placements_for(config(instance_group=[{"kind": "gpu", "gpus": [1]}]), cores=2, gpus=1)
