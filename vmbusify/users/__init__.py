"""Local users: who is at the other end of a local socket (``peer``) and what each may use
(``access``). Below the command listener, its clients and the proxy worker, which all ask.

Imports nothing: ``vmbusifyexec`` loads ``peer`` for a TCP listener, and its start is its
latency.
"""
