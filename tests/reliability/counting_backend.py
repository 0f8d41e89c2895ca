"""An OpenAI-shaped chat-completions replica that records every request it receives, run as its
own process by tests/reliability/test_gateway_restart.py:
`python counting_backend.py PORT NAME RECEIVED_FILE`.

Each request's last user message (the prompt) is appended to RECEIVED_FILE as one JSON line
before anything is answered, so a test can count how many times a prompt reached any replica.
What it does is chosen by the prompt:

- ``crash ...``: the process exits at once (``os._exit``) after recording the request, before
  any response header is sent, as an engine that dies mid-generation;
- ``slow-stream ...`` (with ``"stream": true``): ``SLOW_CHUNKS`` chunks ``SLOW_DELAY`` s apart,
  a generation longer than the gateway's drain and grace periods;
- anything else: a completion whose content is ``"NAME: PROMPT"``, or a stream of
  ``STREAM_CHUNKS`` chunks ``"NAME0 "``, ``"NAME1 "``... then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from aiohttp import web

STREAM_CHUNKS = 12
CHUNK_DELAY = 0.05
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
    req = await request.json()
    name, model, stream = request.app["name"], req.get("model"), bool(req.get("stream"))
    prompt = req["messages"][-1]["content"]
    record(request.app["received"], {"backend": name, "prompt": prompt, "stream": stream})
    if prompt.startswith("crash"):
        os._exit(3)  # dies with the request read and no header sent, as a crashing engine
    if not stream:
        await asyncio.sleep(0.03)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"{name}: {prompt}"},
                        "finish_reason": "stop",
                    }
                ],
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
        pass  # the gateway dropped the stream (cut at shutdown): stop generating
    return resp


def main() -> None:
    port, name, received = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    app = web.Application()
    app["name"] = name
    app["received"] = received
    app.router.add_post("/v1/{tail:.*}", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
