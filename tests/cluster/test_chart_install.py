"""The chart on a real API server: `helm install` brings up the operator and the gateway, the
operator reconciles under the chart's RBAC and nothing more, `helm upgrade` updates the CRD,
and `helm uninstall` leaves nothing of the release behind.

Images point at an address nothing serves: the rig's kwok nodes run no containers, so pods
become Running and Ready without pulling. The operator itself runs in this process with
`kopf_runner_as`, authenticated as the chart's operator ServiceAccount.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from tests.conftest import FIXTURES, load_fixture
from tests.helm import CHART, helm, template

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_NAME = "llmendpoints.llmep.io"
CRD_FILE = REPO / "crds" / "llmendpoints.llmep.io.yaml"
# Loaded by path, so each run gets a fresh module and API client (`-m` would reuse the first
# run's client, authenticated as an earlier test's ServiceAccount).
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
FAKE_IMAGE = {"image.repository": "registry.invalid/llmep/llmep", "image.tag": "test"}
# The rig hands one CRD from release to release and applies it again after each uninstall, so
# these releases let uninstall delete it; test_uninstall_keeps_the_crd_and_every_endpoint shows
# the default (kept).
RIG_VALUES = {**FAKE_IMAGE, "crds.keep": "false"}
INSTANCE = "app.kubernetes.io/instance"


def release_name(namespace: str) -> str:
    # Unique per test, so the instance label selects this release's objects only.
    return f"llmep-{namespace[-6:]}"


def sets(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def read_crd(cluster) -> k8s.V1CustomResourceDefinition | None:
    try:
        return cluster.apiext.read_custom_resource_definition(CRD_NAME)
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def hand_crd_to_release(cluster, release: str, namespace: str) -> None:
    """Let this release adopt an LLMEndpoint CRD that other tests applied without Helm."""
    if read_crd(cluster) is None:
        return
    cluster.apiext.patch_custom_resource_definition(
        CRD_NAME,
        {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": release, "meta.helm.sh/release-namespace": namespace},
            }
        },
    )


def restore_crd(cluster) -> None:
    """Uninstall deletes the CRD; later tests of the session expect it, so apply it again."""
    crd = read_crd(cluster)
    if crd is not None and crd.metadata.deletion_timestamp is None:
        cluster.apiext.delete_custom_resource_definition(CRD_NAME)  # one that uninstall kept
    cluster.wait_until(lambda: read_crd(cluster) is None, timeout=120, message=f"CRD {CRD_NAME} to be deleted")
    cluster.apply_crd(CRD_FILE)


@contextlib.contextmanager
def installed(
    cluster, namespace: str, values: dict[str, str] | None = None, chart: Path | None = None
) -> Iterator[str]:
    release = release_name(namespace)
    hand_crd_to_release(cluster, release, namespace)
    try:
        helm(
            "install",
            release,
            str(chart or CHART),
            "--namespace",
            namespace,
            "--wait",
            "--timeout",
            "180s",
            *sets({**RIG_VALUES, **(values or {})}),
            kubeconfig=cluster.kubeconfig,
        )
        yield release
    except BaseException:
        # Clean up, but let the test's own failure be the one reported.
        with contextlib.suppress(AssertionError, ApiException):
            uninstall_and_restore_crd(cluster, release, namespace)
        raise
    uninstall_and_restore_crd(cluster, release, namespace)


def api_status(call) -> int:
    """The HTTP status an API call answers with: 200, or the ApiException's status."""
    try:
        call()
    except ApiException as e:
        return e.status
    return 200


def release_finalizers(cluster, namespace: str) -> None:
    """Safety net: a finalizer left on an endpoint by a failed test (no operator is left to
    remove it) would keep the CRD and the namespace from ever going."""
    if read_crd(cluster) is None:
        return
    items = cluster.custom.list_namespaced_custom_object("llmep.io", "v1alpha1", namespace, "llmendpoints")["items"]
    for item in items:
        if item["metadata"].get("finalizers"):
            cluster.custom.patch_namespaced_custom_object(
                "llmep.io",
                "v1alpha1",
                namespace,
                "llmendpoints",
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )


