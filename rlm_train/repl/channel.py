"""A session's channel driven by an event loop: the worker's frames read and the host's
written as the descriptors become ready, so a cell run from a coroutine
(`REPLSession.execute_async`) costs no thread. The frames and their checks are
`protocol`'s; what differs from the blocking calls there is only how a side waits.

Every wait is bounded by the caller's deadline (FrameTimeout), registers its descriptors
with the loop only while it waits, and unregisters them however it ends (cancelled too).
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Awaitable, Callable

from rlm_train.repl import protocol

FIRST_READ_BYTES = 1 << 16  # a frame's header and, mostly, all of it
DECODE_IN_THREAD_BYTES = 1 << 20  # a frame this large is checked and decoded off the loop


async def wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket, status_fd: int, deadline: float) -> None:
    """Until the worker's socket is readable; PeerClosed when its status pipe (written by
    its parent once it has died; -1: not watched) becomes readable and the socket holds
    nothing; FrameTimeout at `deadline`."""
    sock_fd = sock.fileno()
    waiter: asyncio.Future[bool | None] = loop.create_future()

    def ready(readable: bool | None) -> None:
        if not waiter.done():
            waiter.set_result(readable)

    loop.add_reader(sock_fd, ready, True)
    if status_fd >= 0:
        loop.add_reader(status_fd, ready, False)
    timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0.0), ready, None)
    try:
        readable = await waiter
    finally:
        timer.cancel()
        loop.remove_reader(sock_fd)
        if status_fd >= 0:
            loop.remove_reader(status_fd)
    if readable is None:
        raise protocol.FrameTimeout("timed out waiting for a frame")
    if not readable and not protocol.spin_until_readable(sock, 0.0):  # a frame sent before it died is read first
        raise protocol.PeerClosed("worker exited")


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, timeout: float) -> bool:
    """Whether `fd` became readable within `timeout` seconds."""
    waiter: asyncio.Future[bool] = loop.create_future()

    def ready(value: bool) -> None:
        if not waiter.done():
            waiter.set_result(value)

    loop.add_reader(fd, ready, True)
    timer = loop.call_later(timeout, ready, False)
    try:
        return await waiter
    finally:
        timer.cancel()
        loop.remove_reader(fd)


async def _recv_exact(loop: asyncio.AbstractEventLoop, sock: socket.socket, status_fd: int, n: int,
                      deadline: float) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:  # what already arrived is read without waiting first
            k = sock.recv_into(view[got:], min(n - got, 1 << 24), socket.MSG_DONTWAIT)
        except BlockingIOError:
            await wait_readable(loop, sock, status_fd, deadline)
            continue
        if k == 0:
            raise protocol.PeerClosed("peer closed the channel mid-frame" if got else "peer closed the channel")
        got += k
    return buf


async def recv_data(loop: asyncio.AbstractEventLoop, sock: socket.socket, status_fd: int, *, max_bytes: int,
                    deadline: float) -> object:
    """One frame from the worker (JSON, at most max_bytes), as `protocol.recv_data` reads it.
    A small frame comes in one read with its header; the worker sends nothing between its
    frames (it waits for the host's answer), so what one read returns is at most that frame."""
    while True:
        try:
            first = sock.recv(FIRST_READ_BYTES, socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            await wait_readable(loop, sock, status_fd, deadline)
    if not first:
        raise protocol.PeerClosed("peer closed the channel")
    if len(first) < protocol.HEADER.size:
        first += await _recv_exact(loop, sock, status_fd, protocol.HEADER.size - len(first), deadline)
    (length,) = protocol.HEADER.unpack_from(first)
    if length > max_bytes:  # checked before a byte of it is allocated
        raise protocol.ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
    payload = first[protocol.HEADER.size:]
    if len(payload) > length:
        raise protocol.ProtocolError("the worker sent more than one frame at once")
    if len(payload) < length:
        payload += await _recv_exact(loop, sock, status_fd, length - len(payload), deadline)
    if length >= DECODE_IN_THREAD_BYTES:  # counting and decoding hold the GIL: keep the loop turning
        return await asyncio.to_thread(protocol.loads_data, payload)
    return protocol.loads_data(payload)


async def send(loop: asyncio.AbstractEventLoop, sock: socket.socket, obj, deadline: float,
               between: Callable[[], Awaitable[None]] | None = None) -> None:
    """A trusted frame: what the socket takes at once, then `between()` (the thaw), then the
    rest as the worker reads it, bounded by `deadline` (FrameTimeout: it stopped reading)."""
    data = memoryview(protocol.HEADER.pack(len(payload := protocol.dumps(obj))) + payload)
    try:
        sent = sock.send(data, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if between is not None:
        await between()
    data = data[sent:]
    while data:
        writable: asyncio.Future[bool] = loop.create_future()

        def ready(value: bool) -> None:
            if not writable.done():
                writable.set_result(value)

        loop.add_writer(sock.fileno(), ready, True)
        timer = loop.call_at(loop.time() + max(deadline - time.monotonic(), 0.0), ready, False)
        try:
            if not await writable:
                raise protocol.FrameTimeout("the peer stopped reading")
        finally:
            timer.cancel()
            loop.remove_writer(sock.fileno())
        try:
            data = data[sock.send(data, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            continue
