"""Fuzz target: the sidecar's control messages and path probes
(meshwright.site.sidecar.messages).

    .venv/bin/python tests/fuzz/fuzz_sidecar_messages.py CORPUS_DIR [libFuzzer flags]

Input: one selector byte, then the datagram. An even selector feeds it to decode_control; an
odd one to the probe decoders, as it came (its MAC only verifies by a 2**-128 chance) and,
when bit 1 is set, with the MAC a sidecar holding the session key would have put on it, so
that the fuzzer gets past authentication to the body parser.

Invariants:

* decode_control, decode_probe and probe_session raise MessageError (a ValueError) and nothing
  else;
* whatever decode_control accepts, encode_control writes as JSON that decode_control accepts
  as an equal message;
* a probe that decodes is the one probe_session finds the session of, and encode_probe gives
  back its bytes exactly; it does not decode under another key.
"""

from __future__ import annotations

import hashlib
import hmac

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.site.sidecar.messages import (
        MAC_SIZE,
        MessageError,
        decode_control,
        decode_probe,
        encode_control,
        encode_probe,
        probe_session,
    )

from harness import fuzz

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def sign(body: bytes) -> bytes:
    # HMAC-SHA256 cut to 16 bytes, written from the format's description, not the module.
    return body + hmac.new(KEY, body, hashlib.sha256).digest()[:MAC_SIZE]


def check_control(datagram: bytes) -> None:
    try:
        message = decode_control(datagram)
    except MessageError:
        return
    again = encode_control(message)
    assert decode_control(again) == message, (datagram, again)


def check_probe(datagram: bytes) -> None:
    session = probe_session(datagram)
    try:
        probe = decode_probe(datagram, KEY)
    except MessageError:
        return
    assert session == probe.session
    assert encode_probe(probe, KEY) == datagram
    try:
        decode_probe(datagram, OTHER_KEY)
    except MessageError:
        pass
    else:
        raise AssertionError("a probe verified under the wrong key")


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    selector, datagram = data[0], data[1:]
    if selector & 1 == 0:
        check_control(datagram)
        return
    check_probe(datagram)
    if selector & 2:
        check_probe(sign(datagram))


if __name__ == "__main__":
    fuzz(TestOneInput)