def uninstall_and_restore_crd(cluster, release: str, namespace: str) -> None:
    release_finalizers(cluster, namespace)
    helm(
        "uninstall",
        release,
        "--namespace",
        namespace,
        "--wait",
        "--timeout",
        "120s",
        kubeconfig=cluster.kubeconfig,
        check=False,
    )
    restore_crd(cluster)


class ForbiddenLog(logging.Handler):
    """Records every operator log line that reports an RBAC denial."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += " " + logging.Formatter().formatException(record.exc_info)
        # kopf's APIForbiddenError, the client's "(403) Reason: Forbidden", kopf's fallbacks.
        if re.search(r"[Ff]orbidden|[Nn]ot enough permissions", text):
            with self.lock:
                self.lines.append(text[:500])


def deployment_available(cluster, namespace: str, name: str, replicas: int) -> bool:
    d = cluster.apps.read_namespaced_deployment(name, namespace)
    return (d.status.available_replicas or 0) == replicas == d.spec.replicas


def delete_endpoint(cluster, namespace: str, name: str) -> None:
    cluster.custom.delete_namespaced_custom_object("llmep.io", "v1alpha1", namespace, "llmendpoints", name)

    def gone() -> bool:
        try:
            cluster.custom.get_namespaced_custom_object("llmep.io", "v1alpha1", namespace, "llmendpoints", name)
        except ApiException as e:
            return e.status == 404
        return False

    cluster.wait_until(gone, timeout=60, message=f"LLMEndpoint {name} to be deleted")


def endpoint_manifest(namespace: str) -> dict:
    return {
        "apiVersion": "llmep.io/v1alpha1",
        "kind": "LLMEndpoint",
        "metadata": {"name": "qwen-small", "namespace": namespace},
        "spec": {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "resources": {"profile": "nvidia-l4"}},
    }


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_install_runs_both_deployments_and_the_operator_reconciles_with_chart_rbac_only(
    cluster, namespace, kopf_runner_as, mode
):
    namespaced = mode == "namespaced"
    values = {"watchNamespaces": f"{{{namespace}}}"} if namespaced else {}
    with installed(cluster, namespace, values) as release:
        operator, gateway = f"{release}-operator", "llmep-gateway"
        for name in (operator, gateway):
            cluster.wait_until(
                lambda n=name: deployment_available(cluster, namespace, n, 2),
                timeout=120,
                message=f"Deployment {name} to have 2 available",
            )
        service = cluster.core.read_namespaced_service(gateway, namespace)
        assert service.spec.ports[0].port == 80

        denials = ForbiddenLog()
        loggers = [logging.getLogger(n) for n in ("kopf", "llmep_operator")]
        for logger in loggers:
            logger.addHandler(denials)
        try:
            watch = (namespace,) if namespaced else ()
            # A fresh registry: the handlers file registers into it alone, not next to the
            # handlers (and cached API client) of an earlier run in this process.
            with kopf_runner_as(operator, namespace, paths=(HANDLERS,), watch_namespaces=watch) as runner:
                cluster.apply(endpoint_manifest(namespace))
                rs = cluster.wait_until(
                    lambda: cluster.custom.get_namespaced_custom_object(
                        "ray.io", "v1", namespace, "rayservices", "qwen-small"
                    ),
                    timeout=90,
                    message=lambda: f"RayService qwen-small; operator denials: {denials.lines}",
                )
                cluster.wait_until(
                    lambda: cluster.core.read_namespaced_service("qwen-small-serve", namespace),
                    timeout=60,
                    message="Service qwen-small-serve",
                )

                def observed() -> bool:
                    ep = cluster.custom.get_namespaced_custom_object(
                        "llmep.io", "v1alpha1", namespace, "llmendpoints", "qwen-small"
                    )
                    status = ep.get("status") or {}
                    return status.get("observedGeneration") == ep["metadata"]["generation"]

                cluster.wait_until(
                    observed,
                    timeout=90,
                    message=lambda: f"status.observedGeneration of qwen-small; denials: {denials.lines}",
                )
                # Deleted while the operator runs, so any finalizer it set is released.
                delete_endpoint(cluster, namespace, "qwen-small")
        finally:
            for logger in loggers:
                logger.removeHandler(denials)
        assert runner.exception is None, runner.exception
        assert rs["metadata"]["labels"]["llmep.io/endpoint"] == "qwen-small"
        assert denials.lines == []


def test_notes_give_the_base_url_and_the_gateway_reads_secrets_only_in_its_namespace(cluster, namespace):
    with installed(cluster, namespace) as release:
        notes = helm("get", "notes", release, "--namespace", namespace, kubeconfig=cluster.kubeconfig).stdout
        assert f"http://llmep-gateway.{namespace}.svc/v1" in notes
        assert "llmep.io/api-key" in notes and "curl" in notes
        api = cluster.client_as("llmep-gateway", namespace)
        core = k8s.CoreV1Api(api)
        custom = k8s.CustomObjectsApi(api)

        cluster.wait_until(
            lambda: api_status(lambda: core.list_namespaced_secret(namespace)) == 200,
            timeout=30,
            message="the gateway's RoleBinding to let it list its Secrets",
        )
        assert api_status(lambda: custom.list_cluster_custom_object("llmep.io", "v1alpha1", "llmendpoints")) == 200
        assert api_status(lambda: core.list_namespaced_secret("default")) == 403
        assert api_status(lambda: core.list_secret_for_all_namespaces()) == 403
        assert api_status(lambda: core.list_namespaced_pod(namespace)) == 403


def test_with_a_keys_namespace_the_gateway_cannot_read_the_releases_secrets(cluster, namespace):
    """RBAC cannot narrow list/watch to labelled Secrets: gateway.keysNamespace moves the keys
    (and the gateway's only Secret rights) to a namespace that holds nothing else, so Helm's
    release Secrets in the release namespace are out of the gateway's reach."""
    keys = f"{namespace}-keys"
    cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=keys)))
    try:
        with installed(cluster, namespace, {"gateway.keysNamespace": keys}):
            core = k8s.CoreV1Api(cluster.client_as("llmep-gateway", namespace))

            cluster.wait_until(
                lambda: api_status(lambda: core.list_namespaced_secret(keys)) == 200,
                timeout=30,
                message="the gateway's RoleBinding in the keys namespace",
            )
            release_secrets = cluster.core.list_namespaced_secret(namespace, label_selector="owner=helm").items
            assert release_secrets, "helm keeps its release record as a Secret in the release namespace"
            assert api_status(lambda: core.list_namespaced_secret(namespace)) == 403
            assert api_status(lambda: core.read_namespaced_secret(release_secrets[0].metadata.name, namespace)) == 403
            gateway = cluster.apps.read_namespaced_deployment("llmep-gateway", namespace)
            env = {e.name: e.value for e in gateway.spec.template.spec.containers[0].env}
            assert env["LLMEP_GATEWAY_NAMESPACE"] == keys
    finally:
        cluster.core.delete_namespace(keys)


