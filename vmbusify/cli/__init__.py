"""The command-line programs: ``vmbusify`` (programs and the lab), ``vmbusifyctl`` and
``vmbusifyexec``. The top layer: nothing in the package imports it."""
