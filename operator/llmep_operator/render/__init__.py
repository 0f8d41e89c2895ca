"""Pure builders: (endpoint, settings) -> manifests as data. No API calls, no ray or vllm."""

from llmep_operator.render.plan import ServingPlan, make_plan
from llmep_operator.render.rayservice import build_cache_pvc, build_children, build_rayservice, build_serve_service
from llmep_operator.render.serve_config import (
    RayApp,
    build_llm_config,
    build_ray_app,
    build_serve_config,
    render_serve_config,
)

__all__ = [
    "RayApp",
    "ServingPlan",
    "build_cache_pvc",
    "build_children",
    "build_llm_config",
    "build_ray_app",
    "build_rayservice",
    "build_serve_config",
    "build_serve_service",
    "make_plan",
    "render_serve_config",
]
