"""Files into and out of a VM (`vmbusifyctl cp`; docs/files.md): one function per direction.

    from vmbusify.files import push, pull
    push("vm1", ["pkg.deb"], "/root/")                      # -> CopyResult
    pull("vm1", ["/var/log/syslog"], "./logs/", checksum=True)

The guest's half runs through exec (vmbusify/files/agent.py, sent as source); the stream is
vmbusify/files/wire.py's, written by vmbusify/files/tree.py's strict receiver. Both functions
raise ``vmbusify.errors.FileCopyError`` (``kind`` says why) or the tunnel's errors
(``UnknownVMError``, ``NotConnectedError``, ``TunnelError``, ``ControlError``); entries of a
tree that could not be copied are in ``CopyResult.warnings`` (then ``ok`` is false).
"""

from __future__ import annotations

from vmbusify.files.copy import CopyResult, Progress, pull, push

__all__ = ["CopyResult", "Progress", "pull", "push"]
