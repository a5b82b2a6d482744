"""A hung PACS for SR delivery tests: a real socket that accepts and never answers, until it relays."""

from __future__ import annotations

import socket
import threading


class SwitchablePeer:
    """A TCP listener in front of a PACS: "silent" accepts and never answers (a hung PACS);
    "forward" relays the bytes to a real DICOM port (the PACS is back)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.target: int | None = None
        self.accepted = 0
        self.connected = threading.Event()  # a first connection was accepted
        self.closed_by_client = threading.Event()  # a silent connection was closed by its client
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self.connected.set()
            self.sockets.append(conn)
            if self.target is None:
                threading.Thread(target=self._drain, args=(conn,), daemon=True).start()
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.sockets.append(upstream)
                threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()
                threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        """Read (and ignore) what the client sends; note when it gives up and closes."""
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        self.closed_by_client.set()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()
