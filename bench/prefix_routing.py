"""Prefix-cache affinity routing against Serve's default router, on the path that ships.

Two replicas of the tiny model, rendered by the operator for `spec.routing.policy`
LeastLoaded and then PrefixCacheAffinity (the direct serving path, as rendered), each fed the
same seeded traffic: conversations that resend one of `--prefixes` long system prompts with a
new question each time, `--concurrency` at once. Each replica's KV cache is cut to
`--kv-blocks` blocks of 32 tokens, so it holds only part of the prefixes, as a busy GPU
replica does: where a request lands decides whether its prefix is still cached.

Reported per policy: vLLM's prefix-cache hit rate as the responses count it
(`usage.prompt_tokens_details.cached_tokens` / `prompt_tokens`, summed) and TTFT p50/p99 of
streamed requests; then the ratios. The two policies run one after the other (two replicas of
each at once do not fit in this machine's memory beside each other), so the load average at
each start is printed.

    .venv/bin/python bench/prefix_routing.py [--requests 160] [--prefixes 8] [--kv-blocks 24]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from benchlib import free_port, percentile

from llmep_serving.local import LocalServe
from llmep_serving.tinymodel import ensure_tiny_model, load_corpus, tiny_ray_app

SERVED = "tiny"
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
POLICIES = ("LeastLoaded", "PrefixCacheAffinity")
BLOCK_SIZE = 32  # vLLM's CPU attention takes multiples of 32


@dataclass
class Result:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int


def workload(requests: int, prefixes: int, prefix_words: int, seed: int) -> list[list[dict]]:
    """The same conversations for every policy: a long system prompt, then a new question."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    words = load_corpus().split()
    systems = [" ".join(rng.choices(words, k=prefix_words)) for _ in range(prefixes)]
    return [
        [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": f"Question {i}: " + " ".join(rng.choices(words, k=8))},
        ]
        for i in range(requests)
    ]


def one_request(http: httpx.Client, base_url: str, messages: list[dict]) -> Result:
    body = {
        "model": SERVED,
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    usage = None
    with http.stream("POST", f"{base_url}/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError(f"no tokens or no usage from {base_url}")
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Result(first - start, usage["prompt_tokens"], cached)


def measure(policy: str, conversations: list[list[dict]], args: argparse.Namespace) -> list[Result]:
    rendered = tiny_ray_app(
        ensure_tiny_model(),
        name=SERVED,
        namespace="bench",
        max_model_len=512,
        autoscaling={"minReplicas": 2, "maxReplicas": 2},
        routing={"policy": policy},
        # A small KV cache, so where a request lands decides whether its prefix is still held;
        # cached_tokens in the usage is vLLM's own count of prefix-cache hits.
        extra_args={
            "enable_prefix_caching": True,
            "block_size": BLOCK_SIZE,
            "num_gpu_blocks_override": args.kv_blocks,
            "enable_prompt_tokens_details": True,
        },
    )
    print(f"\n{policy}: load average {os.getloadavg()[0]:.1f}, starting two replicas ...", flush=True)
    t0 = time.monotonic()
    with LocalServe(
        rendered.application, port=free_port(), num_cpus=6, env={**ENV, **rendered.env}, progress=None
    ) as local:
        print(f"{policy}: ready in {time.monotonic() - t0:.0f}s", flush=True)
        limits = httpx.Limits(max_connections=args.concurrency)
        with httpx.Client(timeout=120, limits=limits) as http, ThreadPoolExecutor(args.concurrency) as pool:
            return list(pool.map(lambda m: one_request(http, local.base_url, m), conversations))


def summary(results: list[Result]) -> dict[str, float]:
    prompt = sum(r.prompt_tokens for r in results)
    return {
        "hit rate %": 100 * sum(r.cached_tokens for r in results) / prompt,
        "TTFT p50 ms": 1000 * percentile([r.ttft_s for r in results], 50),
        "TTFT p99 ms": 1000 * percentile([r.ttft_s for r in results], 99),
        "prompt tokens": prompt / len(results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--prefixes", type=int, default=8, help="distinct system prompts")
    parser.add_argument("--prefix-words", type=int, default=150, help="words per system prompt")
    parser.add_argument("--kv-blocks", type=int, default=24, help=f"KV cache blocks of {BLOCK_SIZE} tokens per replica")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    conversations = workload(args.requests, args.prefixes, args.prefix_words, args.seed)
    print(
        f"{args.requests} streamed chats, {args.prefixes} system prompts of {args.prefix_words} words, "
        f"c={args.concurrency}, 2 replicas with {args.kv_blocks} KV blocks of {BLOCK_SIZE} tokens each"
    )
    figures = {policy: summary(measure(policy, conversations, args)) for policy in POLICIES}
    base, affinity = (figures[p] for p in POLICIES)
    print(f"\n{'':<16}" + "".join(f"{p:>22}" for p in POLICIES) + f"{'affinity/least':>16}")
    for label in base:
        row = f"{label:<16}" + "".join(f"{figures[p][label]:>22.1f}" for p in POLICIES)
        print(row + f"{affinity[label] / base[label]:>15.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
