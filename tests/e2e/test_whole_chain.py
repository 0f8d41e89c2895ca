"""The whole chain on kind, through public interfaces only: `kubectl apply` of an LLMEndpoint whose
weights are on a PVC → the operator in its pod → KubeRay → a Ray head and a vLLM worker from the
serving image → `Ready=True` → answers through the gateway's Service to the official openai SDK,
with keys made by the `llmep` CLI."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
from pytest_kind import KindCluster

from tests.e2e.kind import llmep_cli, ready_condition, wait_for
from tests.helm import helm

pytestmark = [pytest.mark.timeout(3600)]

APP_NAMESPACE = "default"


@pytest.fixture(scope="module")
def ready_endpoint(kind_cluster: KindCluster, tiny_endpoint: str) -> dict:
    t0 = time.monotonic()
    kind_cluster.kubectl(
        "wait", "-n", APP_NAMESPACE, "--for=condition=Ready", f"llmendpoint/{tiny_endpoint}", "--timeout=1500s"
    )
    print(f"\n[e2e] {tiny_endpoint} Ready after {time.monotonic() - t0:.0f}s (kubectl wait)")
    return json.loads(kind_cluster.kubectl("get", "llmendpoint", tiny_endpoint, "-n", APP_NAMESPACE, "-o", "json"))


@pytest.fixture(scope="module")
def api_key(kind_cluster: KindCluster, llmep_release: str) -> str:
    made = llmep_cli(kind_cluster, "keys", "create", "e2e-all", "-n", llmep_release)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def test_operator_in_its_pod_makes_the_endpoint_ready(kind_cluster: KindCluster, ready_endpoint: dict):
    status = ready_endpoint["status"]
    assert status["url"] == f"http://tiny-serve.{APP_NAMESPACE}.svc:8000/v1"
    assert status["replicas"]["ready"] >= 1, status
    assert status["observedGeneration"] == ready_endpoint["metadata"]["generation"]
    table = kind_cluster.kubectl("get", "llmep", "-n", APP_NAMESPACE)
    row = next(line for line in table.splitlines() if line.startswith("tiny "))
    assert "True" in row.split(), table
    shown = llmep_cli(kind_cluster, "status", "-n", APP_NAMESPACE, "--exit-code")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "tiny" in shown.stdout


def test_the_ray_pods_serve_through_haproxy(kind_cluster: KindCluster, ready_endpoint: dict):
    """The direct path as rendered: in both Ray pods HAProxy, configured by Serve, runs the HTTP
    frontend (port 8000, which KubeRay's probes and the serve Service use), and the worker's has
    the LLMServer replica as an UP server, which it forwards requests to directly."""
    pods = json.loads(
        kind_cluster.kubectl("get", "pods", "-n", APP_NAMESPACE, "-l", "llmep.io/endpoint=tiny", "-o", "json")
    )["items"]
    by_kind = {p["metadata"]["labels"].get("ray.io/node-type"): p["metadata"]["name"] for p in pods}
    assert sorted(by_kind) == ["head", "worker"], by_kind
    stats = {
        kind: kind_cluster.kubectl("exec", "-n", APP_NAMESPACE, name, "--", "wget", "-qO-", "http://localhost:8404/stats;csv")
        for kind, name in by_kind.items()
    }
    for kind, csv in stats.items():
        assert "\nhttp_frontend,FRONTEND," in csv, f"{kind}: {csv[:1500]}"
    replicas = [line.split(",") for line in stats["worker"].splitlines() if "LLMServer" in line]
    assert replicas and all(fields[17] == "UP" for fields in replicas), stats["worker"][:3000]


def test_openai_sdk_through_the_gateway(ready_endpoint: dict, gateway_url: str, api_key: str):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=gateway_url, api_key=api_key, timeout=120, max_retries=0)
    assert {"tiny", "chat-default"} <= {m.id for m in client.models.list().data}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16, temperature=0
    )
    print(f"\n[e2e] tiny says: {chat.choices[0].message.content!r}")
    assert chat.choices[0].message.content.strip()
    alias = client.chat.completions.create(
        model="chat-default", messages=[{"role": "user", "content": "What is llmep?"}], max_tokens=8
    )
    assert alias.choices[0].message.content.strip()
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and chunks[-1].usage and chunks[-1].usage.completion_tokens > 0
    completion = client.completions.create(model="tiny", prompt="Kubernetes runs", max_tokens=8)
    assert completion.choices[0].text

    no_key = httpx.get(f"{gateway_url}/models", timeout=30)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key", no_key.text
    wrong = OpenAI(base_url=gateway_url, api_key="sk-not-a-key", timeout=30, max_retries=0)
    with pytest.raises(openai.AuthenticationError) as wrong_key:
        wrong.models.list()
    assert wrong_key.value.body["code"] == "invalid_api_key", wrong_key.value.body
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert unknown.value.body["code"] == "model_not_found", unknown.value.body
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1000)
    engine_says = too_long.value.body["message"]
    print(f"[e2e] over the context: {engine_says!r}")
    assert "max_tokens=1000" in engine_says and "max_model_len" in engine_says, too_long.value.body
    assert not any(word in engine_says for word in ("Internal exception", "Request ID", "ray.llm")), engine_says
    assert too_long.value.body["type"] == "invalid_request_error", too_long.value.body


def test_keys_from_the_cli_work_within_seconds_and_revoke_stops_them(
    kind_cluster: KindCluster, ready_endpoint: dict, gateway_url: str, llmep_release: str
):
    import openai
    from openai import OpenAI

    made = llmep_cli(kind_cluster, "keys", "create", "e2e-scoped", "-n", llmep_release, "--models", "tiny")
    assert made.returncode == 0, made.stderr
    client = OpenAI(base_url=gateway_url, api_key=made.stdout.strip(), timeout=60, max_retries=0)

    def models_of_the_new_key():
        try:
            return [m.id for m in client.models.list().data]
        except openai.AuthenticationError:
            return None

    t0 = time.monotonic()
    models = wait_for("the new key to be accepted", models_of_the_new_key, timeout=30, interval=0.5)
    print(f"\n[e2e] new key accepted after {time.monotonic() - t0:.1f}s")
    assert "tiny" in models, models
    made_other = llmep_cli(kind_cluster, "keys", "create", "e2e-other", "-n", llmep_release, "--models", "other")
    other = OpenAI(base_url=gateway_url, api_key=made_other.stdout.strip(), timeout=60, max_retries=0)

    def other_scope_refused():
        try:
            other.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        except openai.NotFoundError:
            return True
        except openai.AuthenticationError:
            return False  # the gateway has not loaded the key yet
        raise AssertionError("a key scoped to another model reached tiny")

    wait_for("a key scoped to another model to get 404 for tiny", other_scope_refused, timeout=30, interval=0.5)
    revoked = llmep_cli(kind_cluster, "keys", "revoke", "e2e-scoped", "-n", llmep_release)
    assert revoked.returncode == 0, revoked.stderr

    def revoked_key_refused():
        try:
            client.models.list()
        except openai.AuthenticationError:
            return True
        return False

    t0 = time.monotonic()
    wait_for("the revoked key to be refused", revoked_key_refused, timeout=30, interval=0.5)
    print(f"[e2e] revoked key refused after {time.monotonic() - t0:.1f}s")


class RequestLoop:
    """Non-streaming chat requests one after another through the gateway, counting outcomes."""

    def __init__(self, base_url: str, api_key: str):
        from openai import OpenAI

        # The SDK's default retries only (2, on connection errors and 5xx), as an application has.
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=120)
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.client.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=4
                )
                assert reply.choices[0].message.content is not None
                self.ok += 1
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                self.failed.append(f"{type(error).__name__}: {error}"[:300])

    def __enter__(self) -> RequestLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=180)


def accepts_a_prompt_of(client, tokens: int) -> bool:
    """Whether the serving engine takes a prompt of `tokens` token ids (its max_model_len allows it)."""
    import openai

    try:
        client.completions.create(model="tiny", prompt=[5] * tokens, max_tokens=1)
    except openai.BadRequestError:
        return False
    except (openai.APIStatusError, openai.APIConnectionError):
        pass  # the probe only watches the config; the request loop counts failures
    return True


def test_a_spec_change_rolls_out_while_requests_keep_succeeding(
    kind_cluster: KindCluster, ready_endpoint: dict, gateway_url: str, api_key: str
):
    from openai import OpenAI

    probe = OpenAI(base_url=gateway_url, api_key=api_key, timeout=120, max_retries=0)
    assert accepts_a_prompt_of(probe, 220), "a 220-token prompt must fit maxModelLen 256 before the change"
    with RequestLoop(gateway_url, api_key) as load:
        wait_for_count(load, 3)
        before = load.ok
        patch = '{"spec": {"engine": {"maxModelLen": 192}}}'
        kind_cluster.kubectl("patch", "llmendpoint", "tiny", "-n", APP_NAMESPACE, "--type=merge", "-p", patch)
        t0 = time.monotonic()

        def rolled_out():
            assert len(load.failed) < 20, load.failed[:5]
            # The new engine config is live once the engine refuses what only the old one took.
            return not accepts_a_prompt_of(probe, 220)

        wait_for("the engine to refuse a 220-token prompt (maxModelLen 192 live)", rolled_out, timeout=900)
        rolled = time.monotonic() - t0
        wait_for_count(load, load.ok + 3)
    print(
        f"\n[e2e] rollout of maxModelLen 256 -> 192 took {rolled:.0f}s: {load.ok} requests ok "
        f"({load.ok - before} during and after the change), {len(load.failed)} failed"
    )
    assert load.failed == [], load.failed[:5]
    assert ready_condition(kind_cluster, "tiny").get("status") == "True"


def wait_for_count(load: RequestLoop, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while load.ok < count:
        assert time.monotonic() < deadline, f"only {load.ok} requests answered; failures: {load.failed[:3]}"
        assert len(load.failed) < 20, load.failed[:5]
        time.sleep(0.2)


def running_pods(cluster: KindCluster, namespace: str, selector: str) -> list[str]:
    """Names of the pods that match `selector` and are not terminating."""
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json"))["items"]
    return sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp"))


def test_operator_and_gateway_pods_deleted_under_load(
    kind_cluster: KindCluster, ready_endpoint: dict, gateway_url: str, api_key: str, llmep_release: str
):
    replaced = []
    with RequestLoop(gateway_url, api_key) as load:
        wait_for_count(load, 3)
        for component in ("operator", "gateway", "gateway"):
            victim = running_pods(kind_cluster, llmep_release, f"app.kubernetes.io/component={component}")[0]
            kind_cluster.kubectl("delete", "pod", victim, "-n", llmep_release, "--wait=true", "--timeout=180s")
            kind_cluster.kubectl(
                "rollout", "status", f"deployment/llmep-{component}", "-n", llmep_release, "--timeout=300s"
            )
            replaced.append(victim)
            wait_for_count(load, load.ok + 3)
    print(f"\n[e2e] deleted {', '.join(replaced)} under load: {load.ok} requests ok, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    assert ready_condition(kind_cluster, "tiny").get("status") == "True"


def test_scaled_to_zero_a_request_is_held_and_answered(
    kind_cluster: KindCluster, ready_endpoint: dict, gateway_url: str, api_key: str
):
    from openai import OpenAI

    workers = "llmep.io/endpoint=tiny,ray.io/node-type=worker"
    patch = '{"spec": {"autoscaling": {"minReplicas": 0, "scaleDownDelaySeconds": 10}}}'
    kind_cluster.kubectl("patch", "llmendpoint", "tiny", "-n", APP_NAMESPACE, "--type=merge", "-p", patch)
    t0 = time.monotonic()

    def scaled_to_zero():
        ready = ready_condition(kind_cluster, "tiny")
        idle = ready.get("reason") == "ScaledToZero" and not running_pods(kind_cluster, APP_NAMESPACE, workers)
        return ready if idle else None

    ready = wait_for("Ready reason ScaledToZero and no worker pod", scaled_to_zero, timeout=900, interval=3)
    print(f"\n[e2e] scaled to zero {time.monotonic() - t0:.0f}s after minReplicas 0: {ready['message']}")
    assert ready["status"] == "True"
    client = OpenAI(base_url=gateway_url, api_key=api_key, timeout=900, max_retries=0)
    t1 = time.monotonic()
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    cold_start = time.monotonic() - t1
    answer = reply.choices[0].message.content
    print(f"[e2e] cold start: the held request was answered after {cold_start:.0f}s: {answer!r}")
    assert answer.strip()
    assert running_pods(kind_cluster, APP_NAMESPACE, workers), "the answer came without a worker pod"


def test_deleting_the_endpoint_removes_every_child(kind_cluster: KindCluster, ready_endpoint: dict):
    kind_cluster.kubectl("delete", "llmendpoint", "tiny", "-n", APP_NAMESPACE, "--wait=true", "--timeout=300s")

    def leftovers():
        found = kind_cluster.kubectl(
            "get",
            "rayservices,rayclusters,services,pods,configmaps",
            "-n",
            APP_NAMESPACE,
            "-l",
            "llmep.io/endpoint=tiny",
            "-o",
            "name",
        ).split()
        return found or None

    deadline = time.monotonic() + 300
    while (left := leftovers()) is not None:
        assert time.monotonic() < deadline, f"children left 300 s after deleting the endpoint: {left}"
        time.sleep(2)


def test_helm_uninstall_leaves_no_llmep_object(kind_cluster: KindCluster, llmep_release: str):
    for key in ("e2e-all", "e2e-other"):
        llmep_cli(kind_cluster, "keys", "revoke", key, "-n", llmep_release)
    helm(
        "uninstall",
        "llmep",
        "-n",
        llmep_release,
        "--wait",
        "--timeout",
        "300s",
        kubeconfig=Path(kind_cluster.kubeconfig_path),
        timeout=400,
    )
    # The CRD is kept (helm.sh/resource-policy: keep): uninstalling the platform must not delete
    # every team's LLMEndpoints. Deleting it is a deliberate step of its own.
    kept = json.loads(kind_cluster.kubectl("get", "crd", "llmendpoints.llmep.io", "-o", "json"))
    assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    kind_cluster.kubectl("delete", "crd", "llmendpoints.llmep.io", "--wait=true", "--timeout=120s")
    crds = kind_cluster.kubectl("get", "crds", "-o", "name").split()
    assert not [c for c in crds if "llmep.io" in c], crds
    cluster_wide = kind_cluster.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name").split()
    assert not [o for o in cluster_wide if "llmep" in o], cluster_wide
    # Kubernetes' own objects of every namespace stay: the root CA ConfigMap, the default SA.
    kept = {"configmap/kube-root-ca.crt", "serviceaccount/default"}

    def left_in_namespace():
        names = kind_cluster.kubectl(
            "get", "all,configmaps,secrets,serviceaccounts,roles,rolebindings", "-n", llmep_release, "-o", "name"
        ).split()
        return [n for n in names if n not in kept] or None

    deadline = time.monotonic() + 180  # pods of the deleted Deployments finish terminating
    while (left := left_in_namespace()) is not None:
        assert time.monotonic() < deadline, f"left in {llmep_release} after helm uninstall: {left}"
        time.sleep(2)
