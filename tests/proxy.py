"""A TCP proxy that lets a test decide how far a client gets, whatever the machine's speed.

It passes the server's first `budget` bytes (all connections together) to its clients and
holds the rest until release(). A client streaming through it therefore stops at a point
the test chose rather than at whatever point it had reached when the test got around to
looking. When the server goes away the client's connection is closed, as it would be
without the proxy; the upstream can then be pointed at a new server.
"""

from __future__ import annotations

import contextlib
import socket
import threading

_CHUNK = 64 << 10


class HoldingProxy:
    def __init__(self, upstream: str, budget: int) -> None:
        self.upstream = upstream  # host:port; may change (a restarted server)
        self._budget = budget
        self._released = False
        self._lock = threading.Condition()
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def release(self) -> None:
        """From now on everything passes, held bytes first."""
        with self._lock:
            self._released = True
            self._lock.notify_all()

    def close(self) -> None:
        self.release()
        with self._lock:
            sockets, self._sockets = [self._listener, *self._sockets], []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)))
            except OSError:
                client.close()  # as a refused connection would be
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._up, args=(client, server), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client), daemon=True).start()

    @staticmethod
    def _up(client: socket.socket, server: socket.socket) -> None:
        """Client to server: everything, at once."""
        with contextlib.suppress(OSError):
            while data := client.recv(_CHUNK):
                server.sendall(data)
        _shut(server)

    def _down(self, server: socket.socket, client: socket.socket) -> None:
        """Server to client: a reader that always reads the server (so its going away is
        noticed even while bytes are held) and a sender that passes what the budget allows."""
        held = bytearray()
        ended = False

        def read() -> None:
            nonlocal ended
            with contextlib.suppress(OSError):
                while data := server.recv(_CHUNK):
                    with self._lock:
                        held.extend(data)
                        self._lock.notify_all()
            with self._lock:
                ended = True
                self._lock.notify_all()

        threading.Thread(target=read, daemon=True).start()
        with contextlib.suppress(OSError):
            while True:
                with self._lock:
                    self._lock.wait_for(
                        lambda: ended or (held and (self._released or self._budget > 0))
                    )
                    if ended and not (self._released and held):
                        break  # the server is gone: what it sent and was held is lost
                    n = len(held) if self._released else min(len(held), self._budget)
                    self._budget -= 0 if self._released else n
                    data = bytes(held[:n])
                    del held[:n]
                client.sendall(data)
        _shut(client)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
