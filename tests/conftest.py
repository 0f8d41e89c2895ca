"""Shared test helpers: repository paths and the fixture manifests."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def load_fixture(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def expected_rejection(path: Path) -> str:
    """The field an invalid fixture must be rejected on, from its `# rejects: FIELD` line."""
    for line in path.read_text().splitlines():
        if line.startswith("# rejects:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{path} has no '# rejects: FIELD' line")


VALID_FIXTURES = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID_FIXTURES = sorted((FIXTURES / "invalid").glob("*.yaml"))


# Tiers are folders; `make test` runs every tier that has test files, and a tier that has
# files but collects nothing (an import skip, a bad marker) fails the run instead of passing.
TIERS = ("unit", "contract", "cluster", "serving", "reliability", "e2e")
TIER_SECONDS: dict[str, float] = {}  # filled as tests report, printed at the end of the run


def _tier_of(path: Path) -> str | None:
    try:
        relative = path.resolve().relative_to(REPO_ROOT / "tests")
    except ValueError:
        return None
    return relative.parts[0] if relative.parts and relative.parts[0] in TIERS else None


def _requested_tiers(config) -> set[str]:
    requested = set()
    for arg in config.args:
        path = Path(arg.split("::", 1)[0])
        path = path if path.is_absolute() else Path(config.invocation_params.dir) / path
        if not path.is_dir():
            continue  # a single file or node id: the user picked tests by hand
        for tier in TIERS:
            folder = REPO_ROOT / "tests" / tier
            if folder == path.resolve() or path.resolve() in folder.parents:
                if any(folder.rglob("test_*.py")):
                    requested.add(tier)
    return requested


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        tier = _tier_of(Path(str(item.fspath)))
        if tier:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_configure(config):
    import logging

    config._llmep_root_log_handlers = list(logging.getLogger().handlers)


def pytest_collection_finish(session):
    import logging

    import pytest

    # Importing ray.serve.llm (contract and serving modules) adds a JSON handler to the root
    # logger that fails on kopf's log records; tests of other tiers must not log through it.
    logging.getLogger().handlers[:] = session.config._llmep_root_log_handlers

    if session.config.option.collectonly or session.config.getoption("-k") or session.config.getoption("-m"):
        return
    counts = {tier: 0 for tier in TIERS}
    for item in session.items:
        tier = _tier_of(Path(str(item.fspath)))
        if tier:
            counts[tier] += 1
    empty = sorted(t for t in _requested_tiers(session.config) if counts[t] == 0)
    if empty:
        raise pytest.UsageError(
            f"test tier(s) {', '.join(empty)} have test files but collected no test; "
            "fix the collection error instead of letting the tier pass empty"
        )
    summary = ", ".join(f"{t}={n}" for t, n in counts.items() if n)
    session.config.pluginmanager.get_plugin("terminalreporter").write_line(f"llmep tiers: {summary}")


def pytest_runtest_logreport(report):
    # Setup, call and teardown of each test summed per tier: where a slow CI run spent its time.
    tier = _tier_of(REPO_ROOT / report.nodeid.split("::", 1)[0])  # node ids are relative to the root
    if tier:
        TIER_SECONDS[tier] = TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if TIER_SECONDS:
        spent = ", ".join(f"{t} {TIER_SECONDS[t]:.0f} s" for t in TIERS if t in TIER_SECONDS)
        terminalreporter.write_line(f"llmep time per tier: {spent}")
