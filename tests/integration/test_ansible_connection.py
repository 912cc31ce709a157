"""The Ansible connection plugin (packaging/ansible) when its hypervisor cannot be reached
(no root, no lab): the host is UNREACHABLE with ssh's reason, not a failed task or a
traceback; and with vmbusifyexec failing on this machine, its one line is the reason."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.test_ansible_inventory import ansible


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


def test_an_unreachable_hypervisor_makes_the_host_unreachable(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.ini"
    inventory.write_text(
        "[vms]\nvm1 ansible_connection=vmbusify.vmbusify.vmbusify "
        "ansible_vmbusify_hypervisor=root@127.0.0.1 "
        f"ansible_vmbusify_ssh_args='-F /dev/null -p {closed_port()} -o ConnectTimeout=5' "
        f"ansible_vmbusify_control_dir={tmp_path / 'cp'}\n")
    out = ansible(tmp_path, "ansible", "-i", str(inventory), "vms", "-m", "ping")
    assert out.returncode == 4, out.stdout + out.stderr  # 4: a host was unreachable
    assert "UNREACHABLE" in out.stdout and "cannot reach the hypervisor" in out.stdout
    assert "Connection refused" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_a_failing_vmbusifyexec_makes_the_host_unreachable(tmp_path: Path) -> None:
    failing = tmp_path / "vmbusifyexec"
    failing.write_text("#!/bin/sh\necho 'vmbusifyexec: no command listener at x' >&2\n"
                       "exit 255\n")
    failing.chmod(0o755)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[vms]\nvm1 ansible_connection=vmbusify.vmbusify.vmbusify "
                         f"ansible_vmbusify_exec={failing} ansible_vmbusify_use_api=false\n")
    out = ansible(tmp_path, "ansible", "-i", str(inventory), "vms", "-m", "ping")
    assert out.returncode == 4, out.stdout + out.stderr
    assert "UNREACHABLE" in out.stdout and "no command listener at x" in out.stdout


def test_a_programs_own_255_is_a_failed_task(tmp_path: Path) -> None:
    program = tmp_path / "vmbusifyexec"  # stands in: the program in the VM said this
    program.write_text("#!/bin/sh\necho 'the program failed' >&2\nexit 255\n")
    program.chmod(0o755)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[vms]\nvm1 ansible_connection=vmbusify.vmbusify.vmbusify "
                         f"ansible_vmbusify_exec={program} ansible_vmbusify_use_api=false\n")
    out = ansible(tmp_path, "ansible", "-i", str(inventory), "vms", "-m", "raw", "-a", "x")
    assert out.returncode == 2, out.stdout + out.stderr  # 2: a task failed
    assert "FAILED" in out.stdout and "rc=255" in out.stdout and "UNREACHABLE" not in out.stdout


def test_the_collection_builds_and_its_plugins_document_themselves(tmp_path: Path) -> None:
    collection = Path(__file__).resolve().parents[2] / "packaging" / "ansible" / \
        "ansible_collections" / "vmbusify" / "vmbusify"
    out = ansible(tmp_path, "ansible-galaxy", "collection", "build", str(collection),
                  "--output-path", str(tmp_path))
    assert out.returncode == 0 and (tmp_path / "vmbusify-vmbusify-0.2.0.tar.gz").is_file(), \
        out.stdout + out.stderr
    for kind in ("connection", "inventory"):  # their DOCUMENTATION parses, options and all
        out = ansible(tmp_path, "ansible-doc", "-t", kind, "--json",
                      "vmbusify.vmbusify.vmbusify")
        assert out.returncode == 0, out.stderr
        assert "hypervisor" in out.stdout and "ERROR" not in out.stderr


def test_reset_connection_is_implemented(tmp_path: Path) -> None:
    """``meta: reset_connection`` resets (no "not implemented" warning) and the next task
    runs through a new connection."""
    program = tmp_path / "vmbusifyexec"  # stands in: runs the command here
    program.write_text('#!/bin/sh\nwhile [ "$1" != -- ]; do shift; done; shift\nexec "$@"\n')
    program.chmod(0o755)
    inventory = tmp_path / "hosts.ini"
    inventory.write_text("[vms]\nvm1 ansible_connection=vmbusify.vmbusify.vmbusify "
                         f"ansible_vmbusify_exec={program} ansible_vmbusify_use_api=false\n")
    playbook = tmp_path / "reset.yml"
    playbook.write_text(
        "- hosts: vms\n  gather_facts: false\n  tasks:\n"
        "    - raw: echo before-reset\n"
        "    - meta: reset_connection\n"
        "    - raw: echo after-reset\n      register: after\n"
        "    - debug: var=after.stdout\n")
    out = ansible(tmp_path, "ansible-playbook", "-i", str(inventory), str(playbook))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not implemented" not in out.stdout + out.stderr
    assert '"after.stdout": "after-reset' in out.stdout, out.stdout
