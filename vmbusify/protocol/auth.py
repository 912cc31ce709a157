"""The tunnel's shared-key check: a challenge-response carried by HELLO and AUTH (sans-I/O).

Each end puts a fresh random nonce in its HELLO. When both HELLOs list ``Feature.KEY``, each
end then proves it knows the key with an AUTH whose proof is

    HMAC-SHA256(key, LABEL || role || host nonce || guest nonce)

The nonces make a proof good for one connection only (no replay); the role makes the host's
proof useless as the guest's and back (no reflection); nothing on the wire reveals the key.
The host proves first, and the guest answers with its own proof only once the host's checked
out, so a would-be host learns nothing it could use. Keys are per VM: a VM that knows its
own key cannot relay proofs made for another VM.

The functions here decide; the mux (vmbusify/mux/guest.py, host.py) does the sending.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum

from vmbusify.protocol.tunnel import NONCE_SIZE, Feature, Hello

#: Domain separation: a proof for this protocol cannot be mistaken for any other HMAC.
LABEL = b"vmbusify tunnel auth v1\0"


class Side(str, Enum):
    """Whose proof it is."""

    HOST = "host"
    GUEST = "guest"


def new_nonce() -> bytes:
    """A fresh random nonce for a HELLO."""
    return secrets.token_bytes(NONCE_SIZE)


def proof(key: bytes, side: Side, host_nonce: bytes, guest_nonce: bytes) -> bytes:
    """The proof ``side`` sends on the tunnel whose HELLOs carried these nonces."""
    if len(host_nonce) != NONCE_SIZE or len(guest_nonce) != NONCE_SIZE:
        raise ValueError("a proof needs two nonces of NONCE_SIZE bytes")
    msg = LABEL + side.value.encode() + b"\0" + host_nonce + guest_nonce
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify(key: bytes, side: Side, host_nonce: bytes, guest_nonce: bytes,
           received: bytes) -> bool:
    """Whether ``received`` is ``side``'s proof for these nonces (constant-time compare)."""
    try:
        expected = proof(key, side, host_nonce, guest_nonce)
    except ValueError:
        return False
    return hmac.compare_digest(expected, received)


def features(has_key: bool) -> list[str]:
    """The features an end of this release lists in its HELLO."""
    return ([Feature.AUTH.value, Feature.ERROR_CODES.value, Feature.STATS.value]
            + ([Feature.KEY.value] if has_key else []))


def guest_refusal(has_key: bool, host: Hello, guest_nonce: bytes) -> str | None:
    """Why a guest must refuse this host HELLO before answering (None: go on).

    A guest with a key needs a host that will prove it. A guest without one cannot check a
    host that holds a key (the host would refuse it anyway): it says so at once. The reason
    goes to the host in a BYE: it names what is missing, never anything about the key.
    """
    if not has_key:
        if host.has(Feature.KEY):
            return ("the host holds a key for this VM (vms[].key_file) but this guest has "
                    "none (tunnel.key_file)")
        return None
    if not host.has(Feature.KEY):
        who = ("the host has no key for this VM (vms[].key_file)" if host.has(Feature.AUTH)
               else "the host is older than this guest and cannot prove a key")
        return f"this guest requires the shared key (tunnel.key_file): {who}"
    if len(host.nonce) != NONCE_SIZE or host.nonce == guest_nonce:
        return "the host's HELLO carries no usable nonce"
    return None


def host_refusal(has_key: bool, guest: Hello, host_nonce: bytes) -> str | None:
    """Why a host must refuse this guest HELLO (None: go on; with a key, AUTH follows)."""
    if not has_key:
        return None  # a guest that wants a key has refused us already (BYE instead of HELLO)
    if not guest.has(Feature.KEY):
        who = ("the guest has no key (tunnel.key_file)" if guest.has(Feature.AUTH)
               else "the guest is older than this host and cannot prove a key")
        return f"this host requires the shared key for this VM (vms[].key_file): {who}"
    if len(guest.nonce) != NONCE_SIZE or guest.nonce == host_nonce:
        return "the guest's HELLO carries no usable nonce"
    return None


#: BYE reasons when a proof is wrong (the same text on both ends' logs).
WRONG_HOST_PROOF = ("the host's key proof is wrong: its key for this VM (vms[].key_file) "
                    "differs from the guest's (tunnel.key_file)")
WRONG_GUEST_PROOF = ("the guest's key proof is wrong: its key (tunnel.key_file) differs "
                     "from the host's for this VM (vms[].key_file)")
