"""`llmep serve`: its flags shape the LLMEndpoint it serves, and everything it refuses is refused
before a Ray cluster starts, with one line on stderr that says what to change and exit status 2.

The refusals run the real command in a subprocess (`python -m llmep_serving.cli serve ...`): the
exit status and stderr are what a user sees. The flags are checked on `endpoint_manifest`, the
function `llmep serve` hands its parsed arguments to, with arguments from the real parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from llmep_operator.api import parse_endpoint
from llmep_serving.cli import build_parser
from llmep_serving.local_mode import ServeError, endpoint_manifest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny-cpu.yaml"


def _serve(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "llmep_serving.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return result, time.monotonic() - started


def _refused(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run `llmep serve ARGS`; assert it was refused before starting anything; return stderr."""
    result, seconds = _serve(*args, cwd=cwd, env=env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stdout == ""  # no snippet, no key printed
    assert "starting" not in result.stderr  # no Ray cluster was started
    assert seconds < 30, f"a refusal took {seconds:.1f}s"
    return result.stderr


def _args(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def _write(tmp_path: Path, manifest, name: str = "endpoint.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(manifest) if not isinstance(manifest, str) else manifest)
    return path


def _tiny() -> dict:
    return yaml.safe_load(TINY.read_text())


# ---- refusals: exit 2, one line naming what is wrong ---------------------------------------


def test_nothing_to_serve_says_what_to_give():
    assert _refused() == (
        "llmep serve: say what to serve: an LLMEndpoint file, --model PATH_OR_HF_ID, or --demo\n"
    )


def test_a_gateway_shutdown_setting_that_is_not_seconds_names_both_variables(tmp_path):
    stderr = _refused(str(_write(tmp_path, _tiny())), env={"LLMEP_GATEWAY_SHUTDOWN_GRACE_SECONDS": "soon"})
    assert stderr == (
        "llmep serve: LLMEP_GATEWAY_DRAIN_SECONDS and LLMEP_GATEWAY_SHUTDOWN_GRACE_SECONDS must be numbers "
        "of seconds: could not convert string to float: 'soon'\n"
    )


def test_a_file_with_a_bad_field_names_the_full_field_path(tmp_path):
    manifest = _tiny()
    manifest["spec"]["autoscaling"]["minReplicas"] = -1
    stderr = _refused(str(_write(tmp_path, manifest)))
    assert stderr == "llmep serve: spec.autoscaling.minReplicas: Input should be greater than or equal to 0\n"


def test_a_file_with_an_unknown_field_names_it(tmp_path):
    manifest = _tiny()
    manifest["spec"]["engine"]["maxModelLenght"] = 512
    stderr = _refused(str(_write(tmp_path, manifest)))
    assert stderr.startswith("llmep serve: spec.engine.maxModelLenght: "), stderr
    assert stderr.count("\n") == 1, stderr


def test_a_name_too_long_for_its_children_names_metadata_name_and_the_limit(tmp_path):
    manifest = _tiny()
    manifest["metadata"]["name"] = "a" * 41
    stderr = _refused(str(_write(tmp_path, manifest)))
    assert stderr == "llmep serve: metadata.name: String should have at most 40 characters\n"


def test_an_unknown_profile_lists_the_known_ones():
    stderr = _refused(str(TINY), "--profile", "tpu-v5")
    assert stderr.startswith("llmep serve: spec.resources.profile 'tpu-v5' is not a profile of this operator"), stderr
    assert "known profiles: cpu, " in stderr


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    stderr = _refused(str(missing))
    assert stderr.startswith(f"llmep serve: cannot read {missing}: "), stderr
    assert "No such file or directory" in stderr


def test_a_file_that_is_not_yaml_is_named(tmp_path):
    path = _write(tmp_path, "spec: [unclosed\n")
    stderr = _refused(str(path))
    assert stderr.startswith(f"llmep serve: cannot read {path}: "), stderr


def test_a_file_holding_a_list_is_not_one_endpoint(tmp_path):
    path = _write(tmp_path, [_tiny(), _tiny()])
    assert _refused(str(path)) == f"llmep serve: {path} does not hold one LLMEndpoint object\n"


def test_a_model_folder_without_config_json_is_refused(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    stderr = _refused("--model", str(folder))
    assert stderr == (
        f"llmep serve: --model {folder}: {folder} has no config.json; point it at a Hugging Face model folder\n"
    )


def test_a_model_that_is_neither_folder_nor_hub_id_is_refused(tmp_path):
    stderr = _refused("--model", "not a model", cwd=tmp_path)
    assert stderr == (
        "llmep serve: --model 'not a model' is neither an existing folder nor a Hugging Face id like "
        "Qwen/Qwen2.5-0.5B-Instruct\n"
    )


@pytest.mark.parametrize(
    ("flag", "value"), [("--port", "http"), ("--num-cpus", "two"), ("--timeout", "soon"), ("--backend-port", "x")]
)
def test_a_non_numeric_number_flag_is_a_usage_error(flag, value):
    result, _ = _serve("--demo", flag, value)
    assert result.returncode == 2
    assert f"llmep serve: error: argument {flag}: invalid" in result.stderr
    assert repr(value) in result.stderr


# ---- flags: what is served -------------------------------------------------------------------


def test_defaults_of_the_flags():
    args = _args(str(TINY))
    assert (args.profile, args.host, args.port, args.backend_port) == ("cpu", "127.0.0.1", 8080, 0)
    assert (args.num_cpus, args.api_key, args.anonymous, args.timeout, args.ready_file) == (
        None, None, False, 900, None
    )


def test_a_file_is_served_as_written_on_the_cpu_profile_in_namespace_local():
    manifest = endpoint_manifest(_args(str(TINY)))
    expected = _tiny()
    assert manifest["spec"]["model"] == expected["spec"]["model"]
    assert manifest["spec"]["resources"]["profile"] == "cpu"
    assert manifest["metadata"] == {"name": "tiny", "namespace": "local"}
    endpoint = parse_endpoint(manifest)
    assert endpoint.model_ids == ["tiny", "chat-default"]


def test_model_folder_overrides_the_files_source_and_profile_flag_its_profile(tmp_path):
    folder = tmp_path / "My_Model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    manifest = endpoint_manifest(_args(str(TINY), "--model", str(folder), "--profile", "nvidia-l4"))
    assert manifest["spec"]["model"]["source"] == f"file://{folder.resolve()}"
    assert manifest["spec"]["model"]["servedName"] == "tiny"  # the rest of the file stays
    assert manifest["spec"]["resources"]["profile"] == "nvidia-l4"


def test_a_hub_id_alone_makes_an_endpoint_named_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    manifest = endpoint_manifest(_args("--model", "Qwen/Qwen2.5-0.5B-Instruct"))
    assert manifest["spec"]["model"]["source"] == "hf://Qwen/Qwen2.5-0.5B-Instruct"
    assert manifest["metadata"] == {"name": "qwen2-5-0-5b-instruct", "namespace": "local"}
    assert parse_endpoint(manifest).served_name == "qwen2-5-0-5b-instruct"


def test_a_model_folder_whose_name_starts_with_a_digit_gets_a_valid_name(tmp_path):
    folder = tmp_path / "7b-chat"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    manifest = endpoint_manifest(_args("--model", str(folder)))
    assert manifest["metadata"]["name"] == "m-7b-chat"
    parse_endpoint(manifest)  # a name the API accepts


def test_endpoint_manifest_raises_serve_error_without_a_model():
    with pytest.raises(ServeError, match="^say what to serve: "):
        endpoint_manifest(_args())
