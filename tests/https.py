"""A real HTTPS server with fixed pages, standing in for a CA's endpoints in tests."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from server.devca import DevCA


@contextmanager
def serving_https(
    handler: type[http.server.BaseHTTPRequestHandler], directory: Path, name: str = "https"
) -> Iterator[tuple[int, Path]]:
    """Serve ``handler`` over HTTPS on 127.0.0.1 with a certificate from a CA of its own:
    yields (port, that CA's file ``directory``/``name``-ca.pem)."""
    ca = DevCA(f"pinrpc test {name} CA")
    cert, key = ca.issue(["127.0.0.1"], days=1).write(directory)
    (directory / f"{name}-ca.pem").write_bytes(ca.root_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], directory / f"{name}-ca.pem"
    finally:
        server.shutdown()
        thread.join(timeout=5)
        server.server_close()


@contextmanager
def serving_pages(
    pages: Mapping[str, bytes], directory: Path, content_type: str = "application/json"
) -> Iterator[tuple[str, Path]]:
    """Serve ``pages`` (path -> body; any other path is a 404) over HTTPS (serving_https):
    yields (base URL, the CA's file in ``directory``)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = pages.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving_https(Handler, directory) as (port, ca):
        yield f"https://127.0.0.1:{port}", ca