def test_upgrade_with_a_changed_crd_updates_it_in_the_api_server(cluster, namespace, tmp_path):
    changed = tmp_path / "llmep"
    shutil.copytree(CHART, changed)
    crd_template = changed / "templates" / "crd-llmendpoints.yaml"
    text = crd_template.read_text()
    original = "description: LLMEndpoint serves one open model"
    assert original in text
    crd_template.write_text(
        text.replace(original, "description: UPGRADED-BY-TEST LLMEndpoint serves one open model", 1)
    )

    with installed(cluster, namespace) as release:

        def description() -> str:
            return read_crd(cluster).spec.versions[0].schema.open_apiv3_schema.description

        assert not description().startswith("UPGRADED-BY-TEST")
        helm(
            "upgrade",
            release,
            str(changed),
            "--namespace",
            namespace,
            "--wait",
            "--timeout",
            "180s",
            *sets(RIG_VALUES),
            kubeconfig=cluster.kubeconfig,
        )

        assert description().startswith("UPGRADED-BY-TEST")
        assert deployment_available(cluster, namespace, f"{release}-operator", 2)


NAMESPACED_KINDS = {
    "Deployment": lambda c, ns, sel: c.apps.list_namespaced_deployment(ns, label_selector=sel),
    "ServiceAccount": lambda c, ns, sel: c.core.list_namespaced_service_account(ns, label_selector=sel),
    "ConfigMap": lambda c, ns, sel: c.core.list_namespaced_config_map(ns, label_selector=sel),
    "Service": lambda c, ns, sel: c.core.list_namespaced_service(ns, label_selector=sel),
    "Role": lambda c, ns, sel: c.rbac.list_namespaced_role(ns, label_selector=sel),
    "RoleBinding": lambda c, ns, sel: c.rbac.list_namespaced_role_binding(ns, label_selector=sel),
    "PodDisruptionBudget": lambda c, ns, sel: k8s.PolicyV1Api(c.api).list_namespaced_pod_disruption_budget(
        ns, label_selector=sel
    ),
}
CLUSTER_KINDS = {
    "ClusterRole": lambda c, sel: c.rbac.list_cluster_role(label_selector=sel),
    "ClusterRoleBinding": lambda c, sel: c.rbac.list_cluster_role_binding(label_selector=sel),
}


