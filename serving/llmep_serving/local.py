"""Run one serveConfigV2 application on a local Ray cluster, as KubeRay would in a pod.

The input is the ``applications[0]`` entry of a RayService's ``serveConfigV2`` (what the
operator renders): ``{name, route_prefix, import_path, args}``. It is handed to Serve's
controller as a config, the way KubeRay deploys it: the controller builds the app by calling
``import_path`` with ``args`` (``ray.serve.llm:build_openai_app`` for llmep) inside the Ray
cluster, behind Serve's ingress on loopback. ``env`` is exported before Ray starts, so every
Ray process sees it, as every process of a Ray pod sees its container environment (Ray Serve
reads its switches, such as the HAProxy ingress, when it is imported).

    with LocalServe(app) as local:
        client = openai.OpenAI(base_url=local.base_url, api_key="unused")

Progress (application and replica states) is reported while the engine loads, and
:meth:`LocalServe.start` returns once ``/v1/models`` answers. ray and vllm are imported here
only inside functions: the operator and the gateway never import them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import psutil
    from ray.serve._private.client import ServeControllerClient

LOOPBACK = "127.0.0.1"
# Keys of a serveConfigV2 application entry that the local runner honours.
_SUPPORTED_APP_KEYS = frozenset({"name", "route_prefix", "import_path", "args"})
# HAProxy's stats and metrics listeners and Serve's fallback proxy have fixed default ports
# (8404, 9101, 8500): free ones let two local runners, or other servers, share the machine.
_PORT_ENV = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT")


class LocalServeError(RuntimeError):
    """The application failed to deploy, or did not become ready in time."""


def _default_progress(line: str) -> None:
    print(f"[llmep-local] {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ReplicaSummary:
    """One deployment's replica counts by state, as Serve reports them."""

    deployment: str
    status: str
    trigger: str
    states: dict[str, int]

    @property
    def running(self) -> int:
        return self.states.get("RUNNING", 0)

    @property
    def wanted(self) -> int:
        """Replicas Serve is keeping or bringing up: every state but STOPPING."""
        return sum(n for state, n in self.states.items() if state != "STOPPING")

    def __str__(self) -> str:
        states = ", ".join(f"{k}={v}" for k, v in sorted(self.states.items())) or "none"
        return f"{self.deployment}: {self.status} ({states})"


