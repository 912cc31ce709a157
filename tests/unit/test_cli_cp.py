"""`vmbusifyctl cp`'s command line and progress line (no lab)."""

from __future__ import annotations

import io

import click
import pytest
from click.testing import CliRunner

from vmbusify.cli.cp import ProgressLine, _parse, split_remote
from vmbusify.cli.ctl import main
from vmbusify.files import Progress


@pytest.mark.parametrize(("arg", "want"), [
    ("vm1:/tmp/x", ("vm1", "/tmp/x")),
    ("198.19.1.10:/tmp", ("198.19.1.10", "/tmp")),
    ("[fd00::5]:/tmp", ("fd00::5", "/tmp")),
    ("vm1:", ("vm1", "")),
    ("./a:b", None),
    ("/abs/a:b", None),
    ("plain", None),
    (":x", None),
])
def test_split_remote(arg: str, want: tuple[str, str] | None) -> None:
    assert split_remote(arg) == want


def test_directions_and_usage_errors() -> None:
    assert _parse(("a", "b", "vm1:/d/")) == ("push", "vm1", ["a", "b"], "/d/")
    assert _parse(("a", "vm1:")) == ("push", "vm1", ["a"], ".")
    assert _parse(("vm1:/x", "vm1:/y", ".")) == ("pull", "vm1", ["/x", "/y"], ".")
    for bad in (("vm1:/x", "vm2:/y"), ("vm1:/x", "vm2:/y", "."), ("a", "b"), ("a",),
                ("vm1:/x", "local", ".")):
        with pytest.raises(click.UsageError):
            _parse(bad)


def test_usage_exits_2_with_one_line() -> None:
    result = CliRunner().invoke(main, ["--config", "/dev/null", "cp", "a", "b"])
    assert result.exit_code == 2
    assert "either DST or every SRC must be VM:PATH" in result.output


def test_progress_line_escapes_names_and_shows_rate_and_eta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    line = ProgressLine()
    line(Progress("evil\x1b[2J\nname", 512 << 20, 1 << 30, 512 << 20, 1 << 30, 3, 2.0))
    text = err.getvalue()
    assert "\x1b" not in text and "\n" not in text
    assert "512.0 MiB / 1.0 GiB (50%)" in text and "256.0 MiB/s" in text
    assert "ETA 0:00:02" in text and "3 files" in text
    line.done()
    assert err.getvalue().endswith("\r")


def test_a_pull_shows_the_current_file_s_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    ProgressLine()(Progress("big.img", 1 << 20, 4 << 20, 1 << 20, None, 0, 1.0))
    assert "1.0 MiB / 4.0 MiB (25%)" in err.getvalue() and "ETA 0:00:03" in err.getvalue()
