"""A stand-in for kube-apiserver in unit tests: a real HTTP server on 127.0.0.1 whose answers a
test chooses, for answers the rig's API server cannot be made to give on cue (a restart's 403 or
422, KubeRay's CRDs missing)."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Callable, Iterator

from llmep_operator.observed import Seen

# (method, path, request body) -> (status code, content type, response body)
Answer = Callable[[str, str, bytes], tuple[int, str, bytes]]


@contextlib.contextmanager
def stand_in_api(answer: Answer) -> Iterator[str]:
    """Serve `answer` for GET, PATCH, POST and DELETE; yields the server's URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            code, content_type, body = answer(self.command, self.path, self.rfile.read(length) if length else b"")
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PATCH = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def nothing_seen(namespace: str, name: str) -> Seen:
    """The watches' memory of a Reconciler that talks only to a stand-in: nothing is known."""
    return Seen()
