"""The mesh as a picture: a plan (and optionally what a live mesh does) as Graphviz DOT text.

Pure: :func:`to_dot` takes the dict of a ``.meshwright/plan.json`` file, the sites' NAT classes
(the plan does not hold them; ``.meshwright/state.json`` beside it does) and an optional live
view, and returns DOT text. Everything is emitted in sorted order, so the same input gives
byte-identical DOT (a picture committed beside the plan diffs only when the mesh changed).
Running Graphviz is the adapter's job (:mod:`meshwright.graph_cli`). See docs/graph.md.

Sites are rounded boxes (name and NAT class), relays hexagons; every pair with a path is one
edge, styled by how its traffic goes (:data:`EDGE_STYLES`); a legend cluster explains them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "EDGE_STYLES",
    "LIVE_PATHS",
    "NAT_COLOURS",
    "EdgeStyle",
    "GraphError",
    "LivePath",
    "LiveView",
    "live_from_dict",
    "to_dot",
]

# What the live status command reports for a pair: how its WireGuard traffic goes right now
# (judged from the WireGuard endpoints the sites hold, meshwright.status).
#   direct     end to end (for a punch pair: the sidecars upgraded it; drawn "punched")
#   relay      through a relay over UDP (a direct pair too, when its sidecars fell back)
#   relay-tcp  through a relay over TLS (a UDP-blocked side's sidecar)
#   via        no link of its own in use: routed through another site
LivePath = Literal["direct", "relay", "relay-tcp", "via"]
LIVE_PATHS: tuple[LivePath, ...] = ("direct", "relay", "relay-tcp", "via")

# The live view: (site_a, site_b) -> path; either order of the two names. Pairs it leaves out
# are drawn as planned.
LiveView = Mapping[tuple[str, str], LivePath]


class GraphError(ValueError):
    """The plan or the live view is not what it should be; the message names the entry."""


@dataclass(frozen=True, slots=True)
class EdgeStyle:
    """How one kind of edge is drawn, and the legend's words for it."""

    style: str
    colour: str
    penwidth: str
    legend: str


# Drawn kinds, in the legend's order. A planned "punch" pair starts relayed through its
# allocation's relay; only a live view can say the sidecars upgraded it ("punched").
EDGE_STYLES: dict[str, EdgeStyle] = {
    "direct": EdgeStyle("solid", "#222222", "1.6", "direct"),
    "punched": EdgeStyle("solid", "#1f6fd1", "2.4", "punched (upgraded to direct)"),
    "punch": EdgeStyle("dashed", "#1f6fd1", "1.6", "punch (planned: starts relayed)"),
    "relay": EdgeStyle("dashed", "#d9822b", "1.6", "relayed over UDP (relay named)"),
    "relay-tcp": EdgeStyle("dotted", "#c0392b", "2.2", "relayed over TLS (relay named)"),
    "via": EdgeStyle("solid", "#a0a0a0", "1.0", "no link: via another site"),
}

# Site fill by NAT class: greener is easier to reach.
NAT_COLOURS: dict[str, str] = {
    "open": "#c8e6c9",
    "easy": "#dcedc8",
    "hard": "#ffe0b2",
    "blocked": "#ffcdd2",
}
_UNKNOWN_COLOUR = "#eeeeee"
_RELAY_COLOUR = "#e8eaf6"
_FONT = "Helvetica"


@dataclass(frozen=True, slots=True)
class _Edge:
    a: str
    b: str
    kind: str  # a key of EDGE_STYLES
    label: str
    tooltip: str


def _quote(text: str) -> str:
    """A DOT quoted string; backslashes first, so no escape of ours is doubled."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'


def _lines(*parts: str) -> str:
    """A label of several lines: each part quoted on its own, joined by DOT's line break."""
    return _quote("\0".join(parts)).replace("\0", "\\n")


def _attrs(label: tuple[str, ...] = (), **attrs: str) -> str:
    """An attribute list, sorted by name; ``label`` given as its lines."""
    items = {key: _quote(value) for key, value in attrs.items()}
    if label:
        items["label"] = _lines(*label)
    return "[" + ", ".join(f"{key}={items[key]}" for key in sorted(items)) + "]"


