"""Fixtures for the `cluster` tier: tests against a real Kubernetes API.

Which cluster:
- `KUBECONFIG` set in the environment: that cluster is used as it is (kind, a real cluster,
  or a rig started by hand with `eval "$(hack/local-cluster env)"`). It must have KubeRay's
  CRDs and operator, and for the GPU tests nodes like the rig's (see docs/test-rig.md).
- otherwise the session starts its own rig with `hack/local-cluster up --name pytest-<random>`
  (etcd, kube-apiserver with RBAC, controller-manager, scheduler, kwok, KubeRay) and always
  runs `hack/local-cluster down` for it at the end, whatever happened in between.

Fixtures:
- `cluster`: a `Cluster` (API clients, kubectl, polling, CRDs, ServiceAccount tokens).
- `namespace`: a fresh namespace per test, deleted afterwards.
- `kopf_runner_as`: runs an operator with `kopf.testing.KopfRunner` as a ServiceAccount.
- `crd`: the LLMEndpoint CRD applied and Established (once per module).
- `chart_operator`: the operator as the chart's ServiceAccount, with only the chart's RBAC.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from tests.cluster.operator_identity import operator_identity

REPO = Path(__file__).resolve().parents[2]
LOCAL_CLUSTER = REPO / "hack" / "local-cluster"
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
HANDLERS = str(REPO / "operator" / "llmep_operator" / "handlers.py")
T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    # pyproject.toml registers it too; this keeps `--strict-markers` happy when it does not.
    config.addinivalue_line("markers", "cluster: needs a Kubernetes API (hack/local-cluster)")


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.5,
    message: str | Callable[[], str],
) -> T:
    """Poll `check` until it returns something truthy, and return that.

    On timeout fail with `message` (or what it returns, evaluated then) and the last
    exception `check` raised, so the failure says what was awaited and what was seen.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except ApiException as e:  # e.g. 404 while a controller has not created it yet
            last_error = e
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            detail = f"; last error: {last_error.status} {last_error.reason}" if last_error else ""
            raise AssertionError(f"timed out after {timeout:.0f}s: {text}{detail}")
        time.sleep(interval)


async def eventually(
    check: Callable[[], Awaitable[T]],
    timeout: float = 30.0,
    what: str = "",
    retry_on: tuple[type[BaseException], ...] = (openai.APIStatusError, AssertionError),
) -> T:
    """Await `check` every 0.2 s until it returns instead of raising one of `retry_on`; return
    what it returned. Bounded even if a check hangs; on timeout fail with `what` and the last error."""
    last: BaseException | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    return await check()
                except retry_on as error:
                    last = error
                    await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f}s: {what}; last: {last!r}") from None


class Cluster:
    """A Kubernetes API for tests, reached through an admin kubeconfig."""

    def __init__(self, kubeconfig: Path, rig_name: str | None, bin_dir: Path | None) -> None:
        self.kubeconfig = kubeconfig
        self.rig_name = rig_name  # set when this session started the rig
        self.bin_dir = bin_dir
        self.api = k8s_config.new_client_from_config(config_file=str(kubeconfig))
        self.core = k8s.CoreV1Api(self.api)
        self.apps = k8s.AppsV1Api(self.api)
        self.rbac = k8s.RbacAuthorizationV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)
        self.apiext = k8s.ApiextensionsV1Api(self.api)
        self.auth = k8s.AuthenticationV1Api(self.api)

    wait_until = staticmethod(wait_until)

    # ---- kubectl -----------------------------------------------------------------------------

    def kubectl_path(self) -> str:
        if self.bin_dir and (self.bin_dir / "kubectl").exists():
            return str(self.bin_dir / "kubectl")
        found = shutil.which("kubectl")
        if not found:
            pytest.fail("kubectl not found: run `hack/local-cluster build` or put it on PATH")
        return found

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        cmd = [self.kubectl_path(), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def apply(self, manifest: str | Path | dict | list, namespace: str | None = None) -> str:
        """Server-side apply a file, a YAML string, an object or a list of objects."""
        if isinstance(manifest, Path):
            text = manifest.read_text()
        elif isinstance(manifest, str):
            text = manifest
        else:
            items = manifest if isinstance(manifest, list) else [manifest]
            text = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        ns = ["-n", namespace] if namespace else []
        return self.kubectl("apply", "--server-side", "--field-manager=pytest", *ns, "-f", "-",
                            input=text)

    def apply_crd(self, path: str | Path, timeout: float = 60.0) -> list[str]:
        """Apply the CRDs in a YAML file and wait until each is Established; return their names."""
        path = Path(path)
        names = [d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text())
                 if d and d.get("kind") == "CustomResourceDefinition"]
        assert names, f"{path} holds no CustomResourceDefinition"
        self.apply(path)

        def established() -> bool:
            for name in names:
                crd = self.apiext.read_custom_resource_definition(name)
                conds = {c.type: c.status for c in (crd.status.conditions or [])}
                if conds.get("Established") != "True":
                    return False
            return True

        wait_until(established, timeout=timeout, message=f"CRDs {names} to be Established")
        return names

    # ---- identities ------------------------------------------------------------------------

    def token_for(self, service_account: str, namespace: str, seconds: int = 3600) -> str:
        """A bound token for the ServiceAccount, from the TokenRequest API."""
        req = k8s.AuthenticationV1TokenRequest(
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=seconds))
        resp = self.core.create_namespaced_service_account_token(
            service_account, namespace, req)
        return resp.status.token

    def kubeconfig_for_token(self, token: str, path: Path, user: str = "sa") -> Path:
        """Write a kubeconfig with this cluster's server and CA and the bearer token."""
        admin = yaml.safe_load(self.kubeconfig.read_text())
        ctx_name = admin["current-context"]
        ctx = next(c["context"] for c in admin["contexts"] if c["name"] == ctx_name)
        cluster = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [cluster],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": cluster["name"], "user": user}}],
            "current-context": user,
        }
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def client_as(self, service_account: str, namespace: str) -> k8s.ApiClient:
        """An ApiClient that authenticates as the ServiceAccount (TokenRequest token)."""
        token = self.token_for(service_account, namespace)
        with tempfile.TemporaryDirectory() as tmp:
            kc = self.kubeconfig_for_token(token, Path(tmp) / "kubeconfig", service_account)
            return k8s_config.new_client_from_config(config_file=str(kc))

    # ---- reading state -----------------------------------------------------------------------

    def events_for(self, namespace: str, kind: str, name: str) -> list[k8s.CoreV1Event]:
        selector = f"involvedObject.kind={kind},involvedObject.name={name}"
        return self.core.list_namespaced_event(namespace, field_selector=selector).items

    def wait_for_event(self, namespace: str, kind: str, name: str, reason: str,
                       timeout: float = 60.0) -> k8s.CoreV1Event:
        def found() -> k8s.CoreV1Event | None:
            return next((e for e in self.events_for(namespace, kind, name)
                         if e.reason == reason), None)

        return wait_until(found, timeout=timeout, message=lambda: (
            f"a {reason} event for {kind} {namespace}/{name}; events seen: "
            f"{[(e.reason, e.message) for e in self.events_for(namespace, kind, name)]}"))


