"""`llmep operator`: run the kopf operator, optionally behind a Lease so that of several
replicas exactly one reconciles (the others wait, and a leader that loses its lease exits)."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes import client

log = logging.getLogger("llmep.operator")


# kubernetes' defaults: a Lease not renewed for LEASE_DURATION is free to take; the leader keeps
# trying to renew for RENEW_DEADLINE before it steps down; every candidate polls each RETRY_PERIOD.
LEASE_DURATION_SECONDS = 15
RENEW_DEADLINE_SECONDS = 10
RETRY_PERIOD_SECONDS = 2


def _lease_lock(lease_name: str, lease_namespace: str, identity: str, configuration: client.Configuration) -> object:
    """A LeaseLock whose calls are bounded, and fail (rather than raise) when the API server is
    unreachable: an exception would end the election thread while this process keeps reconciling,
    and a call that never returns would keep it from noticing the lost lease."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    from llmep_operator.kube import BoundedApiClient
    from llmep_operator.settings import ApiTimeouts

    # LeaseLock is unannotated: its methods are called through the class (not super()), which
    # mypy's untyped_calls_exclude recognises as the kubernetes client's.
    class BoundedLeaseLock(LeaseLock):
        def __init__(self, name: str, namespace: str, identity: str) -> None:
            LeaseLock.__init__(self, name, namespace, identity)

        def get(self, name: str, namespace: str) -> tuple[bool, object]:
            try:
                found: tuple[bool, object] = LeaseLock.get(self, name, namespace)
                return found
            except urllib3.exceptions.HTTPError as error:
                return False, ApiException(status=0, reason=f"API server unreachable: {type(error).__name__}")

        def create(self, name: str, namespace: str, election_record: object) -> bool:
            try:
                created: bool = LeaseLock.create(self, name, namespace, election_record)
                return created
            except urllib3.exceptions.HTTPError:
                return False

        def update(self, name: str, namespace: str, updated_record: object) -> bool:
            try:
                updated: bool = LeaseLock.update(self, name, namespace, updated_record)
                return updated
            except urllib3.exceptions.HTTPError:
                return False

    lock = BoundedLeaseLock(lease_name, lease_namespace, identity)
    # A renewal must fail well within the renew deadline, so a leader on a dead connection steps down.
    timeouts = ApiTimeouts(request_seconds=RENEW_DEADLINE_SECONDS / 2)
    lock.api_instance = client.CoordinationV1Api(BoundedApiClient(configuration, timeouts))
    return lock


def _elect_leader(lease_name: str, lease_namespace: str, identity: str, configuration: client.Configuration) -> None:
    """Block until this process holds the Lease; exit the process if it is ever lost."""
    from kubernetes.leaderelection import electionconfig, leaderelection

    leading = threading.Event()

    def lost() -> None:
        log.error("lost the leader lease %s/%s; exiting so that no two replicas reconcile", lease_namespace, lease_name)
        os._exit(1)

    config = electionconfig.Config(
        _lease_lock(lease_name, lease_namespace, identity, configuration),
        lease_duration=LEASE_DURATION_SECONDS,
        renew_deadline=RENEW_DEADLINE_SECONDS,
        retry_period=RETRY_PERIOD_SECONDS,
        onstarted_leading=leading.set,
        onstopped_leading=lost,
    )
    thread = threading.Thread(target=leaderelection.LeaderElection(config).run, name="leader-election", daemon=True)
    thread.start()
    log.info("waiting to become leader of %s/%s as %s", lease_namespace, lease_name, identity)
    while not leading.wait(timeout=RETRY_PERIOD_SECONDS):
        if not thread.is_alive():
            # The election ended without leadership (an error in the client): a standby that
            # waited on would answer its liveness probe forever and never take over.
            log.error(
                "the leader election of %s/%s ended without this replica leading; exiting", lease_namespace, lease_name
            )
            raise SystemExit(1)
    log.info("became leader as %s", identity)


@contextlib.contextmanager
def _liveness_while_waiting(url: str | None) -> Iterator[None]:
    if not url:
        yield
        return
    parsed = urllib.parse.urlsplit(url)

    class Alive(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == parsed.path else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 80), Alive)  # noqa: S104
    thread = threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser("operator", help="run the LLMEndpoint operator (kopf)")
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: LLMEP_NAMESPACES or the whole cluster",
    )
    parser.add_argument("--leader-elect", action="store_true", help="hold a Lease so only one replica reconciles")
    parser.add_argument("--lease-name", default="llmep-operator", help="name of the leader Lease")
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader Lease (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--liveness", default=None, help="serve kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import kopf

    from llmep_operator import handlers  # noqa: F401 - registers the handlers with kopf
    from llmep_operator.kube import load_config
    from llmep_operator.settings import OperatorSettings

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        # kopf logs every event handler's success (three lines per endpoint and per pod change);
        # the operator's own lines say what it did.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    namespaces = args.namespace or OperatorSettings().namespaces
    if args.leader_elect:
        identity = f"{socket.gethostname()}-{os.getpid()}"
        # A standby is alive while it waits: answer the liveness probe until kopf takes over.
        with _liveness_while_waiting(args.liveness):
            _elect_leader(args.lease_name, args.lease_namespace, identity, load_config())
    kopf.run(
        standalone=True,  # one reconciler is guaranteed by the Lease, not by kopf peering
        namespaces=list(namespaces),
        clusterwide=not namespaces,
        liveness_endpoint=args.liveness,
    )
    return 0
