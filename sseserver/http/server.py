"""The listening server: sockets, signals, the connection registry and phased shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from ..config import Config
from ..wire.sse import encode_retry
from .protocol import App, HTTPProtocol, ServerState

log = logging.getLogger("sseserver")

Hook = Callable[[], Awaitable[None]]


class Server:
    """Serves ``app`` on ``config.host:config.port`` until told to stop."""

    def __init__(
        self,
        config: Config,
        app: App,
        *,
        on_startup: Hook | None = None,
        on_shutdown: Hook | None = None,
    ) -> None:
        self.config = config
        self.state = ServerState(config, app)
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._servers: list[asyncio.Server] = []
        self._stop: asyncio.Event | None = None
        self.sockets: list[socket.socket] = []

    @property
    def port(self) -> int:
        return int(self.sockets[0].getsockname()[1])

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        state = self.state
        if self._on_startup is not None:
            await self._on_startup()
        if sock is not None:
            server = await loop.create_server(lambda: HTTPProtocol(state), sock=sock, backlog=4096)
        else:
            server = await loop.create_server(
                lambda: HTTPProtocol(state),
                host=self.config.host,
                port=self.config.port,
                reuse_port=self.config.workers > 1,
                backlog=4096,
            )
        self._servers.append(server)
        self.sockets = [s for srv in self._servers for s in (srv.sockets or ())]
        state.streams.start(loop)
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def serve(self, sock: socket.socket | None = None, *, signals: bool = True) -> int:
        """Start, wait for SIGTERM/SIGINT (or ``request_stop``), shut down; exit code."""
        await self.start(sock)
        loop = asyncio.get_running_loop()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        host, port = self.sockets[0].getsockname()[:2]
        log.info("listening on http://%s:%s", host, port)
        assert self._stop is not None
        await self._stop.wait()
        log.info("shutting down")
        await self.shutdown()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return 0

    async def shutdown(self) -> None:
        """Phases: stop accepting; ask streams to reconnect elsewhere; let generations
        finish within the grace period; cancel what is left, ending every body cleanly."""
        state = self.state
        config = self.config
        # 1. Stop accepting; idle keep-alive connections close now.
        state.shutting_down = True
        for server in self._servers:
            server.close()
        for connection in list(state.connections):
            connection.shutdown()
        # 2. Tell every open stream where it stands: reconnect (elsewhere) after retry_ms.
        state.streams.broadcast(encode_retry(config.retry_ms))
        if self._on_shutdown is not None:
            try:
                # The hook spends the grace period itself, then cancels what is left:
                # the margin lets its cancellations finish instead of cutting them off.
                await asyncio.wait_for(self._on_shutdown(), config.shutdown_grace_s + 5.0)
            except (TimeoutError, Exception):
                log.exception("shutdown hook failed")
        # 3. Let running handlers finish within the grace period.
        pending = {t for t in state.handlers if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=config.shutdown_grace_s)
        # 4. Cancel what is left; each handler ends its body with the chunked terminator.
        for task in pending:
            task.cancel(msg="server shutting down")
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        state.streams.close_all("shutdown")
        state.streams.stop()
        # 5. Give the kernel a moment to flush what was written, then close the rest.
        for _ in range(20):
            if not state.connections:
                break
            await asyncio.sleep(0.05)
        for connection in list(state.connections):
            connection.close_connection(abort=True)
        for server in self._servers:
            await server.wait_closed()
