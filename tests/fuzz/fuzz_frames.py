"""Fuzz target: the TLS relay's frames (meshwright.wire.frames), a byte stream cut anywhere.

    .venv/bin/python tests/fuzz/fuzz_frames.py CORPUS_DIR [libFuzzer flags]

Input: one byte (bits 0-1: the decoder's max_payload; bits 2-5: how many chunk sizes follow;
bit 6: feed bytearrays and scribble on them afterwards, as a recv_into caller reusing its
buffer would), the chunk sizes (one byte each), then the stream.

Invariants:

* feed returns frames or raises FrameError, nothing else; after FrameError every feed raises
  it again (with no frames);
* the stream fed in the chosen chunks gives the same frames, the same error or not, and the
  same buffered tail as fed whole; frames are copies, untouched when the caller reuses its
  buffer;
* re-encoding the frames gives back exactly the stream up to the last complete frame; every
  payload is 1..max_payload bytes; what stays buffered is less than one frame; on an error
  the next header really has a bad length;
* could_be_tls of every prefix agrees with looks_like_tls (for three bytes or more) and never
  says no to a prefix of a TLS header; looks_like_stun accepts every STUN message the codec
  accepts.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.wire import stun
    from meshwright.wire.frames import (
        HEADER_SIZE,
        MAX_PAYLOAD,
        FrameDecoder,
        FrameError,
        could_be_tls,
        encode,
        looks_like_stun,
        looks_like_tls,
    )

from harness import chunks, fuzz

MAX_PAYLOADS = (MAX_PAYLOAD, 1, 16, 300)
Frames = list[tuple[int, bytes]]


def chunk_size(value: int) -> int:
    # Mostly small pieces (1-128 bytes), some up to two whole frames (16-2048 in steps of 16).
    return value + 1 if value < 128 else (value - 127) * 16


def feed_whole(stream: bytes, max_payload: int) -> tuple[Frames, bool, int]:
    decoder = FrameDecoder(max_payload)
    try:
        return decoder.feed(stream), False, decoder.buffered
    except FrameError as error:
        return error.frames, True, 0


def feed_chunked(pieces: list[bytes], max_payload: int, scribble: bool) -> tuple[Frames, bool, int]:
    decoder = FrameDecoder(max_payload)
    assert decoder.feed(b"") == []
    frames: Frames = []
    for piece in pieces:
        reused = bytearray(piece)
        try:
            got = decoder.feed(reused if scribble else piece)
        except FrameError as error:
            frames += error.frames
            try:
                decoder.feed(b"\x00\x01\x00\x01x")
            except FrameError as again:
                assert again.frames == []
            else:
                raise AssertionError("a failed decoder accepted more") from None
            return frames, True, 0
        if scribble:
            reused[:] = b"\xee" * len(reused)
        frames += got
        # Whatever stays buffered is less than one whole frame.
        assert decoder.buffered < HEADER_SIZE + max_payload
    return frames, False, decoder.buffered


def check_sniffing(stream: bytes) -> None:
    head = stream[:8]
    tls = looks_like_tls(head)
    for size in range(len(head) + 1):
        prefix = head[:size]
        if size >= 3:
            assert could_be_tls(prefix) == looks_like_tls(prefix)
        if tls:
            assert could_be_tls(prefix)
        if size and not could_be_tls(prefix[:-1]):
            assert not could_be_tls(prefix), "a prefix ruled out TLS, a longer one did not"
    try:
        stun.decode(stream)
    except stun.StunError:
        return
    assert looks_like_stun(stream)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    setup = data[0]
    max_payload = MAX_PAYLOADS[setup & 3]
    count = setup >> 2 & 0x0F
    sizes = [chunk_size(b) for b in data[1 : 1 + count]]
    stream = data[1 + count :]
    check_sniffing(stream)

    whole, whole_failed, whole_buffered = feed_whole(stream, max_payload)
    pieces, failed, buffered = feed_chunked(chunks(stream, sizes), max_payload, bool(setup & 0x40))
    assert pieces == whole, "chunking changed the frames"
    assert (failed, buffered) == (whole_failed, whole_buffered)

    assert all(0 < len(payload) <= max_payload for _, payload in whole)
    consumed = b"".join(encode(port, payload) for port, payload in whole)
    assert stream.startswith(consumed)
    rest = stream[len(consumed) :]
    if failed:
        size = int.from_bytes(rest[2:4], "big")
        assert len(rest) >= HEADER_SIZE and not 0 < size <= max_payload
    else:
        assert len(rest) == buffered
        assert len(rest) < HEADER_SIZE or len(rest) < HEADER_SIZE + int.from_bytes(rest[2:4], "big")


if __name__ == "__main__":
    fuzz(TestOneInput)
