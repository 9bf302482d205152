"""The pinrpc server program: registry, trust, interceptor, services and the admin CLI."""
