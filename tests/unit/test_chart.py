"""The Helm chart lints and renders for every shipped values file, and what it renders is what
the operator and the gateway accept: the settings ConfigMap loads into OperatorSettings and the
gateway's env into GatewaySettings."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llmep_operator.settings import OperatorSettings
from llmep_serving.gateway.settings import GatewaySettings
from tests.helm import CHART, CHART_VALUES_FILES, helm, kube_version, template

VALUES = [None, *CHART_VALUES_FILES]
IDS = ["default", *(p.stem for p in CHART_VALUES_FILES)]


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def values_of(values_file: Path | None) -> dict:
    return yaml.safe_load(values_file.read_text()) if values_file else {}


def operator_settings_from(objects: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OperatorSettings:
    config = by_kind(objects, "ConfigMap")["llmep-operator-config"]
    path = tmp_path / "config.yaml"
    path.write_text(config["data"]["config.yaml"])
    for var in [v for v in os.environ if v.startswith("LLMEP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LLMEP_CONFIG", str(path))
    return OperatorSettings()


def render_error(*sets: str) -> str:
    """stderr of a `helm template` with these --set values, which must fail."""
    args = [a for value in sets for a in ("--set", value)]
    proc = helm("template", "llmep", str(CHART), "--kube-version", kube_version(), *args, check=False)
    assert proc.returncode != 0, f"helm template {args} succeeded"
    return proc.stderr


def test_shipped_values_files_exist():
    assert {p.name for p in CHART_VALUES_FILES} >= {
        "values-kind.yaml",
        "values-namespaced.yaml",
        "values-monitoring.yaml",
    }


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_helm_lint_passes(values_file):
    args = ["-f", str(values_file)] if values_file else []
    out = helm(
        "lint", "--strict", str(CHART), "--namespace", "llmep-system", "--kube-version", kube_version(), *args
    ).stdout
    assert "0 chart(s) failed" in out, out


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_rendered_settings_load_into_operator_settings(values_file, tmp_path, monkeypatch):
    objects = template(values_file)
    settings = operator_settings_from(objects, tmp_path, monkeypatch)

    expected = values_of(values_file)
    assert settings.namespaces == expected.get("watchNamespaces", [])
    assert settings.gateway_service == "llmep-gateway"
    shipped = {"nvidia-h100", "nvidia-a100-80gb", "nvidia-l4", "gke-l4", "cpu"}
    assert shipped <= set(settings.profiles)
    default = (expected.get("operator", {}).get("config", {})).get("default_profile", "nvidia-l4")
    assert settings.default_profile == default
    h100 = settings.profiles["nvidia-h100"]
    assert h100.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.effect) for t in h100.tolerations] == [("nvidia.com/gpu", "NoSchedule")]
    assert settings.profiles["gke-l4"].node_selector == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    cpu = settings.profiles["cpu"]
    assert cpu.is_cpu
    assert cpu.engine_defaults.items() >= {"dtype": "float32", "distributed_executor_backend": "mp"}.items()
    assert cpu.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_COMPILE_DISABLE": "1"}
    assert cpu.stream_batching_interval_ms == 0


def test_chart_default_profiles_match_the_operators_builtin_ones(tmp_path, monkeypatch):
    rendered = operator_settings_from(template(), tmp_path, monkeypatch)
    monkeypatch.delenv("LLMEP_CONFIG")
    builtin = OperatorSettings()
    assert rendered.profiles == builtin.profiles
    assert rendered.image == builtin.image
    assert rendered.ray_version == builtin.ray_version


def test_network_policy_values_reach_the_operator_and_its_rbac(tmp_path, monkeypatch):
    """With networkPolicy.enabled the operator renders one per endpoint: it learns the gateway's
    namespace and pod labels from the chart, and may apply NetworkPolicies (and only then)."""
    sets = {"networkPolicy.enabled": "true", "networkPolicy.kuberayNamespace": "kuberay-system"}
    objects = template(sets=sets)
    settings = operator_settings_from(objects, tmp_path, monkeypatch)
    gateway = by_kind(objects, "Deployment")["llmep-gateway"]

    assert settings.network_policy.enabled
    assert settings.network_policy.gateway_namespace == "llmep-system"
    pod_labels = gateway["spec"]["template"]["metadata"]["labels"]
    assert settings.network_policy.gateway_pod_labels.items() <= pod_labels.items()
    assert settings.network_policy.kuberay_namespace == "kuberay-system"

    def may_apply_network_policies(objs) -> bool:
        return any(
            "networkpolicies" in rule.get("resources", []) and {"create", "patch"} <= set(rule["verbs"])
            for obj in objs
            if obj["kind"] in ("Role", "ClusterRole")
            for rule in obj.get("rules", [])
        )

    assert may_apply_network_policies(objects)
    assert not may_apply_network_policies(template())


def test_scratch_values_reach_the_operator_and_bad_sizes_are_refused(tmp_path, monkeypatch):
    sets = {"operator.config.scratch.cache_size_limit": "1Ti", "operator.config.scratch.tmp_size_limit": "2Gi"}
    settings = operator_settings_from(template(sets=sets), tmp_path, monkeypatch)
    assert (settings.scratch.cache_size_limit, settings.scratch.tmp_size_limit) == ("1Ti", "2Gi")
    assert settings.scratch.ephemeral_storage_request == "2Gi"  # the operator's default, unset here
    assert "at '/operator/config/scratch/tmp_size_limit': 'lots' does not match pattern" in render_error(
        "operator.config.scratch.tmp_size_limit=lots"
    )


def test_settings_values_the_operator_rejects_fail_the_round_trip(tmp_path, monkeypatch):
    # Valid for the schema, invalid for OperatorSettings: the round trip is what catches it.
    objects = template(sets={"operator.config.default_profile": "no-such-profile"})
    with pytest.raises(ValidationError, match="no-such-profile"):
        operator_settings_from(objects, tmp_path, monkeypatch)


def test_schema_rejects_unknown_and_mistyped_values():
    assert "gpus_per_nod" in render_error("operator.config.profiles.cpu.gpus_per_nod=1")
    assert "replicas" in render_error("gateway.replicas=two")


@pytest.mark.parametrize("values_file", VALUES, ids=IDS)
def test_rendered_gateway_env_loads_into_gateway_settings(values_file, monkeypatch):
    objects = template(values_file)
    gateway = by_kind(objects, "Deployment")["llmep-gateway"]
    container = gateway["spec"]["template"]["spec"]["containers"][0]
    for var in [v for v in os.environ if v.startswith("LLMEP_GATEWAY_")]:
        monkeypatch.delenv(var)
    for env in container["env"]:
        if env["name"].startswith("LLMEP_GATEWAY_"):
            monkeypatch.setenv(env["name"], env["value"])
    settings = GatewaySettings()

    assert container["args"] == ["gateway"]
    assert container["ports"] == [
        {"name": "http", "containerPort": settings.port, "protocol": "TCP"},
        # /metrics (every namespace's model names) on its own port, which no Ingress exposes.
        {"name": "metrics", "containerPort": settings.metrics_port, "protocol": "TCP"},
    ]
    assert settings.metrics_port not in (None, settings.port)
    assert settings.namespace == "llmep-system"
    namespaces = values_of(values_file).get("watchNamespaces")
    assert settings.watch_namespaces == (namespaces or ["*"])


@pytest.mark.parametrize(
    ("sets", "url"),
    [
        ({}, "http://qwen-serve.team-a.svc:8000/v1"),
        (
            {"operator.config.cluster_domain": "svc.cluster.local", "operator.config.serve_port": "9000"},
            "http://qwen-serve.team-a.svc.cluster.local:9000/v1",
        ),
    ],
)
def test_gateway_computes_backends_where_the_operator_puts_them(sets, url, monkeypatch):
    """The gateway's URL for an endpoint is the operator's status.url for it, from the same values."""
    from llmep_operator.naming import serve_service_name

    objects = template(sets=sets)
    container = by_kind(objects, "Deployment")["llmep-gateway"]["spec"]["template"]["spec"]["containers"][0]
    template_env = next(e["value"] for e in container["env"] if e["name"] == "LLMEP_GATEWAY_BACKEND_URL_TEMPLATE")
    assert template_env.format(name="qwen", namespace="team-a") == url
    assert url.startswith(f"http://{serve_service_name('qwen')}.team-a.")


def test_gateway_backend_url_template_is_set_by_the_chart_only():
    error = render_error("gateway.settings.backend_url_template=http://x/v1")
    assert "/gateway/settings" in error and "'backend_url_template' not allowed" in error


def test_gateway_service_is_llmep_gateway_port_80_to_the_gateways_port():
    objects = template(release="my-release")
    service = by_kind(objects, "Service")["llmep-gateway"]
    assert service["metadata"]["namespace"] == "llmep-system"
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"},
    ]
    assert GatewaySettings.model_fields["port"].default == 8080
    deployment = by_kind(objects, "Deployment")["llmep-gateway"]
    assert deployment["spec"]["replicas"] == 2
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_operator_runs_two_replicas_with_leader_election_and_a_liveness_probe():
    objects = template()
    deployment = by_kind(objects, "Deployment")["llmep-operator"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert deployment["spec"]["replicas"] == 2
    assert container["args"][:2] == ["operator", "--leader-elect"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["LLMEP_CONFIG"]["value"] == "/etc/llmep/config.yaml"
    assert container["image"] == "ghcr.io/llmep/llmep:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert pod["serviceAccountName"] == "llmep-operator"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/llmep", "/tmp"} <= mounts  # noqa: S108 - an emptyDir in the pod


def test_more_than_one_operator_without_leader_election_is_refused():
    assert "leaderElection" in render_error("operator.leaderElection.enabled=false")


def test_kuberay_install_is_refused_with_advice():
    assert "docs/install.md" in render_error("kuberay.install=true")


def test_cluster_wide_mode_uses_cluster_roles_and_a_namespaced_secrets_role():
    objects = template()
    cluster_roles = by_kind(objects, "ClusterRole")
    roles = by_kind(objects, "Role")
    endpoint_readers = [
        n for n, r in cluster_roles.items() if any("llmendpoints" in rule["resources"] for rule in r["rules"])
    ]
    assert sorted(endpoint_readers) == ["llmep-gateway-endpoints-llmep-system", "llmep-operator-llmep-system"]
    keys = roles["llmep-gateway-keys"]
    assert keys["metadata"]["namespace"] == "llmep-system"
    assert keys["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}]
    lease = roles["llmep-operator-leader-election"]
    assert lease["metadata"]["namespace"] == "llmep-system"


def test_operator_may_run_fill_jobs_and_read_their_logs_and_no_more():
    """cache.prefetch: the operator applies, watches and deletes its fill Jobs and reads their
    pods' logs; it never creates pods or reads other subresources of them."""
    rules = by_kind(template(), "ClusterRole")["llmep-operator-llmep-system"]["rules"]
    jobs = [r for r in rules if "jobs" in r["resources"]]
    assert jobs == [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]}
    ]
    pods = {
        res: r["verbs"] for r in rules if r["apiGroups"] == [""] for res in r["resources"] if res.startswith("pods")
    }
    assert pods == {"pods": ["get", "list", "watch"], "pods/log": ["get"]}


