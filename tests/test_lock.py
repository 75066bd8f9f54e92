"""constraints.txt (the lock the suite runs on) and pyproject.toml's ranges must agree."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: {line!r} is not name==version"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(m.group(2))
    return pins


def requirements() -> list[tuple[str, Requirement]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [(f"[{extra}]", Requirement(r)) for r in reqs]
    return out


def test_every_requirement_is_pinned_inside_its_range():
    pins = lock()
    problems = []
    for where, req in requirements():
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} ({where}) is not pinned in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req} ({where})")
    assert problems == []


def test_setup_installs_from_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup
    assert "scripts/setup.sh" in (ROOT / "scripts" / "test.sh").read_text()


def test_the_installed_versions_are_the_locked_ones():
    # what this suite runs on is what the lock says (a drifted venv fails here, not mysteriously later)
    from importlib.metadata import PackageNotFoundError, version

    pins, drift = lock(), []
    for _, req in requirements():
        name = canonicalize_name(req.name)
        try:
            have = Version(version(req.name))
        except PackageNotFoundError:
            continue  # an extra that is not installed
        if name in pins and Version(have.base_version) != Version(pins[name].base_version):
            drift.append(f"{name} {have} installed, {pins[name]} locked")
    import os

    if os.environ.get("VLMRL_LATEST") == "1":
        return  # the newest-releases run is meant to differ
    assert drift == []
