"""The reliability tier's one OpenAI-shaped chat-completions server, run as its own process so that
a test can kill it outright (SIGKILL) mid-stream:
`python fake_openai_backend.py PORT NAME [RECEIVED_FILE]`.

It stands in for a vLLM replica: killing and restarting real engines on 2 cores does not fit the
suite's time; the real Ray Serve + vLLM path is covered in tests/serving.

With RECEIVED_FILE, each request's last user message (the prompt) is appended to it as one JSON
line before anything is answered, so a test can count how often a prompt reached any replica.
What it answers is chosen by the prompt:

- ``crash ...``: the process exits at once (``os._exit``) after recording the request, before
  any response header is sent, as an engine that dies mid-generation;
- ``slow-stream ...`` (with ``"stream": true``): ``SLOW_CHUNKS`` chunks ``SLOW_DELAY`` s apart,
  a generation longer than the gateway's drain and grace periods;
- anything else: a completion whose content is ``"NAME: PROMPT"``, or a stream of
  ``STREAM_CHUNKS`` chunks ``"NAME0 "``, ``"NAME1 "``... then ``data: [DONE]``.

A body over 1 MiB (test_gateway_limits.py) is read, discarded and answered with no choices.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aiohttp import web

STREAM_CHUNKS = 12
CHUNK_DELAY = 0.06
SLOW_CHUNKS = 400
SLOW_DELAY = 0.05


def record(path: str, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(entry) + "\n")


def chunk(model: str, content: str) -> bytes:
    event = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def chat(request: web.Request) -> web.StreamResponse:
    if (request.content_length or 0) > 1024 * 1024:
        size = 0
        async for data in request.content.iter_chunked(1 << 20):
            size += len(data)
        return web.json_response({"object": "chat.completion", "choices": [], "discarded_bytes": size})
    req = await request.json()
    name, model, stream = request.app["name"], req.get("model"), bool(req.get("stream"))
    messages = req.get("messages") or [{}]
    prompt = str(messages[-1].get("content", ""))
    if request.app["received"]:
        record(request.app["received"], {"backend": name, "prompt": prompt, "stream": stream})
    if prompt.startswith("crash"):
        os._exit(3)  # dies with the request read and no header sent, as a crashing engine
    if not stream:
        await asyncio.sleep(0.05)
        message = {"role": "assistant", "content": f"{name}: {prompt}"}
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )
    count, delay = (SLOW_CHUNKS, SLOW_DELAY) if prompt.startswith("slow-stream") else (STREAM_CHUNKS, CHUNK_DELAY)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    try:
        for i in range(count):
            await resp.write(chunk(model, f"{name}{i} "))
            await asyncio.sleep(delay)
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionError:
        pass  # the gateway dropped the stream (a cut at shutdown): stop generating
    return resp


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    app = web.Application(client_max_size=1 << 30)
    app["name"] = name
    app["received"] = sys.argv[3] if len(sys.argv) > 3 else None
    app.router.add_post("/v1/{tail:.*}", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
