"""An OpenAI-shaped backend on loopback, standing in for an endpoint's Ray Serve Service in tests
that run the gateway in this process (this tier runs no Ray; the real serving path is covered in
tests/serving)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web


async def start_openai_backend(answer: Callable[[str], str]) -> tuple[web.AppRunner, str]:
    """Start it; every chat completion answers `answer(model)`. Returns its runner and /v1 URL."""

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        message = {"role": "assistant", "content": answer(body["model"])}
        choice = {"index": 0, "finish_reason": "stop", "message": message}
        return web.json_response(
            {"id": "x", "object": "chat.completion", "created": 1, "model": body["model"], "choices": [choice]}
        )

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
