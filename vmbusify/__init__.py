"""VMBusify: reach a VM with no network over its hypervisor channel."""

__version__ = "0.2.0.dev0"  # v0.1.0 is tagged; this is the next release in the making