def release_objects(cluster, namespace: str, release: str) -> dict[str, list[str]]:
    selector = f"{INSTANCE}={release}"
    found = {
        kind: [o.metadata.name for o in list_(cluster, namespace, selector).items]
        for kind, list_ in NAMESPACED_KINDS.items()
    }
    found |= {kind: [o.metadata.name for o in list_(cluster, selector).items] for kind, list_ in CLUSTER_KINDS.items()}
    return {kind: names for kind, names in found.items() if names}


def test_uninstall_keeps_the_crd_and_every_endpoint(cluster, namespace):
    """By default `helm uninstall` leaves the LLMEndpoint CRD, so no team's endpoints (and models)
    go with the platform's release."""
    release = release_name(namespace)
    hand_crd_to_release(cluster, release, namespace)
    try:
        helm(
            "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "180s",
            *sets(FAKE_IMAGE), kubeconfig=cluster.kubeconfig,
        )  # fmt: skip
        endpoint = load_fixture(FIXTURES / "valid" / "minimal.yaml")
        endpoint["metadata"] = {"name": "survivor"}
        cluster.custom.create_namespaced_custom_object("llmep.io", "v1alpha1", namespace, "llmendpoints", endpoint)
        release_finalizers(cluster, namespace)
        helm(
            "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", kubeconfig=cluster.kubeconfig
        )

        crd = read_crd(cluster)
        assert crd is not None and crd.metadata.deletion_timestamp is None
        assert crd.metadata.annotations["helm.sh/resource-policy"] == "keep"
        custom = cluster.custom
        kept = custom.get_namespaced_custom_object("llmep.io", "v1alpha1", namespace, "llmendpoints", "survivor")
        assert kept["metadata"].get("deletionTimestamp") is None
    finally:
        release_finalizers(cluster, namespace)
        helm("uninstall", release, "--namespace", namespace, kubeconfig=cluster.kubeconfig, check=False)
        restore_crd(cluster)


def test_uninstall_removes_everything_the_release_installed(cluster, namespace):
    rendered = template(release=release_name(namespace), namespace=namespace, sets=FAKE_IMAGE, chart=CHART)
    expected_kinds = {d["kind"] for d in rendered} - {"CustomResourceDefinition"}
    with installed(cluster, namespace) as release:
        before = release_objects(cluster, namespace, release)
        assert set(before) == expected_kinds, before
        helm(
            "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s", kubeconfig=cluster.kubeconfig
        )

        assert release_objects(cluster, namespace, release) == {}
        crd = read_crd(cluster)
        assert crd is None or crd.metadata.deletion_timestamp is not None
        assert (
            helm("status", release, "--namespace", namespace, kubeconfig=cluster.kubeconfig, check=False).returncode
            != 0
        )