class LocalServe:
    """A local Ray cluster serving one serveConfigV2 application; a context manager."""

    def __init__(
        self,
        application: Mapping[str, Any],
        *,
        host: str = LOOPBACK,
        port: int = 8000,
        num_cpus: int | None = None,
        ready_timeout_s: float = 600.0,
        poll_interval_s: float = 1.0,
        env: Mapping[str, str] | None = None,
        progress: Callable[[str], None] | None = _default_progress,
        stop_grace_s: float = 5.0,
    ) -> None:
        unknown = set(application) - _SUPPORTED_APP_KEYS
        if unknown:
            raise ValueError(
                f"application keys {sorted(unknown)} are not supported by the local runner "
                f"(supported: {sorted(_SUPPORTED_APP_KEYS)})"
            )
        if host not in (LOOPBACK, "localhost", "::1"):
            raise ValueError(f"the local runner binds loopback only, got host {host!r}")
        self.application = dict(application)
        self.app_name: str = self.application.get("name", "default")
        self.route_prefix: str = self.application.get("route_prefix", "/")
        self.host = host
        self.port = port
        self.num_cpus = num_cpus
        self.ready_timeout_s = ready_timeout_s
        self.poll_interval_s = poll_interval_s
        self.env = dict(env or {})
        self._progress = progress or (lambda _line: None)
        self._started_ray = False
        self._ray_roots: list[psutil.Process] = []
        self.stop_grace_s = stop_grace_s
        self._saved_env: dict[str, str | None] = {}

    # -- addresses ---------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        prefix = self.route_prefix.rstrip("/")
        return f"http://{self.host}:{self.port}{prefix}"

    @property
    def base_url(self) -> str:
        """The OpenAI base_url (``.../v1``)."""
        return f"{self.root_url}/v1"

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> LocalServe:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> LocalServe:
        import ray
        from ray import serve

        t0 = time.monotonic()
        if not ray.is_initialized():
            self._export_env()
            before = {child.pid for child in _children()}
            sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(
                num_cpus=self.num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            if sigterm is not None and threading.current_thread() is threading.main_thread():
                # ray.init makes SIGTERM a bare sys.exit; the caller's own handling stays.
                signal.signal(signal.SIGTERM, sigterm)
            self._started_ray = True
            self._ray_roots = [child for child in _children() if child.pid not in before]
        elif (cpus := ray.cluster_resources().get("CPU", 0)) < (self.num_cpus or 0):
            # Someone else's ray.init (or a library's implicit one) would starve the replicas.
            raise LocalServeError(
                f"Ray already runs in this process with {cpus:g} CPUs; {self.app_name!r} needs "
                f"{self.num_cpus}: call ray.shutdown() before starting LocalServe"
            )
        self._progress(f"ray up in {time.monotonic() - t0:.1f}s")
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            self._deploy()
            self._wait_until_ready(t0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        # Ray's processes as they are now: its workers and agents start after ray.init.
        ray_processes = _with_descendants(self._ray_roots)
        if ray.is_initialized():
            serve.shutdown()
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
            # DashboardAgent and RuntimeEnvAgent ignore SIGTERM and outlive ray.shutdown().
            stop_processes(ray_processes, self.stop_grace_s)
            self._ray_roots = []
        self._restore_env()

    # -- status ------------------------------------------------------------------------

    def replicas(self) -> list[ReplicaSummary]:
        """Replica counts by state for each deployment of this application."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return []
        return [
            ReplicaSummary(
                deployment=name,
                status=str(getattr(dep.status, "value", dep.status)),
                trigger=str(getattr(dep.status_trigger, "value", dep.status_trigger)),
                states={str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()},
            )
            for name, dep in app.deployments.items()
        ]

    def replica_summary(self, deployment_prefix: str) -> ReplicaSummary | None:
        """The deployment whose name starts with ``deployment_prefix`` (e.g. "LLMServer")."""
        return next(
            (r for r in self.replicas() if r.deployment.startswith(deployment_prefix)), None
        )

    def app_status(self) -> tuple[str, str]:
        """(status, message) of this application in Serve, e.g. ('RUNNING', '')."""
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return ("NOT_STARTED", "")
        status = getattr(app.status, "value", app.status)
        return (str(status), app.message or "")

    def models(self) -> list[str]:
        """Model ids served, read from /v1/models over HTTP."""
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as resp:  # noqa: S310
            body = json.load(resp)
        return [m["id"] for m in body.get("data", [])]

    # -- internals ---------------------------------------------------------------------

    def _export_env(self) -> None:
        """Put ``env`` (and free local ports) in this process's environment, which the Ray
        processes started next inherit; :meth:`stop` puts the old values back."""
        env = {name: str(_free_port(self.host)) for name in _PORT_ENV if name not in os.environ}
        env.update(self.env)
        self._saved_env = {name: os.environ.get(name) for name in env}
        os.environ.update(env)

    def _restore_env(self) -> None:
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = {}

    def _deploy(self) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = ServeDeploySchema.model_validate(
            {"http_options": {"host": self.host, "port": self.port}, "applications": [self.application]}
        )
        # As KubeRay does through the dashboard: the controller builds the app in the cluster.
        # With raise_if_no_controller_running (the default) it raises rather than return None.
        cast("ServeControllerClient", _get_global_client()).deploy_apps(config)

    def _wait_until_ready(self, t0: float) -> None:
        deadline = t0 + self.ready_timeout_s
        last_line = ""
        while True:
            status, message = self.app_status()
            line = f"{self.app_name}: {status}; " + "; ".join(str(r) for r in self.replicas())
            if line != last_line:
                self._progress(f"{time.monotonic() - t0:6.1f}s {line}")
                last_line = line
            if status == "DEPLOY_FAILED":
                raise LocalServeError(f"{self.app_name!r} failed to deploy: {message}")
            if status == "RUNNING" and self._models_answer():
                self._progress(
                    f"{time.monotonic() - t0:6.1f}s ready: {self.base_url} serves {self.models()}"
                )
                return
            if time.monotonic() > deadline:
                raise LocalServeError(
                    f"{self.app_name!r} not ready after {self.ready_timeout_s:.0f}s: "
                    f"{status} {message} {line}"
                )
            time.sleep(self.poll_interval_s)

    def _models_answer(self) -> bool:
        try:
            return bool(self.models())
        except (urllib.error.URLError, OSError, ValueError):
            return False


def _children() -> list[psutil.Process]:
    import psutil  # ships with Ray and vLLM, like everything local mode needs

    return psutil.Process().children()


def _with_descendants(roots: list[psutil.Process]) -> list[psutil.Process]:
    import psutil

    found = list(roots)
    for root in roots:
        with contextlib.suppress(psutil.Error):
            found.extend(root.children(recursive=True))
    return found


def stop_processes(processes: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM what is still running, then SIGKILL what is left after `grace_s`; reap them all."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=grace_s)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def run_local(application: Mapping[str, Any], **kwargs: Any) -> LocalServe:
    """Start ``application`` locally and return the running :class:`LocalServe`.

    Call ``.stop()`` when done, or use ``LocalServe`` as a context manager instead.
    """
    return LocalServe(application, **kwargs).start()
