"""The virtual subnet worker (docs/subnet.md): IP over the tunnel, with the host as NAT."""
