"""Fuzz target: STUN over TCP, the relay's reassembly of a byte stream into requests
(meshwright.relay.stun_server.StunStreams._feed), with no socket: the connection is a stand-in
that records what is sent and whether it was closed.

    .venv/bin/python tests/fuzz/fuzz_stun_tcp.py CORPUS_DIR [libFuzzer flags]

Input: one byte (bits 0-3: how many chunk sizes follow), the chunk sizes (one byte each:
1-128, or 16-2048 in steps of 16, as recv() may return), then the stream.

Invariants:

* feeding never raises, and the responder never fails inside it (internal_errors stays 0);
* the stream fed in the chosen chunks gets the same answers, and the connection the same fate,
  as fed whole;
* those answers are what a model written here predicts: walking the stream by the headers'
  length fields, one answer per complete message that the codec decodes as a Binding request,
  and the connection closed (counted as tcp_dropped) at the first header without the cookie,
  with a leading bit set or longer than the server's buffer;
* an open connection never buffers a whole buffer's worth;
* every answer is an RFC 8489 message (TCP has no RFC 3489) for the request's transaction id.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["meshwright"]):
    from meshwright.relay import stun_server
    from meshwright.relay.stun_server import StunResponder, StunStreams, StunTcpClient
    from meshwright.wire import stun

from harness import MAGIC_COOKIE, STUN_HEADER_SIZE, chunks, fuzz

MAX_BUFFER = stun_server._TCP_MAX_BUFFER
PEER = ("198.51.100.7", 40000)
LOCAL = ("192.0.2.1", 443)
RESPONDER = StunResponder(["192.0.2.1", "192.0.2.2"], rate=1e12, burst=1e12, clock=lambda: 0.0)


class Connection:
    """Stands in for the accepted socket: records answers and closing."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False

    def sendall(self, data: bytes) -> None:
        assert not self.closed
        self.sent.append(bytes(data))

    def close(self) -> None:
        self.closed = True


class NoSelector:
    """The connection was never registered with a real selector: nothing to unregister."""

    def unregister(self, _fileobj: object) -> None:
        return None


def feed(pieces: list[bytes]) -> tuple[list[bytes], bool, dict[str, int]]:
    stats: dict[str, int] = {}
    streams = StunStreams(RESPONDER, NoSelector(), stats, clock=lambda: 0.0)  # type: ignore[arg-type]
    conn = Connection()
    client = StunTcpClient(conn, PEER, LOCAL, bytearray(), 5.0)  # type: ignore[arg-type]
    streams.clients[conn] = client  # type: ignore[index]
    assert streams.slots.take(PEER[0]) is None  # as adopt() does
    for piece in pieces:
        streams._feed(client, piece)
        if conn.closed:
            assert not streams.clients and len(streams.slots) == 0
            break
        assert len(client.buffer) < MAX_BUFFER
    return conn.sent, conn.closed, stats


def model(stream: bytes) -> tuple[list[bytes], bool]:
    """The requests that get an answer, and whether the connection gets closed."""
    answered: list[bytes] = []
    position = 0
    while len(stream) - position >= STUN_HEADER_SIZE:
        header = stream[position : position + STUN_HEADER_SIZE]
        size = STUN_HEADER_SIZE + int.from_bytes(header[2:4], "big")
        if header[0] & 0xC0 or header[4:8] != MAGIC_COOKIE or size > MAX_BUFFER:
            return answered, True
        if len(stream) - position < size:
            break
        message = stream[position : position + size]
        position += size
        try:
            request = stun.decode(message)
        except stun.StunError:
            continue
        if request.cls == stun.REQUEST and request.method == stun.BINDING:
            answered.append(message)
    return answered, False


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    count = data[0] & 0x0F
    sizes = [b + 1 if b < 128 else (b - 127) * 16 for b in data[1 : 1 + count]]
    stream = data[1 + count :]

    sent, closed, stats = feed(chunks(stream, sizes))
    assert (sent, closed) == feed([stream] if stream else [])[:2], "chunking changed the answers"
    assert stats.get("internal_errors", 0) == 0
    assert stats.get("tcp_dropped", 0) == closed
    answered, closes = model(stream)
    assert closed == closes
    assert len(sent) == len(answered)
    for request, answer in zip(answered, sent, strict=True):
        message = stun.decode(answer)  # no classic=True: TCP has no RFC 3489
        assert message.transaction_id == stun.decode(request).transaction_id
        assert message.cls in (stun.SUCCESS_RESPONSE, stun.ERROR_RESPONSE)


if __name__ == "__main__":
    fuzz(TestOneInput)
