"""A small TCP proxy on 127.0.0.1 that a test controls, to inject network faults between a client and a server.

Usage::

    with FaultProxy("127.0.0.1", 5432) as proxy:
        url = f"postgresql://postgres@{proxy.host}:{proxy.port}/test"
        ...                      # traffic is forwarded to 127.0.0.1:5432
        proxy.cut()              # reset every open connection (new ones still work)
        proxy.refuse()           # reset every open connection and refuse new ones (port closed)
        proxy.blackhole()        # accept new connections, forward nothing in either direction
        proxy.delay(0.2)         # forward, but hold every chunk 0.2 s in each direction
        proxy.restore()          # back to plain forwarding, on the same port

Modes (``proxy.mode``): ``"forward"``, ``"refuse"``, ``"blackhole"``. ``delay`` applies in ``"forward"``.
``blackhole`` also stalls the connections that were already open (their bytes are dropped), like a
network partition; ``restore`` does not revive them, so a client should reconnect.

The proxy runs on daemon threads and stops by itself: on ``stop()``, on leaving the ``with`` block,
when the process exits, or after ``max_lifetime`` seconds (default 600), whichever comes first.
Everything here is standard library; it is safe to use from several threads.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from types import TracebackType

__all__ = ["FaultProxy"]

_CHUNK = 65536
_TICK = 0.05  # how often threads look at the mode and the stop flag


def _hard_close(sock: socket.socket) -> None:
    """Close with SO_LINGER 0 so that the peer sees a reset, not a clean end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _Link:
    """One accepted client connection and its upstream connection, pumped by two threads."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self.stalled = False  # set when blackholed: never forwards again

    def start(self) -> None:
        threading.Thread(target=self._run, name="faultproxy-link", daemon=True).start()

    def _run(self) -> None:
        try:
            self.upstream = socket.create_connection(self.proxy.target, timeout=5.0)
        except OSError:
            self.close()
            return
        self.upstream.settimeout(None)
        if self.closed.is_set():  # cut while we were connecting
            _hard_close(self.upstream)
            return
        threading.Thread(target=self._pump, args=(self.upstream, self.client), daemon=True).start()
        self._pump(self.client, self.upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                try:
                    ready, _, _ = select.select([src], [], [], _TICK)
                except (OSError, ValueError):
                    break
                if not ready:
                    continue
                try:
                    data = src.recv(_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                mode, delay = self.proxy._state()
                if mode == "blackhole" or self.stalled:
                    self.stalled = True
                    continue  # drop: the peer waits forever, as behind a partition
                if delay > 0:
                    deadline = time.monotonic() + delay
                    while not self.closed.is_set() and time.monotonic() < deadline:
                        time.sleep(min(_TICK, max(0.0, deadline - time.monotonic())))
                try:
                    dst.sendall(data)
                except OSError:
                    break
        finally:
            self.close(graceful=not self.closed.is_set())

    def close(self, *, graceful: bool = False) -> None:
        """End both sides: a reset unless ``graceful`` (one side ended cleanly, pass the end on)."""
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            if s is None:
                continue
            if graceful:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
            else:
                _hard_close(s)
        self.proxy._forget(self)


class FaultProxy:
    """Forward TCP connections from ``127.0.0.1:<port>`` to ``target_host:target_port``, with faults on demand.

    ``port`` is chosen by the system unless ``listen_port`` is given; it stays the same across
    ``refuse()``/``restore()``. The proxy starts at construction.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_lifetime: float = 600.0,
    ) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self._lock = threading.Lock()
        self._mode = "forward"
        self._delay = 0.0
        self._links: set[_Link] = set()
        self._stopped = threading.Event()
        self._released = threading.Event()
        self._listener: socket.socket | None = self._listen(listen_port)
        self.port: int = self._listener.getsockname()[1]
        self._deadline = time.monotonic() + max_lifetime
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    # ---------------------------------------------------------------- control

    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` that clients should connect to."""
        return (self.host, self.port)

    @property
    def mode(self) -> str:
        """``"forward"``, ``"refuse"`` or ``"blackhole"``."""
        return self._mode

    @property
    def connections(self) -> int:
        """How many client connections are open through the proxy now."""
        with self._lock:
            return len(self._links)

    def cut(self) -> None:
        """Reset every open connection (both sides see a reset). New connections are still forwarded."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    def refuse(self) -> None:
        """Cut every open connection and refuse new ones (the port is closed) until ``restore()``."""
        with self._lock:
            self._mode = "refuse"
        self._close_listener()
        self.cut()

    def blackhole(self) -> None:
        """Accept new connections but forward nothing; open connections stall too. Undo with ``restore()``."""
        with self._lock:
            self._mode = "blackhole"

    def delay(self, seconds: float) -> None:
        """Hold every forwarded chunk for ``seconds`` (0 turns the delay off)."""
        if seconds < 0:
            raise ValueError("delay must not be negative")
        with self._lock:
            self._delay = float(seconds)

    def restore(self) -> None:
        """Plain forwarding again, on the same port, without delay. Stalled connections stay stalled."""
        with self._lock:
            self._delay = 0.0
            self._mode = "forward"
            if self._listener is None and not self._stopped.is_set():
                self._listener = self._listen(self.port)

    def stop(self) -> None:
        """Close the port and reset every connection. Idempotent."""
        self._stopped.set()
        self._close_listener()
        self.cut()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            self._released.clear()
        if listener is None:
            return
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the accept loop's select
        with contextlib.suppress(OSError):
            listener.close()
        # The kernel keeps the port open while a select() still holds the socket: wait for the
        # accept loop to let go, so that the port is really closed when refuse() returns.
        if threading.current_thread().name != "faultproxy-accept":
            self._released.wait(1.0)

    def _listen(self, port: int) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, port))
        s.listen(128)
        s.setblocking(False)
        return s

    def _state(self) -> tuple[str, float]:
        with self._lock:
            return self._mode, self._delay

    def _forget(self, link: _Link) -> None:
        with self._lock:
            self._links.discard(link)

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            if time.monotonic() > self._deadline:
                self.stop()
                return
            with self._lock:
                listener = self._listener
            if listener is None:
                self._released.set()
                time.sleep(_TICK)
                continue
            try:
                ready, _, _ = select.select([listener], [], [], _TICK)
            except (OSError, ValueError):  # closed under us by refuse()/stop()
                continue
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except (BlockingIOError, OSError):
                continue
            client.setblocking(True)
            mode, _ = self._state()
            if mode == "refuse" or self._stopped.is_set():
                _hard_close(client)
                continue
            link = _Link(self, client)
            with self._lock:
                self._links.add(link)
            if mode == "blackhole":
                link.stalled = True
                threading.Thread(target=self._hold, args=(link,), daemon=True).start()
                continue
            link.start()

    def _hold(self, link: _Link) -> None:
        """A blackholed connection: read and drop what the client sends until it or the proxy ends it."""
        while not link.closed.is_set() and not self._stopped.is_set():
            try:
                ready, _, _ = select.select([link.client], [], [], _TICK)
                if ready and not link.client.recv(_CHUNK):
                    break
            except (OSError, ValueError):
                break
        link.close()