def _rig_bin_dir() -> Path:
    base = os.environ.get("LLMEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmep")
    return Path(base) / "rig" / "bin"


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    # Other tiers re-export this fixture (tests/reliability/conftest.py); pytest then holds one
    # session copy per conftest, so the first one to run shares its cluster with the others.
    shared = getattr(request.config, "_llmep_cluster", None)
    if shared is not None:
        yield shared
        return
    if os.environ.get("KUBECONFIG"):
        kubeconfig = Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]).expanduser()
        bins = _rig_bin_dir()
        request.config._llmep_cluster = Cluster(kubeconfig, None, bins if bins.is_dir() else None)
        yield request.config._llmep_cluster
        return
    name = f"pytest-{os.getpid()}-{secrets.token_hex(2)}"
    env = {k: v for k, v in os.environ.items() if k != "LLMEP_RIG_NAME"}
    try:
        up = subprocess.run([str(LOCAL_CLUSTER), "up", "--name", name], env=env,
                            capture_output=True, text=True, timeout=1800)
        if up.returncode != 0:
            pytest.fail(f"hack/local-cluster up failed ({up.returncode}):\n"
                        f"{up.stdout[-4000:]}\n{up.stderr[-4000:]}", pytrace=False)
        exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M))
        request.config._llmep_cluster = Cluster(Path(exports["KUBECONFIG"]), name, _rig_bin_dir())
        yield request.config._llmep_cluster
    finally:
        # Always: also after a failed `up`, a failed test or Ctrl-C.
        subprocess.run([str(LOCAL_CLUSTER), "down", "--name", name], env=env,
                       capture_output=True, text=True, timeout=300)


def _test_namespace_name(node_name: str) -> str:
    stem = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"{stem}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, with its default ServiceAccount in place; deleted after the test."""
    name = _test_namespace_name(request.node.name)
    cluster.core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(
        name=name, labels={"llmep.io/test": "cluster"})))
    # Pod creation is refused until the controller-manager made the default ServiceAccount.
    wait_until(lambda: cluster.core.read_namespaced_service_account("default", name),
               timeout=60, message=f"ServiceAccount default in namespace {name}")
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            cluster.core.delete_namespace(name)
        # Wait for its pods to go, so they no longer hold simulated GPUs in the next test.
        wait_until(lambda: not cluster.core.list_namespaced_pod(name).items, timeout=120,
                   message=f"the pods of namespace {name} to be deleted")


