"""Fuzzing LLMEndpoint specs with hypothesis against the real API server, with the operator running
as the chart's ServiceAccount. Strategies use the real field names with valid and invalid values:
wrong types, out-of-range integers, bad URL schemes, long and malformed names, unknown fields, and
cross-field violations (minReplicas > maxReplicas, profile GPU count != tensorParallelSize,
an alias repeating servedName, extraArgs overriding first-class fields).

Each generated object is either rejected at admission (400/422, with a message that names the
field path: "spec." or "metadata.name", as `kubectl apply` shows it) or admitted and reconciled
by the operator without an unhandled exception: it gets a Ready condition with a reason (e.g.
InvalidSpec for an unknown profile) and the operator's output has no traceback. Objects are
created with fieldValidation=Strict, as kubectl does, so unknown fields are refused, not pruned.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client.rest import ApiException

from llmep_operator.api import GROUP, PLURAL, VERSION
from tests.cluster.conftest import wait_until

pytestmark = pytest.mark.timeout(420)

EXAMPLES = int(os.environ.get("LLMEP_SPEC_FUZZ_EXAMPLES", "400"))
BATCH = 8  # admitted endpoints alive at once

junk = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)  # fmt: skip


def field(valid: st.SearchStrategy, *invalid: object) -> st.SearchStrategy:
    """Mostly valid values, sometimes a listed invalid one, rarely anything at all: with a dozen
    fields per object, about half of the objects come out valid."""
    bad = st.sampled_from(invalid) if invalid else junk
    return st.one_of(*[valid] * 24, bad, junk)


sources = field(
    st.sampled_from(["hf://Qwen/Qwen2.5-7B-Instruct", "s3://bucket/model", "pvc://models/llama", "file:///models/tiny"]),
    "http://example.com/model", "ftp://x/y", "hf://", "hf:// spaced/name", "", "x" * 2000, "file://relative",
)  # fmt: skip
names = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,20}\Z", fullmatch=True)
served = field(names, "-leading-dash", "has space", "x" * 200, "", "ünïcode")
aliases = field(st.lists(names, max_size=3, unique=True), ["dup", "dup"], [""], ["x" * 200], list(range(20)))
profiles = field(
    st.sampled_from(["default", "cpu", "nvidia-h100:1", "nvidia-h100:2", "nvidia-l4:1", "nvidia-a100-80gb"]),
    "tpu-v5", "nvidia-h100:0", "NVIDIA-H100", "nvidia-h100:1:2", "gpu:x", "unknown-profile",
)  # fmt: skip
small = st.integers(0, 3)
engine = st.fixed_dictionaries(
    {},
    optional={
        "maxModelLen": field(st.integers(16, 131072), 0, 15, 10485761, -1, "4096", 4096.5),
        "tensorParallelSize": field(st.sampled_from([1, 2]), 0, 65, "2"),
        "pipelineParallelSize": field(st.sampled_from([1, 2]), 0, 65),
        "dtype": field(st.sampled_from(["auto", "float16", "bfloat16", "float32"]), "fp8", "FLOAT16", 16),
        "gpuMemoryUtilization": field(st.floats(0.1, 1.0), -0.1, 1.5, "0.9"),
        "extraArgs": field(
            st.fixed_dictionaries({}, optional={"enable_prefix_caching": st.booleans(), "seed": st.integers(0, 9)}),
            {"max_model_len": 4096},
            {"tensor_parallel_size": 2},
            "not-an-object",
        ),  # fmt: skip
        "env": field(
            st.dictionaries(st.from_regex(r"\A[A-Z_]{1,8}\Z", fullmatch=True), st.text(max_size=8), max_size=2),
            {"A": 1},
            "x",
        ),  # fmt: skip
    },
)
autoscaling = st.fixed_dictionaries(
    {},
    optional={
        # Few replicas: every admitted one becomes simulated pods on the shared rig.
        "minReplicas": field(small, -1, 1001, "1", 1.5),
        "maxReplicas": field(st.integers(1, 1000), 0, 1001, "3"),
        "targetQueueDepth": field(st.integers(1, 10000), 0, 10001),
        "maxOngoingRequests": field(st.integers(1, 100000), 0),
        "scaleUpDelaySeconds": field(st.integers(0, 3600), -5, 3601),
        "scaleDownDelaySeconds": field(st.integers(0, 86400), 86401),
    },
)
specs = st.fixed_dictionaries(
    {"model": st.fixed_dictionaries(
        {"source": sources},
        optional={
            "servedName": served, "aliases": aliases,
            "revision": field(st.sampled_from(["main", "v1.0", "abc123"]), "has space", "x" * 200),
            "tokenSecretRef": field(st.fixed_dictionaries({"name": st.sampled_from(["hf-token", "tok"])},
                                                          optional={"key": st.sampled_from(["token", "hf"])}),
                                    {"name": "UPPER"}, {"key": "x"}, {"name": ""}),
        },
    )},
    optional={
        "engine": engine,
        "resources": st.fixed_dictionaries({}, optional={"profile": profiles}),
        "autoscaling": autoscaling,
        "cache": st.fixed_dictionaries({}, optional={
            "enabled": field(st.booleans(), "yes"),
            "size": field(st.sampled_from(["10Gi", "1.5Ti", "500M"]), "10 GB", "-1Gi"),
            "storageClassName": field(st.sampled_from(["standard", "fast"]), "x" * 300)}),
        "image": field(st.sampled_from(["rayproject/ray-llm:2.49.0-py311-cu128", "registry.local/img@sha256:abc"]),
                       "has space", ""),
    },
)  # fmt: skip
# Fields this API does not have, refused under fieldValidation=Strict.
unknown_fields = st.sampled_from([("replicas", 2), ("gpus", 1), ("engine", {"unknownEngineField": 1}),
                                  ("model", {"source": "hf://a/b", "tokenSecret": "x"})])  # fmt: skip
specs = st.one_of(*[specs] * 6, st.tuples(specs, unknown_fields).map(lambda t: {**t[0], t[1][0]: t[1][1]}))
metadata_names = st.one_of(
    st.from_regex(r"\A[a-z][a-z0-9-]{0,20}[a-z0-9]\Z", fullmatch=True),
    st.from_regex(r"\A[a-z][a-z0-9-]{40,70}\Z", fullmatch=True),  # around the child-name length limit
    st.sampled_from(["UpperCase", "under_score", "dot.ted", "-lead", "trail-"]),
)


@pytest.fixture
def operator(chart_operator):
    """The operator as the chart's ServiceAccount, running through the test; once it has stopped,
    chart_operator asserts that it raised nothing and logged no traceback."""
    with chart_operator(drift_check_seconds=30)() as r:
        yield r


def test_every_generated_spec_is_rejected_with_a_field_path_or_reconciled_cleanly(cluster, namespace, operator):
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    live: list[str] = []
    rejected_without_path: list[str] = []
    started = time.monotonic()

    def reason(name: str) -> str | None:
        obj = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        ready = next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Ready"), None)
        return ready["reason"] if ready and ready.get("reason") else None

    def settle() -> None:
        """Wait for a Ready reason on every live endpoint, then delete them, so that the simulated
        pods of admitted endpoints never pile up on the shared rig."""

        def all_reconciled() -> bool:
            for name in list(live):
                if r := reason(name):
                    reasons[r] += 1
                    live.remove(name)
                    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            return not live

        t0 = time.monotonic()
        wait_until(all_reconciled, timeout=60, interval=0.2, message=lambda: f"a Ready reason on {live}")
        tally["settle ms"] += int((time.monotonic() - t0) * 1000)

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(name=metadata_names, spec=specs)
    def create(name: str, spec: dict) -> None:
        tally["tried"] += 1
        name = f"{name[:2]}{tally['tried']}{name[2:]}"  # unique, keeping the generated shape and length
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LLMEndpoint", "metadata": {"name": name}, "spec": spec}
        try:
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, body, field_validation="Strict"
            )
        except ApiException as exc:
            assert exc.status in (400, 422), f"{exc.status} {exc.body[:500]} for {body}"
            tally[f"rejected {exc.status}"] += 1
            if "spec." not in exc.body and "metadata.name" not in exc.body and "spec:" not in exc.body:
                rejected_without_path.append(exc.body[:300])
            return
        tally["admitted"] += 1
        live.append(name)
        if len(live) >= BATCH:
            settle()

    create()
    settle()
    print(  # to the real stdout: KopfRunner redirects sys.stdout while the operator runs
        f"\nspec fuzz: {tally['tried']} generated objects in {time.monotonic() - started:.0f}s: {dict(tally)}; "
        f"every admitted one reconciled, Ready reasons {dict(reasons)}",
        file=sys.__stdout__,
    )
    assert rejected_without_path == []
    assert tally["tried"] >= 200
    assert tally["admitted"] >= 10 and tally["tried"] - tally["admitted"] >= 100, dict(tally)  # both branches ran
