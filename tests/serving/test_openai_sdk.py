"""What an application using the official OpenAI SDK sees from an llmep endpoint: Ray Serve LLM
with vLLM running the operator's serveConfigV2 for a tiny generated model."""

from __future__ import annotations

import time

import openai
import pytest

from tests.serving.conftest import SERVED_NAME

pytestmark = [pytest.mark.serving, pytest.mark.timeout(600)]

MESSAGES = [{"role": "user", "content": "Tell me about the weather in Paris."}]


def test_requests_take_the_direct_path(served):
    """HAProxy listens on Serve's port and hands each request to the LLMServer replica itself,
    after one call to the LLMRouter: no OpenAI ingress replica relays the tokens."""
    import psutil

    deployments = sorted(r.deployment for r in served.replicas())
    assert [d.split(":")[0] for d in deployments] == ["LLMRouter", "LLMServer"], deployments
    (listener,) = [
        c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == served.port
    ]
    assert psutil.Process(listener.pid).name() == "haproxy"


def test_models_list_shows_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].object == "model"


def test_chat_completion_answers_with_text_and_counts_usage(client):
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=12, temperature=0
    )
    (choice,) = response.choices
    assert response.model == SERVED_NAME
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_arrives_in_chunks_and_matches_the_plain_answer(client):
    plain = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    content_arrivals: list[float] = []
    pieces: list[str] = []
    last_with_choice = None
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        last_with_choice = chunk
        if chunk.choices[0].delta.content:
            content_arrivals.append(time.monotonic())
            pieces.append(chunk.choices[0].delta.content)
    assert len(pieces) > 1, "the answer came in one piece: the stream was buffered"
    assert content_arrivals[-1] > content_arrivals[0]
    assert last_with_choice is not None and last_with_choice.choices[0].finish_reason == "length"
    assert "".join(pieces) == plain.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 24


def test_text_completion_answers_and_counts_usage(client):
    response = client.completions.create(
        model=SERVED_NAME, prompt="The quick brown fox", max_tokens=8, temperature=0
    )
    (choice,) = response.choices
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("stop", "length")
    assert 0 < response.usage.completion_tokens <= 8
    assert response.usage.prompt_tokens > 0


@pytest.mark.parametrize("max_tokens", [1, 5, 17])
def test_max_tokens_is_an_upper_bound_and_exact_with_ignore_eos(client, max_tokens):
    bounded = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=max_tokens
    )
    assert bounded.usage.completion_tokens <= max_tokens
    exact = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )
    assert exact.usage.completion_tokens == max_tokens
    assert exact.choices[0].finish_reason == "length"


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
    assert caught.value.status_code == 404
    # Serve's ingress answers FastAPI's {"detail": ...}, not OpenAI's error envelope; the
    # gateway is what turns it into one.
    assert "no-such-model" in caught.value.response.text


def test_max_tokens_past_the_context_is_a_400_naming_the_limit(client):
    """The engine refuses it as a client error; the gateway later strips Ray's wrapping of the
    message (tests/contract/test_engine_error_contract.py, tests/e2e)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=100_000)
    text = caught.value.response.text
    assert "max_tokens=100000" in text and "max_model_len" in text, text