def test_namespaced_mode_has_one_role_per_watched_namespace_and_no_cluster_wide_endpoint_rights():
    objects = template(CHART / "ci" / "values-namespaced.yaml")
    roles = [o for o in objects if o["kind"] == "Role"]
    operator_roles = {r["metadata"]["namespace"] for r in roles if r["metadata"]["name"] == "llmep-operator"}
    gateway_roles = {r["metadata"]["namespace"] for r in roles if r["metadata"]["name"] == "llmep-gateway-endpoints"}
    assert operator_roles == gateway_roles == {"team-a", "team-b"}
    for cluster_role in by_kind(objects, "ClusterRole").values():
        resources = {res for rule in cluster_role["rules"] for res in rule["resources"]}
        assert resources <= {"customresourcedefinitions", "namespaces"}, cluster_role
    bindings = [o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["name"] == "llmep-operator"]
    assert all(
        b["subjects"] == [{"kind": "ServiceAccount", "name": "llmep-operator", "namespace": "llmep-system"}]
        for b in bindings
    )


def test_monitoring_values_render_monitors_dashboard_policies_and_routes():
    objects = template(CHART / "ci" / "values-monitoring.yaml")
    kinds = {o["kind"] for o in objects}
    assert {"ServiceMonitor", "PodMonitor", "NetworkPolicy", "Ingress", "HTTPRoute"} <= kinds
    pod_monitor = next(o for o in objects if o["kind"] == "PodMonitor")
    assert pod_monitor["spec"]["selector"] == {"matchExpressions": [{"key": "llmep.io/endpoint", "operator": "Exists"}]}
    dashboard = by_kind(objects, "ConfigMap")["llmep-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    board = json.loads(dashboard["data"]["llmep-overview.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for metric in (
        "llmep_gateway_request_duration_seconds",
        "llmep_gateway_time_to_first_token",
        "llmep_gateway_requests_in_flight",
        "llmep_gateway_requests_held",
        "llmep_gateway_completion_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "llmep_gateway_key_tokens_total",
        "llmep_gateway_key_requests_total",
        "llmep_gateway_key_rate_limited_total",
        "llmep_gateway_key_queue_depth",
        "llmep_gateway_key_queue_wait_seconds_bucket",
    ):
        assert metric in exprs, metric
    # Per key: tokens by type, requests by code, refusals by limit, as `llmep usage` splits them.
    by_key = {
        t["expr"].split("(rate(")[1].split("{")[0]: t["expr"]
        for p in board["panels"]
        for t in p["targets"]
        if "key" in t["expr"] and "(rate(" in t["expr"]
    }
    assert by_key["llmep_gateway_key_tokens_total"].startswith("sum by (key, type) ")
    assert by_key["llmep_gateway_key_requests_total"].startswith("sum by (key, code) ")
    assert by_key["llmep_gateway_key_rate_limited_total"].startswith("sum by (key, limit) ")
    wait = by_key["llmep_gateway_key_queue_wait_seconds_bucket"]
    assert wait.startswith("histogram_quantile(0.95, sum by (key, le) ")
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "model", "key"}


