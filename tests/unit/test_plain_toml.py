"""config_file.plain_toml: the exec client's light TOML reader reads what tomllib reads, or
leaves the file to tomllib (issue 18: tomllib was a third of vmbusifyexec's imports)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmbusify.config_file import _header, _key_value, plain_toml, read_config_file
from vmbusify.lab.layout import LabLayout, guest_config, host_config

REPO = Path(__file__).resolve().parents[2]


def _same(text: str) -> None:
    """plain_toml reads ``text`` as tomllib does, or declines it."""
    got = plain_toml(text.encode())
    if got is None:
        return
    assert got == tomllib.loads(text)


def test_the_shipped_and_generated_configurations_are_read_plainly_and_alike() -> None:
    layout = LabLayout()
    vms = [layout.vm(k) for k in (1, 2, 3)]
    docs = [(REPO / "packaging" / n).read_text() for n in ("host.toml", "guest.toml")]
    docs += [host_config(layout, vms), host_config(layout, vms, qemu=True),
             *(guest_config(vm) for vm in vms), guest_config(vms[0], first_release=True)]
    for text in docs:
        got = plain_toml(text.encode())
        assert got is not None, text
        assert got == tomllib.loads(text)


@pytest.mark.parametrize("text", [
    'a = "x\\ty"',                   # an escape
    'a = """x"""',                   # multi-line string
    "a = [\n 1,\n]",                 # multi-line array
    "a = {b = 1}",                   # inline table
    "a.b = 1",                       # dotted key
    "[a.b]",                         # dotted table
    "a = 1\na = 2",                  # a key twice
    "[t]\n[t]",                      # a table twice
    "t = 1\n[t]",                    # a key, then a table of its name
    "t = []\n[[t]]",                 # a static array, then an array of tables
    "[t]\n[[t]]",
    "a = 1_000",
    "a = 1e3",
    "a = +1",
    "a = 01",
    "a = 1979-05-27",
    "a = inf",
    "a = 'x' 'y'",
    "a = [[1]]",
    "a = 1\r\nb = 2",
    "\ufeffa = 1",
    "a = 1 # a\x01 comment",
    "= 1",
    "a =",
    "[[t]",
])
def test_anything_outside_the_subset_is_left_to_tomllib(text: str) -> None:
    assert plain_toml(text.encode()) is None


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", 'a = "x"  # c', "a = 'lit\\eral'", "a = -3", "a = 0.25",
    "b = true\nc = false", 'a = []', 'a = ["x", 1, "y,z",]', "[t]\na = 1\n[u]\na = 2",
    '[[v]]\nid = "a"\n\n[[v]]\nid = "b"\n[w]\nk = 1', "  [ t ]  # c\n  a=1",
    "a = 1\n[t]\na = 1",
])
def test_plain_documents_read_as_tomllib_reads_them(text: str) -> None:
    assert plain_toml(text.encode()) == tomllib.loads(text)


_PIECES = ["a", "b", "t", "v", " ", "\t", "=", "[", "]", "[[", "]]", "\n", '"', "'", "#",
           ",", "1", "0", ".", "-", "true", "x\\", "{", "}", "é", "\x00", "_"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40))
def test_whatever_plain_toml_accepts_tomllib_reads_the_same(pieces: list[str]) -> None:
    text = "".join(pieces)
    got = plain_toml(text.encode())
    if got is not None:
        assert got == tomllib.loads(text)


# The regular expressions the reader was first written with (it reads without re now, for the
# exec client's start): the reference for which lines are in the subset and what they hold.
_SCALAR = (r'"[^"\\\x00-\x1f\x7f]*"'
           r"|'[^'\x00-\x1f\x7f]*'"
           r"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?|true|false")
_LINE = re.compile(rf"([A-Za-z0-9_-]+)[ \t]*=[ \t]*({_SCALAR}"
                   rf"|\[[ \t]*(?:(?:{_SCALAR})[ \t]*,[ \t]*)*(?:(?:{_SCALAR})[ \t]*)?\])"
                   r"[ \t]*(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?")
_ITEM = re.compile(_SCALAR)
_HEADER = re.compile(r"(\[\[?)[ \t]*([A-Za-z0-9_-]+)[ \t]*(\]\]?)[ \t]*"
                     r"(?:#[^\x00-\x08\x0a-\x1f\x7f]*)?")


def _reference_scalar(token: str) -> object:
    if token[0] in "\"'":
        return token[1:-1]
    if token in ("true", "false"):
        return token == "true"
    return float(token) if "." in token else int(token)


def _reference_line(line: str) -> object:
    """What the regex reader made of one stripped line: a header, a pair, or None."""
    if line.startswith("["):
        m = _HEADER.fullmatch(line)
        if m is not None and len(m[1]) == len(m[3]):
            return ("header", m[1] == "[[", m[2])
    m = _LINE.fullmatch(line)
    if m is None:
        return None
    value = m[2]
    return ("pair", m[1], [_reference_scalar(t) for t in _ITEM.findall(value)]
            if value[0] == "[" else _reference_scalar(value))


def _our_line(line: str) -> object:
    if line.startswith("["):
        header = _header(line)
        if header is not None:
            return ("header", *header)
    pair = _key_value(line)
    return None if pair is None else ("pair", *pair)


_LINE_PIECES = [*_PIECES, "-0", "01", "1.5", "1.", ".5", "false", "truex", "9", "\\", "\x7f",
                "\x01", "\x09", "#c", "A", "key", '"a\\"', "'a\\'", ", ", "[1,", "0.0"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.sampled_from(_LINE_PIECES), max_size=16))
def test_each_line_reads_as_the_regular_expressions_read_it(pieces: list[str]) -> None:
    line = "".join(pieces).strip(" \t")
    if not line or line[0] == "#" or "\n" in line:
        return
    ours, reference = _our_line(line), _reference_line(line)
    assert ours == reference
    if ours is not None:  # the same types too: 1 and 1.0 and True compare equal
        assert repr(ours) == repr(reference)


@pytest.mark.parametrize("line", [
    "a = 1", "a=-0", "a = 0.50 # x", "a = [ 1 , 'x\\', \"y\" , ]", "[t]", "[[t]] # c",
    " [t ] ".strip(), "a = [,]", "a = [1 2]", "[[t]", "[t]]", "[[t]]]", "a = 1.", "a = --1",
    "a = truex", "a = 'x'#\x01", "a = \"x\\\"", "k-_9 = false", "a = []]",
])
def test_lines_read_as_the_regular_expressions_read_them(line: str) -> None:
    assert _our_line(line) == _reference_line(line)


def test_a_file_outside_the_subset_still_reads_and_a_bad_one_says_where(
        tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[control]\nlisten = """unix:/x/c.sock"""\n')
    assert read_config_file(good)[1] == {"control": {"listen": "unix:/x/c.sock"}}
    bad = tmp_path / "bad.toml"
    bad.write_text("[control\n")
    with pytest.raises(Exception, match=str(bad)):
        read_config_file(bad)


def test_the_exec_client_imports_no_tomllib_for_a_plain_file(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'[control]\nlisten = "unix:{tmp_path}/c.sock"\n')
    code = ("import sys; from vmbusify.config_file import listener_of; listener_of(); "
            "print(sorted(m for m in ('tomllib', 'typing', 'datetime') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"VMBUSIFY_CONFIG": str(conf), "PATH": "/usr/bin:/bin"},
                         check=True).stdout
    assert out.strip() == "[]"
