"""Fuzz target: WG-STUN on a relay (meshwright.relay.wgstun.WgStunAnswerer.handle), which
decodes STUN requests that sites send it through their tunnels.

    .venv/bin/python tests/fuzz/fuzz_wgstun.py CORPUS_DIR [libFuzzer flags]

Input: one flags byte (bits 0-2 repair the datagram as in harness.repair_stun; bits 3-4 pick
who asks: a site with other mappings, an IPv6 one, a peer without an endpoint yet, or an
overlay address that is no peer's), then the datagram.

Invariants:

* handle returns bytes or None and raises nothing; exactly one counter moves;
* it answers exactly the well-formed Binding requests (as the codec decodes them);
* an answer decodes, is a Binding response with the request's transaction id and a matching
  FINGERPRINT; a success carries the asker's WireGuard endpoint as XOR-MAPPED-ADDRESS and its
  other confirmed mappings (at most MAX_ALSO) as ALSO-MAPPED; an unknown asker gets 404;
  answers stay under 512 bytes, whatever the request's size.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.relay.wgstun import MAX_ALSO, WgStunAnswerer
    from meshwright.wire import stun

from harness import fuzz, repair_stun

KEY_A, KEY_B, KEY_C = "A" * 43 + "=", "B" * 43 + "=", "C" * 43 + "="
PEERS = {
    "10.99.0.2": (KEY_A, ("198.51.100.21", 51830)),
    "fd99::3": (KEY_B, ("2001:db8::22", 51820)),
    "10.99.0.4": (KEY_C, None),
}
# Site A has more mappings than an answer carries, to check the cut (one relay's state holds
# one per site; several entries with A's key stand for what a NAT's many mappings would give).
STATE = {
    "sites": {
        f"a{n}": {"port": 40020 + n, "public_key": KEY_A, "confirmed": ["198.51.100.21", 50000 + n]}
        for n in range(MAX_ALSO + 3)
    }
    | {"b": {"port": 40019, "public_key": KEY_B, "confirmed": ["2001:db8::22", 51820]}}
}
ASKERS = (("10.99.0.2", 40000), ("fd99::3", 40000), ("10.99.0.4", 40000), ("10.99.0.9", 40000))
ENDPOINTS = {"10.99.0.2": ("198.51.100.21", 51830), "fd99::3": ("2001:db8::22", 51820)}

ANSWERER = WgStunAnswerer()
ANSWERER.update(PEERS, STATE)
ALSO = tuple(("198.51.100.21", 50000 + n) for n in range(MAX_ALSO))
assert ANSWERER.also["10.99.0.2"][:MAX_ALSO] == ALSO


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    flags, datagram = data[0], repair_stun(data[0], data[1:])
    asker = ASKERS[flags >> 3 & 3]
    before = dict(ANSWERER.counters)

    answer = ANSWERER.handle(datagram, asker)

    moved = {k: v - before.get(k, 0) for k, v in ANSWERER.counters.items()}
    moved = {k: v for k, v in moved.items() if v}
    try:
        request = stun.decode(datagram)
    except stun.StunError:
        request = None
    if request is None or request.method != stun.BINDING or request.cls != stun.REQUEST:
        assert answer is None
        reason = "dropped_malformed" if request is None else "dropped_not_binding_request"
        assert moved == {reason: 1}, moved
        return
    assert answer is not None and len(answer) < 512
    message = stun.decode(answer)
    assert message.transaction_id == request.transaction_id
    assert message.method == stun.BINDING
    assert message.attributes[-1].type == stun.FINGERPRINT
    endpoint = ENDPOINTS.get(asker[0])
    if endpoint is None:
        assert moved == {"unknown_peer": 1}, moved
        assert message.cls == stun.ERROR_RESPONSE
        code = message.error_code()
        assert code is not None and code[0] == 404
        return
    assert moved == {"answered": 1}, moved
    assert message.cls == stun.SUCCESS_RESPONSE
    assert message.xor_mapped_address() == endpoint
    assert message.also_mapped() == (ALSO if asker[0] == "10.99.0.2" else ())


if __name__ == "__main__":
    fuzz(TestOneInput)