def test_dashboard_queries_name_metrics_the_gateway_exports():
    from prometheus_client import generate_latest

    from llmep_serving.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.model("m")  # a model seen, so every per-model family has samples
    metrics.error("m", "x")
    metrics.key_queue_wait("k", "m", 0.1)  # a request through the fair queue, so its families have samples
    metrics.key_queued("k", "m", 1)
    exported = generate_latest(metrics.registry).decode()
    board = json.loads((CHART / "dashboards" / "llmep-overview.json").read_text())
    for panel in board["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(llmep_gateway_\w+)", target["expr"]):
                assert re.search(rf"^(# TYPE )?{name}[ {{]", exported, re.M), name


def test_chart_crd_is_the_generated_one():
    chart_crd = (CHART / "templates" / "crd-llmendpoints.yaml").read_text()
    generated = (CHART.parents[1] / "crds" / "llmendpoints.llmep.io.yaml").read_text()
    rendered = by_kind(template(), "CustomResourceDefinition")["llmendpoints.llmep.io"]
    # Kept on uninstall by default: deleting it would delete every LLMEndpoint in the cluster.
    assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
    assert rendered == yaml.safe_load(generated)
    unkept = by_kind(template(sets={"crds.keep": "false"}), "CustomResourceDefinition")["llmendpoints.llmep.io"]
    assert unkept == yaml.safe_load(generated)
    assert chart_crd.startswith("{{- if .Values.crds.enabled }}")
    assert not by_kind(template(sets={"crds.enabled": "false"}), "CustomResourceDefinition")


def test_gateway_termination_grace_covers_prestop_drain_and_shutdown_grace(monkeypatch):
    """The kubelet never kills a draining gateway: the grace period covers the preStop sleep,
    drain_seconds and shutdown_grace_seconds the gateway itself loads from the rendered env."""
    objects = template(sets={"gateway.settings.shutdown_grace_seconds": "40"})
    pod = by_kind(objects, "Deployment")["llmep-gateway"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    for var in [v for v in os.environ if v.startswith("LLMEP_GATEWAY_")]:
        monkeypatch.delenv(var)
    for env in container["env"]:
        if env["name"].startswith("LLMEP_GATEWAY_"):
            monkeypatch.setenv(env["name"], env["value"])
    settings = GatewaySettings()
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]

    assert settings.shutdown_grace_seconds == 40
    assert pod["terminationGracePeriodSeconds"] == pre_stop + settings.drain_seconds + 40 + 5
    error = render_error("gateway.terminationGracePeriodSeconds=10")
    assert "is below preStopSleepSeconds + drain_seconds + shutdown_grace_seconds" in error
