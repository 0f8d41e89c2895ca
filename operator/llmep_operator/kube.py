"""The only module that talks to the API server: server-side apply, reads, status, events."""

from __future__ import annotations

import copy
import logging
import os
from datetime import UTC, datetime
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from llmep_operator import naming
from llmep_operator.api import API_VERSION, KIND, PLURAL
from llmep_operator.settings import ApiTimeouts

log = logging.getLogger(__name__)

# (apiVersion, kind) -> URL path segments for the few kinds the operator manages.
_RESOURCES = {
    (naming.RAY_API_VERSION, "RayService"): (f"/apis/{naming.RAY_API_VERSION}", "rayservices"),
    (naming.RAY_API_VERSION, "RayCluster"): (f"/apis/{naming.RAY_API_VERSION}", "rayclusters"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    (API_VERSION, KIND): (f"/apis/{API_VERSION}", PLURAL),
}


def load_config() -> client.Configuration:
    """In-cluster config in a pod, otherwise $KUBECONFIG / ~/.kube/config, read now.

    A fresh Configuration, not the client library's global default, so an operator started
    again in the same process (tests) never reuses an earlier identity."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG", "~/.kube/config").split(os.pathsep)[0],
            client_configuration=configuration,
        )
    return configuration


class BoundedApiClient(client.ApiClient):
    """An ApiClient whose every call has a (connect, read) timeout unless the call names its own:
    urllib3 otherwise waits forever on a connection that went silent."""

    def __init__(self, configuration: client.Configuration | None = None, timeouts: ApiTimeouts | None = None):
        configuration = copy.deepcopy(configuration) if configuration else client.Configuration()
        # urllib3 would retry a timed-out GET three times, quadrupling the bound; the operator
        # retries on its own (kopf's TemporaryError, the drift loop).
        configuration.retries = False
        super().__init__(configuration)
        timeouts = timeouts or ApiTimeouts()
        self.timeout = (timeouts.connect_seconds, timeouts.request_seconds)

    def call_api(
        self,
        method: str,
        url: str,
        header_params: dict[str, Any] | None = None,
        body: Any = None,
        post_params: list[Any] | None = None,
        _request_timeout: Any = None,
    ) -> Any:
        return super().call_api(method, url, header_params, body, post_params, _request_timeout or self.timeout)


class Kube:
    def __init__(self, field_manager: str, api_client: client.ApiClient | None = None):
        self.field_manager = field_manager
        self.api = api_client or BoundedApiClient()
        self.core = client.CoreV1Api(self.api)

    def _path(self, api_version: str, kind: str, namespace: str, name: str | None = None) -> str:
        try:
            prefix, plural = _RESOURCES[(api_version, kind)]
        except KeyError:
            raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        return f"{path}/{name}" if name else path

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        answer: str = "object",
    ) -> Any:
        request = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=query or [],
            header_params={"Content-Type": content_type, "Accept": accept},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(*request)
        response.read()
        # Raises ApiException for every non-2xx answer, with the server's message.
        # Every path above answers one JSON object (an object, a list of them, or a Status); a
        # pod's log answers text.
        return self.api.response_deserialize(response, {"2XX": answer}).data

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply under the operator's field manager; our fields win conflicts."""
        meta = obj["metadata"]
        path = self._path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", self.field_manager), ("force", "true")]
        return cast(dict[str, Any], self._call("PATCH", path, obj, query, "application/apply-patch+yaml"))

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> None:
        """Delete the object and, in the background, what it owns (a Job's pods); gone already is fine."""
        try:
            self._call("DELETE", self._path(api_version, kind, namespace, name), {"propagationPolicy": "Background"})
        except ApiException as error:
            if error.status != 404:
                raise

    def json_patch(self, api_version: str, kind: str, namespace: str, name: str, ops: list[dict[str, Any]]) -> None:
        """An RFC 6902 patch: the only way to change one list item without owning the whole list."""
        self._call(
            "PATCH", self._path(api_version, kind, namespace, name), ops, content_type="application/json-patch+json"
        )

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return cast(dict[str, Any], self._call("GET", self._path(api_version, kind, namespace, name)))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods_of(self, namespace: str, endpoint: str) -> list[dict[str, Any]]:
        selector = f"{naming.ENDPOINT_LABEL}={endpoint}"
        result = self._call("GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", selector)])
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    def pod_log_tail(self, namespace: str, pod: str, lines: int = 2) -> str:
        """The last `lines` lines of the pod's (only) container's log."""
        path = f"/api/v1/namespaces/{namespace}/pods/{pod}/log"
        # Logs are text/plain, yet the API server (1.37 here) answers 406 to an Accept of only that.
        data = self._call("GET", path, query=[("tailLines", str(lines))], accept="*/*", answer="bytearray")
        return bytes(data).decode("utf-8", errors="replace")

    def patch_status(self, namespace: str, name: str, status: dict[str, Any], resource_version: str) -> None:
        """Merge-patch status, only over `resource_version`: the API server answers 409 Conflict
        when anything changed the endpoint since, so a writer never overwrites a newer status."""
        path = self._path(API_VERSION, KIND, namespace, name) + "/status"
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        self._call("PATCH", path, body, content_type="application/merge-patch+json")

    def post_event(self, involved: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = involved["metadata"]
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=API_VERSION,
                kind=KIND,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            type=event_type,
            reason=reason,
            message=message[:1024],
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component=self.field_manager),
            reporting_component=self.field_manager,
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], event)
        except ApiException as error:  # an event is a courtesy; status already says it
            log.warning("could not post event %s on %s: %s", reason, meta["name"], error.reason)
