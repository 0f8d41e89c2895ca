"""Fair sharing of a saturated model, through the gateway, with its fair queue on and off.

The model is an in-process OpenAI-shaped engine that runs at most `--capacity` sequences at
once and queues the rest first come, first served, as vLLM does past `max_num_seqs`: each
sequence takes `--prefill-ms`, then `--token-ms` per token; a batch request asks for between
half and 1.5 times `--tokens` (seeded), so sequences do not end in lockstep. (The tests' fake
backend in tests/unit/gateway/conftest.py has no such capacity, which is what this measures.)
Two gateways in the same process front it, one with `max_inflight_per_model` = capacity (the
queue on) and one without (off).

1. TTFT of an interactive high-priority key, one streamed request at a time: idle, then while
   a low-priority batch key keeps `--flood` requests outstanding (queue on, then off).
2. Completions of two normal-priority keys, one keeping 4x capacity requests outstanding and
   the other 1x, over `--seconds` while saturated (queue on, then off). Both want more than
   half the model, so each is owed half.

With `--engine vllm` the model is real instead: the generated tiny model served by Ray Serve
LLM and vLLM's CPU build (LocalServe, the operator's rendered app) with `maxOngoingRequests` set
to `--capacity`, which is also the queue-on gateway's capacity: what cluster mode gives that
endpoint with one ready replica. Past it,
the queue-off gateway's requests wait in Ray Serve's own first-come queue.

Targets: interactive TTFT under flood <= 2x idle; equal keys' shares within 10% of each other.
Everything runs on 127.0.0.1 and stops by itself.

    .venv/bin/python bench/fairness.py [--capacity 8] [--samples 30] [--seconds 5] [--reserve 0.125]
    .venv/bin/python bench/fairness.py --engine vllm [--capacity 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from benchlib import percentile

from llmep_serving.gateway import GatewayServer, GatewaySettings

KEYS = {
    "interactive": "high",
    "batch": "low",
    "heavy": "normal",
    "light": "normal",
}


class Engine:
    """At most ``capacity`` sequences at once, the rest waiting in arrival order."""

    def __init__(self, capacity: int, prefill: float, token: float) -> None:
        self.slots = asyncio.Semaphore(capacity)  # wakes waiters first come, first served
        self.prefill = prefill
        self.token = token
        self.busy = 0  # sequences running or queued, so phases start with an idle engine

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        body = json.loads(await request.read())
        tokens = body["max_tokens"]
        self.busy += 1
        try:
            async with self.slots:
                return await self._generate(request, body.get("stream", False), tokens)
        finally:
            self.busy -= 1

    async def _generate(self, request: web.BaseRequest, stream: bool, tokens: int) -> web.StreamResponse:
        await asyncio.sleep(self.prefill)
        if not stream:
            await asyncio.sleep(self.token * tokens)
            return web.json_response({"choices": [{"message": {"content": "x" * tokens}}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(tokens):
            if i:
                await asyncio.sleep(self.token)
            await resp.write(b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        runner = web.ServerRunner(web.Server(self.handle, access_log=None))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        finally:
            await runner.cleanup()


@asynccontextmanager
async def gateway(backend: str, capacity: int, reserve: float, tmp: Path) -> AsyncIterator[GatewayServer]:
    routes, keys = tmp / f"routes-{capacity}.yaml", tmp / "keys.yaml"
    routes.write_text(yaml.safe_dump([{"models": ["m"], "url": backend}]))
    keys.write_text(yaml.safe_dump([{"name": n, "key": f"sk-{n}", "priority": p} for n, p in KEYS.items()]))
    settings = GatewaySettings(
        host="127.0.0.1",
        port=0,
        routes_file=routes,
        keys_file=keys,
        max_inflight_per_model=capacity,
        fair_high_priority_reserve=reserve,
        log_level="WARNING",
    )
    server = GatewayServer(settings)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def ask(http: aiohttp.ClientSession, url: str, key: str, tokens: int, stream: bool = False) -> float:
    """Seconds to the first streamed token (or to the whole answer)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": stream,
        "ignore_eos": True,  # vLLM: exactly max_tokens, as the in-process engine does
    }
    started = time.perf_counter()
    first = None
    async with http.post(f"{url}/chat/completions", json=body, headers={"Authorization": f"Bearer sk-{key}"}) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{key}: {resp.status} {await resp.text()}")
        async for _ in resp.content.iter_any():
            first = first or time.perf_counter()
    return (first if stream and first else time.perf_counter()) - started


