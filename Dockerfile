# The pinrpc image: server, client CLI and the demo's helpers, installed offline from a
# wheelhouse built beforehand on a Linux host with Python 3.11:
#   rm -rf build && python3 -m pip wheel -w wheelhouse '.[acme]' tlslite-ng h2
# (rm -rf build: setuptools never empties it, and a stale module there would ship.)
# BASE_IMAGE: any Debian-like image with python3 and its venv module (CI imports a
# debootstrapped bookworm, since no image registry is reachable there). Its Python must be
# the wheelhouse's (3.11); bookworm is the release CI tests. No HEALTHCHECK here: the image
# also runs the one-shot clients; docs/OPERATIONS.md (Probes) shows the server's.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/pinrpc/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

COPY wheelhouse/ /wheels/
RUN python3 -m venv /opt/pinrpc \
 && /opt/pinrpc/bin/pip install --no-cache-dir --no-index --find-links /wheels \
        'pinrpc[acme]' tlslite-ng h2 \
 && rm -rf /wheels

# Tools that are scripts in the repository rather than console entry points. Their
# `#!/usr/bin/env python3` finds the venv's python first on PATH.
COPY scripts/obtain-cert scripts/stolen-cert-attack scripts/demo-compose /opt/pinrpc/bin/

# Runs as an unprivileged user. The directories exist (owned by it) so that named volumes
# mounted there start out writable by it.
RUN useradd --system --uid 10001 --user-group --home-dir /home/pinrpc --create-home pinrpc \
 && mkdir -p /certs /registry /public /pebble /keys/alice /keys/mallory \
 && chown pinrpc:pinrpc /certs /registry /public /pebble /keys/alice /keys/mallory
USER pinrpc
WORKDIR /home/pinrpc

EXPOSE 8443
CMD ["pinrpc-server", "--help"]
