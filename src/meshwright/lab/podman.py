"""Thin adapter around the podman command, always with the project's containers.conf."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import IO, Any

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")


class PodmanError(RuntimeError):
    pass


def env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def run(
    args: list[str],
    *,
    check: bool = True,
    stdin: IO[bytes] | None = None,
    timeout: float | None = 300,
) -> str:
    try:
        proc = subprocess.run(
            ["podman", *args], env=env(), stdin=stdin, capture_output=True, timeout=timeout
        )
    except FileNotFoundError:
        raise PodmanError("podman is not installed: run `make setup` (it installs it)") from None
    if check and proc.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args[:3])} ... failed ({proc.returncode}): "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout.decode(errors="replace")


def run_json(args: list[str]) -> Any:
    out = run(args)
    return json.loads(out) if out.strip() else []


def image_exists(name: str) -> bool:
    try:
        subprocess.run(
            ["podman", "image", "exists", name], env=env(), check=True, capture_output=True
        )
    except FileNotFoundError:
        raise PodmanError("podman is not installed: run `make setup` (it installs it)") from None
    except subprocess.CalledProcessError:
        return False
    return True


def exec_sh(container: str, script: str, *, check: bool = True, timeout: float = 60) -> str:
    return run(["exec", container, "sh", "-ec", script], check=check, timeout=timeout)
