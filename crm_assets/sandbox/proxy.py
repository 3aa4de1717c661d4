"""``FlakyProxy``: a loopback TCP proxy in front of the sandbox that drops connections.

Connection-level faults cannot come from the sandbox's ASGI app (uvicorn answers 500 for an app
that fails before responding), so they come from here: the proxy accepts a TCP connection and
closes it at once, before a byte of HTTP is exchanged. The client sees a genuine connection
error (``requests.ConnectionError``), the sandbox never sees the request. After ``drop`` dropped
connections (``None``: all of them) the proxy forwards bytes both ways, unchanged, and keeps a
copy of what clients sent (``sent``: raw HTTP requests, to check what travels on the wire)::

    with FlakyProxy(sandbox.url, drop=1) as proxy:
        ...  # point the sync at proxy.url: its first connection fails, the retry goes through
        assert proxy.dropped == 1

Only loopback: the proxy listens on 127.0.0.1 and forwards to a loopback upstream.

Environment variables: none.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from types import TracebackType
from urllib.parse import urlsplit

_BUFFER = 65536


def _pump(
    source: socket.socket, target: socket.socket, record: Callable[[bytes], None] | None = None
) -> None:
    # Copies until either side closes; then closes both so the other pump ends too.
    try:
        while True:
            chunk = source.recv(_BUFFER)
            if not chunk:
                break
            if record is not None:
                record(chunk)
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class FlakyProxy:
    """TCP proxy to ``upstream_url`` that resets its first ``drop`` connections (None: all)."""

    def __init__(self, upstream_url: str, drop: int | None = 1) -> None:
        parts = urlsplit(upstream_url)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the proxy only forwards to loopback, not {parts.hostname!r}")
        self._upstream = (parts.hostname, parts.port or 80)
        self._scheme = parts.scheme
        self.drop = drop
        self.accepted = 0
        self.dropped = 0
        self._sent = bytearray()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def sent(self) -> bytes:
        """Every byte clients sent through the proxy so far (requests, in arrival order)."""
        with self._lock:
            return bytes(self._sent)

    def _record(self, chunk: bytes) -> None:
        with self._lock:
            self._sent += chunk

    @property
    def url(self) -> str:
        """Base URL of the proxy, e.g. ``http://127.0.0.1:54321``."""
        if self._listener is None:
            raise RuntimeError("the proxy is not running; use `with FlakyProxy(...)`")
        return f"{self._scheme}://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> FlakyProxy:
        """Starts listening on a free loopback port."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="flaky-proxy", daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            with self._lock:
                self.accepted += 1
                drop = self.drop is None or self.dropped < self.drop
                if drop:
                    self.dropped += 1
            if drop:
                # Linger 0: close sends a RST, a reset connection like a crashed load balancer.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pumps = ((client, upstream, self._record), (upstream, client, None))
            for source, target, record in pumps:
                threading.Thread(target=_pump, args=(source, target, record), daemon=True).start()

    def stop(self) -> None:
        """Stops accepting; connections being forwarded end when either side closes."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() wakes the accept() blocked in the serving thread.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FlakyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
