"""The gateway's connections to the API server are blackholed: a TCP proxy the test controls stops
forwarding without closing anything (tests/reliability/blackhole.py). The gateway cannot see a key
revoked or an endpoint created meanwhile, so within a bound derived from its settings /readyz
fails and the gateway leaves the Service. After the path heals (old connections stay dead, new ones
work) it catches up within a bound: /readyz is 200 again, the revoked key is refused and the new
endpoint is routed. The gateway is a separate process in cluster mode, authenticated as a
ServiceAccount with the chart's least-privilege Role, its kubeconfig pointing at the proxy; the
test changes the cluster through the real API server, around the proxy."""

from __future__ import annotations

import base64
import contextlib
import time

import httpx
import pytest
from kubernetes import client as k8s

from tests.cluster.conftest import wait_until
from tests.cluster.test_gateway_watch import gateway_identity, set_status
from tests.conftest import FIXTURES, REPO_ROOT, load_fixture
from tests.reliability.blackhole import BlackholeProxy, kubeconfig_through, upstream
from tests.reliability.stack import free_port, start_backend, start_gateway

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

CRD = REPO_ROOT / "crds" / "llmendpoints.llmep.io.yaml"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
REVOKED_KEY, KEPT_KEY = "sk-revoked-0123456789", "sk-kept-0123456789"

# The gateway's API bounds, shortened (defaults 10 / 30 / 30 / 60 s).
REQUEST_TIMEOUT = 2.0  # kube_request_timeout: connect, and between bytes of a list or watch
WATCH_SECONDS = 5  # kube_watch_seconds: one watch; its normal end counts as a sync
RETRY_MAX_DELAY = 2.0  # kube_retry_max_delay: longest backoff between failed attempts
SYNC_MAX_AGE = 8.0  # kube_sync_max_age: /readyz fails past this without a sync (> 5 + 2)
SLACK = 10.0  # a busy 2-core machine: scheduling, TLS handshakes, the test's own polling
# The last sync was at most SYNC_MAX_AGE ago when the blackhole starts; /readyz fails once the
# oldest loop passes SYNC_MAX_AGE, and a call already on the wire cannot sync past its timeout.
READYZ_FAILS_WITHIN = SYNC_MAX_AGE + REQUEST_TIMEOUT + SLACK
# After the heal a loop may still wait out a call on a dead connection (one request timeout),
# then its backoff, then one more call on a dead pooled connection, then list on a fresh one.
CATCH_UP_WITHIN = 3 * REQUEST_TIMEOUT + RETRY_MAX_DELAY + SLACK


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _key_secret(name: str, key: str) -> k8s.V1Secret:
    return k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, labels={"llmep.io/api-key": "true"}), data={"key": _b64(key)}
    )


def _create_endpoint(cluster, namespace: str, name: str, backend_url: str) -> None:
    """An LLMEndpoint with the status the operator would write once it is Ready."""
    endpoint = load_fixture(FIXTURES / "valid" / "minimal.yaml")
    endpoint["metadata"] = {"name": name}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, endpoint)
    set_status(cluster, namespace, name, backend_url, ready=True)


