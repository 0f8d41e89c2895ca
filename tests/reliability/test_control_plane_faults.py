"""Control-plane faults: the kube-apiserver is restarted while LLMEndpoints are being created and
changed, with the operator running as the chart's ServiceAccount. Once the API server is back the
operator recovers on its own: every endpoint has exactly one RayService and one `<name>-serve`
Service, no child is left whose owner is gone, every endpoint's latest spec change is in its
RayService (no lost update: engine.maxModelLen in serveConfigV2), and
status.observedGeneration == metadata.generation.

Restarting the API server would disturb the other tests, so this module starts its own rig
(`hack/local-cluster up --name reliability-<random>`) and always takes it down.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest
import urllib3
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.cluster.conftest import LOCAL_CLUSTER, Cluster, _rig_bin_dir, run_kopf_as, wait_until
from tests.cluster.operator_identity import operator_identity

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)


@pytest.fixture(scope="module")
def own_rig():
    name = f"reliability-{secrets.token_hex(3)}"
    env = {k: v for k, v in os.environ.items() if k not in ("LLMEP_RIG_NAME", "KUBECONFIG")}
    try:
        up = subprocess.run(
            [str(LOCAL_CLUSTER), "up", "--name", name], env=env, capture_output=True, text=True, timeout=600
        )
        assert up.returncode == 0, f"rig up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}"
        exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M))
        yield Cluster(Path(exports["KUBECONFIG"]), name, _rig_bin_dir())
    finally:
        subprocess.run([str(LOCAL_CLUSTER), "down", "--name", name], env=env, capture_output=True, timeout=300)


def _endpoint(name: str, max_model_len: int) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct"}, "engine": {"maxModelLen": max_model_len}},
    }


class Writer:
    """Creates endpoints and changes their maxModelLen in a loop, through the API server's
    restart, recording the last change the API acknowledged for each endpoint."""

    def __init__(self, cluster: Cluster, namespace: str, names: list[str]) -> None:
        self.cluster, self.namespace, self.names = cluster, namespace, names
        self.acked: dict[str, int] = {}
        self.unsure: set[str] = set()  # a write whose answer was lost may or may not have landed
        self.writes = self.refused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _write(self, name: str, value: int) -> None:
        custom = self.cluster.custom
        self.writes += 1
        try:
            if name in self.acked or name in self.unsure:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, name, {"spec": {"engine": {"maxModelLen": value}}},
                    _request_timeout=5,
                )  # fmt: skip
            else:
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, PLURAL, _endpoint(name, value), _request_timeout=5
                )
            self.acked[name] = value
            self.unsure.discard(name)
        except ApiException as exc:
            self.refused += 1
            if exc.status == 409:  # created by a write whose answer was lost
                self.unsure.add(name)
            elif exc.status == 404 and name not in self.acked:  # that create never landed: create again
                self.unsure.discard(name)
        except API_ERRORS:
            self.refused += 1
            self.unsure.add(name)

    def _run(self) -> None:
        value = 2048
        while not self._stop.is_set():
            for name in self.names:
                value += 1
                self._write(name, value)
            self._stop.wait(0.3)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def test_operator_recovers_from_an_api_server_restart_without_lost_updates_or_orphans(own_rig, monkeypatch):
    cluster = own_rig
    cluster.apply_crd(CRD)
    namespace = f"faults-{secrets.token_hex(3)}"
    cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=namespace)))
    wait_until(lambda: cluster.core.read_namespaced_service_account("default", namespace), message="default SA")
    account, rbac = operator_identity(cluster.bin_dir, "faults", namespace, f"watchNamespaces={{{namespace}}}")
    cluster.apply(rbac)
    monkeypatch.setenv("LLMEP_DRIFT_CHECK_SECONDS", "5")
    names = [f"ep{i}" for i in range(8)]
    started = time.monotonic()
    with run_kopf_as(
        cluster, account, namespace, paths=(HANDLERS,), watch_namespaces=(namespace,), timeout=120
    ) as runner:
        with Writer(cluster, namespace, names[:4]) as writer:
            time.sleep(2)
            writer.names = names  # the other four are created while the API server restarts
            restart = subprocess.run(
                [str(LOCAL_CLUSTER), "restart", "kube-apiserver", "--name", cluster.rig_name],
                capture_output=True, text=True, timeout=240,
            )  # fmt: skip
            assert restart.returncode == 0, restart.stderr[-3000:]
            restarted = time.monotonic()
            wait_until(lambda: not writer.unsure and len(writer.acked) == len(names), timeout=60,
                       message=lambda: f"every write to land once the API is back; unsure {writer.unsure}")  # fmt: skip
            time.sleep(2)  # a few more changes with the API back
        # The truth is the spec the API holds; every acknowledged last change must be it.
        specs = {n: cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n) for n in names}
        for n in names:
            assert specs[n]["spec"]["engine"]["maxModelLen"] == writer.acked[n], n

        def converged() -> bool:
            for n in names:
                ep = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, n)
                rs = cluster.custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", n)
                if f"max_model_len: {writer.acked[n]}" not in rs["spec"]["serveConfigV2"]:
                    return False
                if (ep.get("status") or {}).get("observedGeneration") != ep["metadata"]["generation"]:
                    return False
            return True

        wait_until(converged, timeout=120, interval=1,
                   message="each RayService to carry the last maxModelLen, and observedGeneration")  # fmt: skip
        recovered = time.monotonic()
        uids = {ep["metadata"]["uid"] for ep in specs.values()}
        rayservices = cluster.custom.list_namespaced_custom_object("ray.io", "v1", namespace, "rayservices")["items"]
        services = cluster.core.list_namespaced_service(
            namespace, label_selector="app.kubernetes.io/managed-by=llmep-operator"
        ).items
        assert sorted(r["metadata"]["name"] for r in rayservices) == names
        assert sorted(s.metadata.name for s in services) == [f"{n}-serve" for n in names]
        orphans = [r["metadata"]["name"] for r in rayservices if r["metadata"]["ownerReferences"][0]["uid"] not in uids]
        orphans += [s.metadata.name for s in services if s.metadata.owner_references[0].uid not in uids]
        assert orphans == []
    assert runner.exception is None, runner.exception
    tracebacks = runner.output.count("Traceback")
    print(
        f"\ncontrol-plane faults: {len(names)} endpoints, {writer.writes} writes ({writer.refused} refused or lost "
        f"while the API server was down); API server restart took {restarted - started - 2:.0f}s; operator converged "
        f"{recovered - restarted:.0f}s after it was back; tracebacks in the operator's output: {tracebacks}"
    )
    assert tracebacks == 0, runner.output[-6000:]
    for obj in rbac:
        if obj["kind"].startswith("Cluster"):
            with contextlib.suppress(Exception):
                cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")
