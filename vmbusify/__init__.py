"""VMBusify: reach a VM with no network over its hypervisor channel."""

__version__ = "0.1.0"
