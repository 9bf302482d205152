"""pinrpc: service-to-service gRPC over mutual TLS, clients admitted by certificate fingerprint."""

from pinrpc.channel import secure_channel
from pinrpc.errors import PinrpcError
from pinrpc.identity import Fingerprint

__all__ = ["Fingerprint", "PinrpcError", "secure_channel"]
