"""The gateways' /metrics text for `llmep usage`: from URLs, or from every Ready gateway pod through
the API server's pod proxy (no port-forward, and no network path to the pods needed)."""

from __future__ import annotations

import argparse
import http.client
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The chart's gateway pod labels (charts/llmep/templates/_helpers.tpl, llmep.gateway.selectorLabels).
GATEWAY_SELECTOR = "app.kubernetes.io/name=llmep,app.kubernetes.io/component=gateway"
# The chart names the container port of /metrics `metrics`; without one, /metrics is on the API port.
METRICS_PORTS = ("metrics", "http")
TIMEOUT_SECONDS = 10
_EXAMPLE = "http://127.0.0.1:9090/metrics"


class ScrapeError(Exception):
    """A gateway, or the list of gateways, could not be read: the message says which and what to check."""


@dataclass(frozen=True)
class Gateway:
    name: str  # the URL, or namespace/pod: what a message names
    read: Callable[[], str]


def metrics_url(text: str) -> str:
    """argparse type of --url."""
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a URL: give the gateway's metrics URL, e.g. {_EXAMPLE}")
    return text


def url_gateway(url: str) -> Gateway:
    def read() -> str:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as answer:  # noqa: S310 (scheme checked)
                body: bytes = answer.read()
        except (OSError, http.client.HTTPException) as error:
            raise ScrapeError(
                f"cannot read {url}: {error}. Check that a gateway listens there and that it is its metrics"
                " port (gateway.metricsPort in the chart, 9090 by default; e.g. kubectl -n llmep-system"
                f" port-forward deploy/llmep-gateway 9090, then --url {_EXAMPLE})"
            ) from None
        return body.decode("utf-8", "replace")

    return Gateway(name=url, read=read)


def _is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _metrics_port(pod: Any) -> int | None:
    ports = {p.name: p.container_port for c in pod.spec.containers for p in c.ports or [] if p.name}
    return next((ports[name] for name in METRICS_PORTS if name in ports), None)


def _api_reason(error: Exception) -> str:
    """The API server's status and reason, or the transport's own words."""
    from kubernetes.client.exceptions import ApiException

    return f"{error.status} {error.reason}" if isinstance(error, ApiException) else str(error)


def pod_gateways(namespace: str, selector: str) -> list[Gateway]:
    """Every Ready pod matching `selector` in `namespace`, read through the API server."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException
    from urllib3.exceptions import HTTPError

    from llmep_operator.kube import load_config

    try:
        core = client.CoreV1Api(client.ApiClient(load_config()))
        pods = core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=TIMEOUT_SECONDS).items
    except ConfigException as error:
        raise ScrapeError(f"no cluster to ask: {error}. Set KUBECONFIG, or give gateways with --url") from None
    except (ApiException, HTTPError) as error:
        raise ScrapeError(
            f"cannot list pods in namespace {namespace}: {_api_reason(error)}. Check that you may list pods there"
            f" (kubectl auth can-i list pods -n {namespace})"
        ) from None
    ready = [pod for pod in pods if _is_ready(pod)]
    if not ready:
        raise ScrapeError(
            f"no Ready gateway pod in namespace {namespace} (labels {selector}: {len(pods)} found, none Ready)."
            f" Check kubectl -n {namespace} get pods -l {selector}, or -n with the chart's namespace"
        )

    def gateway(pod: Any) -> Gateway:
        name, where = pod.metadata.name, f"pod {namespace}/{pod.metadata.name}"
        port = _metrics_port(pod)

        def read() -> str:
            if port is None:
                raise ScrapeError(f"{where} has no container port named {' or '.join(METRICS_PORTS)}")
            try:
                # Unpreloaded, the client returns urllib3's response (bytes), not the str it declares.
                answer: Any = core.connect_get_namespaced_pod_proxy_with_path(
                    f"{name}:{port}", namespace, "metrics", _preload_content=False, _request_timeout=TIMEOUT_SECONDS
                )
            except (ApiException, HTTPError) as error:
                raise ScrapeError(
                    f"cannot read {where} port {port} through the API server: {_api_reason(error)}."
                    " Check that the pod still runs and that you may get pods/proxy"
                    f" (kubectl auth can-i get pods/proxy -n {namespace})"
                ) from None
            return bytes(answer.data).decode("utf-8", "replace")

        return Gateway(name=where, read=read)

    return [gateway(pod) for pod in ready]
