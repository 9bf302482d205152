"""The pinrpc client program."""

import os

# gRPC's C core logs rejected handshakes to stderr on its own; the CLI explains failures
# itself, so keep its output to our sentences unless the user asked for the core's logs.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
