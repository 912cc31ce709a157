"""Shell completion: ``vmbusifyctl completion bash|zsh|fish`` and ``vmbusifyexec
--completion bash|zsh|fish`` print a script to source (docs/cli.md "Completion").

``vmbusifyctl``'s is click's own, its VMID arguments completed from the command listener's
list of VMs (``complete_vmids``). ``vmbusifyexec`` is no click program (it starts once per
command: docs/exec.md "A light client"), so its scripts are here; they complete its options,
the VM ids (from ``vmbusifyctl list -q``, the ``vmbusifyctl`` beside the ``vmbusifyexec``
typed) and, after the VM, the command to run. ``vmbusifyctl completion SHELL`` prints both.
"""

from __future__ import annotations

from vmbusify.cli.locate import Settings, config_path
from vmbusify.control.client import ControlClient

TYPE_CHECKING = False
if TYPE_CHECKING:
    import click

SHELLS = ("bash", "zsh", "fish")

#: vmbusifyexec's options that take a value as the next word.
_EXEC_VALUE_OPTIONS = "-e --env -w --workdir -u --user --timeout --config"
_EXEC_OPTIONS = ("-i --interactive -t --tty --tty=auto --tty=always --tty=never -e --env "
                 "-w --workdir -u --user --timeout -d --detach --config --version -h --help")

_BASH = r"""
_vmbusifyexec_completion() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" prev_opt="" w i skip=0 vm_at=0 config=()
    (( COMP_CWORD > 0 )) && prev="${COMP_WORDS[COMP_CWORD-1]}"
    for (( i=1; i<COMP_CWORD; i++ )); do
        w="${COMP_WORDS[i]}"
        if (( skip )); then
            skip=0
            [[ $prev_opt == --config ]] && config=(--config "$w")
            continue
        fi
        case "$w" in
            @VALUE_CASE@) skip=1; prev_opt="$w" ;;
            --config=*) config=(--config "${w#--config=}") ;;
            --) (( i+1 < COMP_CWORD )) && vm_at=$((i+1)); break ;;
            -*) ;;
            *) vm_at=$i; break ;;
        esac
    done
    if (( vm_at )); then
        # After the VM: the command, then its own words (files).
        if (( COMP_CWORD == vm_at + 1 )) && [[ $cur != -* ]]; then
            COMPREPLY=( $(compgen -c -- "$cur") )
        fi
        return 0
    fi
    case "$prev" in
        -e|--env|-w|--workdir|-u|--user|--timeout) return 0 ;;
        --config) COMPREPLY=( $(compgen -f -- "$cur") ); return 0 ;;
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=( $(compgen -W "@OPTIONS@" -- "$cur") )
        return 0
    fi
    local ctl="${COMP_WORDS[0]%vmbusifyexec}vmbusifyctl"
    COMPREPLY=( $(compgen -W "$("$ctl" "${config[@]}" list -q 2>/dev/null)" -- "$cur") )
}
complete -o default -o bashdefault -F _vmbusifyexec_completion vmbusifyexec
"""

_ZSH = r"""
_vmbusifyexec() {
    local -a vms config
    local ctl="${words[1]%vmbusifyexec}vmbusifyctl" i skip=0 vm_at=0 prev_opt=""
    for (( i=2; i<CURRENT; i++ )); do
        if (( skip )); then
            skip=0
            [[ $prev_opt == --config ]] && config=(--config "$words[i]")
            continue
        fi
        case "$words[i]" in
            @VALUE_CASE@) skip=1; prev_opt="$words[i]" ;;
            --config=*) config=(--config "${words[i]#--config=}") ;;
            --) (( i+1 < CURRENT )) && vm_at=$((i+1)); break ;;
            -*) ;;
            *) vm_at=$i; break ;;
        esac
    done
    if (( vm_at )); then
        shift $vm_at words
        (( CURRENT -= vm_at ))
        _normal
        return
    fi
    case "$words[CURRENT-1]" in
        -e|--env|-w|--workdir|-u|--user|--timeout) return 1 ;;
        --config) _files; return ;;
    esac
    if [[ $PREFIX == -* ]]; then
        compadd -- @OPTIONS@
        return
    fi
    vms=( ${(f)"$("$ctl" "${config[@]}" list -q 2>/dev/null)"} )
    compadd -- $vms
}
compdef _vmbusifyexec vmbusifyexec
"""

_FISH = r"""
function __vbx_at_vm
    set -l words (commandline -opc)
    set -e words[1]
    set -l skip 0
    for w in $words
        if test $skip = 1
            set skip 0
            continue
        end
        switch $w
            case @VALUE_FISH@
                set skip 1
            case '-*'
            case '*'
                return 1
        end
    end
    test $skip = 0
end
function __vbx_vms
    set -l ctl (string replace -r 'vmbusifyexec$' vmbusifyctl -- (commandline -opc)[1])
    $ctl list -q 2>/dev/null
end
complete -c vmbusifyexec -f -n __vbx_at_vm -a '(__vbx_vms)'
complete -c vmbusifyexec -n __vbx_at_vm -s i -l interactive -d 'send stdin'
complete -c vmbusifyexec -n __vbx_at_vm -s t -l tty -d 'a pseudo-terminal'
complete -c vmbusifyexec -n __vbx_at_vm -s e -l env -x -d 'KEY=VAL'
complete -c vmbusifyexec -n __vbx_at_vm -s w -l workdir -x -d 'working directory'
complete -c vmbusifyexec -n __vbx_at_vm -s u -l user -x -d 'run as USER'
complete -c vmbusifyexec -n __vbx_at_vm -l timeout -x -d 'seconds'
complete -c vmbusifyexec -n __vbx_at_vm -s d -l detach -d 'start in the background'
complete -c vmbusifyexec -n __vbx_at_vm -l config -r -d 'config file'
complete -c vmbusifyexec -n __vbx_at_vm -l version -d 'print the version'
complete -c vmbusifyexec -n 'not __vbx_at_vm' -a '(__fish_complete_subcommand --fcs-skip=2)'
"""


def exec_script(shell: str) -> str:
    """vmbusifyexec's completion script for ``shell`` (one of SHELLS)."""
    text = {"bash": _BASH, "zsh": _ZSH, "fish": _FISH}[shell]
    return (text.replace("@VALUE_CASE@", _EXEC_VALUE_OPTIONS.replace(" ", "|"))
            .replace("@VALUE_FISH@", _EXEC_VALUE_OPTIONS)
            .replace("@OPTIONS@", _EXEC_OPTIONS).lstrip("\n"))


def complete_vmids(ctx: click.Context, _param: click.Parameter, incomplete: str) -> list[str]:
    """The VM ids the command listener knows, for a click VMID argument's completion
    (nothing on any error: a completion must never print one)."""
    try:
        settings = Settings(config_path(ctx.find_root().params.get("config_path")))
        client = ControlClient.for_listener(settings.listen, settings.token_path, timeout=3.0)
        return [str(vm["vmid"]) for vm in client.request("GET", "/v1/vms")
                if str(vm.get("vmid", "")).startswith(incomplete)]
    except Exception:  # noqa: BLE001 - whatever went wrong, complete nothing
        return []
