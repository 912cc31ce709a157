"""The application message route table and the registry of worker processes (docs/protocol.md,
"The bus").

    {<self-entity-name, {<message-source-entity-name, message-id, handler>}>}

Here a "handler" is a worker process: a package from the tunnel is routed by its
(source entity, message id) to the workers that registered that pair, in registration
order, and whose route accepts the package's type (``RouteKind`` bits: MESSAGE, REQUEST,
STREAM; a route registered without them accepts every type). The same table remembers which
worker is waiting for the ACK of each request the mux forwarded, so replies find their way
back. The decisions made with it are vmbusify/mux/switch.py's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vmbusify.bus.frames import RouteKind
from vmbusify.errors import RemoteProtocolError
from vmbusify.protocol.entities import entity_label

#: Seconds a forwarded request waits for its ACK before the mux forgets it.
PENDING_TTL = 600.0
#: The kind of a route registered without one (an older worker): every package type.
ANY_KIND = RouteKind.MESSAGE | RouteKind.REQUEST | RouteKind.STREAM

Route = tuple[int, int, int]  # (source entity, message id, RouteKind bits)


def kind_label(kind: int) -> str:
    """``request``, ``message|request``, ... for logs and status (``any`` for every type)."""
    if kind == ANY_KIND:
        return "any"
    return "|".join(k.name.lower() for k in RouteKind if kind & k)


def _route(raw: Any) -> Route:
    """One REG route: ``[source, message_id]`` or ``[source, message_id, kind]``."""
    if not isinstance(raw, list | tuple) or len(raw) not in (2, 3):
        raise ValueError(f"a route is [source, message id, kind], not {raw!r}")
    source, message_id = int(raw[0]), int(raw[1])
    kind = int(raw[2]) if len(raw) == 3 else ANY_KIND
    if not 0 < kind <= ANY_KIND:
        raise ValueError(f"route kind {kind} is not a combination of RouteKind bits")
    return source, message_id, kind


@dataclass
class WorkerInfo:
    """A registered worker process."""

    name: str
    identity: bytes
    pid: int
    entities: list[int]
    routes: list[Route]
    #: The REG's ``since``: when the worker's link was made (0: unknown).
    since: int = 0
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    #: Counters the worker published with WorkerLink.report().
    stats: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "pid": self.pid,
            "entities": [entity_label(e) for e in self.entities],
            "routes": [f"{entity_label(s)}:{m}" + ("" if k == ANY_KIND else f"/{kind_label(k)}")
                       for s, m, k in self.routes],
            "registered_at": self.registered_at,
            "stats": self.stats,
        }


@dataclass(frozen=True)
class PendingCall:
    """A request forwarded to the tunnel on behalf of a worker, waiting for its ACK."""

    identity: bytes
    worker_call_id: int
    created: float


_NONE: list[tuple[WorkerInfo, int]] = []


class RouteTable:
    """Which worker gets which (source entity, message id), and who awaits which ACK."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerInfo] = {}
        self._by_identity: dict[bytes, WorkerInfo] = {}
        #: (source, message id) -> [(worker, RouteKind bits)], in registration order.
        self._routes: dict[tuple[int, int], list[tuple[WorkerInfo, int]]] = {}
        self._pending: dict[tuple[str, int], PendingCall] = {}

    # -- registry --------------------------------------------------------------------------
    def register(self, identity: bytes, body: dict[str, Any]
                 ) -> tuple[WorkerInfo, WorkerInfo | None]:
        """Record (or refresh) a worker's registration.

        Returns the worker and, when this registration replaces a different process of the
        same name (it was restarted), the one it replaced; (info, info) for a refresh.
        """
        try:
            name = str(body["name"])
            pid = int(body["pid"])
            entities = [int(e) for e in body["entities"]]
            routes = [_route(r) for r in body["routes"]]
            since = int(body.get("since", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteProtocolError(f"malformed registration: {exc!r}") from None
        known = self._by_identity.get(identity)
        if known is not None and known.routes == routes:
            known.last_seen = time.monotonic()
            return known, known
        holder = self._workers.get(name)
        if (holder is not None and holder.identity != identity
                and 0 < since < holder.since):
            # A heartbeat of a link this name has since replaced (a restarted worker's
            # successor registered first): stale, it must not displace the newer link.
            return holder, holder
        old = self.unregister(name)
        replaced = old if old is not None and old.pid != pid else None
        info = WorkerInfo(name, identity, pid, entities, routes, since)
        self._workers[name] = info
        self._by_identity[identity] = info
        for source, message_id, kind in routes:
            self._routes.setdefault((source, message_id), []).append((info, kind))
        return info, replaced

    def unregister(self, name: str) -> WorkerInfo | None:
        """Forget a worker (it died or was replaced by a restarted copy)."""
        info = self._workers.pop(name, None)
        if info is None:
            return None
        self._by_identity.pop(info.identity, None)
        for source, message_id, _kind in info.routes:
            key = (source, message_id)
            lst = [(w, k) for w, k in self._routes.get(key, []) if w is not info]
            if lst:
                self._routes[key] = lst
            else:
                self._routes.pop(key, None)
        for k in [k for k, p in self._pending.items() if p.identity == info.identity]:
            del self._pending[k]
        return info

    def by_identity(self, identity: bytes) -> WorkerInfo | None:
        return self._by_identity.get(identity)

    def by_name(self, name: str) -> WorkerInfo | None:
        return self._workers.get(name)

    def silent(self, max_age: float, now: float | None = None) -> list[WorkerInfo]:
        """Workers that have not registered (their heartbeat) for ``max_age`` seconds."""
        now = time.monotonic() if now is None else now
        return [w for w in self._workers.values() if now - w.last_seen > max_age]

    def workers(self) -> list[WorkerInfo]:
        return list(self._workers.values())

    def destinations(self, source: int, message_id: int) -> list[tuple[WorkerInfo, int]]:
        """(worker, RouteKind bits) for this pair, in registration order (do not modify)."""
        return self._routes.get((source, message_id), _NONE)

    # -- pending requests ------------------------------------------------------------------
    def pending_count(self) -> int:
        """Requests forwarded and not yet answered, over every VM."""
        return len(self._pending)

    def add_pending(self, vmid: str, tunnel_id: int, identity: bytes, call_id: int) -> None:
        self._pending[(vmid, tunnel_id)] = PendingCall(identity, call_id, time.monotonic())

    def pop_pending(self, vmid: str, tunnel_id: int) -> PendingCall | None:
        return self._pending.pop((vmid, tunnel_id), None)

    def pending_for_vm(self, vmid: str) -> list[PendingCall]:
        """Remove and return every call waiting on a VM (its tunnel went down)."""
        keys = [k for k in self._pending if k[0] == vmid]
        return [self._pending.pop(k) for k in keys]

    def expire(self, now: float | None = None) -> int:
        """Forget requests older than PENDING_TTL; returns how many."""
        now = time.monotonic() if now is None else now
        old = [k for k, p in self._pending.items() if now - p.created > PENDING_TTL]
        for k in old:
            del self._pending[k]
        return len(old)
