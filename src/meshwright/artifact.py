"""The node artifact: everything relays and sites run, as one zipapp for Debian's python3.

Nodes get nothing installed but this file: :mod:`meshwright.node`, :mod:`meshwright.metrics`,
the packages that run on nodes (:mod:`meshwright.wire`, :mod:`meshwright.relay`,
:mod:`meshwright.site`) and the pinned pure-Python packages they import (``wireguard-tools``
with ``attrs`` and ``pyroute2``, and ``prometheus-client``), taken from the controller's
environment, where ``requirements.lock`` pins them. ``segno``, which ``wireguard-tools``
imports only to draw QR codes of configurations, travels as a stand-in that says so: the real
one costs every daemon 1.5 MiB of memory for nothing (the sidecar's budget is 30). The build
is reproducible: sorted entries, fixed timestamps and modes, so the same sources give the same
bytes, and the file is named by its content hash. The roles install it as
``/opt/meshwright/lib/meshwright-node-<digest>.pyz`` (a new version never replaces a file a
running service reads) and modules import from it, so node code exists once, in this package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

# What the node code imports beyond the standard library: distribution -> its top-level
# packages. pyroute2 and attrs come with wireguard-tools (netlink for kernel WireGuard, its
# data classes); prometheus-client (standard library only) serves the relay's and the
# sidecar's metrics.
NODE_DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "wireguard-tools": ("wireguard_tools",),
    "attrs": ("attr", "attrs"),
    "pyroute2": ("pyroute2",),
    "prometheus-client": ("prometheus_client",),
}
# wireguard_tools.wireguard_config does `from segno import QRCode, make_qr` at import time.
SEGNO_STAND_IN = b'''"""A stand-in for segno in the meshwright node artifact: wireguard-tools
imports it to draw QR codes of configurations, which nodes never do (see meshwright.artifact)."""


def _unavailable(*args, **kwargs):
    raise NotImplementedError("QR codes are not made on meshwright nodes")


QRCode = make_qr = _unavailable
'''
NODE_PACKAGES = ("wire", "relay", "site")
NODE_MODULES = ("__init__.py", "node.py", "metrics.py")
ARTIFACT_NAME = "meshwright-node.pyz"
MAIN = b"import sys\n\nfrom meshwright.node import main\n\nsys.exit(main())\n"
_EPOCH = (1980, 1, 1, 0, 0, 0)


class ArtifactError(RuntimeError):
    """A dependency is missing or not at its pinned version."""


def _source_files(package_dir: Path) -> Iterator[tuple[str, bytes]]:
    for name in NODE_MODULES:
        yield f"meshwright/{name}", (package_dir / name).read_bytes()
    yield "meshwright/py.typed", b""
    for package in NODE_PACKAGES:
        for path in sorted((package_dir / package).rglob("*.py")):
            relative = path.relative_to(package_dir).as_posix()
            yield f"meshwright/{relative}", path.read_bytes()


def _dependency_files() -> Iterator[tuple[str, bytes]]:
    for distribution_name, packages in NODE_DEPENDENCIES.items():
        try:
            distribution = importlib.metadata.distribution(distribution_name)
        except importlib.metadata.PackageNotFoundError:
            raise ArtifactError(
                f"the node artifact needs {distribution_name} (pinned in requirements.lock)"
                " installed on the controller"
            ) from None
        for file in distribution.files or ():
            parts = file.parts
            if parts[0] not in packages or "__pycache__" in parts or file.suffix == ".pyc":
                continue
            yield file.as_posix(), Path(str(distribution.locate_file(file))).read_bytes()


def versions() -> dict[str, str]:
    """The version of every bundled dependency."""
    return {name: importlib.metadata.version(name) for name in NODE_DEPENDENCIES}


def build_bytes(package_dir: Path | None = None) -> tuple[bytes, str]:
    """The artifact's bytes and its digest (SHA-256 of the contents, first 16 hex digits)."""
    package_dir = package_dir or Path(__file__).parent
    entries = dict(_source_files(package_dir))
    entries.update(_dependency_files())
    entries["segno/__init__.py"] = SEGNO_STAND_IN
    content = hashlib.sha256()
    for name in sorted(entries):
        content.update(name.encode() + b"\0" + hashlib.sha256(entries[name]).digest())
    digest = content.hexdigest()[:16]
    entries["meshwright/_artifact.py"] = (
        f'"""Written by meshwright.artifact at build time."""\n\nDIGEST = "{digest}"\n'
        f"DEPENDENCIES = {versions()!r}\n"
    ).encode()
    entries["__main__.py"] = MAIN
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(entries):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, entries[name])
    return buffer.getvalue(), digest


def build(directory: Path) -> Path:
    """Write the artifact and its digest file (``<name>.digest``) into ``directory``."""
    data, digest = build_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / ARTIFACT_NAME
    if not target.exists() or target.read_bytes() != data:
        temporary = target.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.replace(target)
    digest_file = directory / f"{ARTIFACT_NAME}.digest"
    if not digest_file.exists() or digest_file.read_text() != digest + "\n":
        digest_file.write_text(digest + "\n")
    return target
