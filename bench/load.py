"""The client side: grpc.aio workloads, each run as one short slice against one variant.

One aio client in the benchmark process drives every variant, with 64 calls in flight over
one channel for the unary and streaming workloads. A slice reports a rate (or latencies);
the alternation and the ratios live in scripts/bench.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio

from pinrpc.v1 import echo_pb2, echo_pb2_grpc

from .fixtures import SERVER_NAME

REQUEST = echo_pb2.EchoRequest(message="x" * 64)
INFLIGHT = 64
# A new channel must open a new connection: grpc shares subchannels between channels with the
# same target and arguments unless told otherwise.
FRESH = ("grpc.use_local_subchannel_pool", 1)


@dataclass(frozen=True)
class Target:
    """How to reach one variant: address, and TLS credentials (None: plaintext)."""

    address: str
    creds: grpc.ChannelCredentials | None

    def channel(self, *options: tuple[str, Any]) -> grpc.aio.Channel:
        opts: list[tuple[str, Any]] = list(options)
        if self.creds is None:
            return grpc.aio.insecure_channel(self.address, options=opts)
        opts.append(("grpc.ssl_target_name_override", SERVER_NAME))
        return grpc.aio.secure_channel(self.address, self.creds, options=opts)


def aio_stub(channel: grpc.aio.Channel) -> Any:
    """An Echo stub on an aio channel (the generated .pyi only describes sync channels)."""
    return echo_pb2_grpc.EchoStub(channel)


EOF = cast(Any, grpc.aio).EOF  # missing from grpc-stubs


def credentials(ca_pem: bytes, key_pem: bytes, cert_pem: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)


async def unary_rate(stub: Any, seconds: float) -> float:
    """Calls/s with INFLIGHT concurrent callers for ``seconds``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while loop.time() < deadline:
            await stub.Echo(REQUEST, timeout=30)
            done += 1

    await asyncio.gather(*(caller() for _ in range(INFLIGHT)))
    return done / (loop.time() - start)


async def unary_latencies(stub: Any, seconds: float, rate: float) -> list[float]:
    """Latencies (s) at a fixed offered rate, measured from each call's scheduled start.

    Measuring from the schedule (not from when the call got going) keeps a stalled client or
    server from hiding its own delay (coordinated omission).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    count = max(1, int(seconds * rate))
    latencies: list[float] = []

    async def one(scheduled: float) -> None:
        await stub.Echo(REQUEST, timeout=30)
        latencies.append(loop.time() - scheduled)

    tasks = []
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(scheduled)))
    await asyncio.gather(*tasks)
    return latencies


async def stream_rate(stub: Any, seconds: float) -> float:
    """Messages/s echoed over one bidirectional stream with INFLIGHT messages outstanding."""
    loop = asyncio.get_running_loop()
    call = stub.EchoStream(timeout=seconds + 30)
    window = asyncio.Semaphore(INFLIGHT)
    start = loop.time()
    deadline = start + seconds
    received = 0

    async def writer() -> None:
        while loop.time() < deadline:
            await window.acquire()
            await call.write(REQUEST)
        await call.done_writing()

    async def reader() -> None:
        nonlocal received
        while True:
            response = await call.read()
            if response is EOF:
                return
            received += 1
            window.release()

    await asyncio.gather(writer(), reader())
    return received / (loop.time() - start)


async def connection_rate(target: Target, seconds: float, parallel: int = 4) -> float:
    """New connections/s, each: connect (TCP + TLS handshake) and one unary call."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while loop.time() < deadline:
            channel = target.channel(FRESH)
            try:
                await aio_stub(channel).Echo(REQUEST, timeout=30)
            finally:
                await channel.close(None)
            done += 1

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return done / (loop.time() - start)


async def connect_once(target: Target, timeout: float) -> tuple[float, grpc.StatusCode]:
    """One fresh connection and one WhoAmI-free Echo call: (seconds, status code)."""
    start = time.monotonic()
    channel = target.channel(FRESH)
    try:
        await aio_stub(channel).Echo(REQUEST, timeout=timeout)
        code = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
    finally:
        await channel.close(None)
    return time.monotonic() - start, code


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered)) - 1))
    return ordered[rank]
