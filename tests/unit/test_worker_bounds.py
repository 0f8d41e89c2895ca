"""The JSON patch that carries worker bounds from a RayService to its running RayCluster."""

from __future__ import annotations

import jsonpatch
import pytest

from llmep_operator.worker_bounds import bounds_patch, cluster_names, wanted_bounds


def _cluster(*groups: dict) -> dict:
    return {"spec": {"headGroupSpec": {}, "workerGroupSpecs": list(groups)}}


def _group(name: str, low: int, high: int, replicas: int) -> dict:
    return {"groupName": name, "minReplicas": low, "maxReplicas": high, "replicas": replicas}


def test_unchanged_bounds_need_no_patch():
    assert bounds_patch(_cluster(_group("workers", 1, 2, 1)), {"workers": (1, 2)}) == []


@pytest.mark.parametrize(
    ("before", "wanted", "after"),
    [
        ((1, 2, 1), (0, 2), (0, 2, 1)),  # scale to zero allowed: the autoscaler drops the idle worker
        ((1, 4, 4), (1, 2), (1, 2, 2)),  # a lower max clamps the running count
        ((0, 2, 0), (2, 3), (2, 3, 2)),  # a higher min raises it
    ],
)
def test_patch_sets_bounds_and_clamps_replicas(before, wanted, after):
    cluster = _cluster(_group("other", 5, 5, 5), _group("workers", *before))
    patched = jsonpatch.apply_patch(cluster, bounds_patch(cluster, {"workers": wanted}))
    group = patched["spec"]["workerGroupSpecs"][1]
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == after
    assert patched["spec"]["workerGroupSpecs"][0] == _group("other", 5, 5, 5)


def test_patch_is_guarded_by_the_group_name():
    cluster = _cluster(_group("workers", 1, 2, 1))
    ops = bounds_patch(cluster, {"workers": (0, 2)})
    cluster["spec"]["workerGroupSpecs"].insert(0, _group("added-meanwhile", 1, 1, 1))
    with pytest.raises(jsonpatch.JsonPatchTestFailed):
        jsonpatch.apply_patch(cluster, ops)


def test_wanted_bounds_and_cluster_names_come_from_the_rayservice():
    rayservice = {
        "spec": {"rayClusterConfig": {"workerGroupSpecs": [_group("workers", 0, 3, 0)]}},
        "status": {
            "activeServiceStatus": {"rayClusterName": "tiny-raycluster-a"},
            "pendingServiceStatus": {"rayClusterName": "tiny-raycluster-b"},
        },
    }
    assert wanted_bounds(rayservice) == {"workers": (0, 3)}
    assert cluster_names(rayservice) == ["tiny-raycluster-a", "tiny-raycluster-b"]
    assert cluster_names({"status": {"activeServiceStatus": {}}}) == []
