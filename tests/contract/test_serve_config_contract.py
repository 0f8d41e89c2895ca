"""The serveConfigV2 the operator renders is accepted by Ray's own classes: Serve's deploy
schema for the document, and ray.serve.llm's LLMServingArgs / LLMConfig for each model, with
the engine settings resolved the way the LLMServer does before starting vLLM."""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("ray.serve.llm", reason="the contract tier needs ray[serve] from `make setup`")

from ray.serve.config import AutoscalingConfig  # noqa: E402
from ray.serve.llm import LLMConfig, LLMServingArgs  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from llmep_operator.api import parse_endpoint  # noqa: E402
from llmep_operator.render import build_rayservice, build_serve_config  # noqa: E402
from llmep_operator.settings import OperatorSettings  # noqa: E402
from tests.conftest import VALID_FIXTURES, load_fixture  # noqa: E402

pytestmark = pytest.mark.contract
SETTINGS = OperatorSettings()
MINIMAL = next(p for p in VALID_FIXTURES if p.stem == "minimal")

VARIANTS = {
    "defaults": {},
    "h100-tp2": {"engine": {"tensorParallelSize": 2}, "resources": {"profile": "nvidia-h100:2"}},
    "multinode-tp8-pp2": {
        "engine": {"tensorParallelSize": 8, "pipelineParallelSize": 2},
        "resources": {"profile": "nvidia-h100"},
    },
    "l4-scale-to-zero": {
        "resources": {"profile": "nvidia-l4"},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "targetQueueDepth": 2},
    },
    "a100-extra-args": {
        "resources": {"profile": "nvidia-a100-80gb"},
        "engine": {
            "extraArgs": {"enable_prefix_caching": True, "max_num_seqs": 64},
            "maxModelLen": 4096,
            "dtype": "bfloat16",
        },
    },
    "gke-l4": {"resources": {"profile": "gke-l4"}},
    "cpu": {"resources": {"profile": "cpu"}, "engine": {"maxModelLen": 256}},
    "s3-source": {"model": {"source": "s3://bucket/org/model"}},
    "gs-source": {"model": {"source": "gs://bucket/org/model"}},
    "pvc-source": {"model": {"source": "pvc://weights/org/model", "servedName": "org-model"}},
    "hf-revision-token": {"model": {"source": "hf://org/model", "revision": "main", "tokenSecretRef": {"name": "hf"}}},
    "cache": {"cache": {"enabled": True}},
}


def _endpoint(spec_overrides: dict):
    manifest = load_fixture(MINIMAL)
    manifest["metadata"]["namespace"] = "team-a"
    manifest["spec"].update(spec_overrides)
    return parse_endpoint(manifest)


def _cases():
    for path in VALID_FIXTURES:
        yield pytest.param(parse_endpoint(load_fixture(path)), id=f"fixture-{path.stem}")
    for name, overrides in VARIANTS.items():
        yield pytest.param(_endpoint(overrides), id=name)


@pytest.mark.parametrize("endpoint", list(_cases()))
def test_serve_config_passes_rays_own_validation(endpoint):
    text = build_rayservice(endpoint, SETTINGS)["spec"]["serveConfigV2"]
    document = yaml.safe_load(text)
    schema = ServeDeploySchema.model_validate(document)
    (app,) = schema.applications
    assert app.import_path == "ray.serve.llm:build_openai_app"
    args = LLMServingArgs.model_validate(app.args)
    (config,) = args.llm_configs
    assert config.model_id == endpoint.served_name
    engine = config.get_engine_config()
    assert engine.tensor_parallel_degree == endpoint.spec.engine.tensor_parallel_size
    assert engine.pipeline_parallel_degree == endpoint.spec.engine.pipeline_parallel_size
    autoscaling = config.deployment_config["autoscaling_config"]
    assert autoscaling["target_ongoing_requests"] == endpoint.spec.autoscaling.target_queue_depth
    assert autoscaling["min_replicas"] == endpoint.spec.autoscaling.min_replicas
    parsed = AutoscalingConfig.model_validate(autoscaling)  # Serve's own model of the block
    assert parsed.metrics_interval_s == endpoint.spec.autoscaling.metrics_interval_seconds
    assert parsed.look_back_period_s == endpoint.spec.autoscaling.look_back_seconds


def test_placement_bundles_cover_every_gpu_of_a_multi_node_replica():
    config = build_serve_config(_endpoint(VARIANTS["multinode-tp8-pp2"]), SETTINGS)
    llm = LLMConfig.model_validate(config["applications"][0]["args"]["llm_configs"][0])
    bundles = llm.get_engine_config().placement_bundles
    assert sum(b.get("GPU", 0) for b in bundles) == 16


def test_cpu_profile_resolves_to_a_cpu_engine():
    config = build_serve_config(_endpoint(VARIANTS["cpu"]), SETTINGS)
    llm = LLMConfig.model_validate(config["applications"][0]["args"]["llm_configs"][0])
    assert llm.accelerator_config.kind == "cpu"
    assert llm.engine_kwargs["dtype"] == "float32"


