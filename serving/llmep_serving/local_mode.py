"""`llmep serve`: one LLMEndpoint on this machine, through the very serveConfigV2 the operator
renders, on a local Ray cluster, behind the llmep gateway.

    llmep serve examples/tiny-cpu.yaml --demo      # the generated tiny model
    llmep serve --model /path/to/model             # a local model folder
    llmep serve --model Qwen/Qwen2.5-0.5B-Instruct # a Hugging Face id (needs the hub)
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import yaml

from llmep_operator.api import API_VERSION, KIND, SourceScheme, SpecError, parse_endpoint, parse_source
from llmep_operator.api.models import MAX_NAME_LENGTH
from llmep_operator.errors import InvalidSpec
from llmep_operator.render import build_ray_app
from llmep_operator.settings import OperatorSettings

if TYPE_CHECKING:
    from llmep_serving.local import LocalServe

LOOPBACK = "127.0.0.1"
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# Seconds a process is given to exit on SIGTERM before SIGKILL (Ray's agents ignore SIGTERM).
_STOP_GRACE_S = 10.0
# The local gateway's shutdown, unless the caller's environment sets them: nothing balances over
# it, so no drain; requests still in flight get 10 s, then streams end with an SSE error event.
_GATEWAY_SHUTDOWN_DEFAULTS = {"LLMEP_GATEWAY_DRAIN_SECONDS": "0", "LLMEP_GATEWAY_SHUTDOWN_GRACE_SECONDS": "10"}

SNIPPET = jinja2.Environment(
    undefined=jinja2.StrictUndefined,
    autoescape=False,  # noqa: S701 - terminal text, not HTML
    keep_trailing_newline=True,
).from_string(
    """
llmep: {{ served }} is serving{% if aliases %} (aliases: {{ aliases | join(', ') }}){% endif %}

  base_url  {{ base_url }}
  api_key   {{ api_key if api_key else '(none: anonymous mode)' }}

curl:
  curl -s {{ base_url }}/chat/completions \\
    -H 'Content-Type: application/json'{% if api_key %} \\
    -H 'Authorization: Bearer {{ api_key }}'{% endif %} \\
    -d '{"model": {{ served | tojson }}, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 32}'

Python:
  from openai import OpenAI
  client = OpenAI(base_url={{ base_url | tojson }}, api_key={{ (api_key or 'unused') | tojson }})
  reply = client.chat.completions.create(
      model={{ served | tojson }}, messages=[{"role": "user", "content": "Hello!"}], max_tokens=32
  )
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""
)


class ServeError(RuntimeError):
    """A clear, user-facing reason why local serving could not start."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _source_for(model: str) -> str:
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ServeError(f"--model {model}: {path} has no config.json; point it at a Hugging Face model folder")
        return f"file://{path.resolve()}"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return f"hf://{model}"
    raise ServeError(
        f"--model {model!r} is neither an existing folder nor a Hugging Face id like Qwen/Qwen2.5-0.5B-Instruct"
    )


def endpoint_manifest(args: argparse.Namespace) -> dict[str, Any]:
    """The LLMEndpoint to serve: the file given, with --model/--demo overriding the source."""
    if args.file:
        try:
            manifest = yaml.safe_load(Path(args.file).read_text())
        except (OSError, yaml.YAMLError) as error:
            raise ServeError(f"cannot read {args.file}: {error}") from None
        if not isinstance(manifest, dict):
            raise ServeError(f"{args.file} does not hold one LLMEndpoint object")
    else:
        derived = re.sub(r"[^a-z0-9-]+", "-", Path(args.model or "model").name.lower()).strip("-")
        name = "tiny" if args.demo else derived[:MAX_NAME_LENGTH] or "model"
        if not name[0].isalpha():
            name = f"m-{name}"[:MAX_NAME_LENGTH]
        manifest = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name},
            "spec": {"model": {"source": "file:///unset"}, "engine": {"maxModelLen": 256 if args.demo else None}},
        }
        manifest["spec"]["engine"] = {k: v for k, v in manifest["spec"]["engine"].items() if v is not None}
    spec = manifest.setdefault("spec", {})
    model = spec.setdefault("model", {})
    if args.demo:
        from llmep_serving.tinymodel import ensure_tiny_model

        model["source"] = f"file://{ensure_tiny_model()}"
    elif args.model:
        model["source"] = _source_for(args.model)
    elif not args.file:
        raise ServeError("say what to serve: an LLMEndpoint file, --model PATH_OR_HF_ID, or --demo")
    # Local mode runs on this machine's CPUs unless told otherwise: the `cpu` profile holds
    # what vLLM's CPU build needs, so the builder is the operator's, unchanged.
    spec.setdefault("resources", {})["profile"] = args.profile
    manifest.setdefault("metadata", {}).setdefault("namespace", "local")
    return manifest


def _wait_for_gateway(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServeError(f"the gateway exited with status {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback URL we built
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise ServeError(f"the gateway did not answer {url} within {timeout:.0f}s")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # the same clean shutdown as Ctrl-C


def _adopt_orphans() -> None:
    """Make this process the subreaper of everything it starts (Linux): a Ray or vLLM process
    whose parent dies is handed to us, not to init, so the last sweep still finds it."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _gateway_stop_grace_s() -> float:
    """Seconds between the gateway's SIGTERM and SIGKILL: its own drain and grace, as its
    environment sets them, then the usual margin, so it is never killed in the middle of its cut."""
    try:
        return sum(float(os.environ.get(k, v)) for k, v in _GATEWAY_SHUTDOWN_DEFAULTS.items()) + _STOP_GRACE_S
    except ValueError as error:
        names = " and ".join(_GATEWAY_SHUTDOWN_DEFAULTS)
        raise ServeError(f"{names} must be numbers of seconds: {error}") from None


