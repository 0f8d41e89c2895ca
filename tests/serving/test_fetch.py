"""`llmep fetch` (the weight cache's fill step) against a real S3-compatible store (SeaweedFS
built from its Go module): progress that moves, files byte-identical, a second run that fetches
nothing, and failures that say why in the termination message."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from llmep_operator.weights_fetch import FetchError, describe, fetch
from tests.objectstore import ObjectStore, weed_binary

BUCKET = "models"
BIG = 96 * 1024 * 1024  # large enough that several progress lines come out on loopback


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The files of a model as the store holds them."""
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "sub").mkdir()
    (model / "sub" / "tokenizer.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as f:
        f.write(os.urandom(BIG))
    return model


@pytest.fixture(scope="module")
def store(model):
    if weed_binary() is None:
        pytest.skip("no SeaweedFS binary: run `hack/local-cluster build weed` (part of `make setup`)")
    with ObjectStore() as running:
        running.create_bucket(BUCKET)
        running.upload_folder(model, BUCKET, "org/tiny")
        yield running


@pytest.fixture
def s3_env(store, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint_url)
    for key, value in ObjectStore.CLIENT_ENV.items():
        monkeypatch.setenv(key, value)


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_fill_reports_moving_progress_and_copies_every_byte(model, s3_env, tmp_path):
    out = io.StringIO()
    fetch(f"s3://{BUCKET}/org/tiny", tmp_path / "cache", out=out, every=0.01)
    lines = _lines(out)
    total = BIG + len('{"architectures": ["LlamaForCausalLM"]}') + 2
    assert lines[-1]["phase"] == "done" and lines[-1]["bytes"] == lines[-1]["total"] == total
    moving = [line["bytes"] for line in lines if line["phase"] == "downloading"]
    assert len(set(moving)) >= 2, lines  # the count changes while it downloads
    assert moving == sorted(moving)
    assert all(line["total"] == total and "GiB" in line["message"] for line in lines)
    for name in ("config.json", "sub/tokenizer.json", "model.safetensors"):
        assert (tmp_path / "cache" / name).read_bytes() == (model / name).read_bytes()
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_a_second_fill_fetches_nothing_again(store, s3_env, tmp_path):
    fetch(f"s3://{BUCKET}/org/tiny", tmp_path, out=io.StringIO())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    out = io.StringIO()
    fetch(f"s3://{BUCKET}/org/tiny", tmp_path, out=out)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps
    assert _lines(out)[-1]["phase"] == "done"


def test_a_missing_bucket_is_named_in_the_termination_message(store, s3_env, tmp_path):
    termination = tmp_path / "termination-log"
    result = subprocess.run(
        [sys.executable, "-m", "llmep_serving.cli", "fetch", "s3://no-such-bucket/org/tiny", str(tmp_path / "c")],
        env={**os.environ, "LLMEP_TERMINATION_LOG": str(termination)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    why = termination.read_text()
    assert why == "bucket 'no-such-bucket' does not exist (s3://no-such-bucket/org/tiny): check spec.model.source"
    assert why in result.stderr


def test_an_empty_folder_is_refused_naming_it(store, s3_env, tmp_path):
    with pytest.raises(FetchError, match=r"^no objects under s3://models/org/missing: check spec.model.source$"):
        fetch(f"s3://{BUCKET}/org/missing", tmp_path, out=io.StringIO())


def test_a_cache_too_small_is_refused_before_anything_is_written(store, s3_env, tmp_path, monkeypatch):
    # A stand-in for a full volume: a real one would need a size-limited mount here.
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=1024**3 // 100))
    with pytest.raises(FetchError, match=r"^the cache volume has 0.0 GiB free and the model needs 0.1 GiB more"):
        fetch(f"s3://{BUCKET}/org/tiny", tmp_path, out=io.StringIO())
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_progress_reads_as_a_sentence():
    assert describe(int(12.3 * 1024**3), 140 * 1024**3, 310 * 1024**2) == "12.3 of 140.0 GiB, 310 MiB/s, about 7 min"
    assert describe(0, 2 * 1024**3, 0) == "0.0 of 2.0 GiB"
    assert describe(1024**3, 2 * 1024**3, 1024**3 / 30) == "1.0 of 2.0 GiB, 34 MiB/s, about 30 s"


def test_unsupported_scheme_is_refused(tmp_path):
    with pytest.raises(FetchError, match=r"^file:// sources are not fetched into the cache: only s3:// and hf://$"):
        fetch("file:///models/x", tmp_path, out=io.StringIO())


def test_the_fill_jobs_own_command_fills_the_cache(store, model, tmp_path):
    """What the operator renders for cache.prefetch, run as the Job would (python -c, the serving
    image's python being this one), with only the standard environment and the Secret's keys."""
    from llmep_operator.api import parse_endpoint
    from llmep_operator.render import build_children
    from llmep_operator.settings import OperatorSettings

    endpoint = parse_endpoint(
        {
            "apiVersion": "llmep.io/v1alpha1",
            "kind": "LLMEndpoint",
            "metadata": {"name": "tiny", "namespace": "team-a"},
            "spec": {
                "model": {"source": f"s3://{BUCKET}/org/tiny"},
                "cache": {"enabled": True, "prefetch": True},
                "storageSecretRef": {"name": "s3-credentials"},
            },
        }
    )
    job = next(c for c in build_children(endpoint, OperatorSettings(), owner_uid="u") if c["kind"] == "Job")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["python", "-c"]
    secret = {**ObjectStore.CLIENT_ENV, "AWS_ENDPOINT_URL": store.endpoint_url}
    result = subprocess.run(
        [sys.executable, "-I", *command[1:4], str(tmp_path), "--every", "0.05"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), **secret},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.splitlines()[-1])
    assert last["phase"] == "done" and last["bytes"] == last["total"]
    assert (tmp_path / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
