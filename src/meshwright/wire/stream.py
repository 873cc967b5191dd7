"""One non-blocking TLS connection that carries :mod:`.tcp` frames: the I/O both ends share.

The relay's TLS service (:class:`.tls.TlsClients`, the server) and the sidecar
(:mod:`meshwright.site.sidecar`, the client) keep a :class:`FramedStream` per connection, each in a
subclass with its own state. This is how both do the handshake, read, write and ask the
selector for events; what is then closed, counted, logged or retried stays with them:
:meth:`FramedStream.receive` and :meth:`FramedStream.flush` return why a connection has to go
rather than deciding what happens next.

Writes are queued in :attr:`FramedStream.out` by :meth:`FramedStream.queue` and written as
far as the socket takes them by :meth:`FramedStream.flush`, which the owner calls on
``EVENT_WRITE`` (watched while frames wait) or as soon as a full batch (:data:`WRITE_CHUNK`)
is queued: the frames queued in one wake-up of the loop go out in order, in a few TLS records
and one send, not a record and a send per datagram. Reads go straight into the decoder's
buffer. OpenSSL wants a write that failed with WANT_WRITE repeated with the same length, which
:attr:`FramedStream.retry` remembers. A read or the handshake may also have to wait for
writability (a TLS 1.3 key update, a full send buffer): :attr:`FramedStream.read_wants_write`
and :attr:`FramedStream.wants_write` say so, and :meth:`FramedStream.watch` then asks the
selector for ``EVENT_WRITE`` too, which it otherwise does only while writes are pending.

Not thread-safe. Standard library only: copied to relays and sites that have Debian's python3.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
from collections.abc import Callable
from typing import Self

from .frames import HEADER_SIZE, READ_ROOM, FrameDecoder, FrameError, append

__all__ = [
    "FRAME_ERROR",
    "PEER_CLOSED",
    "READ_ERROR",
    "UDP_BUFFER",
    "WRITE_CHUNK",
    "FramedStream",
    "Frames",
    "tune",
    "widen_buffers",
]

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
# At most this much per send: four full TLS records (16 KiB of plaintext each), so a batch
# costs four records' framing and one system call, and waits for no more than itself.
WRITE_CHUNK = 64 * 1024
# UDP has no autotuning: the default (about 208 KiB) holds some 140 full-size datagrams, a
# few milliseconds of a busy tunnel, while the loop serves its other sockets.
UDP_BUFFER = 4 << 20

# Why :meth:`FramedStream.receive` ended: the peer closed the stream (TLS close_notify or EOF),
# the socket or TLS failed, or the stream is not made of frames.
PEER_CLOSED, READ_ERROR, FRAME_ERROR = "peer_closed", "read_error", "frame_error"

Frames = list[tuple[int, bytes]]


def tune(sock: socket.socket, keepalive_idle: int) -> None:
    """Small frames must not wait for Nagle; a dead peer or path must eventually be noticed
    (TCP keepalive after ``keepalive_idle`` seconds of silence).

    The buffer sizes are left to the kernel: TCP autotuning grows them with the connection up to
    ``tcp_rmem``/``tcp_wmem``'s maximum (6 and 4 MiB by default), while a fixed ``SO_RCVBUF``
    or ``SO_SNDBUF`` turns it off and is capped at ``rmem_max``/``wmem_max`` (208 KiB by
    default), which would bound a long path to a few Mbit/s.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive_idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)