class Load:
    """Batch clients: each keeps requests of varied lengths outstanding, replacing each as it completes."""

    def __init__(self, http: aiohttp.ClientSession, url: str, tokens: int, seed: int) -> None:
        self.http = http
        self.url = url
        self.tokens = tokens
        self.lengths = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
        self.done: dict[str, int] = {}

    @asynccontextmanager
    async def outstanding(self, key: str, count: int) -> AsyncIterator[None]:
        async def client() -> None:
            while True:
                await ask(self.http, self.url, key, self.lengths.randint(self.tokens // 2, self.tokens * 3 // 2))
                self.done[key] = self.done.get(key, 0) + 1

        tasks = [asyncio.create_task(client()) for _ in range(count)]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def saturated(self, capacity: int) -> dict[str, int]:
        """Once the first sequences are through, the completions so far."""
        while sum(self.done.values()) < capacity:
            await asyncio.sleep(0.05)
        return dict(self.done)


async def interactive_ttft(http: aiohttp.ClientSession, url: str, args: argparse.Namespace) -> list[float]:
    return [await ask(http, url, "interactive", args.tokens, stream=True) for _ in range(args.samples)]


async def flood_ttft(http: aiohttp.ClientSession, url: str, args: argparse.Namespace) -> list[float]:
    load = Load(http, url, args.tokens, args.seed)
    async with load.outstanding("batch", args.flood):
        await load.saturated(args.capacity)
        return await interactive_ttft(http, url, args)


async def shares(http: aiohttp.ClientSession, url: str, args: argparse.Namespace) -> dict[str, float]:
    load = Load(http, url, args.tokens, args.seed)
    async with load.outstanding("heavy", 4 * args.capacity), load.outstanding("light", args.capacity):
        start = await load.saturated(args.capacity)
        await asyncio.sleep(args.seconds)
        counts = {key: load.done.get(key, 0) - start.get(key, 0) for key in ("heavy", "light")}
    total = sum(counts.values())
    return {
        "share of 'heavy' %": 100 * counts["heavy"] / total,
        "share of 'light' %": 100 * counts["light"] / total,
        "completions/s": total / args.seconds,
    }


async def run(args: argparse.Namespace, served: str | None) -> None:
    """``served``: a real engine's base URL; None runs the in-process one."""
    engine = Engine(args.capacity, args.prefill_ms / 1000, args.token_ms / 1000)
    connector = aiohttp.TCPConnector(limit=0)
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            engine.serving() if served is None else nullcontext(served) as backend,
            gateway(backend, args.capacity, args.reserve, Path(tmp)) as on_server,
            gateway(backend, 0, args.reserve, Path(tmp)) as off_server,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            on, off = (f"http://127.0.0.1:{g.port}/v1" for g in (on_server, off_server))

            async def idle() -> None:
                # A left client's request is aborted by the gateway (vLLM, through Serve) or
                # finished by the in-process engine, as vLLM does when nobody aborts it.
                while any(len(g.gateway.in_flight) for g in (on_server, off_server)) or engine.busy:
                    await asyncio.sleep(0.05)

            for url in (on, off):  # warm both paths' connection pools
                await ask(http, url, "interactive", args.tokens, stream=True)
            ttft = {"idle": await interactive_ttft(http, on, args)}
            for label, url in (("flood, queue on", on), ("flood, queue off", off)):
                ttft[label] = await flood_ttft(http, url, args)
                await idle()
            split = {}
            for label, url in (("queue on", on), ("queue off", off)):
                split[label] = await shares(http, url, args)
                await idle()
    report(ttft, split)


@contextmanager
def vllm_engine(capacity: int) -> Iterator[str]:
    """The tiny model on Ray Serve LLM + vLLM, taking ``capacity`` requests at once; its base URL."""
    from benchlib import free_port

    from llmep_operator.api import capacity_of
    from llmep_serving.local import LocalServe
    from llmep_serving.tinymodel import ensure_tiny_model, tiny_endpoint_manifest, tiny_ray_app

    autoscaling = {
        "minReplicas": 1,
        "maxReplicas": 1,
        "targetQueueDepth": max(1, capacity // 4),
        "maxOngoingRequests": capacity,
    }
    model = ensure_tiny_model()
    manifest = tiny_endpoint_manifest(model, name="m", namespace="bench", max_model_len=512, autoscaling=autoscaling)
    assert capacity_of({**manifest, "status": {"replicas": {"ready": 1}}}) == capacity  # as cluster mode sees it
    rendered = tiny_ray_app(model, name="m", namespace="bench", max_model_len=512, autoscaling=autoscaling)
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **rendered.env}
    started = time.monotonic()
    print("starting Ray Serve LLM + vLLM (CPU) with the tiny model ...", flush=True)
    with LocalServe(rendered.application, port=free_port(), env=env, progress=None) as local:
        print(f"ready in {time.monotonic() - started:.0f}s", flush=True)
        yield local.base_url


def report(ttft: dict[str, list[float]], split: dict[str, dict[str, float]]) -> None:
    idle = ttft["idle"]
    print(
        f"\n{'interactive key (high), TTFT ms':<34}{'idle':>8}{'flood, on':>12}{'flood, off':>12}"
        f"{'on/idle':>10}{'off/idle':>10}"
    )
    for q in (50, 99):
        base = percentile(idle, q)
        row = [percentile(ttft[label], q) for label in ("flood, queue on", "flood, queue off")]
        print(
            f"{f'p{q}':<34}{1000 * base:>8.1f}{1000 * row[0]:>12.1f}{1000 * row[1]:>12.1f}"
            f"{row[0] / base:>9.2f}x{row[1] / base:>9.2f}x"
        )
    print("target: flood, on / idle <= 2x")
    print(f"\n{'equal keys, 4:1 outstanding':<34}{'queue on':>10}{'queue off':>12}")
    for label in split["queue on"]:
        print(f"{label:<34}{split['queue on'][label]:>10.1f}{split['queue off'][label]:>12.1f}")
    on = split["queue on"]
    gap = abs(on["share of 'heavy' %"] - on["share of 'light' %"])
    print(f"target: shares within 10% of each other (queue on: {gap:.1f} points apart)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--capacity", type=int, default=8, help="sequences the engine runs at once")
    parser.add_argument("--prefill-ms", type=float, default=20)
    parser.add_argument("--token-ms", type=float, default=10)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--flood", type=int, default=32, help="batch requests kept outstanding")
    parser.add_argument("--samples", type=int, default=30, help="interactive requests per phase")
    parser.add_argument("--seconds", type=float, default=5, help="length of each shares window")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--engine", choices=("model", "vllm"), default="model", help="in-process model or real vLLM")
    parser.add_argument(
        "--reserve",
        type=float,
        default=GatewaySettings.model_fields["fair_high_priority_reserve"].default,
        help="fair_high_priority_reserve (default: the gateway's)",
    )
    args = parser.parse_args()
    engine = (
        f"in-process, {args.capacity} sequences at once, {args.prefill_ms:g} ms prefill, {args.token_ms:g} ms a token"
        if args.engine == "model"
        else f"vLLM (CPU) behind Ray Serve LLM, the tiny model, max_ongoing_requests {args.capacity}"
    )
    print(
        f"engine: {engine}; "
        f"interactive: {args.tokens} tokens, batch: {args.tokens // 2}-{args.tokens * 3 // 2}; "
        f"flood: {args.flood} outstanding; load average {os.getloadavg()[0]:.1f}"
    )
    held = min(args.capacity - 1, math.ceil(args.capacity * args.reserve))
    print(
        f"fair_high_priority_reserve {args.reserve:g}: {held} of {args.capacity} slots held back from the other "
        "keys while the high key has asked within a minute (in the shares window too: it asked just before)"
    )
    if args.engine == "model":
        asyncio.run(run(args, None))
        return 0
    with vllm_engine(args.capacity) as served:
        asyncio.run(run(args, served))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
