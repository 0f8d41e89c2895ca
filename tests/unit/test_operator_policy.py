"""The operator's policy over what an endpoint's creator may choose: refused choices are
InvalidSpec naming the field and the setting that allows them, and nothing is rendered."""

from __future__ import annotations

import pytest

from llmep_operator.api import parse_endpoint
from llmep_operator.errors import InvalidSpec
from llmep_operator.render import build_children, build_rayservice
from llmep_operator.settings import OperatorSettings
from tests.conftest import FIXTURES, load_fixture

pytestmark = pytest.mark.unit

MINIMAL = FIXTURES / "valid" / "minimal.yaml"


def _endpoint(**spec_overrides):
    manifest = load_fixture(MINIMAL)
    manifest["metadata"]["namespace"] = "team-b"
    for key, value in spec_overrides.items():
        manifest["spec"][key] = value
    return parse_endpoint(manifest)


def test_an_image_the_settings_do_not_name_is_refused():
    endpoint = _endpoint(image="attacker.example/ray-llm:latest")
    with pytest.raises(InvalidSpec) as refused:
        build_children(endpoint, OperatorSettings())
    message = str(refused.value)
    assert "spec.image 'attacker.example/ray-llm:latest'" in message
    assert "policy.allowed_images" in message


def test_allowed_image_patterns_let_an_image_through():
    settings = OperatorSettings(policy={"allowed_images": ["registry.example.com/ray-llm:*"]})
    rayservice = build_rayservice(_endpoint(image="registry.example.com/ray-llm:2.60.0-custom"), settings)
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["image"] == "registry.example.com/ray-llm:2.60.0-custom"
    with pytest.raises(InvalidSpec, match="spec.image"):
        build_rayservice(_endpoint(image="registry.example.com/other:1"), settings)


def test_the_configured_images_are_allowed_by_default():
    settings = OperatorSettings()
    for image in settings.configured_images:
        assert build_rayservice(_endpoint(image=image), settings)


@pytest.mark.parametrize("arg", ["trust_remote_code", "worker_extension_cls", "allowed_local_media_path"])
def test_engine_args_that_run_or_read_code_are_refused(arg):
    with pytest.raises(InvalidSpec) as refused:
        build_children(_endpoint(engine={"extraArgs": {arg: True}}), OperatorSettings())
    assert f"spec.engine.extraArgs.{arg} is refused" in str(refused.value)
    assert "policy.refused_engine_args" in str(refused.value)


def test_an_admin_can_allow_a_refused_engine_arg():
    settings = OperatorSettings(policy={"refused_engine_args": []})
    rayservice = build_rayservice(_endpoint(engine={"extraArgs": {"trust_remote_code": True}}), settings)
    assert "trust_remote_code: true" in rayservice["spec"]["serveConfigV2"]


@pytest.mark.parametrize(
    ("name", "pattern"),
    [("LD_PRELOAD", "LD_*"), ("PYTHONPATH", "PYTHON*"), ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_*"), ("HF_ENDPOINT", None)],
)
def test_env_that_loads_code_changes_ray_or_moves_the_token_is_refused(name, pattern):
    with pytest.raises(InvalidSpec) as refused:
        build_children(_endpoint(engine={"env": {name: "x"}}), OperatorSettings())
    assert f"spec.engine.env.{name} is refused" in str(refused.value)
    assert f"matches {pattern or name!r}" in str(refused.value)
    assert "policy.refused_env" in str(refused.value)


def test_ordinary_engine_env_and_args_pass():
    endpoint = _endpoint(engine={"env": {"NCCL_DEBUG": "WARN"}, "extraArgs": {"enable_prefix_caching": True}})
    assert build_children(endpoint, OperatorSettings())


def test_worker_pods_carry_no_kubernetes_credentials():
    cluster = build_rayservice(_endpoint(), OperatorSettings())["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["automountServiceAccountToken"] is False
    # The head's autoscaler sidecar scales workers through KubeRay's ServiceAccount for the cluster.
    assert "automountServiceAccountToken" not in cluster["headGroupSpec"]["template"]["spec"]
    assert "serviceAccountName" not in cluster["headGroupSpec"]["template"]["spec"]


def _ray_pods(endpoint, settings: OperatorSettings) -> dict[str, dict]:
    cluster = build_rayservice(endpoint, settings)["spec"]["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    return {"head": cluster["headGroupSpec"]["template"]["spec"], "worker": workers["template"]["spec"]}


def test_the_model_token_reaches_only_the_workers_that_load_the_model():
    endpoint = _endpoint(model={"source": "hf://org/gated-model", "tokenSecretRef": {"name": "hf", "key": "token"}})
    pods = _ray_pods(endpoint, OperatorSettings())
    names = {kind: {e["name"] for e in pod["containers"][0].get("env", [])} for kind, pod in pods.items()}
    assert {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} <= names["worker"], names
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & names["head"], names
    token = next(e for e in pods["worker"]["containers"][0]["env"] if e["name"] == "HF_TOKEN")
    assert token["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}


def test_scratch_volumes_are_bounded_and_counted_by_the_scheduler():
    settings = OperatorSettings(
        scratch={"tmp_size_limit": "4Gi", "cache_size_limit": "500Gi", "ephemeral_storage_request": "10Gi"}
    )
    for kind, pod in _ray_pods(_endpoint(), settings).items():
        empty_dirs = {v["name"]: v["emptyDir"] for v in pod["volumes"] if "emptyDir" in v}
        container = pod["containers"][0]
        assert empty_dirs["tmp"] == {"sizeLimit": "4Gi"}, kind
        assert empty_dirs["home-cache"] == {"sizeLimit": "500Gi"}, kind
        # /dev/shm is memory: bounded by what the pod may use anyway.
        memory = container["resources"]["requests"]["memory"]
        assert empty_dirs["dshm"] == {"medium": "Memory", "sizeLimit": memory}, kind
        assert container["resources"]["requests"]["ephemeral-storage"] == "10Gi", kind


def test_a_scratch_size_kubernetes_would_refuse_is_refused_with_the_setting_named():
    with pytest.raises(ValueError, match=r"scratch\.cache_size_limit"):
        OperatorSettings(scratch={"cache_size_limit": "200 GB"})
