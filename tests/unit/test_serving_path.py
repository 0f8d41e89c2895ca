"""The serving path: the Ray Serve switches every Ray process of an endpoint gets, the routing
policy, and what each path leaves out of the serveConfigV2."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from llmep_operator.api import parse_endpoint
from llmep_operator.render import build_rayservice, build_serve_config
from llmep_operator.settings import OperatorSettings
from tests.conftest import FIXTURES, load_fixture

pytestmark = pytest.mark.unit

MINIMAL = FIXTURES / "valid" / "minimal.yaml"
DIRECT_SWITCHES = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
}


def _endpoint(**spec_overrides):
    manifest = load_fixture(MINIMAL)
    manifest["metadata"]["namespace"] = "team-a"
    manifest["spec"].update(spec_overrides)
    return parse_endpoint(manifest)


def _ray_containers(rayservice: dict) -> list[dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_direct_path_is_the_default_and_reaches_head_and_workers():
    rayservice = build_rayservice(_endpoint(), OperatorSettings())
    containers = _ray_containers(rayservice)
    assert [c["name"] for c in containers] == ["ray-head", "ray-worker"]
    for container in containers:
        env = _env(container)
        assert {k: env.get(k) for k in DIRECT_SWITCHES} == DIRECT_SWITCHES, container["name"]
        assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"
        assert "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY" not in env


def test_haproxy_threads_come_from_the_settings():
    rayservice = build_rayservice(_endpoint(), OperatorSettings(haproxy_threads=4))
    assert {_env(c)["RAY_SERVE_HAPROXY_NBTHREAD"] for c in _ray_containers(rayservice)} == {"4"}


def test_proxy_path_sets_no_ray_serve_switch():
    rayservice = build_rayservice(_endpoint(), OperatorSettings(serving_path="proxy"))
    for container in _ray_containers(rayservice):
        assert not [k for k in _env(container) if k.startswith("RAY_SERVE_")], container["name"]


def test_scale_to_zero_ingress_delays_only_on_the_proxy_path():
    """Direct streaming has no ingress replica and Ray refuses ingress_deployment_config there."""
    endpoint = _endpoint(autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleDownDelaySeconds": 30})
    direct = build_serve_config(endpoint, OperatorSettings())["applications"][0]["args"]
    proxy = build_serve_config(endpoint, OperatorSettings(serving_path="proxy"))["applications"][0]["args"]
    assert "ingress_deployment_config" not in direct
    assert proxy["ingress_deployment_config"]["autoscaling_config"]["downscale_delay_s"] == 30


def test_least_loaded_routing_leaves_serves_default_router():
    config = build_serve_config(_endpoint(), OperatorSettings())
    (llm,) = config["applications"][0]["args"]["llm_configs"]
    assert "request_router_config" not in llm["deployment_config"]


@pytest.mark.parametrize("serving_path", ["direct", "proxy"])
def test_prefix_cache_affinity_renders_rays_router_on_either_path(serving_path):
    settings = OperatorSettings(serving_path=serving_path)
    rayservice = build_rayservice(_endpoint(routing={"policy": "PrefixCacheAffinity"}), settings)
    (llm,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]["llm_configs"]
    assert llm["deployment_config"]["request_router_config"] == {
        "request_router_class": "ray.serve.llm.request_router.PrefixCacheAffinityRouter",
        # the endpoint's targetQueueDepth (default 8): beyond that imbalance, least-loaded wins
        "request_router_kwargs": {"imbalanced_threshold": 8},
    }
    forwarded = {_env(c).get("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY") for c in _ray_containers(rayservice)}
    # HAProxy hands the prompt to the router only when told to; the proxy path always has it.
    assert forwarded == ({"1"} if serving_path == "direct" else {None})


def test_unknown_routing_policy_is_refused_naming_the_field_and_the_choices():
    with pytest.raises(Exception) as refused:
        _endpoint(routing={"policy": "RoundRobin"})
    message = str(refused.value)
    assert "spec.routing.policy" in message
    assert "LeastLoaded" in message and "PrefixCacheAffinity" in message


@pytest.mark.parametrize(("field", "value"), [("serving_path", "haproxy"), ("haproxy_threads", 0)])
def test_bad_serving_settings_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        OperatorSettings(**{field: value})


@pytest.mark.parametrize("serving_path", ["direct", "proxy"])
def test_lora_on_the_direct_path_forwards_the_body_to_rays_router(serving_path):
    """Ray refuses LoRA under direct streaming unless HAProxy hands the router the body, where
    the adapter is named (`model`): "LoRA multiplexing with direct streaming requires
    RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY=1"."""
    lora = {"source": "s3://models/adapters", "adapters": [{"name": "sql"}]}
    rayservice = build_rayservice(_endpoint(lora=lora), OperatorSettings(serving_path=serving_path))
    forwarded = {_env(c).get("RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY") for c in _ray_containers(rayservice)}
    assert forwarded == ({"1"} if serving_path == "direct" else {None})
