"""The operator's connections to the API server are blackholed: a TCP proxy the test controls
stops forwarding without closing anything, as a node, NAT or load balancer that forgets a
connection does. After the path heals, old connections stay dead (as such connections do) and
new ones work. A spec change made meanwhile is reconciled within a bound: no watch and no API
call waits forever on a dead connection (settings.api_timeouts, here shortened)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import Cluster, run_kopf_as, wait_until
from tests.cluster.operator_identity import operator_identity
from tests.reliability.blackhole import BlackholeProxy, through, upstream

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
# After the heal: a dead watch is noticed within its inactivity bound, a dead call within the
# request bound, then kopf's retry (5 s) runs on a new connection.
CATCH_UP_SECONDS = 40


def _endpoint(name: str, max_model_len: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "engine": {"maxModelLen": max_model_len}},
    }


def _serves(cluster: Cluster, namespace: str, name: str, max_model_len: int) -> bool:
    rayservice = cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", name)
    return f"max_model_len: {max_model_len}" in rayservice["spec"]["serveConfigV2"]


def _observed_generation(cluster: Cluster, namespace: str, name: str) -> int | None:
    endpoint = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return (endpoint.get("status") or {}).get("observedGeneration")


def test_a_spec_change_made_while_the_api_server_was_blackholed_is_reconciled_after_the_heal(
    cluster, namespace, monkeypatch, tmp_path
):
    cluster.apply_crd(CRD)
    account, rbac = operator_identity(cluster.bin_dir, "op-blackhole", namespace, f"watchNamespaces={{{namespace}}}")
    cluster.apply(rbac)
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__REQUEST_SECONDS", "3")
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__CONNECT_SECONDS", "3")
    monkeypatch.setenv("LLMEP_API_TIMEOUTS__WATCH_INACTIVITY_SECONDS", "5")
    monkeypatch.setenv("LLMEP_DRIFT_CHECK_SECONDS", "2")  # the drift loop is on a pooled connection too
    proxy = BlackholeProxy(upstream(cluster))
    proxied = through(cluster, proxy, tmp_path / "kubeconfig")
    name = "steady"
    try:
        with run_kopf_as(proxied, account, namespace, paths=(HANDLERS,), watch_namespaces=(namespace,)) as runner:
            cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _endpoint(name, 4096))
            wait_until(lambda: _serves(cluster, namespace, name, 4096), timeout=60, message="the first RayService")
            proxy.blackhole()
            cluster.custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"spec": {"engine": {"maxModelLen": 2048}}}
            )
            # The outage lasts until the operator has sent a call into it (the drift loop, every 2 s):
            # a call on a pooled connection that will never answer.
            sent = proxy.discarded
            wait_until(lambda: proxy.discarded > sent, timeout=30, message="a call of the operator into the outage")
            assert _serves(cluster, namespace, name, 4096)  # nothing reached the operator meanwhile
            proxy.heal()
            healed = time.monotonic()
            wait_until(
                lambda: _serves(cluster, namespace, name, 2048) and _observed_generation(cluster, namespace, name) == 2,
                timeout=CATCH_UP_SECONDS,
                message=lambda: f"the change reconciled within {CATCH_UP_SECONDS}s of the heal; operator log:\n"
                f"{runner.output[-3000:]}",
            )
            caught_up = time.monotonic() - healed
        print(f"\nblackhole: reconciled {caught_up:.1f}s after the heal")  # after kopf's runner let go of stdout
    finally:
        proxy.close()
        for obj in rbac:
            if obj["kind"].startswith("Cluster"):
                with contextlib.suppress(Exception):
                    cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")
