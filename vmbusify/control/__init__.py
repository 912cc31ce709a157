"""The command listener behind ``vmbusifyctl`` and ``vmbusifyexec``, and the client side of
reaching it safely (its token, the check that it is root's)."""
