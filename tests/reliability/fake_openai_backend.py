"""A small OpenAI-shaped chat-completions server, run as its own process by the reliability
tests so that it can be killed outright (SIGKILL) mid-stream: `python fake_openai_backend.py PORT NAME`.

It stands in for a vLLM replica: killing and restarting real engines on 2 cores does not fit the
suite's time; the real Ray Serve + vLLM path is covered in tests/serving.
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

STREAM_CHUNKS = 12
CHUNK_DELAY = 0.06


async def chat(request: web.Request) -> web.StreamResponse:
    if (request.content_length or 0) > 1024 * 1024:  # a large upload (test_gateway_limits.py): discard it
        size = 0
        async for chunk in request.content.iter_chunked(1 << 20):
            size += len(chunk)
        return web.json_response({"object": "chat.completion", "choices": [], "discarded_bytes": size})
    req = await request.json()
    model, name = req.get("model"), request.app["name"]
    if not req.get("stream"):
        await asyncio.sleep(0.05)
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": f"from {name}"}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(STREAM_CHUNKS):
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": f"{name}{i} "}, "finish_reason": None}],
        }
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await asyncio.sleep(CHUNK_DELAY)
    await resp.write(b"data: [DONE]\n\n")
    return resp


def main() -> None:
    port, name = int(sys.argv[1]), sys.argv[2]
    app = web.Application(client_max_size=1 << 30)
    app["name"] = name
    app.router.add_post("/v1/{tail:.*}", chat)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    main()
