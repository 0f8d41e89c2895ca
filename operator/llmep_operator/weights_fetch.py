"""`llmep fetch`: copy a model's weights into a folder (the weight cache), showing progress.

A program of its own (the standard library, plus boto3 or huggingface_hub when a source needs
them): the cache-fill Job runs this file's text with `python -c` in the serving image, which
has both (Ray's ray-llm images, llmep-serving-cpu), so no serving image needs llmep installed.
Also `llmep fetch` by hand. Progress goes to stdout as one JSON line
every few seconds (bytes, total, rate, ETA and a sentence for people); a failure says why in
one line, on stderr and in the container's termination message, and exits 1. Files already in
the folder with the right size are kept, so a fill that stopped goes on where it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

TERMINATION_LOG = "/dev/termination-log"
GIB = 1024**3
MIB = 1024**2
# The rate and ETA are over the last seconds, not since the start: a burst at the start (a
# token bucket, a warm connection) or a stall would otherwise skew them for the whole copy.
RATE_WINDOW_SECONDS = 10.0


class FetchError(Exception):
    """Why the weights could not be fetched, in words that name the fix."""


@dataclass(frozen=True)
class RemoteFile:
    path: str  # relative to the model's root
    size: int


def describe(done: int, total: int, rate: float) -> str:
    """'12.3 of 140.0 GiB, 310 MiB/s, about 7 min'."""
    text = f"{done / GIB:.1f} of {total / GIB:.1f} GiB"
    if rate > 0:
        text += f", {rate / MIB:.0f} MiB/s"
        left = max(total - done, 0) / rate
        if left >= 1:
            text += f", about {left / 60:.0f} min" if left >= 90 else f", about {left:.0f} s"
    return text


def _on_disk(folder: Path) -> int:
    """Bytes under `folder`, partial downloads included (they are what moves)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:  # renamed from its partial name meanwhile
                continue
    return total


class Progress:
    """Reports the bytes in the destination every `every` seconds, on its own thread."""

    def __init__(self, dest: Path, total: int, out: TextIO, every: float):
        self.dest, self.total, self.out, self.every = dest, total, out, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fetch-progress", daemon=True)
        # (time, bytes) samples of the last RATE_WINDOW_SECONDS, oldest first.
        self._samples = deque([(time.monotonic(), _on_disk(dest))])

    def __enter__(self) -> Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, phase: str) -> None:
        done = min(_on_disk(self.dest), self.total) if self.total else _on_disk(self.dest)
        rate = self._rate(time.monotonic(), done)
        left = (self.total - done) / rate if rate > 0 and self.total > done else None
        line = {
            "phase": phase,
            "bytes": done,
            "total": self.total,
            "bytesPerSecond": round(rate),
            "etaSeconds": round(left) if left is not None else None,
            "message": describe(done, self.total, rate),
        }
        self.out.write(json.dumps(line) + "\n")
        self.out.flush()

    def _rate(self, now: float, done: int) -> float:
        """Bytes per second over the window's samples, this one included."""
        while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW_SECONDS:
            self._samples.popleft()
        since, then = self._samples[0]
        self._samples.append((now, done))
        return max(done - then, 0) / max(now - since, 1e-6)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.report("downloading")


# ---- sources -----------------------------------------------------------------------------------


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # Region and endpoint (AWS_ENDPOINT_URL for S3-compatible stores) come from the environment.
    return boto3.client("s3", config=Config(retries={"max_attempts": 5, "mode": "standard"}))


def _s3_error(error: Exception, bucket: str, prefix: str) -> FetchError:
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"s3://{bucket}/{prefix}".rstrip("/")
    if isinstance(error, NoCredentialsError):
        return FetchError(
            f"no credentials for {where}: name a Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "in spec.storageSecretRef"
        )
    if isinstance(error, ClientError):
        code = error.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return FetchError(f"bucket {bucket!r} does not exist ({where}): check spec.model.source")
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
            return FetchError(f"access to {where} denied ({code}): check the keys in spec.storageSecretRef")
        return FetchError(f"reading {where} failed: {code or error}")
    return FetchError(f"reading {where} failed: {error}")


def _s3_files(client: Any, bucket: str, prefix: str) -> list[RemoteFile]:
    root = prefix.rstrip("/") + "/" if prefix else ""
    files = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=root):
        for item in page.get("Contents", []):
            relative = item["Key"][len(root) :]
            if relative and not relative.endswith("/"):
                files.append(RemoteFile(relative, int(item["Size"])))
    return files


