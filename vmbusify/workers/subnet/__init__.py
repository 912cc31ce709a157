"""The virtual subnet worker (spec 3.3, 4.4): IP over the tunnel, with the host as NAT."""
