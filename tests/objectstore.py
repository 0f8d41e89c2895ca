"""An S3-compatible object store on loopback, started by the tests that need s3:// sources.

The server is SeaweedFS (``weed server -s3``: master, volume server, filer and S3 gateway in
one process), the binary ``hack/local-cluster build weed`` builds from its Go module into the
rig's bin folder. Every listener binds 127.0.0.1 on a free port (gRPC ports too: SeaweedFS's
default of HTTP port + 10000 can pass 65535 or collide), data goes to a temporary folder, and
without an identity config the S3 gateway accepts any access key.

    with ObjectStore() as store:
        store.create_bucket("models")
        store.upload_folder(adapter_dir, "models", "adapters/demo")
        env = {"AWS_ENDPOINT_URL": store.endpoint_url, **ObjectStore.CLIENT_ENV}

The helper raises (:class:`ObjectStoreError`) rather than skips: a test's fixture decides
whether a missing binary is a skip (:func:`weed_binary` returns None then).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from tests.helm import rig_bin_dir

LOOPBACK = "127.0.0.1"
REGION = "us-east-1"
# SeaweedFS takes requests signed with any key while no identities are configured.
ACCESS_KEY = "llmep-test"
SECRET_KEY = "llmep-test-secret"  # noqa: S105 (a placeholder the store does not check)
# Written and removed by start() to tell that writes work.
_PROBE_BUCKET = "llmep-ready-probe"
# The servers that take a port, and the flags that set their HTTP and gRPC ports.
_PORT_FLAGS = {
    "master": ("-master.port", "-master.port.grpc"),
    "volume": ("-volume.port", "-volume.port.grpc"),
    "filer": ("-filer.port", "-filer.port.grpc"),
    "s3": ("-s3.port", "-s3.port.grpc"),
}


class ObjectStoreError(RuntimeError):
    """The store's binary is missing, or the server did not come up."""


def weed_binary() -> Path | None:
    """The rig's SeaweedFS binary, or None when it has not been built."""
    path = rig_bin_dir() / "weed"
    return path if path.is_file() else None


class ObjectStore:
    """A SeaweedFS server with its S3 gateway on loopback, for one ``with`` block.

    ``start`` returns once an object can be written, or raises naming the server's log: the
    gateway lists buckets ~2 s after start, but the first write waits ~7 s more (the master
    defers volume id allocation after a fresh start, and writes take a lock that needs the filer
    registered with the master), so a probe object is written and removed before handing over.
    ``stop`` terminates the server, kills it after ``stop_grace_s`` (a graceful stop takes
    ~15 s: the filer waits on a flush of its metadata log; the data is thrown away anyway)
    and removes the temporary folder.
    """

    # Environment for AWS SDK clients (boto3 in Ray Serve LLM's processes) besides the endpoint.
    CLIENT_ENV = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION}

    def __init__(self, *, binary: Path | None = None, ready_timeout_s: float = 60.0, stop_grace_s: float = 5.0) -> None:
        self.binary = binary or weed_binary()
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.ports: dict[str, tuple[int, int]] = {}
        self.workdir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports['s3'][0]}"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise ObjectStoreError("the object store is not started")
        return self.workdir / "weed.log"

    def __enter__(self) -> ObjectStore:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> ObjectStore:
        if self.binary is None or not self.binary.is_file():
            raise ObjectStoreError(
                f"no SeaweedFS binary at {self.binary or rig_bin_dir() / 'weed'}: run `hack/local-cluster build weed`"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix="llmep-objectstore-"))
        data = self.workdir / "data"
        data.mkdir()
        ports = _free_ports(2 * len(_PORT_FLAGS))
        self.ports = {name: (ports[2 * i], ports[2 * i + 1]) for i, name in enumerate(_PORT_FLAGS)}
        port_flags = [
            f"{flag}={port}"
            for name, flags in _PORT_FLAGS.items()
            for flag, port in zip(flags, self.ports[name], strict=True)
        ]
        cmd = [
            str(self.binary),
            "server",
            f"-dir={data}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-s3",
            *port_flags,
            # The S3 gateway's Iceberg and Lance listeners have fixed ports (8181, 9101): off.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # Unix sockets default to /tmp/seaweedfs-<server>-<port>.sock; these two can move.
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            f"-s3.localSocket={self.workdir / 's3.sock'}",
            "-master.telemetry=false",
            "-volume.preStopSeconds=0",
        ]
        self._log = open(self.log_path, "wb")  # closed in stop()
        self._process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop(keep_log=True)
            raise
        return self

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server and remove its folder (``keep_log``: leave the folder for reading)."""
        process, self._process = self._process, None
        if process is not None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=self.stop_grace_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        # gRPC sockets always go to /tmp; a killed server leaves them, named by our own ports.
        for server, (_, grpc_port) in self.ports.items():
            Path(f"/tmp/seaweedfs-{server}-grpc-{grpc_port}.sock").unlink(missing_ok=True)  # noqa: S108
        if self.workdir is not None and not keep_log:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def client(self) -> Any:
        """A boto3 S3 client for this store."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(connect_timeout=2, read_timeout=30, retries={"max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def upload_folder(self, local_dir: Path | str, bucket: str, prefix: str) -> list[str]:
        """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>``;
        returns the keys written."""
        client = self.client()
        root = Path(local_dir)
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = f"{prefix.strip('/')}/{path.relative_to(root).as_posix()}"
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        client = self.client()
        while True:
            if (code := self._process.poll()) is not None:
                raise ObjectStoreError(f"weed server exited with {code} while starting; log: {self.log_path}")
            if _lists_buckets(client) and _can_write(client):
                return
            if time.monotonic() > deadline:
                raise ObjectStoreError(
                    f"weed server's S3 gateway not ready after {self.ready_timeout_s:.0f}s; log: {self.log_path}"
                )
            time.sleep(0.2)


def _lists_buckets(client: Any) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.list_buckets()
    except (BotoCoreError, ClientError):
        return False
    return True


def _can_write(client: Any) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket=_PROBE_BUCKET)
        client.put_object(Bucket=_PROBE_BUCKET, Key="probe", Body=b"ready")
        client.delete_object(Bucket=_PROBE_BUCKET, Key="probe")
        client.delete_bucket(Bucket=_PROBE_BUCKET)
    except (BotoCoreError, ClientError):
        return False
    return True


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open together while they are chosen)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in sockets]