# (verb, resource, subresource) the operator performs in every watched namespace.
OPERATOR_NAMESPACED = [
    ("get", "llmendpoints.llmep.io", ""),
    ("list", "llmendpoints.llmep.io", ""),
    ("watch", "llmendpoints.llmep.io", ""),
    ("patch", "llmendpoints.llmep.io", "status"),
    ("update", "llmendpoints.llmep.io", "finalizers"),
    ("create", "rayservices.ray.io", ""),
    ("patch", "rayservices.ray.io", ""),
    ("watch", "rayservices.ray.io", ""),
    ("create", "services", ""),
    ("patch", "services", ""),
    ("watch", "services", ""),
    ("create", "persistentvolumeclaims", ""),
    ("patch", "persistentvolumeclaims", ""),
    ("list", "pods", ""),
    ("watch", "pods", ""),
    ("get", "pods", "log"),
    ("create", "jobs.batch", ""),
    ("patch", "jobs.batch", ""),
    ("watch", "jobs.batch", ""),
    ("delete", "jobs.batch", ""),
    ("create", "events", ""),
    ("create", "events.events.k8s.io", ""),
]
OPERATOR_DENIED = [
    ("list", "secrets", ""),
    ("delete", "rayservices.ray.io", ""),
    ("create", "pods", ""),
    ("delete", "pods", ""),
    ("create", "pods", "exec"),
    ("update", "llmendpoints.llmep.io", ""),
    ("patch", "llmendpoints.llmep.io", ""),  # the operator writes only status
]


def can_i(cluster, account: str, namespace: str, verb: str, resource: str, sub: str, in_namespace: str | None) -> bool:
    args = ["auth", "can-i", verb, resource, f"--as=system:serviceaccount:{namespace}:{account}"]
    args += [f"--subresource={sub}"] if sub else []
    args += [f"--namespace={in_namespace}"] if in_namespace else ["--all-namespaces"]
    return cluster.kubectl(*args, check=False).strip() == "yes"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_account_may_do_what_the_operator_does_and_nothing_more(cluster, namespace, mode):
    namespaced = mode == "namespaced"
    values = {"watchNamespaces": f"{{{namespace}}}"} if namespaced else {}
    with installed(cluster, namespace, values) as release:
        account = f"{release}-operator"
        scope = namespace if namespaced else None

        def allowed(verb: str, resource: str, sub: str = "", where: str | None = scope) -> bool:
            return can_i(cluster, account, namespace, verb, resource, sub, where)

        cluster.wait_until(
            lambda: allowed("list", "llmendpoints.llmep.io"),
            timeout=30,
            message="the operator's bindings to take effect",
        )
        missing = [r for r in OPERATOR_NAMESPACED if not allowed(*r)]
        extra = [r for r in OPERATOR_DENIED if allowed(*r)]
        assert (missing, extra) == ([], [])
        assert allowed("create", "leases.coordination.k8s.io", where=namespace)
        assert allowed("update", "leases.coordination.k8s.io/llmep-operator", where=namespace)
        assert not allowed("update", "leases.coordination.k8s.io/other", where=namespace)
        assert allowed("watch", "customresourcedefinitions.apiextensions.k8s.io", where=None)
        if namespaced:
            assert not allowed("list", "llmendpoints.llmep.io", where="default")


def test_server_side_apply_that_creates_a_child_is_allowed_to_the_operator(cluster, namespace):
    with installed(cluster, namespace) as release:
        api = cluster.client_as(f"{release}-operator", namespace)
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "ssa-probe-serve", "namespace": namespace},
            "spec": {"ports": [{"name": "http", "port": 8000}]},
        }
        request = api.param_serialize(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/services/ssa-probe-serve",
            query_params=[("fieldManager", "llmep-operator"), ("force", "true")],
            header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
            body=service,
            auth_settings=["BearerToken"],
        )
        response = api.call_api(*request)
        response.read()
        assert response.status == 201, response.data
        assert cluster.core.read_namespaced_service("ssa-probe-serve", namespace)
