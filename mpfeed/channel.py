"""The consumer's end of one pipe (a worker's, or the fork server's): framed messages, never a blocking read.

The other end writes with `multiprocessing.connection.Connection.send_bytes` (a 4-byte big-endian length,
or -1 and an 8-byte one, then the payload). `Connection.recv_bytes` would block until a whole message is
in, with no way out, and two threads reading one connection can split a header from its payload. A
`Channel` is read by one owner only, and reads only what has arrived: whole messages come out, a partial
one waits in the buffer, and a peer that dies mid-message leaves nothing half-delivered.
"""

from __future__ import annotations

import select
import socket
import struct
import time

_SIZE = struct.Struct("!i")
_LONG_SIZE = struct.Struct("!Q")
_READ_BYTES = 1 << 16
_LARGE = 1 << 18  # a message this big is received straight into its own buffer
_SEND_DEADLINE_S = 5.0  # a peer that reads nothing for this long while its pipe is full is stuck


class Channel:
    """Non-blocking framed reads and deadline-bound sends over a connected stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # reads pass MSG_DONTWAIT; sends wait with a deadline
        self.socket = sock
        self.eof = False  # the other end closed (or died)
        self.stuck = False  # a send ran out of time: the stream may hold half a message, so no more sends
        self._buffer = bytearray()
        self._large: bytearray | None = None
        self._large_filled = 0

    def fileno(self) -> int:
        return self.socket.fileno()

    def receive(self) -> list:
        """Every whole message that has arrived (bytes, or a bytearray for a large one); never blocks."""
        messages: list = []
        while not self.eof:
            try:
                if self._large is not None:
                    view = memoryview(self._large)[self._large_filled :]
                    received = self.socket.recv_into(view, len(view), socket.MSG_DONTWAIT)
                    if received:
                        self._large_filled += received
                        if self._large_filled == len(self._large):
                            messages.append(self._large)
                            self._large = None
                            self._parse(messages)
                else:
                    chunk = self.socket.recv(_READ_BYTES, socket.MSG_DONTWAIT)
                    received = len(chunk)
                    if received:
                        self._buffer += chunk
                        self._parse(messages)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # reset, or closed under us
                received = 0
            if not received:
                self.eof = True
        return messages

    def _parse(self, messages: list) -> None:
        buffer = self._buffer
        while len(buffer) >= 4:
            size = _SIZE.unpack_from(buffer)[0]
            header = 4
            if size == -1:
                if len(buffer) < 12:
                    return
                size = _LONG_SIZE.unpack_from(buffer, 4)[0]
                header = 12
            end = header + size
            if len(buffer) >= end:
                messages.append(bytes(buffer[header:end]))
                del buffer[:end]
            elif size >= _LARGE:
                self._large = bytearray(size)
                have = len(buffer) - header
                self._large[:have] = buffer[header:]
                self._large_filled = have
                buffer.clear()
                return
            else:
                return

    def send(self, message: bytes) -> bool:
        """Send one message whole, waiting at most a few seconds for room; False when the peer is gone
        (its end closed) or stuck (reading nothing while its pipe is full)."""
        if self.stuck:
            return False
        size = len(message)
        header = _SIZE.pack(size) if size <= 0x7FFFFFFF else _SIZE.pack(-1) + _LONG_SIZE.pack(size)
        data = memoryview(header + message if size < _LARGE else header)
        deadline = None
        for part in (data,) if size < _LARGE else (data, memoryview(message)):
            while part:
                try:
                    sent = self.socket.send(part, socket.MSG_DONTWAIT)
                    part = part[sent:]
                except (BlockingIOError, InterruptedError):
                    deadline = deadline or time.monotonic() + _SEND_DEADLINE_S
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.stuck = True
                        return False
                    _wait_writable(self.socket, remaining)
                except OSError:
                    return False
        return True

    def close(self) -> None:
        self.eof = True
        self.socket.close()


def _wait_writable(sock: socket.socket, seconds: float) -> None:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    poller.poll(max(1, int(seconds * 1000)))