def _fetch_s3(location: str, dest: Path, start: Callable[[int], Progress]) -> None:
    bucket, _, prefix = location.removeprefix("s3://").partition("/")
    client = _s3_client()
    try:
        files = _s3_files(client, bucket, prefix)
        if not files:
            raise FetchError(f"no objects under s3://{bucket}/{prefix}: check spec.model.source")
        with start(sum(f.size for f in files)):
            root = prefix.rstrip("/") + "/" if prefix else ""
            for remote in _missing(files, dest):
                target = dest / remote.path
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(target.name + ".partial")
                client.download_file(bucket, root + remote.path, str(partial))
                partial.rename(target)
    except (FetchError, OSError):
        raise
    except Exception as error:  # botocore's errors do not share one base with a code
        raise _s3_error(error, bucket, prefix) from error


def _fetch_hf(location: str, revision: str | None, dest: Path, start: Callable[[int], Progress]) -> None:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo = location
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        files = [RemoteFile(s.rfilename, int(s.size or 0)) for s in info.siblings or []]
        with start(sum(f.size for f in files)):
            for remote in _missing(files, dest):
                hf_hub_download(repo, remote.path, revision=revision, local_dir=dest)
    except GatedRepoError:
        raise FetchError(f"{repo} is gated: accept its terms on the hub and set spec.model.tokenSecretRef") from None
    except RepositoryNotFoundError:
        raise FetchError(
            f"{repo} was not found on the hub (or is private: set spec.model.tokenSecretRef): check spec.model.source"
        ) from None
    except RevisionNotFoundError:
        raise FetchError(f"{repo} has no revision {revision!r}: check spec.model.revision") from None
    except HfHubHTTPError as error:
        raise FetchError(f"the hub refused {repo}: {error}") from None


def _missing(files: list[RemoteFile], dest: Path) -> Iterator[RemoteFile]:
    for remote in files:
        target = dest / remote.path
        if not (target.is_file() and target.stat().st_size == remote.size):
            yield remote


def fetch(
    source: str, dest: Path, *, revision: str | None = None, out: TextIO = sys.stdout, every: float = 2.0
) -> None:
    """Copy `source` (s3://, hf://) into `dest`; raises FetchError with the reason."""
    scheme, _, location = source.partition("://")
    dest.mkdir(parents=True, exist_ok=True)

    def start(total: int) -> Progress:
        free = shutil.disk_usage(dest).free
        needed = max(total - _on_disk(dest), 0)
        if needed > free:
            raise FetchError(
                f"the cache volume has {free / GIB:.1f} GiB free and the model needs {needed / GIB:.1f} GiB more: "
                "raise spec.cache.size"
            )
        return Progress(dest, total, out, every)

    try:
        if scheme == "s3":
            _fetch_s3(source, dest, start)
        elif scheme == "hf":
            _fetch_hf(location.strip("/"), revision, dest, start)
        else:
            raise FetchError(f"{scheme}:// sources are not fetched into the cache: only s3:// and hf://")
    except OSError as error:
        if error.errno == 28:  # ENOSPC
            raise FetchError("the cache volume is full: raise spec.cache.size") from None
        raise FetchError(f"writing into {dest} failed: {error}") from None
    Progress(dest, _on_disk(dest), out, every).report("done")


def _say_why(message: str) -> None:
    print(f"llmep fetch: {message}", file=sys.stderr, flush=True)
    log = Path(os.environ.get("LLMEP_TERMINATION_LOG", TERMINATION_LOG))
    if log.parent.is_dir():
        try:
            log.write_text(message)
        except OSError:  # not in a container: stderr already said it
            pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="s3://BUCKET/PATH or hf://ORG/MODEL")
    parser.add_argument("dest", type=Path, help="folder to fill (kept files of the right size are not fetched again)")
    parser.add_argument("--revision", help="hub revision for hf:// sources")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between progress lines (default 2)")


def run(args: argparse.Namespace) -> int:
    try:
        fetch(args.source, args.dest, revision=args.revision, every=args.every)
    except FetchError as error:
        _say_why(str(error))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmep fetch", description="Copy a model's weights into a folder.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
