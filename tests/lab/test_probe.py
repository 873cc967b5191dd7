"""playbooks/probe.yml against the lab: every site classified as its NAT kind, 5 runs of 5."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from .conftest import ansible, recap

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUNS = 5
EI, APD = "endpoint-independent", "address-and-port-dependent"
# site -> (class, mapping, filtering); relay1 has two addresses, so filtering is measurable.
EXPECTED = {
    "public": ("open", EI, EI),
    "cone": ("open", EI, EI),
    "easy1": ("easy", EI, APD),
    "easy2": ("easy", EI, APD),
    "cgn": ("easy", EI, APD),
    "easy3": ("easy", EI, APD),  # behind easy1's NAT, on a port of its own
    "hard1": ("hard", APD, APD),
    "hard2": ("hard", APD, APD),
    "blocked": ("blocked", "unknown", "unknown"),
}


@pytest.fixture(scope="module")
def probe_runs(lab, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    runs = []
    for i in range(RUNS):
        report = out / f"run{i}.json"
        proc = ansible(lab, "meshwright.mesh.probe", "-e", f"mesh_probe_report={report}")
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        runs.append((json.loads(report.read_text()), proc.stdout))
    return runs


@pytest.mark.lab
@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_every_run_classifies_the_site_as_its_nat_kind(probe_runs, site):
    seen = [(r[site]["nat_class"], r[site]["mapping"], r[site]["filtering"]) for r, _ in probe_runs]
    assert seen == [EXPECTED[site]] * RUNS, f"{site}: {seen}"


@pytest.mark.lab
@pytest.mark.parametrize("site", sorted(EXPECTED))
def test_public_address_is_the_sites_nat(lab, probe_runs, site):
    expected = [] if site == "blocked" else [lab.lab.host(site).public_address]
    for report, _ in probe_runs:
        assert report[site]["public_addresses"] == expected


@pytest.mark.lab
def test_blocked_site_reaches_relays_over_tcp_443_only(probe_runs):
    for report, _ in probe_runs:
        blocked = report["blocked"]
        assert blocked["udp"] is False
        assert blocked["tcp443"] == {"relay1": True, "relay2": True}


@pytest.mark.lab
def test_table_and_timing(probe_runs):
    report, stdout = probe_runs[-1]
    assert re.search(r"site\s+class\s+mapping\s+filtering\s+public address\s+best relay", stdout)
    for site, (nat_class, _, _) in EXPECTED.items():
        assert re.search(rf'"{site}\s+{nat_class}\s', stdout), f"no table row for {site}"
    for site in EXPECTED:
        rtts = report[site]["rtt_ms"]
        if site != "blocked":
            # Two shaped links of 10 ms each way (cgn's: 15): at least 16 ms round trip.
            assert report[site]["best_relay"] in rtts and min(rtts.values()) >= 16, rtts


@pytest.mark.lab
def test_second_run_changes_nothing_and_check_mode_works(lab, probe_runs):
    # The relay role already ran five times in probe_runs; a run that writes no report on
    # the controller now changes nothing anywhere: relays stay as they are, probes change nothing.
    again = ansible(lab, "meshwright.mesh.probe")
    assert again.returncode == 0, again.stdout[-3000:]
    rows = recap(again.stdout)
    assert set(rows) == set(EXPECTED) | {"relay1", "relay2"}
    assert {h: r["changed"] for h, r in rows.items() if r["changed"]} == {}
    checked = ansible(lab, "meshwright.mesh.probe", "--check")
    assert checked.returncode == 0, checked.stdout[-3000:]
    assert re.search(r'"easy1\s+easy\s', checked.stdout), "check mode still probes"


@pytest.mark.lab
def test_no_relay_answering_fails_naming_each_address(lab):
    relays = json.dumps({"relays": [{"name": "ghost", "addresses": ["203.0.113.99"]}]})
    proc = ansible(lab, "easy1", "-m", "meshwright.mesh.nat_probe", "-a", relays, tool="ansible")
    assert proc.returncode != 0
    for attempt in ("ghost 203.0.113.99:3478", "ghost 203.0.113.99:3479", "ghost 203.0.113.99:443"):
        assert attempt in proc.stdout, proc.stdout[-2000:]
