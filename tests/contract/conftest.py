"""The contract tier validates with Ray's code but must never start Ray: a local Ray started
implicitly here (some builders call ray.init) would serve every later tier of the same pytest
process with this machine's defaults, and starve the serving tier's replicas."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def no_local_ray_left_running():
    yield
    ray = sys.modules.get("ray")
    assert not (ray and ray.is_initialized()), "this test started a local Ray (ray.init): validate without it"
