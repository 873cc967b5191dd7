"""meshwright.graph and `meshwright graph`: the plan as DOT, live overrides, determinism, errors,
and a real Graphviz rendering (fails, never skips, without Graphviz)."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from meshwright import graph_cli
from meshwright.graph import EDGE_STYLES, GraphError, live_from_dict, to_dot
from meshwright.plan import LINK_KINDS, Mesh, Policy, Relay, build_plan
from meshwright.plan.inventory import SiteState, State
from meshwright.plan.synthetic import public_key, synthetic_site

DATA = Path(__file__).resolve().parent.parent / "data"
SVG = "{http://www.w3.org/2000/svg}"

# One pair of every planned mode: a open, b and c easy (punch), d hard behind hub c (relay to c,
# via c to the rest), e UDP-blocked behind hub a (relay-tcp to a, via a to the rest).
SITES = (
    synthetic_site("a", "open", 1),
    synthetic_site("b", "easy", 2),
    synthetic_site("c", "easy", 3),
    synthetic_site("d", "hard", 4, policy=Policy(hubs=("c",))),
    synthetic_site("e", "blocked", 5, policy=Policy(hubs=("a",))),
)
NAT = {site.name: site.nat_class for site in SITES}
RELAY = Relay(
    name="r1", addresses=("192.0.2.1",), public_key=public_key("r1"), overlay_address="10.99.0.250"
)


def plan_dict() -> dict[str, Any]:
    mesh = Mesh(
        sites=SITES,
        relays=(RELAY,),
        overlay_network="10.99.0.0/24",
        link_kinds=frozenset(LINK_KINDS),
    )
    # Through JSON, as the command reads it from the plan file.
    data: dict[str, Any] = json.loads(build_plan(mesh).to_json())
    return data


def edge_lines(dot: str) -> dict[tuple[str, str], str]:
    """The site-to-site edge lines of DOT text, by pair."""
    edges = {}
    for line in dot.splitlines():
        if line.startswith('  "site:') and " -- " in line:
            left, right = line.split(" -- ", 1)
            a, b = left.strip()[6:-1], right.split('"', 2)[1][5:]
            edges[(a, b)] = line
    return edges


def test_the_plan_gives_exactly_this_dot() -> None:
    plan = plan_dict()
    assert {p["mode"] for p in plan["pairs"]} == {
        "direct",
        "punch",
        "relay",
        "relay-tcp",
        "via a",
        "via c",
    }
    # Checked by eye against format_table (a-b direct, b-c punch through r1, c-d relay, a-e
    # relay-tcp, the rest via c or a), and rendered.
    assert to_dot(plan, NAT) == (DATA / "graph_five_sites.dot").read_text("utf-8")


def test_every_style_is_distinct_and_in_the_legend() -> None:
    dot = to_dot(plan_dict(), NAT)
    looks = {(s.style, s.colour, s.penwidth) for s in EDGE_STYLES.values()}
    assert len(looks) == len(EDGE_STYLES)
    for kind, style in EDGE_STYLES.items():
        assert f'"legend:edge:{kind}:end" -- "legend:edge:{kind}" [color="{style.colour}"' in dot
        assert f'label="{style.legend}"' in dot
    for nat_class in ("open", "easy", "hard", "blocked"):
        assert f'"legend:nat:{nat_class}"' in dot
    assert "subgraph cluster_legend {" in dot


def test_same_plan_same_bytes_whatever_the_input_order() -> None:
    plan = plan_dict()
    first = to_dot(plan, NAT)
    assert to_dot(plan_dict(), dict(NAT)) == first
    shuffled = dict(plan)
    shuffled["sites"] = dict(reversed(list(plan["sites"].items())))
    shuffled["pairs"] = [dict(reversed(list(p.items()))) for p in reversed(plan["pairs"])]
    shuffled["allocations"] = list(reversed(plan["allocations"]))
    assert to_dot(shuffled, dict(reversed(list(NAT.items())))) == first
    live = {("c", "b"): "direct", ("a", "b"): "via"}
    assert to_dot(plan, NAT, dict(live)) == to_dot(plan, NAT, dict(reversed(list(live.items()))))


def test_live_view_overrides_planned_modes() -> None:
    plan = plan_dict()
    live: dict[tuple[str, str], Any] = {
        ("c", "b"): "direct",  # a punch pair the sidecars upgraded (either order of names)
        ("a", "b"): "via",
        ("c", "d"): "relay-tcp",
        ("a", "e"): "relay",
        ("d", "e"): "direct",
    }
    edges = edge_lines(to_dot(plan, NAT, live))
    assert edges[("b", "c")] == (
        '  "site:b" -- "site:c" [color="#1f6fd1", label="punched", penwidth="2.4",'
        ' style="solid", tooltip="b -- c: planned punch, live direct"]'
    )
    assert edges[("a", "b")] == (
        '  "site:a" -- "site:b" [color="#a0a0a0", fontcolor="#a0a0a0", label="via",'
        ' penwidth="1.0", style="solid", tooltip="a -- b: planned direct, live via"]'
    )
    assert edges[("c", "d")] == (
        '  "site:c" -- "site:d" [color="#c0392b", label="r1 (TLS)", penwidth="2.2",'
        ' style="dotted", tooltip="c -- d: planned relay, live relay-tcp"]'
    )
    assert edges[("a", "e")] == (
        '  "site:a" -- "site:e" [color="#d9822b", label="r1", penwidth="1.6",'
        ' style="dashed", tooltip="a -- e: planned relay-tcp, live relay"]'
    )
    # a live direct on a pair that was not a punch pair is plain direct
    assert edges[("d", "e")].startswith('  "site:d" -- "site:e" [color="#222222", penwidth="1.6"')
    # pairs the live view leaves out are drawn as planned
    planned = edge_lines(to_dot(plan, NAT))
    assert edges[("a", "c")] == planned[("a", "c")]
    assert "(live)" in to_dot(plan, NAT, {})


def test_a_direct_pair_that_fell_back_is_drawn_on_its_relay() -> None:
    """Every linked pair has a relay allocation (a direct pair's is its fallback), and every
    relay is drawn with the address its site ports are bound on."""
    plan = plan_dict()
    edges = edge_lines(to_dot(plan, NAT, {("a", "c"): "relay"}))
    assert edges[("a", "c")] == (
        '  "site:a" -- "site:c" [color="#d9822b", label="r1", penwidth="1.6",'
        ' style="dashed", tooltip="a -- c: planned direct, live relay"]'
    )
    assert plan["relays"]["r1"]["address"] == "192.0.2.1"
    bare = {**plan, "allocations": []}
    assert 'label="r1\\n192.0.2.1", shape="hexagon"' in to_dot(bare, NAT)


def test_live_view_from_a_status_file() -> None:
    data = {
        "pairs": [
            {"a": "c", "b": "b", "path": "direct", "rtt_ms": 12.5},
            {"a": "a", "b": "e", "path": "relay-tcp"},
        ]
    }
    assert live_from_dict(data) == {("b", "c"): "direct", ("a", "e"): "relay-tcp"}
    assert live_from_dict({}) == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "live view: not a JSON object but list"),
        ({"pairs": {}}, "live view: 'pairs' is not a list but dict"),
        ({"pairs": [{"a": "a", "path": "direct"}]}, "live view: pairs[0]: 'b' is None, not a name"),
        (
            {"pairs": [{"a": "a", "b": "b", "path": "punched"}]},
            "live view: pairs[0] (a -- b): path 'punched' is not one of direct, relay,"
            " relay-tcp, via",
        ),
        (
            {"pairs": [{"a": "a", "b": "b", "path": "via"}, {"a": "b", "b": "a", "path": "via"}]},
            "live view: pairs[1]: b -- a is listed twice",
        ),
    ],
)
def test_bad_status_files_are_named(data: Any, message: str) -> None:
    with pytest.raises(GraphError) as error:
        live_from_dict(data)
    assert str(error.value) == message


def test_live_pairs_must_be_the_plans() -> None:
    plan = plan_dict()
    with pytest.raises(GraphError, match=r"^live view: a -- zz: zz is not a site of the plan$"):
        to_dot(plan, NAT, {("a", "zz"): "direct"})
    plan["pairs"] = [p for p in plan["pairs"] if (p["a"], p["b"]) != ("a", "b")]
    with pytest.raises(GraphError, match=r"^live view: a -- b is not a pair of the plan$"):
        to_dot(plan, NAT, {("b", "a"): "direct"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sites": []}, "plan: 'sites' is not a mapping but list"),
        ({"pairs": None}, "plan: 'pairs' is not a list but NoneType"),
        ({"pairs": [{"a": "a", "b": "b"}]}, "plan: pairs[0]: 'mode' is None, not a name"),
        (
            {"pairs": [{"a": "a", "b": "x", "mode": "direct"}]},
            "plan: pairs[0]: a -- x: x is not in the plan's sites",
        ),
        (
            {"pairs": [{"a": "a", "b": "b", "mode": "carrier-pigeon"}]},
            "plan: pairs[0]: a -- b: mode 'carrier-pigeon' is not one this graph draws",
        ),
        (
            {"allocations": [{"a": "a", "b": "b"}]},
            "plan: allocations[0]: 'relay' is None, not a name",
        ),
    ],
)
def test_bad_plans_are_named(change: dict[str, Any], message: str) -> None:
    plan = {**plan_dict(), **change}
    with pytest.raises(GraphError) as error:
        to_dot(plan, NAT)
    assert str(error.value) == message


def test_unreachable_sites_are_dashed_and_names_are_quoted() -> None:
    plan = {
        "sites": {'odd "name" \\ here': {}, "lone": {}},
        "pairs": [{"a": "lone", "b": 'odd "name" \\ here', "mode": "none", "path": []}],
        "unreachable": {"lone": "no path reaches it"},
    }
    dot = to_dot(plan)
    assert (
        '  "site:lone" [fillcolor="#eeeeee", label="lone\\nunreachable", shape="box",'
        ' style="rounded,filled,dashed", tooltip="site lone: no path reaches it"]'
    ) in dot
    assert '"site:odd \\"name\\" \\\\ here" [fillcolor="#eeeeee", label="odd \\"name\\"' in dot
    assert edge_lines(dot) == {}  # a "none" pair has nothing to draw
    assert 'label="meshwright mesh"' in dot


def write_plan(tmp_path: Path) -> Path:
    """A plan file and its state file, as mesh_plan writes them beside an inventory."""
    here = tmp_path / "inventory" / ".meshwright"
    here.mkdir(parents=True)
    plan = here / "plan.json"
    plan.write_text(json.dumps(plan_dict()), "utf-8")
    state = State(sites={s.name: SiteState(nat_class=s.nat_class) for s in SITES})
    (here / "state.json").write_text(state.to_json(), "utf-8")
    return plan


def test_command_renders_svg_with_graphviz(tmp_path: Path) -> None:
    if shutil.which("dot") is None:
        pytest.fail("Graphviz's `dot` is not on PATH: install graphviz (make deb)")
    plan = write_plan(tmp_path)
    out = tmp_path / "mesh.svg"
    assert graph_cli.main(["-p", str(plan), "-o", str(out)]) == 0
    root = ET.fromstring(out.read_bytes())  # valid XML, or this raises
    assert root.tag == f"{SVG}svg"
    texts = {t.text for t in root.iter(f"{SVG}text")}
    for site in SITES:
        assert site.name in texts
        assert site.nat_class in texts  # from the state file beside the plan
    assert {"r1", "punch (r1)", "r1 (TLS)", "via a", "via c", "legend"} <= texts
    # the same plan gives the same picture
    again = tmp_path / "again.svg"
    assert graph_cli.main(["-p", str(plan), "-o", str(again), "--format", "svg"]) == 0
    assert again.read_bytes() == out.read_bytes()


def test_command_writes_dot_without_graphviz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` here: DOT output needs none
    out = tmp_path / "mesh.dot"
    assert graph_cli.main(["-p", str(plan), "-o", str(out)]) == 0  # format from the suffix
    assert out.read_text("utf-8") == (DATA / "graph_five_sites.dot").read_text("utf-8")
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"pairs": [{"a": "b", "b": "c", "path": "direct"}]}), "utf-8")
    assert graph_cli.main(["-p", str(plan), "--live", str(status), "--format", "dot"]) == 0
    assert 'label="punched"' in capsys.readouterr().out


def test_command_without_graphviz_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = write_plan(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert graph_cli.main(["-p", str(plan), "-o", str(tmp_path / "mesh.png")]) == 1
    err = capsys.readouterr().err
    assert "`dot` program is not on PATH: install graphviz (make deb)" in err
    assert not (tmp_path / "mesh.png").exists()


def test_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere" / "plan.json"
    assert graph_cli.main(["-p", str(missing), "--format", "dot"]) == 1
    assert f"plan file {missing} does not exist" in capsys.readouterr().err
    plan = write_plan(tmp_path)
    status = tmp_path / "status.json"
    status.write_text('{"pairs": [{"a": "a", "b": "b", "path": "sideways"}]}', "utf-8")
    assert graph_cli.main(["-p", str(plan), "--live", str(status), "--format", "dot"]) == 2
    assert "graph: live view: pairs[0] (a -- b): path 'sideways'" in capsys.readouterr().err
    status.write_text("{", "utf-8")
    assert graph_cli.main(["-p", str(plan), "--live", str(status), "--format", "dot"]) == 2
    assert f"live status {status}: not valid JSON" in capsys.readouterr().err
    (plan.parent / "state.json").write_text('{"version": 99}', "utf-8")
    assert graph_cli.main(["-p", str(plan), "--format", "dot"]) == 2
    assert "state file" in capsys.readouterr().err
    (plan.parent / "state.json").unlink()  # no state yet: drawn without NAT classes
    assert graph_cli.main(["-p", str(plan), "--format", "dot"]) == 0
    assert 'label="a"' in capsys.readouterr().out
