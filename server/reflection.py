"""Server reflection that describes to each caller only what it may call.

Every enrolled client may use reflection (server/auth.py's ALWAYS_ALLOWED), and grpc_reflection's
servicer lists every served service and describes any file to whoever asks: Admin's and a
library user's method and message names went to clients allowed none of them. Here each caller
is answered by grpc_reflection's own servicer over a pool of its own, which holds only the
methods the caller may call (method_allowed, the per-call check's rule), the services holding
at least one, and the files and types they need. Anything else is absent from that pool, so
asking for it gets grpc_reflection's NOT_FOUND, the very answer an unknown name gets: no oracle.

A file of a service the caller may call is served as it is when the caller may call every
method in it. Any other file it needs (an imported one included) is trimmed: without the
methods (and services) it may not call, the top-level types nothing kept uses, and the imports
nothing kept uses. Refusing the file would leave a listed service that
cannot be described, which fails grpcurl's whole-server describe and its calls through
reflection; serving it whole would describe what the caller may not call. A trimmed file keeps
its top-level (proto2) extensions of the types the caller sees: they describe those types, not
a hidden method, and keeping them costs one pass over the file's extensions; an extension of a
type the caller does not see is dropped with that type.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Sequence
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
_Item = _Type | descriptor.FieldDescriptor | descriptor.MethodDescriptor


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
    """grpc_reflection's servicer over the methods ``client`` may call and what they need."""
    default = descriptor_pool.Default()
    services = [default.FindServiceByName(name) for name in names]
    methods = [
        m
        for s in services
        for m in s.methods
        if client is not None and method_allowed(client, f"/{s.full_name}/{m.name}")
    ]
    callable_ = {m.full_name for m in methods}
    shown = {m.containing_service.full_name for m in methods}
    shown_files = {m.containing_service.file.name: m.containing_service.file for m in methods}
    # A file whose every method the caller may call is served as it is, its types all kept.
    whole = {
        name
        for name, f in shown_files.items()
        if all(m.full_name in callable_ for s in f.services_by_name.values() for m in s.methods)
    }
    needed: dict[str, _Type] = {}
    _need(needed, _uses(methods))
    for f in (shown_files[name] for name in whole):
        _need(needed, [*f.message_types_by_name.values(), *f.enum_types_by_name.values()])
        _need(needed, _uses(f.extensions_by_name.values()))
    files = _with_dependencies(shown_files.values(), lambda f: f.dependencies)
    extensions = _extensions([f for f in files if f.name not in whole], shown_files, needed)
    # A trimmed file keeps its callable methods, needed types and kept extensions, and imports
    # only the files these use (and its public imports, which others may reach types through).
    kept: dict[str, list[_Item]] = {}
    for file, item in (
        *((m.containing_service.file, m) for m in methods),
        *((t.file, t) for t in needed.values()),
        *extensions,
    ):
        if file.name not in whole:
            kept.setdefault(file.name, []).append(item)
    uses = {name: {t.file.name for t in _uses(items)} for name, items in kept.items()}

    def imports(f: descriptor.FileDescriptor) -> Iterable[descriptor.FileDescriptor]:
        if f.name in whole:
            return f.dependencies
        public = {d.name for d in f.public_dependencies}
        return [d for d in f.dependencies if d.name in uses.get(f.name, public) or d.name in public]

    pool = descriptor_pool.DescriptorPool()
    for f in _with_dependencies(shown_files.values(), imports):
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        if f.name not in whole:
            prefix = f"{proto.package}." if proto.package else ""
            _keep(proto.service, prefix, shown)
            for service in proto.service:
                _keep(service.method, f"{prefix}{service.name}.", callable_)
            _keep(proto.message_type, prefix, needed)
            _keep(proto.enum_type, prefix, needed)
            _keep(proto.extension, prefix, {e.full_name for _, e in extensions})
            _imports(proto, {d.name for d in imports(f)})
            proto.ClearField("source_code_info")  # its paths point into what was removed
        pool.Add(proto)
    return reflection.ReflectionServicer(shown, pool=pool)


