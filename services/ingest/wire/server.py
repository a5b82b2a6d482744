"""pynetdicom's threaded association server, with TCP_NODELAY, a bound on connections that have not
asked to associate yet, and one shared copy of the supported presentation contexts."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts. pynetdicom deep-copies them for every new
    association (RequestHandler._create_association): ~11 ms of CPU per association for our ~150
    storage classes x 14 transfer syntaxes (measured: 31 -> 20 ms per association + image). Negotiation
    only reads them (presentation.negotiate_as_acceptor builds new result contexts) and no handler of
    ours changes them, so each association gets a new list of the same context objects."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GuardedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer + TCP_NODELAY + a bound on connections still waiting to associate."""

    max_pending = 16
    shared_socket: socket.socket | None = None  # set by sharing(): a listening socket of several processes

    @classmethod
    def sharing(cls, sock: socket.socket) -> type[GuardedServer]:
        """This server class accepting from an already listening (non-blocking) socket that other
        worker processes accept from too: a worker that loses the race gets EAGAIN, which
        socketserver ignores, and waits for the next connection."""
        return type("SharedGuardedServer", (cls,), {"shared_socket": sock})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: dict[socket.socket, tuple[float, str]] = {}
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)

    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.shared_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared_socket is None:
            super().server_activate()  # a shared socket is listening already

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.setblocking(True)  # the shared listening socket is non-blocking; the connection is not
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        evict: list[tuple[socket.socket, str]] = []
        with self._pending_lock:
            for sock in [s for s in self._pending if s.fileno() < 0]:
                del self._pending[sock]
            while len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda s: self._pending[s][0])
                evict.append((oldest, self._pending.pop(oldest)[1]))
            self._pending[request] = (time.monotonic(), peer)
        for sock, who in evict:
            log.warning(
                "connection closed: no association request while others wait",
                extra={"peer": who, "pending_limit": self.max_pending},
            )
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True

    def requested(self, sock: socket.socket | None) -> None:
        """The connection sent its A-ASSOCIATE-RQ: it no longer counts as pending."""
        if sock is not None:
            with self._pending_lock:
                self._pending.pop(sock, None)

    def pending_count(self) -> int:
        with self._pending_lock:
            return sum(1 for s in self._pending if s.fileno() >= 0)
