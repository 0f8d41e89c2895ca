"""Processes for the reliability tier: the gateway and fake OpenAI backends, each its own
process on 127.0.0.1 so that a test can SIGTERM, SIGKILL and restart it, and read its memory
and its logs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Until GET url answers 200 (fails early if proc exited)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback only
                if resp.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args} exited ({proc.returncode}) before {url} answered")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout:.0f}s")
        time.sleep(0.1)


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited ({proc.returncode})") from None
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


@dataclass
class Proc:
    """A child process whose stdout and stderr go to one log file."""

    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def terminate(self, timeout: float = 40.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def vm_hwm_kib(self) -> int:
        """Peak resident set size (VmHWM) of the running process, in KiB."""
        return _status_kib(self.pid, "VmHWM")

    def rss_kib(self) -> int:
        return _status_kib(self.pid, "VmRSS")

    def workers(self) -> list[Worker]:
        """The multiprocessing workers it spawned (the gateway's body parser), not their helpers."""
        found = []
        for pid in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # exited meanwhile
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(Worker(int(pid)))
        return found


@dataclass(frozen=True)
class Worker:
    pid: int

    def vm_hwm_kib(self) -> int:
        return _status_kib(self.pid, "VmHWM")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    """Start `argv` with its output in `log`, without the caller's KUBECONFIG unless `env` names one."""
    base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={**base, **(env or {})}
        )
    return Proc(proc, log)


def start_backend(port: int, name: str, logs: Path, received: Path | None = None) -> Proc:
    """fake_openai_backend.py on PORT; with `received`, every prompt it gets is appended there."""
    argv = [sys.executable, str(HERE / "fake_openai_backend.py"), str(port), name]
    argv += [str(received)] if received else []
    p = spawn(argv, logs / f"backend-{name}.log")
    wait_port(port, proc=p.proc)
    return p


def start_gateway(port: int, logs: Path, *args: str, env: dict[str, str] | None = None, name: str = "gateway") -> Proc:
    """`llmep gateway --host 127.0.0.1 --port PORT ARGS...`, waited for until /readyz is 200."""
    argv = [sys.executable, "-m", "llmep_serving.cli", "gateway", "--host", "127.0.0.1", "--port", str(port), *args]
    p = spawn(argv, logs / f"{name}.log", env)
    wait_http(f"http://127.0.0.1:{port}/readyz", proc=p.proc)
    return p
