"""A TCP proxy between a client under test and the API server that the test can blackhole: it
stops forwarding without closing anything (no FIN, no RST), as a node, NAT or load balancer that
forgets a connection does. Used by test_operator_blackhole.py and test_gateway_blackhole.py."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import yaml

from tests.cluster.conftest import Cluster


class BlackholeProxy:
    """TCP proxy to the API server. blackhole(): every connection open now, and every one made
    until heal(), is read and discarded, never answered, never closed."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._dead: set[int] = set()  # ids of connections blackholed for good
        self._blackholed = False
        self._sockets: list[socket.socket] = []
        self.discarded = 0  # chunks from the client dropped in the outage
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self._blackholed = True
        self._dead.update(id(s) for s in self._sockets)

    def heal(self) -> None:
        self._blackholed = False

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                self._sockets.append(client)
                if self._blackholed:
                    self._dead.add(id(client))
                upstream = socket.create_connection(self.upstream)
                self._sockets.append(upstream)
                for source, target in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(client, source, target), daemon=True).start()

    def _pump(self, client: socket.socket, source: socket.socket, target: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if id(client) not in self._dead:
                    target.sendall(data)
                elif source is client:
                    self.discarded += 1
            target.shutdown(socket.SHUT_WR)


def upstream(cluster: Cluster) -> tuple[str, int]:
    """The API server's host and port, from the cluster's admin client."""
    host = cluster.api.configuration.host.removeprefix("https://")
    name, port = host.rsplit(":", 1)
    return name, int(port)


def kubeconfig_through(kubeconfig: Path, proxy: BlackholeProxy, path: Path) -> Path:
    """A copy of `kubeconfig` (same credentials and CA) whose server is the proxy; the API
    server's certificate names 127.0.0.1, where the proxy listens."""
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        entry["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def through(cluster: Cluster, proxy: BlackholeProxy, path: Path) -> Cluster:
    """The same cluster, reached through the proxy (so are ServiceAccount kubeconfigs made from it)."""
    return Cluster(kubeconfig_through(cluster.kubeconfig, proxy, path), None, cluster.bin_dir)
