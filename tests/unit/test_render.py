"""Builders: golden files a reviewer can read, plus the rules each builder must keep.

Regenerate the golden files after an intended change with `LLMEP_UPDATE_GOLDEN=1 make test-unit`.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

import pytest
import yaml

from llmep_operator.api import parse_endpoint
from llmep_operator.errors import InvalidSpec
from llmep_operator.render import build_children, build_rayservice, build_serve_config, make_plan
from llmep_operator.render.fill_job import FETCH_PROGRAM
from llmep_operator.settings import OperatorSettings
from tests.conftest import FIXTURES, VALID_FIXTURES, load_fixture

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).parent / "golden"
SETTINGS = OperatorSettings()
MINIMAL = FIXTURES / "valid" / "minimal.yaml"


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def _endpoint(path: Path, **spec_overrides):
    manifest = load_fixture(path)
    manifest["metadata"].setdefault("namespace", "team-a")
    manifest["spec"].update(spec_overrides)
    return parse_endpoint(manifest)


def _serve_config_of(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


@pytest.mark.parametrize("path", VALID_FIXTURES, ids=lambda p: p.stem)
def test_children_match_golden_file(path):
    children = build_children(_endpoint(path), SETTINGS, owner_uid="00000000-0000-0000-0000-000000000001")
    # serveConfigV2 is shown parsed, so the golden file reads as YAML, not as an escaped string.
    for child in children:
        if child["kind"] == "RayService":
            child["spec"]["serveConfigV2"] = _serve_config_of(child)
    text = yaml.dump_all(children, Dumper=_Dumper, sort_keys=False)
    golden = GOLDEN / f"{path.stem}.yaml"
    if os.environ.get("LLMEP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"no golden file {golden.name}: run with LLMEP_UPDATE_GOLDEN=1 and review it"
    assert text == golden.read_text(), f"{golden.name} differs; if intended, LLMEP_UPDATE_GOLDEN=1"


def test_serve_config_is_one_build_openai_app_with_one_llm_config():
    config = build_serve_config(_endpoint(FIXTURES / "valid" / "qwen-7b-h100.yaml"), SETTINGS)
    (app,) = config["applications"]
    assert app["import_path"] == "ray.serve.llm:build_openai_app"
    (llm,) = app["args"]["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "qwen-7b", "model_source": "Qwen/Qwen2.5-7B-Instruct"}
    assert llm["accelerator_type"] == "H100"
    assert llm["engine_kwargs"]["max_model_len"] == 8192
    assert llm["engine_kwargs"]["enable_prefix_caching"] is True
    assert llm["deployment_config"]["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 8,
        "upscale_delay_s": 5,
        "downscale_delay_s": 300,
        "metrics_interval_s": 1,  # responsive defaults: Serve's own are 10 s and 30 s
        "look_back_period_s": 5,
    }


def test_object_store_credentials_reach_only_the_workers_from_their_secret():
    rayservice = build_rayservice(
        _endpoint(
            MINIMAL,
            model={"source": "s3://models/qwen"},
            lora={"source": "s3://models/adapters", "adapters": [{"name": "sql"}]},
            storageSecretRef={"name": "s3-credentials"},
        ),
        SETTINGS,
    )
    cluster = rayservice["spec"]["rayClusterConfig"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert worker["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    # The head loads no model (num-cpus 0): it never sees the credentials.
    assert "envFrom" not in head
    assert "s3-credentials" not in rayservice["spec"]["serveConfigV2"]


def test_hf_token_comes_from_the_secret_and_is_never_inlined():
    rayservice = build_rayservice(
        _endpoint(
            MINIMAL,
            model={"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "tokenSecretRef": {"name": "hf", "key": "tok"}},
        ),
        SETTINGS,
    )
    worker = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in worker["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "tok"}}
    assert "value" not in env["HF_TOKEN"]
    assert "HF_TOKEN" not in rayservice["spec"]["serveConfigV2"]


def test_gpu_worker_group_carries_profile_scheduling():
    rayservice = build_rayservice(
        _endpoint(MINIMAL, resources={"profile": "nvidia-h100"}, autoscaling={"minReplicas": 2, "maxReplicas": 5}),
        SETTINGS,
    )
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (2, 5, 2)
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    assert "tolerations" not in head


def test_parallelism_beyond_one_node_spans_several_workers():
    endpoint = _endpoint(
        MINIMAL,
        engine={"tensorParallelSize": 8, "pipelineParallelSize": 2},
        resources={"profile": "nvidia-h100"},
        autoscaling={"minReplicas": 1, "maxReplicas": 3},
    )
    plan = make_plan(endpoint, SETTINGS)
    assert (plan.gpus_per_worker, plan.workers_per_replica) == (8, 2)
    rayservice = build_rayservice(endpoint, SETTINGS)
    group = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert (group["minReplicas"], group["maxReplicas"]) == (2, 6)
    llm = _serve_config_of(rayservice)["applications"][0]["args"]["llm_configs"][0]
    assert len(llm["placement_group_config"]["bundles"]) == 16
    assert llm["placement_group_config"]["strategy"] == "PACK"


def test_scale_to_zero_starts_with_no_workers():
    group = build_rayservice(_endpoint(MINIMAL, autoscaling={"minReplicas": 0, "maxReplicas": 2}), SETTINGS)["spec"][
        "rayClusterConfig"
    ]["workerGroupSpecs"][0]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (0, 0, 2)


def test_unknown_profile_is_invalid_spec_naming_the_known_ones():
    with pytest.raises(InvalidSpec, match=r"spec.resources.profile 'tpu-v5'.*nvidia-h100"):
        make_plan(_endpoint(MINIMAL, resources={"profile": "tpu-v5"}), SETTINGS)


def test_parallelism_no_node_shape_holds_is_invalid_spec():
    with pytest.raises(InvalidSpec, match="multiple of 8"):
        make_plan(_endpoint(MINIMAL, engine={"tensorParallelSize": 12}, resources={"profile": "nvidia-h100"}), SETTINGS)
    with pytest.raises(InvalidSpec, match="no GPUs"):
        make_plan(_endpoint(MINIMAL, engine={"tensorParallelSize": 2}, resources={"profile": "cpu"}), SETTINGS)


def test_cpu_profile_adapts_the_engine_without_a_fork():
    llm = build_serve_config(_endpoint(MINIMAL, resources={"profile": "cpu"}), SETTINGS)["applications"][0]["args"][
        "llm_configs"
    ][0]
    assert llm["engine_kwargs"]["dtype"] == "float32"
    assert llm["engine_kwargs"]["distributed_executor_backend"] == "mp"
    assert llm["placement_group_config"]["bundles"] == [{"CPU": 1}]
    assert llm["runtime_env"]["env_vars"]["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "accelerator_type" not in llm


def test_every_pod_template_is_restricted():
    rayservice = build_rayservice(_endpoint(MINIMAL), SETTINGS)
    cluster = rayservice["spec"]["rayClusterConfig"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}


def test_children_are_owned_by_the_endpoint_and_labelled():
    for child in build_children(_endpoint(MINIMAL, cache={"enabled": True}), SETTINGS, owner_uid="u1"):
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == "u1" and owner["controller"] is True
        assert child["metadata"]["labels"]["llmep.io/endpoint"] == "qwen-small"
    kinds = [c["kind"] for c in build_children(_endpoint(MINIMAL, cache={"enabled": True}), SETTINGS)]
    assert kinds == ["PersistentVolumeClaim", "RayService", "Service"]


PREFETCH = FIXTURES / "valid" / "prefetch-s3.yaml"


def _by_kind(children: list[dict]) -> dict[str, dict]:
    return {c["kind"]: c for c in children}


def test_prefetch_fills_the_cache_with_a_job_before_the_rayservice():
    children = build_children(_endpoint(PREFETCH), SETTINGS, owner_uid="u1")
    assert [c["kind"] for c in children] == ["PersistentVolumeClaim", "Job", "RayService", "Service"]
    job = _by_kind(children)["Job"]
    assert job["metadata"]["name"].startswith("qwen-prefetched-fill-")
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "weights-fill"
    assert job["metadata"]["labels"]["llmep.io/endpoint"] == "qwen-prefetched"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u1"
    assert job["spec"]["backoffLimit"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    folder = container["command"][4]
    assert container["command"] == ["python", "-c", FETCH_PROGRAM, "s3://models/qwen2.5-7b-instruct", folder]
    assert folder.startswith("/home/ray/.cache/huggingface/llmep-weights/")
    assert container["image"] == make_plan(_endpoint(PREFETCH), SETTINGS).image
    assert {"name": "weights-cache", "mountPath": "/home/ray/.cache/huggingface"} in container["volumeMounts"]
    assert {"name": "weights-cache", "persistentVolumeClaim": {"claimName": "qwen-prefetched-weights"}} in pod[
        "volumes"
    ]
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    sc = container["securityContext"]
    assert (sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"], sc["capabilities"]) == (
        False,
        True,
        {"drop": ["ALL"]},
    )
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}


def test_the_fill_program_needs_only_what_serving_images_have():
    """The Job runs weights_fetch.py's text with the serving image's python: it may import the
    standard library, boto3/botocore and huggingface_hub, never llmep itself."""
    allowed = {*sys.stdlib_module_names, "boto3", "botocore", "huggingface_hub", "__future__"}
    imported = set()
    for node in ast.walk(ast.parse(FETCH_PROGRAM)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported and imported <= allowed, imported - allowed


def test_prefetched_replicas_read_the_filled_folder_offline():
    children = _by_kind(build_children(_endpoint(PREFETCH), SETTINGS))
    folder = children["Job"]["spec"]["template"]["spec"]["containers"][0]["command"][4]
    llm = _serve_config_of(children["RayService"])["applications"][0]["args"]["llm_configs"][0]
    assert llm["model_loading_config"]["model_source"] == folder  # a path, not a bucket_uri
    assert llm["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_a_hub_source_is_fetched_at_its_revision_and_the_engine_reads_the_folder():
    endpoint = _endpoint(
        PREFETCH,
        model={"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "revision": "v2", "tokenSecretRef": {"name": "hf"}},
        storageSecretRef=None,
    )
    children = _by_kind(build_children(endpoint, SETTINGS))
    container = children["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["python", "-c", FETCH_PROGRAM, "hf://meta-llama/Llama-3.1-8B-Instruct"]
    assert container["command"][5:] == ["--revision", "v2"]
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert "envFrom" not in container
    llm = _serve_config_of(children["RayService"])["applications"][0]["args"]["llm_configs"][0]
    assert "revision" not in llm["engine_kwargs"]  # the folder holds that revision; no hub lookup


def test_a_new_source_is_a_new_job_filling_a_folder_of_its_own():
    first = _by_kind(build_children(_endpoint(PREFETCH), SETTINGS))["Job"]
    other = _by_kind(build_children(_endpoint(PREFETCH, model={"source": "s3://models/other"}), SETTINGS))["Job"]
    assert first["metadata"]["name"] != other["metadata"]["name"]
    assert (
        first["spec"]["template"]["spec"]["containers"][0]["command"][3]
        != (other["spec"]["template"]["spec"]["containers"][0]["command"][3])
    )


def test_the_longest_endpoint_name_keeps_the_fill_pods_names_within_63():
    manifest = load_fixture(PREFETCH)
    manifest["metadata"]["name"] = "a" * 40  # the API's longest
    job = _by_kind(build_children(parse_endpoint(manifest), SETTINGS))["Job"]
    assert len(job["metadata"]["name"] + "-xxxxx") <= 63  # the Job controller's pod names


def test_without_prefetch_there_is_no_job():
    kinds = [c["kind"] for c in build_children(_endpoint(MINIMAL, cache={"enabled": True}), SETTINGS)]
    assert "Job" not in kinds
