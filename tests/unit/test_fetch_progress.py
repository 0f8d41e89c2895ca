"""`llmep fetch`'s progress lines: the rate and ETA a user reads in the endpoint's status."""

from __future__ import annotations

import io
import json

import pytest

from llmep_operator import weights_fetch

pytestmark = pytest.mark.unit
MIB = 1024**2


def test_the_rate_is_over_the_last_seconds_not_since_the_start(tmp_path, monkeypatch):
    """A burst at the start (a token bucket's) must not hold the rate and ETA up for the rest."""
    clock = iter([0.0, 2.0, 12.0, 22.0])
    monkeypatch.setattr(weights_fetch.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    progress = weights_fetch.Progress(tmp_path, 1000 * MIB, out, every=10)  # first sample: t=0, 0 bytes
    part = tmp_path / "model.safetensors.part"
    for size in (500, 510, 520):  # 500 MiB at once, then 1 MiB/s (sparse: only the size counts)
        with open(part, "ab") as grown:
            grown.truncate(size * MIB)
        progress.report("downloading")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["bytesPerSecond"] / MIB for line in lines] == [250.0, 1.0, 1.0]
    assert lines[-1]["etaSeconds"] == 480
    assert lines[-1]["message"] == "0.5 of 1.0 GiB, 1 MiB/s, about 8 min"
