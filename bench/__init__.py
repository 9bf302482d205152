"""The performance benchmark's parts (scripts/bench). Not shipped: pyproject packages only
pinrpc*, server* and client*."""