def _mapping(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise GraphError(f"{where}: {key!r} is not a mapping but {type(value).__name__}")
    return value


def _list(data: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise GraphError(f"{where}: {key!r} is not a list but {type(value).__name__}")
    return value


def _text(entry: Any, key: str, where: str) -> str:
    value = entry.get(key) if isinstance(entry, Mapping) else None
    if not isinstance(value, str) or not value:
        raise GraphError(f"{where}: {key!r} is {value!r}, not a name")
    return value


def live_from_dict(data: Any) -> dict[tuple[str, str], LivePath]:
    """The live view from a status file's dict: ``{"pairs": [{"a", "b", "path"}, ...]}``.

    Other keys of an entry (round-trip times, handshake ages) are the status command's and are
    ignored; a missing or unknown path is an error naming the entry.
    """
    if not isinstance(data, Mapping):
        raise GraphError(f"live view: not a JSON object but {type(data).__name__}")
    view: dict[tuple[str, str], LivePath] = {}
    for n, entry in enumerate(_list(data, "pairs", "live view")):
        where = f"live view: pairs[{n}]"
        a, b = _text(entry, "a", where), _text(entry, "b", where)
        value = entry.get("path")
        # the loop narrows the file's Any to one of the Literal's values
        path = next((p for p in LIVE_PATHS if p == value), None)
        if path is None:
            raise GraphError(
                f"{where} ({a} -- {b}): path {value!r} is not one of {', '.join(LIVE_PATHS)}"
            )
        key = (min(a, b), max(a, b))
        if key in view:
            raise GraphError(f"{where}: {a} -- {b} is listed twice")
        view[key] = path
    return view


def _edges(
    plan: Mapping[str, Any],
    sites: Iterable[str],
    live: LiveView,
) -> list[_Edge]:
    known = set(sites)
    relay_of: dict[tuple[str, str], str] = {}
    for n, allocation in enumerate(_list(plan, "allocations", "plan")):
        where = f"plan: allocations[{n}]"
        a, b = _text(allocation, "a", where), _text(allocation, "b", where)
        relay_of[(min(a, b), max(a, b))] = _text(allocation, "relay", where)
    live_paths: dict[tuple[str, str], LivePath] = {}
    for (a, b), path in live.items():
        for name in (a, b):
            if name not in known:
                raise GraphError(f"live view: {a} -- {b}: {name} is not a site of the plan")
        live_paths[(min(a, b), max(a, b))] = path
    edges: list[_Edge] = []
    for n, pair in enumerate(_list(plan, "pairs", "plan")):
        where = f"plan: pairs[{n}]"
        a, b = sorted((_text(pair, "a", where), _text(pair, "b", where)))
        mode = _text(pair, "mode", where)
        for name in (a, b):
            if name not in known:
                raise GraphError(f"{where}: {a} -- {b}: {name} is not in the plan's sites")
        hops = pair.get("path") or []
        # "via X" names the first transit from the pair's a; a live "via" takes it from the path
        transit = mode[4:] if mode.startswith("via ") else None
        if transit is None and isinstance(hops, list) and len(hops) > 2:
            transit = str(hops[1])
        relay = relay_of.get((a, b))
        seen = live_paths.pop((a, b), None)
        tooltip = f"{a} -- {b}: planned {mode}" + ("" if seen is None else f", live {seen}")
        kind: str
        if seen is None:
            if mode == "none":
                continue  # different parts of the mesh: nothing to draw
            kind = "via" if mode.startswith("via ") else mode
        elif seen == "direct":
            kind = "punched" if mode == "punch" else "direct"
        else:
            kind = seen
        if kind not in EDGE_STYLES:
            raise GraphError(f"{where}: {a} -- {b}: mode {mode!r} is not one this graph draws")
        if kind == "via":
            label = f"via {transit}" if transit else "via"
        elif kind == "relay":
            label = relay or "relay"
        elif kind == "relay-tcp":
            label = f"{relay or 'relay'} (TLS)"
        elif kind == "punch":
            label = f"punch ({relay})" if relay else "punch"
        elif kind == "punched":
            label = "punched"
        else:
            label = ""
        edges.append(_Edge(a, b, kind, label, tooltip))
    if live_paths:
        a, b = min(live_paths)
        raise GraphError(f"live view: {a} -- {b} is not a pair of the plan")
    edges.sort(key=lambda e: (e.a, e.b))
    return edges


def _relays(plan: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every relay the plan names (its relays and allocations) -> its addresses."""
    relays: dict[str, set[str]] = {}
    for name, relay in _mapping(plan, "relays", "plan").items():
        address = relay.get("address") if isinstance(relay, Mapping) else None
        relays[name] = {address} if isinstance(address, str) else set()
    for allocation in _list(plan, "allocations", "plan"):
        if isinstance(allocation, Mapping) and isinstance(allocation.get("relay"), str):
            address = allocation.get("address")
            relays.setdefault(allocation["relay"], set())
            if isinstance(address, str):
                relays[allocation["relay"]].add(address)
    return {name: sorted(relays[name]) for name in sorted(relays)}


def _legend(lines: list[str]) -> None:
    """The legend cluster: a sample of each node kind and each edge kind.

    With rankdir=LR a rank is a column: one column holds every line's left end, the next the
    node samples and every line's words (a plaintext node, not an edge label: labels become
    nodes of their own and would spread the lines apart). With no edge crossing, dot keeps
    the written order; invisible edges to force it would be flat edges, which dot spaces a rank
    apart.
    """
    lines.append("  subgraph cluster_legend {")
    lines.append(
        "    graph "
        + _attrs(label=("legend",), style="rounded", color="#bbbbbb", fontname=_FONT, fontsize="11")
    )
    lines.append("    node " + _attrs(shape="point", width="0.06", color="#888888"))
    ends: list[str] = []
    words: list[str] = []
    for nat_class, colour in NAT_COLOURS.items():
        node = f"legend:nat:{nat_class}"
        box = _attrs(
            label=("site", nat_class),
            shape="box",
            style="rounded,filled",
            fillcolor=colour,
            fontsize="10",
            height="0.3",
        )
        lines.append(f"    {_quote(node)} {box}")
        words.append(node)
    relay = _attrs(
        label=("relay",),
        shape="hexagon",
        style="filled",
        fillcolor=_RELAY_COLOUR,
        fontsize="10",
        height="0.3",
    )
    lines.append(f"    {_quote('legend:node:relay')} {relay}")
    words.append("legend:node:relay")
    for kind, style in EDGE_STYLES.items():
        end, text = f"legend:edge:{kind}:end", f"legend:edge:{kind}"
        ends.append(end)
        words.append(text)
        lines.append(
            f"    {_quote(text)} "
            + _attrs(label=(style.legend,), shape="plaintext", fontsize="10", height="0.25")
        )
        lines.append(
            f"    {_quote(end)} -- {_quote(text)} "
            + _attrs(style=style.style, color=style.colour, penwidth=style.penwidth)
        )
    for column in (ends, words):
        lines.append("    { rank=same; " + " ".join(f"{_quote(n)};" for n in column) + " }")
    lines.append("  }")


def to_dot(
    plan: Mapping[str, Any],
    nat_classes: Mapping[str, str | None] | None = None,
    live: LiveView | None = None,
) -> str:
    """The plan as Graphviz DOT text, byte-identical for the same input.

    ``plan``: the dict of a plan file (``Plan.to_dict()``). ``nat_classes``: site -> NAT class
    (from the state file; a site left out is drawn without one). ``live``: pair -> what the
    live mesh does; it overrides the planned mode of those pairs (a punch pair seen direct is
    "punched"). :class:`GraphError` names what is malformed.
    """
    if not isinstance(plan, Mapping):
        raise GraphError(f"plan: not a JSON object but {type(plan).__name__}")
    sites = sorted(_mapping(plan, "sites", "plan"))
    unreachable = _mapping(plan, "unreachable", "plan")
    classes = dict(nat_classes or {})
    edges = _edges(plan, sites, live or {})
    overlay = plan.get("overlay_network")
    heading = "meshwright mesh" + (f" {overlay}" if isinstance(overlay, str) else "")
    if live is not None:
        heading += " (live)"
    lines = [
        "graph mesh {",
        "  graph "
        + _attrs(
            label=(heading,),
            labelloc="t",
            fontname=_FONT,
            fontsize="14",
            rankdir="LR",
            nodesep="0.4",
            ranksep="1.0",
        ),
        "  node " + _attrs(fontname=_FONT, fontsize="11"),
        "  edge " + _attrs(fontname=_FONT, fontsize="9"),
    ]
    for name in sites:
        nat_class = classes.get(name)
        parts = [name] + ([nat_class] if nat_class else [])
        style = "rounded,filled"
        if name in unreachable:
            parts.append("unreachable")
            style += ",dashed"
        lines.append(
            f"  {_quote('site:' + name)} "
            + _attrs(
                label=tuple(parts),
                shape="box",
                style=style,
                fillcolor=NAT_COLOURS.get(nat_class or "", _UNKNOWN_COLOUR),
                tooltip=f"site {name}" + (f": {unreachable[name]}" if name in unreachable else ""),
            )
        )
    for name, addresses in _relays(plan).items():
        lines.append(
            f"  {_quote('relay:' + name)} "
            + _attrs(
                label=(name, *addresses),
                shape="hexagon",
                style="filled",
                fillcolor=_RELAY_COLOUR,
                tooltip=f"relay {name}",
            )
        )
    for edge in edges:
        drawn = EDGE_STYLES[edge.kind]
        attrs = {
            "style": drawn.style,
            "color": drawn.colour,
            "penwidth": drawn.penwidth,
            "tooltip": edge.tooltip,
        }
        if edge.kind == "via":
            attrs["fontcolor"] = drawn.colour
        label = (edge.label,) if edge.label else ()
        lines.append(
            f"  {_quote('site:' + edge.a)} -- {_quote('site:' + edge.b)} " + _attrs(label, **attrs)
        )
    _legend(lines)
    lines.append("}")
    return "\n".join(lines) + "\n"
