"""Per-key usage through `llmep gateway` in front of real Ray Serve LLM + vLLM: the gateway's
token counters equal the sum of the usage the engine reported, for plain answers and for
streams, including a stream whose client did not ask for usage (the gateway asks, settles the
key's tokens from it, and strips that chunk)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmep_serving.local import LocalServe
from tests.serving.conftest import SERVED_NAME, local_gateway

pytestmark = [pytest.mark.serving, pytest.mark.timeout(600)]

KEY_NAME, KEY = "metered", "sk-test-metered"
MESSAGES = [{"role": "user", "content": "Name three rivers."}]
TOKENS = 8  # every answer below is exactly this long (ignore_eos)


@pytest.fixture(scope="module")
def gateway_root(served: LocalServe, tmp_path_factory) -> Iterator[str]:
    routes = [{"models": [SERVED_NAME], "url": served.base_url, "ready": True}]
    keys = [{"name": KEY_NAME, "key": KEY, "rpm": 600, "tpm": 100_000, "tokens_per_day": 1_000_000}]
    with local_gateway(tmp_path_factory.mktemp("gateway"), routes, keys) as root:
        yield root


def key_counters(root: str) -> dict[tuple[str, str], float]:
    """(family, label) -> value of the key's series: tokens by type, requests by code."""
    text = httpx.get(f"{root}/metrics", timeout=10).text
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("key") != KEY_NAME or not sample.name.endswith("_total"):
                continue
            label = sample.labels.get("type") or sample.labels.get("code") or sample.labels.get("limit", "")
            found[(sample.name, label)] = sample.value
    return found


def test_the_keys_token_counters_equal_the_engines_usage(gateway_root: str):
    client = openai.OpenAI(base_url=f"{gateway_root}/v1", api_key=KEY, max_retries=0, timeout=120)
    exact = {"max_tokens": TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    plain = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, **exact)
    assert plain.usage.completion_tokens == TOKENS
    usages = [plain.usage]

    asked = list(
        client.chat.completions.create(
            model=SERVED_NAME, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **exact
        )
    )
    assert asked[-1].usage is not None and not asked[-1].choices
    usages.append(asked[-1].usage)

    # The client asks for no usage: it must see none, yet the key is charged what the engine counted.
    unasked = list(client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, stream=True, **exact))
    assert all(chunk.usage is None and chunk.choices for chunk in unasked), unasked[-1]
    assert "".join(c.choices[0].delta.content or "" for c in unasked)
    usages.append(plain.usage)  # the same prompt, and exactly TOKENS tokens

    text = client.completions.create(model=SERVED_NAME, prompt="Rivers of Europe:", **exact)
    usages.append(text.usage)

    counters = key_counters(gateway_root)
    print(f"\n[serving] usage per request: {[(u.prompt_tokens, u.completion_tokens) for u in usages]}")
    print(f"[serving] the key's counters: {counters}")
    assert counters[("llmep_gateway_key_tokens_total", "prompt")] == sum(u.prompt_tokens for u in usages)
    assert counters[("llmep_gateway_key_tokens_total", "completion")] == sum(u.completion_tokens for u in usages)
    assert counters[("llmep_gateway_key_requests_total", "200")] == len(usages)
    assert not any(name == "llmep_gateway_key_rate_limited_total" for name, _ in counters)
