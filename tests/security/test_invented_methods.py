"""Method names are the caller's to invent: a denied call to a method no handler serves must
not become a metric label (one time series per name would grow without bound)."""

from __future__ import annotations

import uuid

import grpc

from server.auth import UNKNOWN_METHOD
from server.metrics import Metrics
from tests.conftest import ECHO_ALL, Connect, MakeClient, code_of

DENIED = grpc.StatusCode.PERMISSION_DENIED


def _methods(metrics: Metrics) -> dict[str, float]:
    """pinrpc_calls_total by method label."""
    counts: dict[str, float] = {}
    for family in metrics.calls.collect():
        for sample in family.samples:
            method = sample.labels["method"]
            counts[method] = counts.get(method, 0) + sample.value
    return counts


def test_invented_method_names_stay_out_of_metric_labels(
    connect: Connect, make_client: MakeClient
) -> None:
    bob = make_client("bob")
    connect.enroll(bob, "bob", ECHO_ALL)
    channel = connect.channel(bob.cert_path, bob.key_path)
    for _ in range(50):
        call = channel.unary_unary(f"/evil.Svc/{uuid.uuid4().hex}", None, None)
        assert code_of(lambda: call(b"", timeout=5)) == DENIED  # noqa: B023
    served = channel.unary_unary("/pinrpc.v1.Admin/List", None, None)
    assert code_of(lambda: served(b"", timeout=5)) == DENIED
    methods = _methods(connect.server.metrics)
    assert not [m for m in methods if "/evil" in m]
    assert methods[UNKNOWN_METHOD] == 50
    assert methods["/pinrpc.v1.Admin/List"] == 1  # a served method keeps its name
