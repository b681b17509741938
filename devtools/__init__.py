"""devtools: the Go tools the chart's tests run, built from source and cached.

``helm`` (the Helm CLI, pinned to :data:`HELM_VERSION`) renders and lints the chart in
``deploy/helm``; ``promcheck`` (``deploy/promcheck``, Prometheus's own rule and PromQL parser)
checks its alerts and dashboard queries. Neither has a Debian package of a current version, and
download sites are out of reach from the machines this project is built on, so both are built
with the Go toolchain from the Go module proxy: ``go install`` for helm (a few minutes the first
time), ``go build`` for promcheck (seconds). They land in ``~/.cache/wifi-bridge/tools``
(``WIFI_BRIDGE_TOOLS_DIR`` overrides), keyed by version, so later runs find them at once.

``python -m devtools`` builds whatever is missing and prints where the tools are; the chart's
tests call :func:`build` themselves when a tool is missing. Builds of one tool take turns (a
lock file beside it), so a build started early in the background (``.ci/run`` does) and the
tests asking for the tool meanwhile share the one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

__all__ = ["HELM_VERSION", "ToolUnavailable", "build_all", "locate", "tools_dir"]

HELM_VERSION = "v4.3.2"
_HELM_MODULE = "helm.sh/helm/v4/cmd/helm"
_ROOT = Path(__file__).resolve().parents[1]
_PROMCHECK_SOURCE = _ROOT / "deploy" / "promcheck"


class ToolUnavailable(RuntimeError):
    """A tool is neither built nor buildable here (no Go toolchain, or the build failed)."""


def tools_dir() -> Path:
    configured = os.environ.get("WIFI_BRIDGE_TOOLS_DIR")
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "wifi-bridge" / "tools"


def _promcheck_key() -> str:
    """The promcheck build is keyed by its source, so an edit rebuilds it."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update((_PROMCHECK_SOURCE / name).read_bytes())
    return digest.hexdigest()[:12]


def _path(name: str) -> Path:
    if name == "helm":
        return tools_dir() / f"helm-{HELM_VERSION}" / "helm"
    if name == "promcheck":
        return tools_dir() / f"promcheck-{_promcheck_key()}" / "promcheck"
    raise ValueError(f"unknown tool {name!r}: helm or promcheck")


def locate(name: str) -> Path | None:
    """The cached binary of ``name`` (``helm`` or ``promcheck``), or None if not built yet."""
    path = _path(name)
    return path if path.is_file() and os.access(path, os.X_OK) else None


def _go() -> str:
    go = shutil.which("go")
    if go is None:
        raise ToolUnavailable(
            "the chart's tests need the Go toolchain to build helm and promcheck "
            "(https://go.dev/doc/install, or Debian's golang package)"
        )
    return go


def _run_go(arguments: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    started = time.monotonic()
    completed = subprocess.run(  # our own go command line
        [_go(), *arguments],
        cwd=cwd,
        env={**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise ToolUnavailable(
            f"go {' '.join(arguments)} failed:\n{completed.stderr.strip()[-4000:]}"
        )
    print(f"devtools: go {arguments[0]} took {time.monotonic() - started:.0f} s", flush=True)


def build(name: str) -> Path:
    """Build ``name`` unless it is cached (waiting for a build in progress); returns the binary."""
    found = locate(name)
    if found is not None:
        return found
    target = _path(name)
    target.parent.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process building it: wait for its result
        found = locate(name)
        if found is not None:
            return found
        return _build(name, target)


def _build(name: str, target: Path) -> Path:
    partial = target.parent.with_name(target.parent.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if name == "helm":
        print(f"devtools: building helm {HELM_VERSION} from the Go module proxy ...", flush=True)
        _run_go(
            ["install", f"{_HELM_MODULE}@{HELM_VERSION}"],
            cwd=partial,
            env={"GOBIN": str(partial), "GOFLAGS": "-mod=mod"},
        )
    else:
        print("devtools: building promcheck (deploy/promcheck) ...", flush=True)
        _run_go(["build", "-o", str(partial / "promcheck"), "."], cwd=_PROMCHECK_SOURCE, env={})
    shutil.rmtree(target.parent, ignore_errors=True)
    partial.rename(target.parent)  # a build cut short never looks finished
    return target


def build_all() -> dict[str, Path]:
    return {name: build(name) for name in ("helm", "promcheck")}
