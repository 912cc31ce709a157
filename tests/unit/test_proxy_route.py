"""Which VM the host's proxy client picks for a ``[NAME.]VMID.vmbusify`` target (no sockets)."""

from __future__ import annotations

import pytest

from vmbusify.protocol.proxy import ReplyCode
from vmbusify.workers.proxy.route import RouteError, split_vmbusify_name

VMIDS = {"vm1", "vm2", "db.prod", "7A5E0C2D-1B3F-4E5A-9C8D-0123456789AB"}


@pytest.mark.parametrize(("name", "expected"), [
    ("vm1.vmbusify", ("vm1", "localhost")),
    ("vm1.vmbusify.", ("vm1", "localhost")),
    ("web.vm2.vmbusify", ("vm2", "web")),
    ("db.prod.vmbusify", ("db.prod", "localhost")),
    ("api.db.prod.vmbusify", ("db.prod", "api")),
    # DNS names are case-insensitive, and GUID vmids are printed in either case
    ("VM1.vmbusify", ("vm1", "localhost")),
    ("Web.VM2.VMBUSIFY", ("vm2", "Web")),
    ("7a5e0c2d-1b3f-4e5a-9c8d-0123456789ab.vmbusify",
     ("7A5E0C2D-1B3F-4E5A-9C8D-0123456789AB", "localhost")),
])
def test_names_pick_the_vm(name: str, expected: tuple[str, str]) -> None:
    assert split_vmbusify_name(name, VMIDS) == expected


def test_an_exact_vmid_wins_over_one_that_differs_only_in_case() -> None:
    assert split_vmbusify_name("VM1.vmbusify", {"vm1", "VM1"}) == ("VM1", "localhost")
    assert split_vmbusify_name("vm1.vmbusify", {"vm1", "VM1"}) == ("vm1", "localhost")


def test_other_names_are_not_ours_and_unknown_vms_are_refused() -> None:
    assert split_vmbusify_name("external.lab", VMIDS) is None
    with pytest.raises(RouteError) as err:
        split_vmbusify_name("vm3.vmbusify", VMIDS)
    assert err.value.reply is ReplyCode.HOST_UNREACHABLE