def test_a_key_revoked_and_an_endpoint_created_while_the_api_server_was_blackholed_apply_after_the_heal(
    cluster, namespace, tmp_path
):
    cluster.apply_crd(CRD)
    # A ServiceAccount with the gateway's Role and RoleBinding in `namespace` (namespaced, so they
    # go with the namespace fixture); its kubeconfig is rewritten to reach the API through the proxy.
    kubeconfig = gateway_identity(cluster, namespace, tmp_path)
    proxy = BlackholeProxy(upstream(cluster))
    proxied = kubeconfig_through(kubeconfig, proxy, tmp_path / "gateway-through-proxy")
    backend_port, port = free_port(), free_port()
    backend_url = f"http://127.0.0.1:{backend_port}/v1"
    base = f"http://127.0.0.1:{port}"
    backend = gateway = None
    http = httpx.Client(timeout=5)

    def readyz() -> httpx.Response:
        return http.get(f"{base}/readyz")

    def models(key: str) -> list[str]:
        reply = http.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert reply.status_code == 200, (reply.status_code, reply.text)
        return [m["id"] for m in reply.json()["data"]]

    def chat(key: str, model: str) -> httpx.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return http.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})

    def answered(key: str, model: str) -> bool:
        reply = chat(key, model)
        if reply.status_code != 200:
            return False
        body = reply.json()
        return body["model"] == model and body["choices"][0]["message"]["content"] == "backend: hi"

    def refused(key: str) -> bool:
        reply = chat(key, "first")
        if reply.status_code != 401:
            return False
        error = reply.json()["error"]  # OpenAI's envelope
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error", error
        assert set(error) == {"message", "type", "param", "code"}, error
        return True

    try:
        backend = start_backend(backend_port, "backend", tmp_path)
        _create_endpoint(cluster, namespace, "first", backend_url)
        cluster.core.create_namespaced_secret(namespace, _key_secret("revoked-key", REVOKED_KEY))
        cluster.core.create_namespaced_secret(namespace, _key_secret("kept-key", KEPT_KEY))
        # The backend stands in for the endpoints' Serve Services: the URL template names it.
        gateway = start_gateway(
            port, tmp_path, "--kubeconfig", str(proxied), "--namespace", namespace,
            "--watch-namespaces", namespace, "--no-wake-backend", "--hold-deadline", "0", "--drain-seconds", "0",
            "--backend-url-template", backend_url,
            env={
                "LLMEP_GATEWAY_KUBE_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
                "LLMEP_GATEWAY_KUBE_WATCH_SECONDS": str(WATCH_SECONDS),
                "LLMEP_GATEWAY_KUBE_RETRY_MAX_DELAY": str(RETRY_MAX_DELAY),
                "LLMEP_GATEWAY_KUBE_SYNC_MAX_AGE": str(SYNC_MAX_AGE),
            },
        )  # fmt: skip
        wait_until(
            lambda: answered(REVOKED_KEY, "first") and "first" in models(KEPT_KEY),
            timeout=30,
            message=lambda: f"the first endpoint routed for both keys; gateway log:\n{gateway.output()[-3000:]}",
        )
        assert readyz().status_code == 200

        proxy.blackhole()
        blackholed = time.monotonic()
        # Through the real API server, around the proxy: revoke one key, add a second endpoint.
        cluster.core.delete_namespaced_secret("revoked-key", namespace)
        _create_endpoint(cluster, namespace, "second", backend_url)
        not_ready = wait_until(
            lambda: (r := readyz()).status_code != 200 and r,
            timeout=READYZ_FAILS_WITHIN,
            interval=0.1,
            message=lambda: (
                f"/readyz to fail within {READYZ_FAILS_WITHIN:.0f}s of the blackhole; gateway log:\n"
                f"{gateway.output()[-3000:]}"
            ),
        )
        failed_after = time.monotonic() - blackholed
        assert not_ready.status_code == 503, not_ready.text
        assert "no successful list or watch" in not_ready.json()["status"], not_ready.text
        # The outage is real: nothing made meanwhile reached the gateway.
        assert "second" not in models(KEPT_KEY)
        assert proxy.discarded > 0  # the gateway's calls went into the outage

        proxy.heal()
        healed = time.monotonic()
        wait_until(
            lambda: (
                readyz().status_code == 200
                and refused(REVOKED_KEY)
                and "second" in models(KEPT_KEY)
                and answered(KEPT_KEY, "second")
            ),
            timeout=CATCH_UP_WITHIN,
            interval=0.1,
            message=lambda: (
                f"the gateway caught up within {CATCH_UP_WITHIN:.0f}s of the heal (readyz "
                f"{readyz().text}); gateway log:\n{gateway.output()[-3000:]}"
            ),
        )
        caught_up = time.monotonic() - healed
        assert answered(KEPT_KEY, "first")  # the old route still works
    finally:
        http.close()
        for proc in (gateway, backend):
            if proc is not None:
                proc.terminate(20)
        proxy.close()
        # gateway_identity made only namespaced objects (the namespace fixture deletes them too).
        for delete in (cluster.rbac.delete_namespaced_role_binding, cluster.rbac.delete_namespaced_role,
                       cluster.core.delete_namespaced_service_account):  # fmt: skip
            with contextlib.suppress(k8s.ApiException):
                delete("llmep-gateway", namespace)
    print(
        f"\ngateway blackhole: /readyz failed {failed_after:.1f}s after the blackhole (bound "
        f"{READYZ_FAILS_WITHIN:.0f}s; kube_sync_max_age {SYNC_MAX_AGE:.0f}s); caught up {caught_up:.1f}s after "
        f"the heal (bound {CATCH_UP_WITHIN:.0f}s): revoked key 401, second model listed and answered"
    )