@contextlib.contextmanager
def run_kopf_as(
    cluster: Cluster,
    service_account: str,
    namespace: str,
    *,
    module: str | None = None,
    paths: tuple[str, ...] = (),
    watch_namespaces: tuple[str, ...] | None = None,
    extra_args: tuple[str, ...] = ("--verbose",),
    registry: Any = None,
    settings: Any = None,
    timeout: float = 60.0,
) -> Iterator[Any]:
    """Run an operator in this process with `kopf.testing.KopfRunner`, as a ServiceAccount.

    The token comes from the TokenRequest API; a kubeconfig with that bearer token and the
    cluster's CA becomes the only credentials kopf's default login (`login_via_client`) can
    find, so every API call of the operator is authorised by RBAC as
    `system:serviceaccount:<namespace>:<service_account>`. Handlers come from `module`
    (`-m`, e.g. "llmep_operator.handlers"), `paths`, or a `registry` passed in; such a
    registry needs `kopf.on.login(registry=r)(kopf.login_via_client)`, as kopf registers
    its default login handlers in the default registry only. Without one, each run gets a
    fresh registry with that login, so no handler of an earlier run (holding an earlier
    identity) is called again.
    Watches `watch_namespaces` (default: the ServiceAccount's namespace); `()` means all.
    """
    import kopf
    from kopf.testing import KopfRunner
    from kubernetes.config import kube_config

    args = ["run", "--standalone", *extra_args]
    scope = (namespace,) if watch_namespaces is None else watch_namespaces
    args += [f"--namespace={ns}" for ns in scope] or ["--all-namespaces"]
    if module:
        args += ["-m", module]
    args += list(paths)

    if registry is None:
        registry = kopf.OperatorRegistry()
        kopf.on.login(registry=registry)(kopf.login_via_client)
    token = cluster.token_for(service_account, namespace)
    # Importing ray.serve.llm (the contract tier does) puts a root handler with Ray's JSON
    # formatter in place, which cannot serialise the settings kopf logs with: it sits out the run.
    root = logging.getLogger()
    ray_handlers = [h for h in root.handlers if type(h.formatter).__module__.startswith("ray.")]
    saved_default_registry = kopf.get_default_registry()  # KopfRunner replaces it
    saved_location = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    saved_env = os.environ.get("KUBECONFIG")
    saved_client_config = k8s.Configuration.get_default_copy()
    with tempfile.TemporaryDirectory(prefix="kopf-as-") as tmp:
        kc = cluster.kubeconfig_for_token(token, Path(tmp) / "kubeconfig", service_account)
        # kubernetes' loader reads KUBECONFIG once at import; point both at the SA's file.
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kc)
        os.environ["KUBECONFIG"] = str(kc)
        for handler in ray_handlers:
            root.removeHandler(handler)
        try:
            with KopfRunner(args, registry=registry, settings=settings, timeout=timeout) as runner:
                yield runner
        finally:
            for handler in ray_handlers:
                root.addHandler(handler)
            kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved_location
            if saved_env is None:
                os.environ.pop("KUBECONFIG", None)
            else:
                os.environ["KUBECONFIG"] = saved_env
            k8s.Configuration.set_default(saved_client_config)
            kopf.set_default_registry(saved_default_registry)


@pytest.fixture
def kopf_runner_as(cluster: Cluster) -> Callable[..., contextlib.AbstractContextManager[Any]]:
    """`with kopf_runner_as("llmep-operator", ns, module="llmep_operator.handlers") as r:`"""

    def factory(service_account: str, namespace: str, **kwargs: Any):
        return run_kopf_as(cluster, service_account, namespace, **kwargs)

    return factory


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> None:
    """The LLMEndpoint CRD, applied and Established."""
    cluster.apply_crd(CRD)


@pytest.fixture
def chart_operator(
    cluster: Cluster,
    namespace: str,
    crd: None,
    kopf_runner_as: Callable[..., contextlib.AbstractContextManager[Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Callable[[], contextlib.AbstractContextManager[Any]]]]:
    """The operator as the chart's ServiceAccount, with only the chart's RBAC, watching `namespace`.

    `run = chart_operator(drift_check_seconds=3)` renders and applies the chart's operator
    identity and sets the drift-check period (LLMEP_DRIFT_CHECK_SECONDS, read when the operator
    starts, so a test may still change it); each `with run() as runner:` (re)starts the operator,
    and once it has stopped asserts that it raised nothing and logged no traceback. The chart's
    cluster-scoped RBAC is deleted after the test.
    """
    applied: list[dict] = []

    def start(drift_check_seconds: float) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        release = f"op-{secrets.token_hex(3)}"
        account, rbac = operator_identity(cluster.bin_dir, release, namespace, f"watchNamespaces={{{namespace}}}")
        cluster.apply(rbac)
        applied.extend(rbac)
        monkeypatch.setenv("LLMEP_DRIFT_CHECK_SECONDS", str(drift_check_seconds))

        @contextlib.contextmanager
        def run() -> Iterator[Any]:
            with kopf_runner_as(account, namespace, paths=(HANDLERS,), watch_namespaces=(namespace,)) as runner:
                yield runner
            # Read once the operator has stopped (KopfRunner's exception and output wait for that).
            assert runner.exception is None, runner.exception
            output = runner.output
            # The first traceback with the log before it, wherever it is in a long log.
            assert "Traceback" not in output, output[max(0, output.find("Traceback") - 2000) :][:6000]

        return run

    yield start
    for obj in applied:
        if obj["kind"].startswith("Cluster"):
            with contextlib.suppress(Exception):
                cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"], "--ignore-not-found")
