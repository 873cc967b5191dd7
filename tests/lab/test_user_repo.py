"""The collection as users install it: built, installed, and run from a user's own repository.

The collection tarball (`ansible-galaxy collection build`) and the `meshwright` wheel are built
from this checkout; a fresh virtual environment gets ansible-core and the wheel, a fresh
collections path gets the tarball (`ansible-galaxy collection install -r requirements.yml`),
and a directory outside the checkout that looks like a user's GitOps repository (its own
`ansible.cfg`, inventory, `group_vars`, `requirements.yml`) converges a small lab of its own
with `ansible-playbook meshwright.mesh.site`, with nothing from the checkout on any path.
Then every LAN host reaches every other site's LAN host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from meshwright import artifact
from meshwright.lab import podman, runner

from .conftest import ROOT, require_prerequisites

LAB_NAME = "mwuser"
BIN = Path(sys.executable).parent
ANSIBLE_CORE = next(
    line.strip()
    for line in (ROOT / "requirements.lock").read_text().splitlines()
    if line.startswith("ansible-core==")
)


def run(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, f"{command}:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def user_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The small lab's inventory, written by `lab up`."""
    require_prerequisites()
    topology = runner.read_topology(ROOT / "tests/lab/topologies/user-repo.yml", LAB_NAME)
    inventory = tmp_path_factory.mktemp("user-lab") / "hosts.yml"
    runner.up(topology, inventory)
    try:
        yield inventory
    finally:
        runner.down(LAB_NAME, inventory)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tarball and the wheel, built from the checkout; a venv with ansible-core and the
    wheel; the tarball installed into a collections path of the user's repository."""
    build = tmp_path_factory.mktemp("build")
    artifact.build(ROOT / "roles/node/files")  # the tarball carries the node artifact
    run(BIN / "ansible-galaxy", "collection", "build", "--output-path", build, ROOT, cwd=ROOT)
    (tarball,) = build.glob("meshwright-mesh-*.tar.gz")
    run(BIN / "pip", "wheel", "-q", "--no-deps", "-w", build, ROOT)
    (wheel,) = build.glob("meshwright-*.whl")
    venv = tmp_path_factory.mktemp("user") / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin/pip", "install", "-q", "--disable-pip-version-check", ANSIBLE_CORE, wheel)
    return {"tarball": tarball, "venv": venv}


def user_repository(root: Path, lab_inventory: Path, tarball: Path) -> Path:
    """A GitOps repository as docs/examples/gitops-repo shows, with the lab as its inventory."""
    repo = root / "gitops"
    (repo / "inventory/group_vars").mkdir(parents=True)
    (repo / "ansible.cfg").write_text(
        "[defaults]\ninventory = inventory/hosts.yml\ncollections_path = collections\n"
        "interpreter_python = auto_silent\nforks = 16\n"
    )
    (repo / "requirements.yml").write_text(
        yaml.safe_dump({"collections": [{"name": str(tarball), "type": "file"}]})
    )
    (repo / "inventory/hosts.yml").write_text(lab_inventory.read_text())
    (repo / "inventory/group_vars/all.yml").write_text(
        "---\nmesh_preshared_keys: true\nmesh_preshared_key_secret: user-repo-test-secret\n"
    )
    # A policy, as users write them: easy1 uses no relay, so its pair with the UDP-blocked
    # site goes through the open site (a multi-hop path, routed by both).
    (repo / "inventory/host_vars").mkdir()
    (repo / "inventory/host_vars/easy1.yml").write_text("---\nmesh_policy:\n  allow_relay: false\n")
    return repo


def test_installed_collection_converges_a_lab_from_a_user_repository(
    user_lab: Path, installed: dict[str, Path], tmp_path: Path
) -> None:
    repo = user_repository(tmp_path, user_lab, installed["tarball"])
    venv = installed["venv"]
    # Nothing of the checkout: not its venv, not its collections, not its ansible.cfg or
    # Python path. podman needs the lab's containers.conf: the installed package's copy.
    containers_conf = run(
        venv / "bin/python",
        "-c",
        "import meshwright.lab, pathlib; "
        "print(pathlib.Path(meshwright.lab.__file__).with_name('containers.conf'))",
        cwd=repo,
        env={"PATH": "/usr/bin:/bin"},
    ).strip()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": str(tmp_path),
        "CONTAINERS_CONF": containers_conf,
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_FORCE_COLOR": "0",
        "LANG": "C.UTF-8",
    }
    assert str(ROOT) not in json.dumps(env)
    run(
        venv / "bin/ansible-galaxy",
        "collection",
        "install",
        "-r",
        "requirements.yml",
        cwd=repo,
        env=env,
    )
    listed = run(
        venv / "bin/ansible-galaxy", "collection", "list", "meshwright.mesh", cwd=repo, env=env
    )
    assert str(repo / "collections") in listed and str(ROOT) not in listed, listed
    package = run(
        venv / "bin/python",
        "-c",
        "import meshwright; print(meshwright.__file__)",
        cwd=repo,
        env=env,
    )
    assert package.startswith(str(venv)), package

    out = run(venv / "bin/ansible-playbook", "meshwright.mesh.site", cwd=repo, env=env)
    # The last play pings every planned peer and fails naming any that does not answer.
    assert "TASK [Fail naming the pairs that do not answer]" in out
    assert not re.search(r"(failed|unreachable)=[1-9]", out), out[-3000:]
    assert (repo / "inventory/.meshwright/plan.json").exists()
    assert str(ROOT) not in out

    inventory = yaml.safe_load(user_lab.read_text())["all"]["children"]
    sites = sorted(inventory["mesh_sites"]["hosts"])
    lans = {s: inventory["mesh_sites"]["hosts"][s]["mesh_lan_prefixes"][0] for s in sites}

    def reaches(pair: tuple[str, str]) -> str | None:
        source, target = pair
        address = lans[target].rsplit(".", 1)[0] + ".10"  # the lab's first LAN host
        container = inventory["lan_hosts"]["hosts"][f"{source}-lan1"]["ansible_host"]
        proc = podman.run(
            ["exec", container, "ping", "-c", "3", "-i", "0.3", "-W", "2", "-q", address],
            check=False,
        )
        return None if " 0% packet loss" in proc else f"{source}-lan1 -> {target} ({address})"

    pairs = [(a, b) for a in sites for b in sites if a != b]
    with ThreadPoolExecutor(len(pairs)) as pool:
        failures = [f for f in pool.map(reaches, pairs) if f]
    assert failures == []

    # The multi-hop pair: packets from blocked's LAN to easy1's pass public's overlay address.
    plan = json.loads((repo / "inventory/.meshwright/plan.json").read_text())
    (pair,) = [p for p in plan["pairs"] if {p["a"], p["b"]} == {"blocked", "easy1"}]
    assert pair["mode"] == "via public", pair
    transit = plan["sites"]["public"]["overlay_address"]
    source = inventory["lan_hosts"]["hosts"]["blocked-lan1"]["ansible_host"]
    target = lans["easy1"].rsplit(".", 1)[0] + ".10"
    hops = ""
    for _ in range(3):  # ICMP time-exceeded is rate limited (about 1/s): paced retries
        hops = podman.run(
            ["exec", source, "traceroute", "-n", "-q", "3", "-w", "2", "-m", "6", target],
            check=False,
        )
        if transit in hops:
            break
        time.sleep(2)
    assert transit in hops, hops
    assert os.path.exists(repo / "collections/ansible_collections/meshwright/mesh/roles/node")
