#!/usr/bin/env python3
"""`ansible -m ping` over the lab's VMs through VMBusify, beside the same through ssh, in one
run (docs/ansible.md, "Performance").

    sudo bench/ansible.py [--runs 7]

Each round runs, in turn (median wall time of each over the rounds):

1. **vmbusify**: `ansible all -m ping` over the lab's VMs, listed by the collection's inventory
   plugin and reached by its connection plugin (vmbusifyexec on this machine);
2. **ssh**: the same number of hosts through Ansible's own ssh connection to a throwaway sshd
   on 127.0.0.1 (bench/exec.py's), each host with a master connection of its own made in the
   run, as on a first run against a fleet or after ControlPersist's 60 s;
3. **ssh, warm**: the same with the masters of run 2 still up (ControlPersist), the best ssh
   does for consecutive runs;
4. **local**: the same number of hosts with `-c local`, for scale: most of every run is
   Ansible's own work (its start, a worker per host, the module's Python), which the local
   connection also does (it is no floor: it has its own costs, and came out slower than
   vmbusify in some runs);
5. **ssh, Ansible's defaults**: run 2 without pipelining, as ssh runs unless told (the
   vmbusify connection pipelines by default);
6. **Ansible alone**: `-m debug` over the same hosts: an action that runs on the control node
   and opens no connection at all. What it takes is spent by every connection plugin before
   and around its own work, so when it is above half of run 2, the goal (<= 0.5x ssh) is out
   of reach for any connection on this machine: the output says so;
7. **vmbusify, static inventory**: run 1 with the same hosts listed in an INI file instead of
   by the inventory plugin: the difference from run 1 is the inventory plugin's share (its
   imports and one status request), the difference from run 4 the connection plugin's.

Every round's times are printed under the medians (the machine's load moves them).

Runs 1-4 use pipelining and the same interpreter; nothing else is set. The goal is on the
first ratio (vmbusify / ssh <= 0.5, both pipelining). Needs root and the lab (honours
VMBUSIFY_LAB_INSTANCE); brings the lab up if it is not (and leaves it up).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.exec import LocalSshd
from vmbusify.lab.testing import LabHandle, lab_status, vmbusify

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
COLLECTIONS = REPO / "packaging" / "ansible"
PYTHON = "/usr/bin/python3"


def environment(home: Path) -> dict[str, str]:
    (home / "ansible.cfg").write_text("[defaults]\n")
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"  # this venv's programs, as
    # a user of it has them (bench/run runs with the venv's python, not its PATH)
    return {**os.environ, "PATH": path, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
            "ANSIBLE_HOME": str(home), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_CONFIG": str(home / "ansible.cfg"), "ANSIBLE_PIPELINING": "1",
            "ANSIBLE_PYTHON_INTERPRETER": PYTHON, "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_HOST_KEY_CHECKING": "0", "ANSIBLE_FORKS": "10"}


def ping(inventory: Path, env: dict[str, str], hosts: int, *extra: str,
         module: str = "ping") -> float:
    """Seconds one `ansible all -m MODULE` took; exits if any host did not answer."""
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN / "ansible"), "-i", str(inventory), "all", "-m", module,
                          "-o", *extra], env=env, capture_output=True, text=True, check=False,
                         timeout=300)
    took = time.perf_counter() - t0
    if out.returncode != 0 or out.stdout.count("SUCCESS") != hosts:
        sys.exit(f"ansible failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return took


def stop_masters(tmp: Path) -> None:
    """Stop the ssh masters Ansible left in ``tmp`` (ControlPersist)."""
    for cp in tmp.glob("cp-*"):
        subprocess.run(["ssh", "-o", f"ControlPath={cp}", "-O", "exit", "x"],
                       capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/ansible.py needs root (the lab)")
    if not lab_status()["up"]:
        vmbusify("lab", "-q", "up", timeout=1800)
    lab = LabHandle(status=lab_status(), started=False)
    lab.wait_connected(timeout=120)
    vmids = lab.vmids
    tmp = Path(tempfile.mkdtemp(prefix="vmbusify-bench-ansible-"))
    sshd = LocalSshd(tmp)
    try:
        sshd.start()
        env = environment(tmp)
        ours = tmp / "lab.vmbusify.yml"
        ours.write_text(json.dumps({"plugin": "vmbusify.vmbusify.vmbusify", "hypervisors": [
            {"name": "lab", "config": str(lab.layout.host.config_path),
             "vmbusifyctl": str(BIN / "vmbusifyctl"),
             "vmbusifyexec": str(BIN / "vmbusifyexec")}]}))
        ssh_inv = tmp / "ssh.ini"
        local_inv = tmp / "local.ini"
        ssh_lines, local_lines = ["[all]"], ["[all]"]
        for vmid in vmids:
            # A ControlPath per host: a fleet's hosts do not share one master.
            ssh_lines.append(
                f"{vmid} ansible_host=127.0.0.1 ansible_port={sshd.port} "
                f"ansible_user={sshd.user} ansible_ssh_private_key_file={sshd.key} "
                f"ansible_ssh_common_args='-F /dev/null -o UserKnownHostsFile=/dev/null "
                f"-o ControlPath={tmp}/cp-%r-{vmid}'")
            local_lines.append(f"{vmid} ansible_connection=local")
        static_inv = tmp / "static.ini"
        static_inv.write_text("[all]\n" + "".join(
            f"lab/{vmid} ansible_connection=vmbusify.vmbusify.vmbusify "
            f"ansible_vmbusify_vmid={vmid} "
            f"ansible_vmbusify_config={lab.layout.host.config_path} "
            f"ansible_vmbusify_exec={BIN / 'vmbusifyexec'}\n" for vmid in vmids))
        ssh_inv.write_text("\n".join(ssh_lines) + "\n")
        local_inv.write_text("\n".join(local_lines) + "\n")
        n = len(vmids)
        ping(ours, env, n)  # warm the page cache and bytecode of each path once
        ping(local_inv, env, n)
        t_ours, t_ssh, t_warm, t_local, t_default, t_alone, t_static = ([], [], [], [], [], [],
                                                                         [])
        no_pipelining = {**env, "ANSIBLE_PIPELINING": "0"}
        for _ in range(args.runs):
            t_ours.append(ping(ours, env, n))
            stop_masters(tmp)  # the previous run's masters: a cold start
            t_ssh.append(ping(ssh_inv, env, n))
            t_warm.append(ping(ssh_inv, env, n))
            t_local.append(ping(local_inv, env, n))
            stop_masters(tmp)
            t_default.append(ping(ssh_inv, no_pipelining, n))
            t_alone.append(ping(ssh_inv, env, n, "-a", "msg=x", module="debug"))
            t_static.append(ping(static_inv, env, n))
        stop_masters(tmp)
    finally:
        sshd.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    runs = {"ours": t_ours, "ssh": t_ssh, "warm": t_warm, "local": t_local,
            "default": t_default, "alone": t_alone, "static": t_static}
    med = {name: statistics.median(ts) * 1e3 for name, ts in runs.items()}
    print(f"ansible -m ping over {n} lab VMs, median of {args.runs} rounds (ms)")
    print(f"  {'measure':<44} {'vmbusify':>9} {'anchor':>9} {'ratio':>6}  goal")
    print(f"  {'ping, whole command vs ssh':<44} {med['ours']:>9.0f} {med['ssh']:>9.0f} "
          f"{med['ours'] / med['ssh']:>6.2f}  <= 0.5")
    print(f"  {'ping, whole command vs ssh with warm masters':<44} {med['ours']:>9.0f} "
          f"{med['warm']:>9.0f} {med['ours'] / med['warm']:>6.2f}")
    print(f"  {'each at its default (ssh: no pipelining)':<44} {med['ours']:>9.0f} "
          f"{med['default']:>9.0f} {med['ours'] / med['default']:>6.2f}")
    print(f"  {'vs ansible -c local (for scale)':<44} {med['ours']:>9.0f} "
          f"{med['local']:>9.0f} {med['ours'] / med['local']:>6.2f}")
    floor = med["alone"] / med["ssh"]
    print(f"  {'Ansible alone (-m debug, no connection) vs ssh':<44} {med['alone']:>9.0f} "
          f"{med['ssh']:>9.0f} {floor:>6.2f}")
    print(f"  {'vmbusify, static inventory (no inventory plugin)':<44} {med['static']:>9.0f} "
          f"{med['ssh']:>9.0f} {med['static'] / med['ssh']:>6.2f}")
    if floor > 0.5:
        print(f"  the goal is out of reach here for any connection: Ansible's own part is "
              f"{floor:.2f}x ssh before a connection does anything (goal 0.5x)")
    if med["local"] / med["ssh"] > 0.5:
        print(f"  -c local, which has no transport at all, is {med['local'] / med['ssh']:.2f}x "
              f"ssh here: Ansible and the module's own Python alone are above the goal (0.5x), "
              f"so no connection can meet it on this machine")
    print("  every round (ms):")
    for name, ts in runs.items():
        print(f"    {name:<8} " + " ".join(f"{t * 1e3:5.0f}" for t in ts))

if __name__ == "__main__":
    main()
