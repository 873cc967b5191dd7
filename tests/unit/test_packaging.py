"""What users install: the node artifact, the collection tarball, the execution environment.

The artifact must run on Debian's python3 with nothing else (no venv, no site-packages); the
tarball must hold what runs and nothing of the development tree; `ansible-builder create`
(the real tool) must make a build context from execution-environment.yml with the tarball
and the wheel this repository builds.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from meshwright import artifact

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEBIAN_PYTHON = Path("/usr/bin/python3")


def version() -> str:
    return str(yaml.safe_load((ROOT / "galaxy.yml").read_text())["version"])


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    artifact.build(ROOT / "roles/node/files")
    for command in (
        [BIN / "ansible-galaxy", "collection", "build", "--output-path", out, ROOT],
        [BIN / "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps", "-w", out, ROOT],
    ):
        subprocess.run([str(c) for c in command], cwd=ROOT, check=True, capture_output=True)
    return out


def test_artifact_is_reproducible_and_named_by_its_contents(tmp_path: Path) -> None:
    first, digest = artifact.build_bytes()
    second, again = artifact.build_bytes()
    assert first == second and digest == again
    path = artifact.build(tmp_path)
    assert path.read_bytes() == first
    assert (tmp_path / "meshwright-node.pyz.digest").read_text() == digest + "\n"


def test_artifact_runs_every_node_module_on_debians_python_alone(tmp_path: Path) -> None:
    assert DEBIAN_PYTHON.exists(), "Debian's python3 is missing (make setup installs it)"
    path = artifact.build(tmp_path)
    modules = sorted(
        "meshwright."
        + p.relative_to(ROOT / "src/meshwright")
        .with_suffix("")
        .as_posix()
        .replace("/", ".")
        .removesuffix(".__init__")
        for package in artifact.NODE_PACKAGES
        for p in (ROOT / "src/meshwright" / package).rglob("*.py")
    )
    # -I -S: no user site, no site-packages, no environment: only the standard library and
    # what the artifact carries.
    script = (
        "import importlib, sys; sys.path.insert(0, sys.argv[1])\n"
        "for name in sys.argv[2:]: importlib.import_module(name)\n"
        "import wireguard_tools, pyroute2; print('ok')"
    )
    proc = subprocess.run(
        [DEBIAN_PYTHON, "-I", "-S", "-c", script, path, *modules],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.stdout.strip() == "ok", proc.stderr
    version_out = subprocess.run(
        [DEBIAN_PYTHON, "-I", "-S", path, "version"], capture_output=True, text=True, check=True
    )
    assert version_out.stdout.strip() == artifact.build_bytes()[1]
    assert "meshwright.lab" not in " ".join(modules) and "meshwright.plan" not in " ".join(modules)


def test_tarball_holds_what_runs_and_nothing_of_the_development_tree(dist: Path) -> None:
    (tarball,) = dist.glob("meshwright-mesh-*.tar.gz")
    assert tarball.name == f"meshwright-mesh-{version()}.tar.gz"
    with tarfile.open(tarball) as archive:
        names = set(archive.getnames())
        relay = archive.getmember("roles/relay")
    for needed in (
        "MANIFEST.json",
        "meta/runtime.yml",
        "playbooks/site.yml",
        "playbooks/probe.yml",
        "plugins/modules/wg_keypair.py",
        "plugins/action/mesh_plan.py",
        "roles/node/files/meshwright-node.pyz",
        "roles/node/files/meshwright-node.pyz.digest",
        "relay-role/tasks/main.yml",
    ):
        assert needed in names, needed
    assert relay.issym() and relay.linkname == "../relay-role"
    tops = {name.split("/")[0] for name in names}
    for unwanted in (
        "tests",
        "molecule",
        "src",
        "bench",
        "inventory",
        ".venv",
        ".cache",
        ".git",
        "build",
        "dist",
        "Makefile",
        "ansible.cfg",
    ):
        assert unwanted not in tops, unwanted
    assert not any(n.endswith((".pyc", ".tar.gz")) or "__pycache__" in n for n in names)


def test_versions_agree() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{version()}"' in pyproject
    ee = (ROOT / "execution-environment.yml").read_text()
    assert f"meshwright-mesh-{version()}.tar.gz" in ee
    assert f"meshwright-{version()}-py3-none-any.whl" in ee


def test_ansible_builder_makes_a_build_context(dist: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "dist").mkdir(parents=True)
    for built in dist.iterdir():
        (project / "dist" / built.name).write_bytes(built.read_bytes())
    (project / "execution-environment.yml").write_text(
        (ROOT / "execution-environment.yml").read_text()
    )
    context = tmp_path / "context"
    subprocess.run(
        [
            str(BIN / "ansible-builder"),
            "create",
            "-f",
            "execution-environment.yml",
            "-c",
            str(context),
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    containerfile = (context / "Containerfile").read_text()
    assert "ansible-galaxy collection install" in containerfile
    assert (context / f"_build/collections/meshwright-mesh-{version()}.tar.gz").exists()
    assert (context / f"_build/python/meshwright-{version()}-py3-none-any.whl").exists()
    requirements = yaml.safe_load((context / "_build/requirements.yml").read_text())
    assert requirements["collections"][0]["name"].endswith(f"meshwright-mesh-{version()}.tar.gz")
    assert "meshwright @ file:///build/python/" in (context / "_build/requirements.txt").read_text()
