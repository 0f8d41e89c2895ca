"""serveConfigV2: one application running `ray.serve.llm:build_openai_app` with one LLMConfig.

The same builder feeds the operator's RayService and local mode (`llmep serve`), so what is
tested on a laptop is what runs on the cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from llmep_operator import naming
from llmep_operator.api import LLMEndpoint, RoutingPolicy
from llmep_operator.render.plan import ModelSource, ServingPlan, make_plan
from llmep_operator.render.serving_path import is_direct
from llmep_operator.settings import OperatorSettings

IMPORT_PATH = "ray.serve.llm:build_openai_app"
REQUEST_ROUTERS = {RoutingPolicy.PREFIX_CACHE_AFFINITY: "ray.serve.llm.request_router.PrefixCacheAffinityRouter"}


def _engine_kwargs(plan: ServingPlan) -> dict[str, Any]:
    engine = plan.endpoint.spec.engine
    kwargs: dict[str, Any] = dict(plan.profile.engine_defaults)
    kwargs["tensor_parallel_size"] = engine.tensor_parallel_size
    kwargs["pipeline_parallel_size"] = engine.pipeline_parallel_size
    if engine.dtype != "auto" or "dtype" not in kwargs:
        kwargs["dtype"] = engine.dtype
    if engine.max_model_len is not None:
        kwargs["max_model_len"] = engine.max_model_len
    if engine.gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
    if plan.endpoint.spec.model.revision and not plan.model_source.cached:
        # A prefetched folder holds that revision already; vLLM would look it up on the hub.
        kwargs["revision"] = plan.endpoint.spec.model.revision
    lora = plan.endpoint.spec.lora
    if lora is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora.max_rank, max_loras=lora.max_adapters_per_replica)
    kwargs.update(engine.extra_args)
    return kwargs


def _autoscaling(plan: ServingPlan) -> dict[str, Any]:
    scaling = plan.endpoint.spec.autoscaling
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        "target_ongoing_requests": scaling.target_queue_depth,
        "upscale_delay_s": scaling.scale_up_delay_seconds,
        "downscale_delay_s": scaling.scale_down_delay_seconds,
        "metrics_interval_s": scaling.metrics_interval_seconds,
        "look_back_period_s": scaling.look_back_seconds,
    }


def _placement_group(plan: ServingPlan) -> dict[str, Any] | None:
    if plan.profile.is_cpu:
        return {"bundles": [{"CPU": 1}], "strategy": "PACK"}
    if plan.workers_per_replica > 1:
        # One GPU per bundle, packed onto as few nodes as possible: spans nodes when it must.
        return {"bundles": [{"GPU": 1} for _ in range(plan.gpus_per_replica)], "strategy": "PACK"}
    return None


def _deployment_config(plan: ServingPlan) -> dict[str, Any]:
    config: dict[str, Any] = {
        "autoscaling_config": _autoscaling(plan),
        "max_ongoing_requests": plan.endpoint.spec.autoscaling.effective_max_ongoing_requests,
    }
    router = REQUEST_ROUTERS.get(plan.endpoint.spec.routing.policy)
    if router:
        config["request_router_config"] = {
            "request_router_class": router,
            # Ray's default (no limit) sends every request with a popular prefix to one replica
            # however long its queue; past the endpoint's own target, balance load instead.
            "request_router_kwargs": {"imbalanced_threshold": plan.endpoint.spec.autoscaling.target_queue_depth},
        }
    return config


def _loading_source(source: ModelSource) -> str | dict[str, str]:
    """LLMConfig's model_source: a hub id or a path, or a bucket that Ray Serve LLM mirrors."""
    return {"bucket_uri": source.location} if source.is_bucket else source.location


def build_llm_config(plan: ServingPlan) -> dict[str, Any]:
    endpoint = plan.endpoint
    env_vars = {**plan.profile.env, **endpoint.spec.engine.env}
    if plan.model_source.is_local:
        # Weights on a path in the container (file://, pvc://, the filled cache): never reach for the hub.
        env_vars.setdefault("HF_HUB_OFFLINE", "1")
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": endpoint.served_name, "model_source": _loading_source(plan.model_source)},
        "engine_kwargs": _engine_kwargs(plan),
        "deployment_config": _deployment_config(plan),
    }
    lora = endpoint.spec.lora
    if lora is not None:
        # Ray Serve LLM loads '<model_id>:<adapter>' from '<path>/<adapter>' on its first request.
        config["lora_config"] = {
            "dynamic_lora_loading_path": lora.source.rstrip("/"),
            "max_num_adapters_per_replica": lora.max_adapters_per_replica,
        }
    if plan.profile.accelerator_type:
        config["accelerator_type"] = plan.profile.accelerator_type
    placement = _placement_group(plan)
    if placement:
        config["placement_group_config"] = placement
    if env_vars:
        config["runtime_env"] = {"env_vars": env_vars}
    if plan.profile.stream_batching_interval_ms is not None:
        config["experimental_configs"] = {"stream_batching_interval_ms": plan.profile.stream_batching_interval_ms}
    return config


def _ingress_deployment_config(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any] | None:
    """On the proxy path with minReplicas 0, Ray scales the OpenAI ingress to zero too, but after
    its own 600 s default: give it the model's delays, so an idle worker is freed on the
    endpoint's schedule. The direct path has no ingress replica (and refuses this option)."""
    scaling = plan.endpoint.spec.autoscaling
    if is_direct(settings) or scaling.min_replicas > 0:
        return None
    return {
        "autoscaling_config": {
            "upscale_delay_s": scaling.scale_up_delay_seconds,
            "downscale_delay_s": scaling.scale_down_delay_seconds,
        }
    }


def build_application(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    args: dict[str, Any] = {"llm_configs": [build_llm_config(plan)]}
    ingress = _ingress_deployment_config(plan, settings)
    if ingress:
        args["ingress_deployment_config"] = ingress
    return {"name": naming.APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args}


def build_serve_config(endpoint: LLMEndpoint, settings: OperatorSettings) -> dict[str, Any]:
    """The whole serveConfigV2 document, as data."""
    return serve_config_for(make_plan(endpoint, settings), settings)


def serve_config_for(plan: ServingPlan, settings: OperatorSettings) -> dict[str, Any]:
    """build_serve_config for a plan already made (the RayService builder has one)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": settings.serve_port},  # noqa: S104 - inside the pod
        "applications": [build_application(plan, settings)],
    }


@dataclass(frozen=True)
class RayApp:
    """What one endpoint's Ray cluster runs: its serveConfigV2 application and the environment
    every Ray process needs for it (container env on KubeRay, exported by `llmep serve`)."""

    application: dict[str, Any]
    env: dict[str, str]


def build_ray_app(endpoint: LLMEndpoint, settings: OperatorSettings) -> RayApp:
    plan = make_plan(endpoint, settings)
    return RayApp(application=build_application(plan, settings), env=dict(plan.ray_env))


class _NoAliasDumper(yaml.CSafeDumper):
    """Plain YAML without &anchors, so the text reads like a hand-written config; libyaml's
    emitter (the same text as PyYAML's own, 30 times faster: it was most of a reconcile's CPU)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_serve_config(serve_config: dict[str, Any]) -> str:
    """YAML text for RayService.spec.serveConfigV2 (KubeRay takes a string)."""
    return yaml.dump(serve_config, Dumper=_NoAliasDumper, sort_keys=False)