def _extensions(
    files: Iterable[descriptor.FileDescriptor],
    shown_files: Container[str],
    needed: dict[str, _Type],
) -> list[tuple[descriptor.FileDescriptor, descriptor.FieldDescriptor]]:
    """The top-level extensions of ``files`` kept: those of a type the caller sees, declared in a
    file it sees. They describe that type, not a hidden method; what they use joins ``needed``,
    which may keep more of them, hence the loop (each pass keeps one more at least)."""
    candidates = [(f, e) for f in files for e in f.extensions_by_name.values()]
    kept: list[tuple[descriptor.FileDescriptor, descriptor.FieldDescriptor]] = []
    while more := [
        (f, e)
        for f, e in candidates
        if (f, e) not in kept
        and e.containing_type is not None
        and _top(e.containing_type).full_name in needed
        and (f.name in shown_files or any(t.file == f for t in needed.values()))
    ]:
        kept += more
        _need(needed, _uses(e for _, e in more))
    return kept


def _with_dependencies(
    files: Iterable[descriptor.FileDescriptor],
    imports: Callable[[descriptor.FileDescriptor], Iterable[descriptor.FileDescriptor]],
) -> list[descriptor.FileDescriptor]:
    """The files and everything they import, each after its imports (a pool's order)."""
    ordered: dict[str, descriptor.FileDescriptor] = {}

    def visit(file: descriptor.FileDescriptor) -> None:
        if file.name not in ordered:
            for dependency in imports(file):
                visit(dependency)
            ordered[file.name] = file

    for file in files:
        visit(file)
    return list(ordered.values())


def _top(item: _Type) -> _Type:
    while item.containing_type is not None:
        item = item.containing_type
    return item


def _uses(items: Iterable[_Item]) -> list[_Type]:
    """The types ``items`` name directly: a method's two, a field's or extension's types and the
    type it extends, the same for a message's (and its nested messages') fields and extensions."""
    fields: list[descriptor.FieldDescriptor] = []
    used: list[_Type] = []
    for item in items:
        if isinstance(item, descriptor.Descriptor):  # the commonest first: isinstance is slow
            messages = [item]
            while messages:
                message = messages.pop()
                messages += message.nested_types
                fields += (*message.fields, *message.extensions)
        elif isinstance(item, descriptor.MethodDescriptor):
            used += (item.input_type, item.output_type)
        elif isinstance(item, descriptor.FieldDescriptor):
            fields.append(item)
    for field in fields:
        extended = field.containing_type if field.is_extension else None
        used += (t for t in (extended, field.message_type, field.enum_type) if t is not None)
    return used


def _need(needed: dict[str, _Type], types: Iterable[_Type]) -> None:
    """Add to ``needed`` the top-level types of ``types`` and all they use, transitively."""
    pending = list(types)
    while pending:
        top = _top(pending.pop())
        if top.full_name not in needed:
            needed[top.full_name] = top
            pending += _uses((top,))


def _keep(repeated: Any, prefix: str, names: Container[str]) -> None:
    """Remove the definitions whose full name (``prefix`` + name) is not in ``names``."""
    kept = [item for item in repeated if prefix + item.name in names]
    del repeated[:]
    repeated.extend(kept)


def _imports(proto: descriptor_pb2.FileDescriptorProto, keep: Container[str]) -> None:
    """Keep only the imports in ``keep``, renumbering the public and weak ones."""
    names = list(proto.dependency)
    public = {names[i] for i in proto.public_dependency}
    weak = {names[i] for i in proto.weak_dependency}
    kept = [name for name in names if name in keep]
    del proto.dependency[:], proto.public_dependency[:], proto.weak_dependency[:]
    proto.dependency.extend(kept)
    proto.public_dependency.extend(i for i, name in enumerate(kept) if name in public)
    proto.weak_dependency.extend(i for i, name in enumerate(kept) if name in weak)
