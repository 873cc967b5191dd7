"""Prometheus scrapes the relays' and the sidecars' metrics on the lab.

A real Prometheus server (Debian's package) runs on the test machine inside the network
namespace of the `public` site, so it is on the mesh: its targets are the relays' and the
sidecars' overlay addresses, which is where they serve (and, on relays, the only place their
firewall lets a scrape in). Every target must be up, every exposition must pass
`promtool check metrics`, and the series must say what the lab is doing: the sidecars' upgraded
peers on the direct path, relays forwarding for their relayed pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mesh_lab import INVENTORY, PLAN

SCRAPER = "public"  # an open site: every relay and site is one WireGuard hop away
LISTEN = "127.0.0.1:19090"  # inside that namespace only
RELAY_PORT, SIDECAR_PORT = 9588, 9587
SIDECARS = sorted({s for p in PLAN["pairs"] if p["mode"] == "punch" for s in (p["a"], p["b"])})
RELAYS = sorted(PLAN["relays"])


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's prometheus package (make deb)"
    return path


def namespace_pid(site: str) -> str:
    container = INVENTORY["mesh_sites"]["hosts"][site]["ansible_host"]
    return subprocess.run(
        ["podman", "inspect", "-f", "{{.State.Pid}}", container],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def in_mesh(*command: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program of the test machine in the scraping site's network namespace."""
    return subprocess.run(
        ["nsenter", "-t", namespace_pid(SCRAPER), "-n", *command],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def fetch(url: str) -> str:
    code = (
        f"import urllib.request\nprint(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    )
    done = in_mesh("python3", "-c", code)
    assert done.returncode == 0, done.stderr
    return done.stdout


def query(expression: str) -> list[dict]:
    from urllib.parse import quote

    answer = json.loads(fetch(f"http://{LISTEN}/api/v1/query?query={quote(expression)}"))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def targets() -> dict[str, list[str]]:
    relays = [f"{PLAN['relays'][r]['overlay_address']}:{RELAY_PORT}" for r in RELAYS]
    sidecars = [f"{PLAN['sites'][s]['overlay_address']}:{SIDECAR_PORT}" for s in SIDECARS]
    return {"meshwright_relay": relays, "meshwright_sidecar": sidecars}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    directory: Path = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": hosts}]}
            for job, hosts in targets().items()
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        [tool("promtool"), "check", "config", str(directory / "prometheus.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    log = (directory / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            "nsenter",
            "-t",
            namespace_pid(SCRAPER),
            "-n",
            tool("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address={LISTEN}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GOMAXPROCS": "1"},
    )
    try:
        expected = sum(len(hosts) for hosts in targets().values())
        deadline = time.monotonic() + 60
        while True:
            try:
                up = query("up == 1")
            except AssertionError:
                up = []
            if len(up) == expected:
                break
            assert server.poll() is None, (directory / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, f"targets up: {up}; expected {targets()}"
            time.sleep(1)
        yield
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_every_relay_and_sidecar_is_scraped(prometheus):
    up = {r["metric"]["instance"]: r["value"][1] for r in query("up")}
    wanted = {target for hosts in targets().values() for target in hosts}
    assert up == dict.fromkeys(wanted, "1")


@pytest.mark.parametrize("target", [t for hosts in targets().values() for t in hosts])
def test_each_exposition_passes_promtool(prometheus, target):
    text = fetch(f"http://{target}/metrics")
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def test_the_series_say_what_the_mesh_does(prometheus):
    # Every punch peer the sidecars keep: on exactly one path.
    paths = query("sum by (instance, peer) (meshwright_sidecar_peer_path)")
    assert paths and all(r["value"][1] == "1" for r in paths), paths
    # The default lab's upgraded pairs are direct (the traversal tests assert it pair by pair).
    direct = query('meshwright_sidecar_peer_path{path="direct"} == 1')
    assert len(direct) >= 2, direct
    # Relays forward for the relayed pairs, and count what they drop by reason.
    forwarded = query("sum(meshwright_relay_forwarded_packets_total)")
    assert forwarded and float(forwarded[0]["value"][1]) > 0, forwarded
    assert query("meshwright_relay_dropped_packets_total"), "no drop counters"