def widen_buffers(sock: socket.socket, size: int = UDP_BUFFER) -> None:
    """Give a UDP socket ``size`` bytes of receive and send buffer, best effort: past
    ``rmem_max``/``wmem_max`` when privileged (``SO_*BUFFORCE``, as wireguard-go does), else as
    much as they allow."""
    for forced, plain in (
        (getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
        (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF),
    ):
        for option in (forced, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
            except OSError:
                continue
            break


class FramedStream:
    """A connection's socket (an ``ssl.SSLSocket`` once wrapped) and its stream state.

    Also the selector data the owner registers the socket with: :meth:`watch` passes ``self``.
    """

    __slots__ = ("decoder", "events", "out", "read_wants_write", "retry", "sock", "wants_write")

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock: socket.socket | None = sock
        self.reset_stream()

    def reset_stream(self) -> None:
        """The per-connection state, fresh (the socket is the owner's to set)."""
        self.decoder = FrameDecoder(room=READ_ROOM)
        self.out = bytearray()
        self.retry = 0  # OpenSSL wants a write that hit WANT_WRITE repeated with this length
        self.events = 0  # what the selector watches for now
        self.wants_write = False  # the handshake waits for writability
        self.read_wants_write = False  # a read waits for writability (a TLS 1.3 key update)

    def watch(self, selector: selectors.BaseSelector) -> None:
        """Have ``selector`` watch for reads, and for writes while anything waits for them."""
        wanted = READ
        if self.out or self.wants_write or self.read_wants_write:
            wanted |= WRITE
        if wanted != self.events:
            selector.modify(self.sock, wanted, self)  # type: ignore[arg-type]
            self.events = wanted

    def start_tls(
        self, selector: selectors.BaseSelector, context: ssl.SSLContext, *, server_side: bool
    ) -> OSError | None:
        """Wrap the connected plain socket in TLS (the handshake not yet begun) and have
        ``selector`` watch the wrapped one for reads in its place. On failure the plain socket
        is closed and stays :attr:`sock`; returns that error, or None."""
        sock = self.sock
        assert sock is not None
        # wrap_socket detaches the plain socket (its fileno() becomes -1): unregister it first.
        selector.unregister(sock)
        self.events = 0
        try:
            wrapped = context.wrap_socket(
                sock, server_side=server_side, do_handshake_on_connect=False
            )
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            return exc
        self.sock = wrapped
        selector.register(wrapped, READ, self)
        self.events = READ
        return None

    def handshake(self) -> bool:
        """One step of the TLS handshake: True once it is done, False while it waits for the
        socket (:attr:`wants_write` says which way); otherwise raises what ``do_handshake``
        raises (``ssl.SSLError``, ``OSError``)."""
        sock: ssl.SSLSocket = self.sock  # type: ignore[assignment]
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.wants_write = False
            return False
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return False
        self.wants_write = False
        return True

    def receive(
        self,
        budget: int,
        on_data: Callable[[Self, int], object],
        on_frames: Callable[[Self, Frames], bool],
    ) -> tuple[str, Exception | None] | None:
        """Read until OpenSSL has nothing more, or ``budget`` reads (the next wake-up goes on).

        Every read's size goes to ``on_data(self, size)``, then the frames it completed to
        ``on_frames(self, frames)``, which returns whether to go on reading (False: the owner
        closed the connection). Returns None when the connection stays; else why it has to be
        closed: ``(PEER_CLOSED, None)``, ``(READ_ERROR, the error)`` or ``(FRAME_ERROR, the
        FrameError)``, whose ``frames`` (the good ones before the bad) were not yet delivered.
        """
        sock: ssl.SSLSocket = self.sock  # type: ignore[assignment]
        decoder = self.decoder
        self.read_wants_write = False
        reads = 0
        while True:
            try:
                # Straight into the decoder's buffer, behind the partial frame it holds.
                size = sock.recv_into(decoder.space())
            except ssl.SSLWantReadError:
                return None
            except ssl.SSLWantWriteError:
                self.read_wants_write = True
                return None
            except ssl.SSLZeroReturnError:
                return PEER_CLOSED, None
            except (ssl.SSLError, OSError) as exc:
                return READ_ERROR, exc
            if not size:
                return PEER_CLOSED, None
            on_data(self, size)
            try:
                frames = decoder.commit(size)
            except FrameError as exc:
                return FRAME_ERROR, exc
            if not on_frames(self, frames):
                return None
            reads += 1
            # Plaintext already decrypted inside OpenSSL raises no readiness event: drain it.
            if reads >= budget and not sock.pending():
                return None

    def queue(
        self,
        port: int,
        payload: bytes | bytearray | memoryview,
        limit: int,
        selector: selectors.BaseSelector,
    ) -> bool:
        """Append a frame (port and size already checked) to :attr:`out` of an open connection,
        unless that would make it longer than ``limit`` bytes: then False, and the frame is
        dropped (never reordered). Nothing is written here: ``selector`` watches for
        ``EVENT_WRITE``, on which the owner calls :meth:`flush` for all that this wake-up
        queued; or sooner, when :attr:`batch_full`."""
        out = self.out
        if len(out) + HEADER_SIZE + len(payload) > limit:
            return False
        append(out, port, payload)
        if not self.events & WRITE:
            self.watch(selector)
        return True

    @property
    def batch_full(self) -> bool:
        """Whether a full write (:data:`WRITE_CHUNK`) is queued and may go now; a write that
        waits for the socket (:attr:`retry`) goes on the writable event instead."""
        return len(self.out) >= WRITE_CHUNK and not self.retry

    def flush(self, selector: selectors.BaseSelector) -> OSError | None:
        """Write from :attr:`out` until it is empty or the socket takes no more, then
        :meth:`watch`; returns the error that ended the connection (nothing watched), or None."""
        out = self.out
        sock = self.sock
        if sock is None:
            return None
        while out:
            size = self.retry or min(len(out), WRITE_CHUNK)
            view = memoryview(out)
            chunk = view[:size]
            try:
                sent = sock.send(chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                self.retry = size
                break
            except (ssl.SSLError, OSError) as exc:
                return exc
            finally:
                chunk.release()
                view.release()
            self.retry = 0
            del out[:sent]  # O(1): bytearray deletes from the front by moving its start
        self.watch(selector)
        return None
