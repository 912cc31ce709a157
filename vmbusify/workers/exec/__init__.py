"""The command executor worker (docs/exec.md): runs programs on the guest for vmbusifyexec."""
