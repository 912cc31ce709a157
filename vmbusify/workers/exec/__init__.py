"""The command executor worker (spec 4.2.3): runs programs on the guest for vmbusifyexec."""
