"""The proxy worker: SOCKS/HTTP proxy client and proxy server in one process (docs/proxy.md)."""
