#!/usr/bin/env python3
"""Autoscale bench: a step to 2x the target queue depth, on a real local Ray cluster.

The deployment is the operator's own serveConfigV2 (llmep_operator.render.build_serve_config)
for an LLMEndpoint with the `cpu` profile and the generated tiny model, run by LocalServe on
vLLM's CPU build, with the serving tier's settings: target 2 ongoing requests per replica,
1..2 replicas, scale-up delay 2 s, scale-down delay 10 s, and two Serve knobs that the
LLMEndpoint API does not expose (metrics_interval_s 1, look_back_period_s 2; without them
Serve's defaults, 10 s and 30 s, apply; `--serve-metric-defaults` measures that instead).

Prints, from the step (2 -> 4 concurrent streams, i.e. 2x target with one replica):
- time to Serve's decision (replicas wanted rose above min),
- time to the new replica RUNNING,
- after the load stops: time back to min;
and under a square-wave load (high 4 streams / low 0, 2 cycles) the target's moves and the
flaps (moves beyond one up per high phase and one down per low phase).

Baseline: the published anchors (Ray Serve 30 s default, KEDA 30 s + HPA 15 s, KubeAI ~310 s),
printed as published, not measured here. A bench, not a test: it prints, it asserts nothing.

  .venv/bin/python bench/autoscale.py [--high-s 30 --low-s 30 --cycles 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVED_NAME = "tiny"
MIN_REPLICAS, MAX_REPLICAS = 1, 2
TARGET = 2
MAX_ONGOING = 8
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 2, 10
SERVE_OVERRIDES = {"metrics_interval_s": 1, "look_back_period_s": 2}
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
TOKENS = 64
POLL_S = 0.25


def log(msg: str) -> None:
    print(f"[autoscale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def application(model_dir: str, overrides: bool) -> dict:
    from llmep_serving.tinymodel import tiny_application

    app = tiny_application(
        model_dir,
        name=SERVED_NAME,
        namespace="bench",
        autoscaling={
            "minReplicas": MIN_REPLICAS,
            "maxReplicas": MAX_REPLICAS,
            "targetQueueDepth": TARGET,
            "maxOngoingRequests": MAX_ONGOING,
            "scaleUpDelaySeconds": UPSCALE_DELAY_S,
            "scaleDownDelaySeconds": DOWNSCALE_DELAY_S,
        },
    )
    (llm_config,) = app["args"]["llm_configs"]
    scaling = llm_config["deployment_config"]["autoscaling_config"]
    if overrides:
        scaling.update(SERVE_OVERRIDES)
    log(f"autoscaling_config: {json.dumps(scaling)}")
    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--high-s", type=float, default=30.0)
    ap.add_argument("--low-s", type=float, default=30.0)
    ap.add_argument("--at-target-s", type=float, default=6.0)
    ap.add_argument("--running-timeout", type=float, default=240.0)
    ap.add_argument(
        "--serve-metric-defaults",
        action="store_true",
        help="leave metrics_interval_s / look_back_period_s at Serve's defaults (as the operator renders them)",
    )
    args = ap.parse_args(argv)
    try:
        import ray.serve.llm  # noqa: F401
        import vllm  # noqa: F401
    except ImportError as e:
        print(f"autoscale bench skipped: needs ray[serve] and vllm-cpu from hack/setup-venv ({e})")
        return 0

    from llmep_serving.local import LocalServe
    from llmep_serving.tinymodel import ensure_tiny_model

    t_all = time.monotonic()
    model_dir = str(ensure_tiny_model())
    app = application(model_dir, overrides=not args.serve_metric_defaults)
    t0 = time.monotonic()
    with LocalServe(
        app, port=free_port(), num_cpus=2 * MAX_REPLICAS + 2, env=ENGINE_ENV, ready_timeout_s=420
    ) as served:
        startup_s = time.monotonic() - t0
        log(f"serving after {startup_s:.0f}s")
        out = asyncio.run(run(served, args))
    total_s = time.monotonic() - t_all

    print()
    print(
        f"autoscale: operator serveConfigV2, profile cpu, tiny model, vLLM CPU build, {os.cpu_count()} cores; "
        f"target {TARGET} ongoing/replica, replicas {MIN_REPLICAS}..{MAX_REPLICAS}, "
        f"upscale delay {UPSCALE_DELAY_S} s, downscale delay {DOWNSCALE_DELAY_S} s; "
        f"load average at the end {os.getloadavg()[1]:.1f} (5 min)"
    )
    if args.serve_metric_defaults:
        print("Serve metrics_interval_s / look_back_period_s: Serve's defaults (as rendered by the operator)")
    else:
        print(
            f"Serve overrides applied (not in the LLMEndpoint API; the operator's rendering leaves Serve's "
            f"defaults): {SERVE_OVERRIDES}"
        )
    print(f"at target ({TARGET} streams, 1 replica): replicas wanted = {out['wanted_at_target']} (expected 1)")
    print()
    rows = [
        (f"step {TARGET} -> {2 * TARGET} streams -> scale decision", fmt(out["decision_s"]), "<= 5 s"),
        ("step -> new replica RUNNING (engine load on 2 cores)", fmt(out["running_s"]), ""),
        ("load stopped -> back to min", fmt(out["back_to_min_s"]), ""),
        (
            f"square wave {args.cycles}x ({args.high_s:.0f} s high / {args.low_s:.0f} s low): flaps",
            str(out["flaps"]),
            "0",
        ),
        ("requests ok / failed", f"{out['load_ok']} / {len(out['load_failed'])}", ""),
    ]
    print(f"| {'what':<58} | {'measured':>10} | {'target':>7} |")
    print(f"| {'-' * 58} | {'-' * 10}:| {'-' * 7} |")
    for what, val, target in rows:
        print(f"| {what:<58} | {val:>10} | {target:>7} |")
    print()
    print(
        f"square wave: target moved up {out['square_ups']}x, down {out['square_downs']}x "
        f"(no flapping = at most one up per high phase and one down per low phase)"
    )
    for t, a, b, phase in out["square_moves"]:
        print(f"  t={t:6.1f}s  wanted {a} -> {b}  (during {phase} phase)")
    print()
    print("baseline, PUBLISHED (not measured here): Ray Serve default autoscaling ~30 s to decide; KEDA 30 s poll")
    print("  + HPA 15 s sync; KubeAI ~310 s.")
    if out["decision_s"] is not None:
        print(
            f"ratio: decision {out['decision_s']:.1f} s vs Ray Serve default 30 s (published) = "
            f"{out['decision_s'] / 30:.2f}x; vs KEDA+HPA 45 s (published) = {out['decision_s'] / 45:.2f}x"
        )
    if out["load_failed"]:
        print(f"failed requests (first 3): {out['load_failed'][:3]}")
    print(f"bench wall time {total_s:.0f} s (Ray + first engine up in {startup_s:.0f} s)")
    print(
        json.dumps(
            {
                "bench": "autoscale",
                "decision_s": out["decision_s"],
                "running_s": out["running_s"],
                "back_to_min_s": out["back_to_min_s"],
                "flaps": out["flaps"],
                "failed": len(out["load_failed"]),
                "serve_overrides": not args.serve_metric_defaults,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
