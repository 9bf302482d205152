"""Server reflection that describes to each caller only what it may call.

Every enrolled client may use reflection (server/auth.py's ALWAYS_ALLOWED), and grpc_reflection's
servicer lists every served service and describes any file to whoever asks: Admin's and a
library user's method and message names went to clients allowed none of them. Here each caller
is answered by grpc_reflection's own servicer over a pool of its own, which holds only the
services with at least one method the caller may call (method_allowed, the per-call check's
rule) and the files and types they need. Anything else is absent from that pool, so asking for
it gets grpc_reflection's NOT_FOUND, the very answer an unknown name gets: no oracle.

A file holding both a service the caller may call and one it may not (or one the caller needs
for its types only: identity.proto imports admin.proto for Client) is served without the
hidden service and without the top-level types only the hidden one needs. Refusing the file
would leave a listed service that cannot be described, which fails grpcurl's whole-server
describe and its calls through reflection; serving it whole would describe the hidden service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from server.auth import caller, method_allowed
from server.registry import Client
from server.trust import EnrolledSet

# Views are kept per distinct permission list; past this many, the cache starts over.
_VIEW_LIMIT: Final = 256
_Type = descriptor.Descriptor | descriptor.EnumDescriptor


class ScopedReflection:
    """grpc_reflection's ServerReflection (v1alpha, all grpcio-reflection serves), per caller."""

    def __init__(self, service_names: Iterable[str], enrolled: Callable[[], EnrolledSet]) -> None:
        self._names = tuple(service_names)
        self._enrolled = enrolled
        # Read and written without a lock: two threads building the same view is harmless.
        self._views: dict[tuple[str, ...] | None, reflection.ReflectionServicer] = {}

    def add_to(self, server: grpc.Server) -> None:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self, server)

    def ServerReflectionInfo(
        self,
        requests: Iterator[reflection_pb2.ServerReflectionRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[reflection_pb2.ServerReflectionResponse]:
        for request in requests:
            # Looked up per request: a permit reaches a stream that is already open.
            view: Any = self._view()  # its stub says it returns None; it yields the answer
            yield from view.ServerReflectionInfo(iter((request,)), context)

    def _view(self) -> reflection.ReflectionServicer:
        client = self._enrolled().lookup(caller().fingerprint)
        key = client.allowed_methods if client is not None else None
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= _VIEW_LIMIT:
                self._views.clear()
            view = self._views[key] = _build_view(self._names, client)
        return view


def _build_view(names: Sequence[str], client: Client | None) -> reflection.ReflectionServicer:
    """grpc_reflection's servicer over the services ``client`` may call and what they need."""
    default = descriptor_pool.Default()
    services = [default.FindServiceByName(name) for name in names]
    shown = {
        s.full_name
        for s in services
        if client is not None
        and any(method_allowed(client, f"/{s.full_name}/{m.name}") for m in s.methods)
    }
    files = _with_dependencies(s.file for s in services if s.full_name in shown)
    trimmed = {
        f.name for f in files if any(s.full_name not in shown for s in f.services_by_name.values())
    }
    roots: list[_Type] = []
    for s in services:
        if s.full_name in shown:
            roots += [t for m in s.methods for t in (m.input_type, m.output_type)]
    for f in files:
        if f.name not in trimmed:
            roots += [*f.message_types_by_name.values(), *f.enum_types_by_name.values()]
    needed = _needed(roots)
    pool = descriptor_pool.DescriptorPool()
    for f in files:
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        if f.name in trimmed:
            prefix = f"{proto.package}." if proto.package else ""
            _keep(proto.service, prefix, shown)
            _keep(proto.message_type, prefix, needed)
            _keep(proto.enum_type, prefix, needed)
            proto.ClearField("extension")  # they may extend a type just removed
            proto.ClearField("source_code_info")  # its paths point into what was removed
        pool.Add(proto)
    return reflection.ReflectionServicer(shown, pool=pool)


def _with_dependencies(
    files: Iterable[descriptor.FileDescriptor],
) -> list[descriptor.FileDescriptor]:
    """The files and everything they import, each after its imports (a pool's order)."""
    ordered: dict[str, descriptor.FileDescriptor] = {}

    def visit(file: descriptor.FileDescriptor) -> None:
        if file.name not in ordered:
            for dependency in file.dependencies:
                visit(dependency)
            ordered[file.name] = file

    for file in files:
        visit(file)
    return list(ordered.values())


def _needed(roots: Iterable[_Type]) -> set[str]:
    """Full names of the top-level types ``roots`` use, themselves included, transitively."""
    needed: set[str] = set()
    pending = list(roots)
    while pending:
        top = pending.pop()
        while top.containing_type is not None:
            top = top.containing_type
        if top.full_name in needed:
            continue
        needed.add(top.full_name)
        messages = [top] if isinstance(top, descriptor.Descriptor) else []
        while messages:  # a message and its nested messages, whose fields name more types
            message = messages.pop()
            messages += message.nested_types
            for field in message.fields:
                pending += [t for t in (field.message_type, field.enum_type) if t is not None]
    return needed


def _keep(repeated: Any, prefix: str, names: set[str]) -> None:
    """Remove the definitions whose full name (``prefix`` + name) is not in ``names``."""
    kept = [item for item in repeated if prefix + item.name in names]
    del repeated[:]
    repeated.extend(kept)