@pytest.mark.parametrize("endpoint", list(_cases()))
def test_direct_path_passes_rays_direct_streaming_checks(endpoint):
    """build_openai_app refuses, under direct streaming, more than one model, an ingress
    deployment config and a custom ingress class: the rendered args must pass its own check."""
    from ray.llm._internal.serve.core.ingress.builder import _validate_direct_streaming_ingress_config

    args = LLMServingArgs.model_validate(build_serve_config(endpoint, SETTINGS)["applications"][0]["args"])
    assert len(args.llm_configs) == 1
    _validate_direct_streaming_ingress_config(args.ingress_deployment_config, args.ingress_cls_config)


def test_prefix_cache_affinity_names_a_router_serve_can_load():
    import inspect

    from ray.serve.config import RequestRouterConfig
    from ray.serve.llm.request_router import PrefixCacheAffinityRouter

    endpoint = _endpoint({"routing": {"policy": "PrefixCacheAffinity"}, "autoscaling": {"maxReplicas": 2}})
    llm = LLMConfig.model_validate(build_serve_config(endpoint, SETTINGS)["applications"][0]["args"]["llm_configs"][0])
    router = RequestRouterConfig.model_validate(llm.deployment_config["request_router_config"])
    assert router.get_request_router_class() is PrefixCacheAffinityRouter
    # Every kwarg is one the router's initialize_state takes.
    accepted = inspect.signature(PrefixCacheAffinityRouter.initialize_state).parameters
    assert set(router.request_router_kwargs) <= set(accepted), router.request_router_kwargs


def test_every_rendered_switch_is_one_ray_reads():
    """A misspelt variable would be ignored in silence: each name must be one Ray's constants read."""
    import inspect

    import ray.llm._internal.serve.constants as llm_constants
    import ray.serve._private.constants as serve_constants

    from llmep_operator.render.serving_path import ray_process_env

    endpoint = _endpoint({"routing": {"policy": "PrefixCacheAffinity"}})
    read_by_ray = inspect.getsource(serve_constants) + inspect.getsource(llm_constants)
    names = ray_process_env(endpoint, SETTINGS)
    assert len(names) == 5
    for name in names:
        assert f'"{name}"' in read_by_ray, name


def test_scale_to_zero_ingress_follows_the_endpoints_delays_in_rays_builder():
    """Ray's own builder scales the OpenAI ingress to zero with the model; its downscale delay
    must be the endpoint's, or the worker that hosts it stays up for Ray's 600 s default.

    The ingress options are computed as build_openai_app computes them (its two calls), not by
    calling it: it starts a local Ray, which would then serve this whole pytest process."""
    from ray.llm._internal.common.dict_utils import maybe_apply_llm_deployment_config_defaults
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress

    endpoint = _endpoint({"autoscaling": {"minReplicas": 0, "scaleDownDelaySeconds": 30}})
    proxy_path = OperatorSettings(serving_path="proxy")
    args = LLMServingArgs.model_validate(build_serve_config(endpoint, proxy_path)["applications"][0]["args"])
    options = maybe_apply_llm_deployment_config_defaults(
        OpenAiIngress.get_deployment_options(args.llm_configs), args.ingress_deployment_config
    )
    ingress = AutoscalingConfig.model_validate(options["autoscaling_config"])
    assert (ingress.min_replicas, ingress.downscale_delay_s, ingress.upscale_delay_s) == (0, 30, 3)


@pytest.mark.parametrize(
    "source", ["s3://models/adapters/", "gs://models/adapters", "abfss://c@acct.dfs.core.windows.net/a"]
)
def test_lora_settings_are_rays_and_vllms_own(source):
    """spec.lora becomes Ray Serve LLM's LoraConfig (which checks the object-store path itself)
    and vLLM's LoRA engine arguments, which vLLM's own LoRAConfig accepts."""
    from vllm.config.lora import LoRAConfig

    lora = {"source": source, "adapters": [{"name": "sql"}], "maxAdaptersPerReplica": 3, "maxRank": 32}
    endpoint = _endpoint({"lora": lora})
    llm = LLMConfig.model_validate(build_serve_config(endpoint, SETTINGS)["applications"][0]["args"]["llm_configs"][0])
    assert llm.lora_config.dynamic_lora_loading_path == source.rstrip("/")
    assert llm.lora_config.max_num_adapters_per_replica == 3
    # Ray's multiplexing keeps as many adapters per replica as the engine has LoRA slots.
    assert llm.multiplex_config().max_num_models_per_replica == 3
    kwargs = llm.get_engine_config().get_initialization_kwargs()
    assert kwargs["enable_lora"] is True
    engine_lora = LoRAConfig(max_lora_rank=kwargs["max_lora_rank"], max_loras=kwargs["max_loras"])
    assert (engine_lora.max_lora_rank, engine_lora.max_loras) == (32, 3)


def test_an_endpoint_without_lora_renders_no_lora_settings():
    llm = LLMConfig.model_validate(
        build_serve_config(_endpoint({}), SETTINGS)["applications"][0]["args"]["llm_configs"][0]
    )
    assert llm.lora_config is None
    assert "enable_lora" not in llm.engine_kwargs
