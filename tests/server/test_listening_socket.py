"""The servers' pre-bound listening socket: what every accepted connection inherits."""

from __future__ import annotations

import asyncio
import socket

import pytest

from weightsync.server.runner import bind_socket

pytestmark = pytest.mark.timeout(30)


def test_accepted_connections_send_without_nagle_delay() -> None:
    """asyncio (uvicorn's loop) turns on TCP_NODELAY only for sockets whose protocol is
    TCP, and an accepted socket inherits the listening socket's. A socket made without
    it left Nagle on: uvicorn writes a response's head and body separately, so every
    request after the first on a kept-alive connection waited ~40 ms for the client's
    delayed ACK (each hot-load POST, status poll, completion and warmup)."""

    async def accepted_nodelay() -> int:
        sock = bind_socket("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                conn = transport.get_extra_info("socket")
                seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            try:
                return await asyncio.wait_for(seen, 10)
            finally:
                writer.close()

    with bind_socket("127.0.0.1", 0) as listening:
        assert listening.proto == socket.IPPROTO_TCP
    assert asyncio.run(accepted_nodelay()) != 0
