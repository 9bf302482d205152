"""Variant D: nginx terminating mTLS, admitting clients by a fingerprint map, proxying gRPC.

What a user might pick instead of pinrpc. nginx's $ssl_client_fingerprint is SHA-1 of the
certificate (not SHA-256 as pinrpc prints); `ssl_verify_client optional_no_ca` asks for a
client certificate and checks its signature over the handshake (proof of key possession) but
chains it to nothing, so the map is the whole authorization. A wrong or missing certificate gets
HTTP 403, which gRPC clients see as PERMISSION_DENIED.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from .procs import Proc, StartError, free_port, launch

NGINX = "/usr/sbin/nginx"


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)


def sha1_fingerprint(cert_pem: bytes) -> str:
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest()


def config(
    directory: Path, port: int, backend: int, cert: Path, key: Path, clients: list[bytes]
) -> str:
    allowed = "\n".join(f"        {sha1_fingerprint(pem)} 1;" for pem in clients)
    temp = directory / "temp"
    return f"""
worker_processes 1;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    map $ssl_client_fingerprint $pinrpc_allowed {{
        default 0;
{allowed}
    }}
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_verify_client optional_no_ca;
        location / {{
            if ($pinrpc_allowed != 1) {{ return 403; }}
            grpc_pass grpc://backend;
        }}
    }}
}}
"""


def start_nginx(directory: Path, backend: int, cert: Path, key: Path, clients: list[bytes]) -> Proc:
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx is not installed (apt-get install nginx)")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "temp").mkdir(exist_ok=True)
    port = free_port()
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, port, backend, cert, key, clients))
    proc = launch("nginx", [binary, "-p", str(directory), "-c", str(conf)], directory, python=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise StartError(f"nginx exited: {proc.tail()} {(directory / 'error.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            time.sleep(0.02)
            continue
        proc.port = port
        return proc
    proc.stop()
    raise StartError("nginx did not listen within 10 s")
