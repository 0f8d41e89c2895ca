#!/usr/bin/env python3
"""Operator scale bench: N LLMEndpoints created as fast as the client can, in one namespace.

Measures, on the local rig (hack/local-cluster, or the cluster of $KUBECONFIG):
- per endpoint, the time from its create call returning to its RayService AND Service
  existing (first seen by watches on `llmep.io/endpoint`): p50 / p95 / max;
- LLMEndpoints reconciled per second (N / first create -> last child seen);
- the operator's peak RSS (VmHWM of its process) at the end;
- once everything is reconciled, a steady window (default 60 s, with the drift timer at
  LLMEP_DRIFT_CHECK_SECONDS=30 so every endpoint gets at least one drift pass): kopf
  retry/failure lines in the operator's log, and the API server's write calls
  (apiserver_request_total, PATCH/APPLY/POST/PUT) on llmep's objects during the window.

Baseline, same run, same client threads: N plain ConfigMap creates (raw API round trips).

KubeRay is stopped when this script starts its own rig (otherwise 1,000 RayServices become
1,000 RayClusters and their pods on a 2-core machine): the figures are llmep's operator plus
the API server, not KubeRay. A bench, not a test: it prints, it asserts no timings.

  .venv/bin/python bench/operator_scale.py [--count 1000] [--threads 8] [--steady-seconds 60]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import percentile
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch
from kubernetes.client.rest import ApiException

REPO = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = REPO / "hack" / "local-cluster"
CRD = REPO / "crds" / "llmendpoints.llmep.io.yaml"
LABEL = "llmep.io/endpoint"
GROUP, VERSION, PLURAL = "llmep.io", "v1alpha1", "llmendpoints"
RETRY_RE = re.compile(
    r"will try again|failed with an exception|failed temporarily|will retry|trying again in|Traceback", re.I
)


def cache_root() -> Path:
    base = os.environ.get("LLMEP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmep"
    )
    return Path(base) / "rig"


def log(msg: str) -> None:
    print(f"[operator_scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def endpoint_manifest(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMEndpoint",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "file:///models/tiny-llama", "servedName": name},
            "engine": {"maxModelLen": 256, "dtype": "float32"},
            "resources": {"profile": "cpu"},
            "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "targetQueueDepth": 4},
        },
    }


class Rig:
    """The bench's own rig (always taken down), or the cluster of $KUBECONFIG."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.kubeconfig: Path
        self.kuberay_stopped = False

    def up(self) -> None:
        if os.environ.get("KUBECONFIG"):
            self.kubeconfig = Path(os.environ["KUBECONFIG"].split(os.pathsep)[0]).expanduser()
            log(f"using the cluster of $KUBECONFIG ({self.kubeconfig}); KubeRay left as it is")
            return
        self.name = f"bench-{secrets.token_hex(3)}"
        env = {k: v for k, v in os.environ.items() if k != "LLMEP_RIG_NAME"}
        log(f"starting rig {self.name} (hack/local-cluster up)")
        t0 = time.monotonic()
        up = subprocess.run(
            [str(LOCAL_CLUSTER), "up", "--name", self.name], env=env, capture_output=True, text=True, timeout=1800
        )
        if up.returncode != 0:
            raise RuntimeError(f"hack/local-cluster up failed:\n{up.stdout[-3000:]}\n{up.stderr[-3000:]}")
        exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M))
        self.kubeconfig = Path(exports["KUBECONFIG"])
        log(f"rig up in {time.monotonic() - t0:.0f}s")
        self._stop_kuberay()

    def _stop_kuberay(self) -> None:
        # hack/local-cluster has no switch for it: stop the process it started, by its pid file.
        pid_file = cache_root() / "clusters" / self.name / "run" / "kuberay-operator.pid"
        pid = int(pid_file.read_text().split()[0])
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        if not argv0.endswith("kuberay-operator"):
            raise RuntimeError(f"pid {pid} from {pid_file} is not kuberay-operator ({argv0})")
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                break
            time.sleep(0.1)
        self.kuberay_stopped = True
        log(f"KubeRay operator (pid {pid}) stopped for the bench")

    def down(self) -> None:
        if self.name:
            log(f"taking rig {self.name} down")
            env = {k: v for k, v in os.environ.items() if k != "LLMEP_RIG_NAME"}
            subprocess.run(
                [str(LOCAL_CLUSTER), "down", "--name", self.name], env=env, capture_output=True, text=True, timeout=300
            )


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kubectl(rig: Rig, *args: str) -> str:
    exe = cache_root() / "bin" / "kubectl"
    cmd = [str(exe) if exe.exists() else "kubectl", "--kubeconfig", str(rig.kubeconfig), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout


class FirstSeen:
    """Watches RayServices and Services labelled llmep.io/endpoint; first-seen time per endpoint."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self.ns = namespace
        self.seen: dict[str, dict[str, float]] = {"rayservice": {}, "service": {}}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in self.seen]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _list(self, kind: str, **kw):
        if kind == "service":
            return self.core.list_namespaced_service, dict(namespace=self.ns, label_selector=LABEL, **kw)
        return self.custom.list_namespaced_custom_object, dict(
            group="ray.io", version="v1", plural="rayservices", namespace=self.ns, label_selector=LABEL, **kw
        )

    def _note(self, kind: str, labels: dict | None) -> None:
        name = (labels or {}).get(LABEL)
        if name:
            now = time.monotonic()
            with self.lock:
                self.seen[kind].setdefault(name, now)

    def _run(self, kind: str) -> None:
        while not self.stop.is_set():
            try:
                fn, kw = self._list(kind)
                listing = fn(**kw)
                items = listing["items"] if isinstance(listing, dict) else listing.items
                for it in items:
                    self._note(kind, it["metadata"].get("labels") if isinstance(it, dict) else it.metadata.labels)
                rv = (
                    listing["metadata"]["resourceVersion"]
                    if isinstance(listing, dict)
                    else listing.metadata.resource_version
                )
                w = k8s_watch.Watch()
                fn, kw = self._list(kind, resource_version=rv, timeout_seconds=120, allow_watch_bookmarks=False)
                for ev in w.stream(fn, **kw):
                    obj = ev["object"]
                    labels = obj["metadata"].get("labels") if isinstance(obj, dict) else obj.metadata.labels
                    if ev["type"] in ("ADDED", "MODIFIED"):
                        self._note(kind, labels)
                    if self.stop.is_set():
                        w.stop()
                        break
            except Exception as e:  # noqa: BLE001 - a broken watch is re-listed
                if not self.stop.is_set():
                    log(f"{kind} watch restarted after {type(e).__name__}: {e}")
                    time.sleep(0.5)

    def both(self, name: str) -> float | None:
        with self.lock:
            a, b = self.seen["rayservice"].get(name), self.seen["service"].get(name)
        return max(a, b) if a is not None and b is not None else None


def create_all(names: list[str], threads: int, create, rate: float = 0.0) -> dict[str, tuple[float, float]]:
    """Create every name with `threads` workers (paced at `rate`/s when > 0); (call start, returned) per name."""
    out: dict[str, tuple[float, float]] = {}
    errors: list[str] = []
    start = time.monotonic()
    index = {name: i for i, name in enumerate(names)}

    def one(name: str) -> None:
        if rate > 0:
            time.sleep(max(0.0, start + index[name] / rate - time.monotonic()))
        for attempt in range(5):
            t0 = time.monotonic()
            try:
                create(name)
                out[name] = (t0, time.monotonic())
                return
            except ApiException as e:
                if e.status == 429 or e.status >= 500:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                errors.append(f"{name}: {e.status} {e.reason}")
                return
        errors.append(f"{name}: gave up after 5 tries")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, names))
    if errors:
        log(f"{len(errors)} creates failed, e.g. {errors[:3]}")
    return out


def apiserver_writes(api: k8s.ApiClient) -> collections.Counter:
    """apiserver_request_total of write verbs, by (verb, resource), for llmep's kinds."""
    data = api.call_api("GET", api.configuration.host + "/metrics").read()
    counts: collections.Counter = collections.Counter()
    for line in data.decode().splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels.get("verb") in ("PATCH", "APPLY", "POST", "PUT", "DELETE") and labels.get("resource") in (
            "llmendpoints",
            "rayservices",
            "services",
            "events",
        ):
            sub = "/" + labels["subresource"] if labels.get("subresource") else ""
            counts[(labels["verb"], labels["resource"] + sub)] += float(line.rsplit(" ", 1)[1])
    return counts


def apiserver_time(api: k8s.ApiClient) -> collections.Counter:
    """Seconds the API server spent answering, by (verb, resource) (apiserver_request_duration_seconds_sum)."""
    data = api.call_api("GET", api.configuration.host + "/metrics").read()
    spent: collections.Counter = collections.Counter()
    for line in data.decode().splitlines():
        if line.startswith("apiserver_request_duration_seconds_sum{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            if labels.get("verb") != "WATCH":
                sub = "/" + labels["subresource"] if labels.get("subresource") else ""
                spent[(labels.get("verb", ""), labels.get("resource", "") + sub)] += float(line.rsplit(" ", 1)[1])
    return spent


def vm(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument(
        "--rate", type=float, default=0.0, help="pace the LLMEndpoint creates at this many per second (0: flat out)"
    )
    ap.add_argument("--steady-seconds", type=float, default=60.0)
    ap.add_argument("--singles", type=int, default=20, help="endpoints applied one at a time on the idle rig first")
    ap.add_argument("--drift-seconds", type=float, default=30.0)
    ap.add_argument("--reconcile-timeout", type=float, default=900.0)
    args = ap.parse_args(argv)

    def on_term(signum, frame):  # SIGTERM takes the same way out as Ctrl-C
        raise KeyboardInterrupt

    missing = [b for b in ("etcd", "kube-apiserver", "kwok", "kubectl") if not (cache_root() / "bin" / b).exists()]
    if missing and not os.environ.get("KUBECONFIG"):
        # `hack/local-cluster up` would build them first (about 40 minutes on a new machine).
        print(f"operator_scale bench skipped: rig binaries {missing} not built (run `make rig-build`)")
        return 0
    signal.signal(signal.SIGTERM, on_term)
    rig = Rig()
    operator: subprocess.Popen | None = None
    watcher: FirstSeen | None = None
    logdir = Path(tempfile.mkdtemp(prefix="llmep-bench-operator-"))
    oplog_path = logdir / "operator.log"
    try:
        rig.up()
        cfg = k8s.Configuration()
        k8s_config.load_kube_config(config_file=str(rig.kubeconfig), client_configuration=cfg)
        cfg.connection_pool_maxsize = max(16, args.threads * 2)
        api = k8s.ApiClient(cfg)
        core, custom = k8s.CoreV1Api(api), k8s.CustomObjectsApi(api)

        kubectl(rig, "apply", "--server-side", "--field-manager=bench", "-f", str(CRD))
        kubectl(rig, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{PLURAL}.{GROUP}")
        ns = f"bench-ops-{secrets.token_hex(3)}"
        core.create_namespace(k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=ns)))

        # ---- baselines: N ConfigMaps and N ClusterIP Services, same threads, no operator yet ---
        def baseline(what: str, prefix: str, create) -> tuple[dict[str, tuple[float, float]], float]:
            log(f"baseline: {args.count} {what} creates with {args.threads} threads")
            t0 = time.monotonic()
            done = create_all([f"{prefix}-{i:05d}" for i in range(args.count)], args.threads, create)
            return done, time.monotonic() - t0

        cm, cm_wall = baseline(
            "ConfigMap",
            "cm",
            lambda n: core.create_namespaced_config_map(
                ns, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name=n), data={"k": "v"})
            ),
        )
        cm_lat = [b - a for a, b in cm.values()]
        # Every endpoint has a ClusterIP Service, whose IP the API server allocates in the create
        # call (an IPAddress object).
        svc, svc_wall = baseline(
            "ClusterIP Service",
            "svc",
            lambda n: core.create_namespaced_service(
                ns,
                k8s.V1Service(
                    metadata=k8s.V1ObjectMeta(name=n),
                    spec=k8s.V1ServiceSpec(selector={"none": n}, ports=[k8s.V1ServicePort(port=8000)]),
                ),
            ),
        )

        # ---- the operator ---------------------------------------------------------------------
        env = dict(
            os.environ,
            KUBECONFIG=str(rig.kubeconfig),
            LLMEP_DRIFT_CHECK_SECONDS=str(args.drift_seconds),
            PYTHONUNBUFFERED="1",
        )
        env.pop("LLMEP_CONFIG", None)
        oplog = open(oplog_path, "w")
        operator = subprocess.Popen(
            [sys.executable, "-m", "llmep_serving.cli", "operator", "--namespace", ns],
            env=env,
            stdout=oplog,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log(f"operator pid {operator.pid} (llmep operator --namespace {ns}), log {oplog_path}")
        watcher = FirstSeen(api, ns)
        watcher.start()
        # Warm-up: one endpoint, so imports and watch start-up are not in the figures.
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, endpoint_manifest("warmup"))
        deadline = time.monotonic() + 120
        while watcher.both("warmup") is None:
            if operator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"operator did not reconcile the warm-up endpoint; see {oplog_path}")
            time.sleep(0.2)
        log("operator reconciled the warm-up endpoint")

        # ---- single applies on an idle rig: one endpoint at a time, each waited for ----------
        single: list[float] = []
        for i in range(args.singles):
            name = f"single-{i:03d}"
            t0 = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, endpoint_manifest(name))
            returned = time.monotonic()
            while (seen := watcher.both(name)) is None:
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"operator did not reconcile {name} within 60s; see {oplog_path}")
                time.sleep(0.005)
            single.append(seen - returned)
        log(f"{len(single)} single applies: p50 {percentile(single, 50) * 1000:.0f} ms; creating the endpoints")

        names = [f"ep-{i:05d}" for i in range(args.count)]
        spent_before = apiserver_time(api)
        t_first = time.monotonic()
        created = create_all(
            names,
            args.threads,
            lambda n: custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, endpoint_manifest(n)),
            args.rate,
        )
        create_wall = time.monotonic() - t_first
        log(f"{len(created)} LLMEndpoints created in {create_wall:.1f}s; waiting for their children")
        deadline = time.monotonic() + args.reconcile_timeout
        last_report = time.monotonic()
        while True:
            done = {n: watcher.both(n) for n in created}
            missing = [n for n, t in done.items() if t is None]
            if not missing or time.monotonic() > deadline or operator.poll() is not None:
                break
            if time.monotonic() - last_report > 15:
                log(f"{len(created) - len(missing)}/{len(created)} reconciled")
                last_report = time.monotonic()
            time.sleep(0.2)
        latencies = [done[n] - created[n][1] for n in created if done[n] is not None]
        t_last = max((t for t in done.values() if t is not None), default=t_first)
        rate = len(latencies) / (t_last - t_first) if latencies else 0.0
        crd_lat = [b - a for a, b in created.values()]

        spent = apiserver_time(api)
        spent.subtract(spent_before)

        # ---- steady window ----------------------------------------------------------------------
        steady_from = oplog_path.stat().st_size
        writes_before = apiserver_writes(api)
        log(f"steady window: {args.steady_seconds:.0f}s (drift timer every {args.drift_seconds:.0f}s)")
        time.sleep(args.steady_seconds)
        writes_after = apiserver_writes(api)
        with open(oplog_path, errors="replace") as f:
            f.seek(steady_from)
            steady_lines = f.read().splitlines()
        retries = [ln for ln in steady_lines if RETRY_RE.search(ln)]
        with open(oplog_path, errors="replace") as f:
            all_retries = sum(1 for ln in f if RETRY_RE.search(ln))
        writes = {
            k: writes_after[k] - writes_before.get(k, 0)
            for k in writes_after
            if writes_after[k] - writes_before.get(k, 0) > 0
        }
        rss_peak, rss_now = vm(operator.pid, "VmHWM"), vm(operator.pid, "VmRSS")

        # ---- report -------------------------------------------------------------------------
        n_ok = len(latencies)
        print()
        print(
            f"operator scale: {args.count} LLMEndpoints, {args.threads} client threads"
            f"{f', paced at {args.rate:g}/s' if args.rate else ', flat out'}, one namespace; "
            f"{os.cpu_count()} cores; load average at the end {os.getloadavg()[1]:.1f} (5 min)"
        )
        if rig.kuberay_stopped:
            print(
                "KubeRay was STOPPED for this bench: the figures measure llmep's operator and the API server "
                "(RayServices are created but no RayCluster or pod follows)."
            )
        print(f"reconciled: {n_ok}/{len(created)} (children seen within {args.reconcile_timeout:.0f}s)")
        print()
        rows = [
            ("create call, LLMEndpoint (client round trip) p50", f"{percentile(crd_lat, 50) * 1000:.1f} ms", ""),
            ("create call, ConfigMap baseline p50", f"{percentile(cm_lat, 50) * 1000:.1f} ms", ""),
            (
                f"single apply on an idle rig -> children p50 (n={len(single)})",
                f"{percentile(single, 50) * 1000:.0f} ms",
                "<= 200 ms",
            ),
            ("apply -> RayService+Service p50", f"{percentile(latencies, 50) * 1000:.0f} ms", ""),
            ("apply -> RayService+Service p95", f"{percentile(latencies, 95) * 1000:.0f} ms", "<= 2000 ms"),
            ("apply -> RayService+Service max", f"{max(latencies, default=float('nan')) * 1000:.0f} ms", ""),
            ("LLMEndpoints reconciled / s", f"{rate:.1f}", ">= 10% of CMs/s"),
            ("ConfigMaps created / s (baseline)", f"{len(cm) / cm_wall:.1f}", ""),
            ("ClusterIP Services created / s (baseline)", f"{len(svc) / svc_wall:.1f}", ""),
            ("LLMEndpoints created / s (client side)", f"{len(created) / create_wall:.1f}", ""),
            ("operator RSS peak (VmHWM)", f"{rss_peak:.0f} MiB", "<= 150 MiB"),
            ("operator RSS at end (VmRSS)", f"{rss_now:.0f} MiB", ""),
            (f"retry/failure log lines, steady {args.steady_seconds:.0f}s", f"{len(retries)}", "0"),
            ("retry/failure log lines, whole run", f"{all_retries}", ""),
        ]
        print(f"| {'what':<52} | {'measured':>20} | {'target':>10} |")
        print(f"| {'-' * 52} | {'-' * 20}:| {'-' * 10} |")
        for what, val, target in rows:
            print(f"| {what:<52} | {val:>20} | {target:>10} |")
        print()
        ratio_rate = rate / (len(cm) / cm_wall) if cm else float("nan")
        print(
            f"ratio: reconciled/s vs raw ConfigMap creates/s = {ratio_rate:.2f} "
            f"({rate:.1f} vs {len(cm) / cm_wall:.1f}); apply->children p95 vs ConfigMap create p95 = "
            f"{percentile(latencies, 95) / percentile(cm_lat, 95):.1f}x "
            f"({percentile(latencies, 95) * 1000:.0f} ms vs {percentile(cm_lat, 95) * 1000:.1f} ms)"
        )
        print(
            f"ratio: reconciled/s vs raw ClusterIP Service creates/s = {rate / (len(svc) / svc_wall):.2f} "
            f"({rate:.1f} vs {len(svc) / svc_wall:.1f}; each endpoint also creates a Service)"
        )
        print("anchor (published): controller-runtime ~20-50 objects/s")
        print()
        print(
            f"API writes during the steady {args.steady_seconds:.0f}s window (apiserver_request_total deltas; "
            f"APPLY = server-side apply PATCH):"
        )
        for (verb, res), v in sorted(writes.items()):
            print(f"  {verb:<6} {res:<24} {v:8.0f}")
        if not writes:
            print("  none")
        print("API server time answering requests during the burst, by verb and resource (top 8, seconds):")
        for (verb, res), v in spent.most_common(8):
            print(f"  {verb:<6} {res:<28} {v:8.1f}")
        if retries:
            print("steady-window retry lines (first 5):")
            for ln in retries[:5]:
                print("  " + ln[:240])
        print(
            json.dumps(
                {
                    "bench": "operator_scale",
                    "count": args.count,
                    "reconciled": n_ok,
                    "single_p50_ms": round(percentile(single, 50) * 1000, 1),
                    "p50_ms": round(percentile(latencies, 50) * 1000, 1),
                    "p95_ms": round(percentile(latencies, 95) * 1000, 1),
                    "max_ms": round(max(latencies, default=float("nan")) * 1000, 1),
                    "per_s": round(rate, 2),
                    "cm_per_s": round(len(cm) / cm_wall, 2),
                    "svc_per_s": round(len(svc) / svc_wall, 2),
                    "rss_peak_mib": round(rss_peak, 1),
                    "steady_retries": len(retries),
                    "kuberay_stopped": rig.kuberay_stopped,
                }
            )
        )
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if watcher is not None:
            watcher.stop.set()
        if operator is not None and operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(timeout=20)
            except subprocess.TimeoutExpired:
                operator.kill()
        rig.down()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
