"""The gateway's limits against hostile or heavy clients, as a separate process whose memory is
read from /proc: an oversized chunked upload gets 413 before it ends and without being buffered
whole; a slowloris client is disconnected by the header timeout; 200 concurrent 8 MiB bodies
(from one key and from 200 keys) are held within the body budget, the excess answered 429,
with the gateway's peak RSS bounded by the budget.

The backend is a small OpenAI-shaped aiohttp server (fake_openai_backend.py) standing in for
vLLM, which discards the bodies; the real Ray Serve + vLLM path is covered in tests/serving.
All traffic is on 127.0.0.1, every loop bounded.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from tests.reliability.stack import free_port, start_backend, start_gateway

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio]

MIB = 1024 * 1024
CAP = 16 * MIB


@pytest.fixture
def stack(tmp_path, request):
    # A short header timeout for the slowloris test; the default elsewhere, since 100 clients
    # uploading at once on 2 cores may take longer than 2 s to send a head after connecting.
    header_timeout = getattr(request, "param", 10)
    backend_port, gateway_port = free_port(), free_port()
    backend = start_backend(backend_port, "sink", tmp_path)
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps([{"models": ["chat"], "url": f"http://127.0.0.1:{backend_port}/v1"}]))
    gateway = start_gateway(
        gateway_port, tmp_path, "--routes-file", str(routes), "--anonymous", "--max-concurrency-per-key", "0",
        "--max-body-bytes", str(CAP), "--header-timeout", str(header_timeout), "--body-timeout", "60",
        "--backend-connect-timeout", "30",
    )  # fmt: skip
    yield gateway, gateway_port
    gateway.terminate(10)
    backend.terminate(10)


async def test_a_64_mib_chunked_upload_gets_413_before_it_ends_without_being_buffered(stack):
    gateway, port = stack
    rss_before = gateway.rss_kib()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (MIB, b" " * MIB)
    sent, answered_at = 0, None
    status_line = asyncio.ensure_future(reader.readline())
    started = time.monotonic()
    try:
        for _ in range(64):  # 64 MiB, paced: about 6 s if the gateway never stopped it
            if status_line.done():
                answered_at = sent
                break
            writer.write(chunk)
            await writer.drain()
            sent += MIB
            await asyncio.sleep(0.1)
    except ConnectionError:
        pass  # the gateway closed the connection after its 413
    line = await asyncio.wait_for(status_line, 10)
    answered_at = answered_at if answered_at is not None else sent
    rest = await asyncio.wait_for(reader.read(65536), 10)
    writer.close()
    hwm_growth = (gateway.vm_hwm_kib() - rss_before) / 1024
    print(
        f"\n413 for a 64 MiB chunked upload after {answered_at / MIB:.0f} MiB sent "
        f"({time.monotonic() - started:.1f}s); gateway peak RSS grew {hwm_growth:.1f} MiB"
    )
    assert line.startswith(b"HTTP/1.1 413"), line
    assert b"request_too_large" in rest
    assert answered_at < 64 * MIB, "the 413 came only after the whole upload"
    assert hwm_growth < 40, f"the gateway's peak RSS grew {hwm_growth:.1f} MiB for a refused upload"


@pytest.mark.parametrize("stack", [2], indirect=True)
async def test_a_slowloris_client_is_disconnected_by_the_header_timeout(stack):
    _, port = stack
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    closed_after = None
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30
    try:
        for byte in head:  # one byte every 0.2 s: 12 s if never cut off
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                data = await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                continue
            if not data or b"HTTP/1.1" in data:
                closed_after = time.monotonic() - started
                break
    except ConnectionError:
        closed_after = time.monotonic() - started
    writer.close()
    print(f"\nslowloris client disconnected after {closed_after}s (header timeout 2 s)")
    assert closed_after is not None, "the gateway kept a slowloris connection open for its whole head"
    assert 1.5 <= closed_after <= 5


BUDGET = 64 * MIB


@pytest.mark.parametrize("keys", [1, 200], ids=["one-key", "200-keys"])
async def test_200_concurrent_8_mib_bodies_stay_within_the_body_budget(tmp_path, keys):
    """200 clients send 8 MiB at once (1.6 GiB): the gateway holds at most max_inflight_body_bytes
    of them, the rest get 429 in the envelope, and its peak RSS follows the budget, not the load."""
    backend_port, port = free_port(), free_port()
    backend = start_backend(backend_port, "sink", tmp_path)
    routes, keys_file = tmp_path / "routes.json", tmp_path / "keys.json"
    routes.write_text(json.dumps([{"models": ["chat"], "url": f"http://127.0.0.1:{backend_port}/v1"}]))
    keys_file.write_text(json.dumps([{"name": f"k{i}", "key": f"sk-{i}"} for i in range(keys)]))
    gateway = start_gateway(
        port, tmp_path, "--routes-file", str(routes), "--keys-file", str(keys_file),
        "--max-inflight-body-bytes", str(BUDGET), "--max-body-bytes", str(CAP), "--body-timeout", "60",
        "--retry-after-seconds", "1",
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * (8 * MIB - 100)}]}).encode()
        answers: list[tuple[int, dict, str | None]] = []
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=150)) as session:
            # One body at offload_parse_bytes (256 KiB) starts the parser process: its idle size.
            warm = {"model": "chat", "messages": [{"role": "user", "content": "x" * 256 * 1024}]}
            async with session.post(url, json=warm, headers={"Authorization": "Bearer sk-0"}) as resp:
                assert resp.status == 200, await resp.text()
            (parser,) = gateway.workers()
            base, parser_base = gateway.vm_hwm_kib() / 1024, parser.vm_hwm_kib() / 1024
            started = time.monotonic()

            async def one(i: int) -> None:
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer sk-{i % keys}"}
                async with session.post(url, data=body, headers=headers) as resp:
                    answers.append((resp.status, await resp.json(), resp.headers.get("Retry-After")))

            await asyncio.gather(*(one(i) for i in range(200)))
        peak, parser_peak = gateway.vm_hwm_kib() / 1024, parser.vm_hwm_kib() / 1024
    finally:
        gateway.terminate(10)
        backend.terminate(10)
    ok = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    # Bodies held (<= the budget), as much again on their way out (buffers to the backend), up to
    # 0.5 MiB of receive buffers per open connection (aiohttp's 2 x 64 KiB and uvloop's 256 KiB,
    # filled before a refused body is drained), and 32 MiB for one body joined from its chunks and
    # two pickled for the parser process.
    bound = base + 2 * BUDGET / MIB + 200 * 0.5 + 32
    # The parser process parses one body at a time: the pickled bytes, the decoded text, the
    # parsed JSON and the rewritten body, 4 x 8 MiB, plus 8 MiB of allocator slack.
    parser_bound = parser_base + 4 * 8 + 8
    print(
        f"\n200 concurrent 8 MiB bodies from {keys} key(s) in {time.monotonic() - started:.1f}s: {len(ok)} x 200, "
        f"{len(refused)} x 429; gateway VmHWM {base:.0f} MiB idle -> {peak:.0f} MiB peak "
        f"(bound {bound:.0f} MiB from a {BUDGET // MIB} MiB budget; 1600 MiB sent); parser process "
        f"{parser_base:.0f} -> {parser_peak:.0f} MiB (bound {parser_bound:.0f} MiB)"
    )
    assert len(answers) == 200
    assert ok and all(a[1]["choices"] == [] for a in ok)
    assert all(
        status == 429
        and retry_after == "1"
        and error == {
            "error": {
                "message": f"The gateway is holding its limit of request body bytes ({BUDGET} bytes, "
                "max_inflight_body_bytes); retry later.",
                "type": "rate_limit_error",
                "param": None,
                "code": "too_many_request_bytes",
            }
        }
        for status, error, retry_after in refused
    ), refused[:2]
    assert peak < bound
    assert parser_peak < parser_bound