def _stop_everything_started(
    gateway: subprocess.Popen[bytes] | None, local: LocalServe | None, gateway_grace_s: float
) -> None:
    """The gateway, then the Ray cluster, then whatever of theirs is left: nothing survives."""
    import psutil  # ships with Ray and vLLM

    from llmep_serving.local import stop_processes

    # A second Ctrl-C or SIGTERM must not cut the cleanup short; each step is bounded.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if gateway and gateway.poll() is None:
        stop_processes([psutil.Process(gateway.pid)], gateway_grace_s)
        gateway.wait()
    if local is not None:
        local.stop()
    stop_processes(psutil.Process().children(recursive=True), _STOP_GRACE_S)


def run(args: argparse.Namespace) -> int:
    from llmep_serving.local import LocalServe, LocalServeError

    # Ctrl-C and SIGTERM shut down cleanly, even when started in the background (where a
    # shell leaves SIGINT ignored) and even while the engine is still loading.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    _adopt_orphans()
    try:
        endpoint = parse_endpoint(endpoint_manifest(args))
        # LLMEP_* variables tune it as they tune the operator (e.g. LLMEP_SERVING_PATH=proxy).
        rendered = build_ray_app(endpoint, OperatorSettings())
        gateway_grace_s = _gateway_stop_grace_s()
    except (ServeError, SpecError, InvalidSpec) as error:
        print(f"llmep serve: {error}", file=sys.stderr)
        return 2

    api_key = (
        None
        if args.anonymous
        else (args.api_key or os.environ.get("LLMEP_API_KEY") or f"sk-llmep-{secrets.token_urlsafe(24)}")
    )
    backend_port = args.backend_port or _free_port()
    # Ray counts logical CPUs: each replica holds 2 (its actor and the engine's bundle) and the
    # proxy path's ingress one more, whatever the machine has; too few leaves a replica pending.
    num_cpus = args.num_cpus or max(os.cpu_count() or 2, 2 * endpoint.spec.autoscaling.max_replicas + 2)
    # The serving path's switches, exactly as the operator puts them in the Ray pods.
    env = dict(rendered.env)
    # A folder on this machine: no Ray process needs the hub (a pvc:// claim exists only in a pod).
    if parse_source(endpoint.spec.model.source).scheme is SourceScheme.FILE:
        env["HF_HUB_OFFLINE"] = "1"
    gateway = None
    local = None
    with tempfile.TemporaryDirectory(prefix="llmep-serve-") as tmp:
        try:
            local = LocalServe(
                rendered.application, port=backend_port, num_cpus=num_cpus, env=env, ready_timeout_s=args.timeout
            )
            print(
                f"llmep serve: starting {endpoint.served_name} on a local Ray cluster "
                "(the engine takes a minute to load) ...",
                file=sys.stderr,
            )
            local.start()
            routes = Path(tmp) / "routes.yaml"
            routes.write_text(yaml.safe_dump([{"models": endpoint.model_ids, "url": local.base_url, "ready": True}]))
            gateway_env = {
                **_GATEWAY_SHUTDOWN_DEFAULTS,
                **os.environ,
                "LLMEP_GATEWAY_HOST": args.host,
                "LLMEP_GATEWAY_PORT": str(args.port),
                "LLMEP_GATEWAY_ROUTES_FILE": str(routes),
            }
            if api_key:
                keys = Path(tmp) / "keys.yaml"
                keys.write_text(yaml.safe_dump([{"name": "local", "key": api_key}]))
                keys.chmod(0o600)
                gateway_env["LLMEP_GATEWAY_KEYS_FILE"] = str(keys)
            else:
                gateway_env["LLMEP_GATEWAY_ANONYMOUS"] = "true"
            gateway = subprocess.Popen([sys.executable, "-m", "llmep_serving.cli", "gateway"], env=gateway_env)
            _wait_for_gateway(f"http://{args.host}:{args.port}/healthz", gateway)
            base_url = f"http://{args.host}:{args.port}/v1"
            print(
                SNIPPET.render(
                    served=endpoint.served_name, aliases=endpoint.spec.model.aliases, base_url=base_url, api_key=api_key
                ),
                flush=True,
            )
            if args.ready_file:
                Path(args.ready_file).write_text(
                    yaml.safe_dump({"base_url": base_url, "api_key": api_key, "model": endpoint.served_name})
                )
            gateway.wait()
            print(f"llmep serve: the gateway exited with status {gateway.returncode}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nllmep serve: shutting down ...", file=sys.stderr)
            return 0
        except (ServeError, LocalServeError) as error:
            print(f"llmep serve: {error}", file=sys.stderr)
            return 1
        finally:
            _stop_everything_started(gateway, local, gateway_grace_s)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "serve", help="serve an LLMEndpoint on this machine (local Ray + vLLM, behind the gateway)"
    )
    parser.add_argument("file", nargs="?", help="an LLMEndpoint YAML file (e.g. examples/tiny-cpu.yaml)")
    parser.add_argument("--model", help="a local model folder or a Hugging Face id; overrides the file's source")
    parser.add_argument("--demo", action="store_true", help="serve a generated tiny model (no download)")
    parser.add_argument("--profile", default="cpu", help="resource profile for local serving (default: cpu)")
    parser.add_argument("--host", default=LOOPBACK, help="gateway address (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    parser.add_argument("--backend-port", type=int, default=0, help="Ray Serve's port (default: a free one)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray cluster")
    parser.add_argument("--api-key", help="API key clients must send (default: a random one, printed)")
    parser.add_argument("--anonymous", action="store_true", help="no API key (local use only)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for the engine to load")
    parser.add_argument("--ready-file", help="write base_url, api_key and model to this YAML file once serving")
    parser.set_defaults(func=run)
