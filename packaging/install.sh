#!/bin/sh
# Install VMBusify for one role on this machine (a Linux host or a Linux guest).
#
#   packaging/install.sh host|guest [--source DIR] [--python PY] [--now] [--dry-run]
#
# It makes /opt/vmbusify/venv and installs VMBusify (and supervisor) into it, with pip:
# on the host with the host-only extras (vmbusify[host]: aiohttp, uvloop). It puts
# conf/supervisord.conf, the programs it includes (conf/programs/*.conf, each with a line
# that sends its output to the journal too) and the role's example config into
# /etc/vmbusify (an existing vmbusify.toml is kept; `vmbusify check-config` checks it), the
# man pages into /usr/local/share/man/man1, installs vmbusify-ROLE.service and
# enables it (--now: starts it too). --dry-run prints the commands instead of running them,
# and needs no root.
#
# pip needs a network (or a wheelhouse). A guest with no network installs the Debian
# package instead, built on the host by packaging/build-guest.py (docs/deploy.md).
set -eu

usage() {
    echo "usage: $0 host|guest [--source DIR] [--python PY] [--now] [--dry-run]" >&2
    exit 2
}

here=$(cd "$(dirname "$0")" && pwd)
source_dir=$(dirname "$here")
python=python3
now=""
dry_run=0
role=""

while [ $# -gt 0 ]; do
    case "$1" in
        host|guest) [ -z "$role" ] || usage; role=$1 ;;
        --source) [ $# -ge 2 ] || usage; source_dir=$2; shift ;;
        --python) [ $# -ge 2 ] || usage; python=$2; shift ;;
        --now) now="--now" ;;
        --dry-run) dry_run=1 ;;
        -h|--help) usage ;;
        *) echo "$0: unknown argument: $1" >&2; usage ;;
    esac
    shift
done
[ -n "$role" ] || usage

prefix=/opt/vmbusify
venv=$prefix/venv
etc=/etc/vmbusify
unit=vmbusify-$role.service
unit_dir=/etc/systemd/system
man_dir=/usr/local/share/man/man1
other=vmbusify-host.service
[ "$role" = host ] && other=vmbusify-guest.service

run() {
    if [ "$dry_run" = 1 ]; then
        echo "+ $*"
    else
        "$@"
    fi
}

die() {
    echo "$0: $*" >&2
    exit 1
}

for f in "$source_dir/pyproject.toml" "$source_dir/conf/supervisord.conf" \
         "$source_dir/conf/programs/mux.conf" \
         "$source_dir/packaging/$role.toml" "$source_dir/packaging/$unit"; do
    [ -f "$f" ] || die "missing $f (is --source a VMBusify checkout?)"
done
if [ "$dry_run" = 0 ]; then
    [ "$(id -u)" = 0 ] || die "run as root (or try --dry-run)"
    command -v systemctl >/dev/null || die "systemctl not found: this installs a systemd unit"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$python is older than Python 3.11"
fi

# 1. The virtualenv, with VMBusify and its dependencies (supervisor included); the host's
# command listener needs aiohttp and its programs run faster on uvloop: vmbusify[host].
if [ ! -x "$venv/bin/python" ]; then
    run install -d -m 0755 "$prefix"
    run "$python" -m venv "$venv"
fi
if [ "$role" = host ]; then
    run "$venv/bin/pip" install --upgrade "$source_dir[host]"
else
    run "$venv/bin/pip" install --upgrade "$source_dir"
fi
if [ -f "$source_dir/docs/deploy.md" ]; then
    run install -D -m 0644 "$source_dir/docs/deploy.md" "$prefix/docs/deploy.md"
fi

# 2. The group that may use the command listener and the host proxy without credentials,
# as docker's group may use docker.sock (docs/deploy.md, "Who may use it"). Made empty, on
# the host only: a guest's listener stays root's alone. Add operators with
# `usermod -aG vmbusify USER`; membership is as good as root's view into every VM.
if [ "$role" = host ]; then
    if getent group vmbusify >/dev/null 2>&1; then
        echo "group vmbusify exists: its members may use vmbusifyctl, vmbusifyexec and the proxy"
    else
        run groupadd --system vmbusify
    fi
fi

# 3. Configuration. On the host, root's and readable by group vmbusify (its members'
# vmbusifyctl reads it to find the listener; secrets go in root-only files: the proxy's
# credentials_file); on a guest, root's alone.
if [ "$role" = host ]; then
    run install -d -m 0750 -g vmbusify "$etc"
    conf_mode="-m 0640 -g vmbusify"
else
    run install -d -m 0700 "$etc"
    conf_mode="-m 0600"
fi
run install -m 0644 "$source_dir/conf/supervisord.conf" "$etc/supervisord.conf"
# supervisord.conf includes programs/*.conf beside it: without them it starts nothing.
run install -d -m 0755 "$etc/programs"
# Under systemd each program's output goes to the journal too (supervisord sends it to
# syslog, which journald attributes to this unit: journalctl -u vmbusify-ROLE), besides
# the file in the run directory that conf/programs/*.conf names.
for program in "$source_dir"/conf/programs/*.conf; do
    run install -m 0644 "$program" "$etc/programs/$(basename "$program")"
    if [ "$dry_run" = 1 ]; then
        echo "+ append stdout_syslog=true to $etc/programs/$(basename "$program")"
    else
        printf '\n; VMBusify packaging: under systemd, to the journal too\nstdout_syslog=true\n' \
            >> "$etc/programs/$(basename "$program")"
    fi
done
if [ -e "$etc/vmbusify.toml" ]; then
    echo "keeping the existing $etc/vmbusify.toml"
else
    # $conf_mode is two options or four: unquoted on purpose.
    # shellcheck disable=SC2086
    run install $conf_mode "$source_dir/packaging/$role.toml" "$etc/vmbusify.toml"
    if [ "$role" = host ]; then
        echo "installed $etc/vmbusify.toml from packaging/$role.toml: name your VMs in it"
    else
        echo "installed $etc/vmbusify.toml from packaging/$role.toml (it works as it is)"
    fi
fi
# Check it as the programs will load it: every problem on a line of its own, before the
# service would start and stop on the first.
run "$venv/bin/vmbusify" check-config -q "$etc/vmbusify.toml" ||
    die "invalid configuration: fix the lines above, then run this again"

# The man pages of vmbusify, vmbusifyctl and vmbusifyexec, made from their own --help.
run install -d -m 0755 "$man_dir"
run "$venv/bin/vmbusify" man --output "$man_dir"

# 4. The systemd unit.
run install -m 0644 "$source_dir/packaging/$unit" "$unit_dir/$unit"
run systemctl daemon-reload
if [ "$dry_run" = 0 ] && systemctl is-enabled --quiet "$other" 2>/dev/null; then
    echo "warning: $other is enabled too; one machine should run one role" >&2
fi
# $now is empty or --now; left unquoted on purpose so that empty means no argument.
# shellcheck disable=SC2086
run systemctl enable $now "$unit"
echo "done: $unit is enabled${now:+ and started}"
