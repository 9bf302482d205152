"""The day's change reviewed as a whole, against real servers: what its fixes missed."""

from __future__ import annotations

import grpc
import pytest

from tests.conftest import Connect, MakeClient


def test_an_allowed_invented_method_gets_unimplemented_not_resource_exhausted(
    connect: Connect, make_client: MakeClient
) -> None:
    # The refusal's cut (server/auth.py shown_method) missed the other answer that quotes a
    # caller's method: a client allowed a whole service gets UNIMPLEMENTED for a name it made up.
    bob = make_client("bob")
    connect.enroll(bob, "bob", "/pinrpc.v1.Echo/*")
    channel = connect.channel(bob.cert_path, bob.key_path)
    invented = "/pinrpc.v1.Echo/" + "\u00e9" * 3_000  # as in test_observe_review.py
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(invented, None, None)(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()
    assert "... (3016 characters)" in (caught.value.details() or "")
    # A real name stays whole.
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/pinrpc.v1.Echo/Nope", None, None)(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == "method /pinrpc.v1.Echo/Nope not found"
