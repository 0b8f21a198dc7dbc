"""The error tree's errno mapping and the ``coldstart image`` commands (build, inspect, usage errors)."""

from __future__ import annotations

import errno
import inspect
import json

import pytest

from coldstart.imagefs import cli, errors
from coldstart.imagefs.fs import errno_of


def test_every_error_maps_to_an_errno() -> None:
    declared = {
        obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, errors.ImageError)
    }
    assert declared == set(errors.ALL_ERRORS)
    for cls in errors.ALL_ERRORS:
        exc = cls("d" * 64, []) if cls is errors.ChunkUnavailable else cls("message")
        assert errno_of(exc) in (errno.EIO, errno.EINVAL)
    assert errno_of(errors.ChunkUnavailable("ab", ["x: absent"])) == errno.EIO
    assert errno_of(FileNotFoundError(errno.ENOENT, "x")) == errno.ENOENT
    assert errno_of(RuntimeError("other")) == errno.EIO


def test_cli_build_and_inspect(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("content")
    assert cli.main(["build", str(src), "-o", str(tmp_path / "store")]) == 0
    out = capsys.readouterr().out
    assert "digest  sha256:" in out
    index = tmp_path / "store" / "images" / "src.cidx"
    assert cli.main(["inspect", str(index), "--list"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[: out.index("}") + 1])
    assert info["bytes"] == 7 and info["inodes"] == 2
    assert "/f" in out


def test_cli_errors_are_one_line_with_exit_codes(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.cidx"
    bad.write_bytes(b"CSIMGIDX" + b"\0" * 10)
    assert cli.main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "shorter than an index header" in err
    (tmp_path / "mnt").mkdir()
    code = cli.main(["mount", str(bad), str(tmp_path / "mnt"), "--cache", str(tmp_path / "c")])
    assert code == 2  # no --tier and the index is not inside STORE/images
    assert "--tier" in capsys.readouterr().err
    assert cli.main(["nonsense"]) == 2
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize("command", ["build", "inspect", "mount", "umount", "serve"])
def test_every_command_has_help(command: str, capsys) -> None:
    assert cli.main([command, "--help"]) == 0
    assert "usage: coldstart image" in capsys.readouterr().out
