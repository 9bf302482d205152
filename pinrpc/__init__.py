"""pinrpc: service-to-service gRPC over mutual TLS, clients admitted by certificate fingerprint."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pinrpc.errors import PinrpcError
from pinrpc.identity import Fingerprint

if TYPE_CHECKING:
    from pinrpc.channel import secure_channel

__all__ = ["Fingerprint", "PinrpcError", "secure_channel"]


def __getattr__(name: str) -> object:
    # Loaded on first use: every pinrpc.* import runs this file, and the admin commands must
    # start without grpc (server/config.py says why).
    if name == "secure_channel":
        from pinrpc.channel import secure_channel

        return secure_channel
    raise AttributeError(f"module 'pinrpc' has no attribute {name!r}")
