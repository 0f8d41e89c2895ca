"""Local mode: routes and keys from YAML/JSON files, reloaded when they change."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class FileSource:
    """Polls one file; on change parses it and hands the result on, keeping the last good one.

    Polling a stat is cheap and also sees the symlink swaps of a mounted ConfigMap or Secret.
    """

    def __init__(
        self, path: Path, parse: Callable[[Any], Any], apply: Callable[[Any], None], what: str
    ) -> None:
        self.path = path
        self.parse = parse
        self.apply = apply
        self.what = what
        self._seen: tuple[int, int, int] | None = None

    def _read(self) -> Any:
        try:
            return self.parse(yaml.safe_load(self.path.read_bytes()))
        except yaml.YAMLError as exc:
            # YAML errors quote the offending line, which in a keys file may hold a key.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"not valid YAML or JSON{where}") from None

    def load(self) -> None:
        """Read the file now; raises if it is missing or invalid (used at startup)."""
        self._seen = _signature(self.path)
        self.apply(self._read())

    def poll(self) -> None:
        signature = _signature(self.path)
        if signature == self._seen:
            return
        self._seen = signature
        if signature is None:
            log.error("%s file %s disappeared; keeping the last good one", self.what, self.path)
            return
        try:
            parsed = self._read()
        except (OSError, ValueError) as exc:
            log.error(
                "%s file %s is invalid, keeping the last good one: %s", self.what, self.path, exc
            )
            return
        self.apply(parsed)
        log.info("reloaded %s from %s", self.what, self.path)

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.poll()
