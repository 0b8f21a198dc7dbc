"""``coldstart logs REPLICA`` (launcher/cli/logs.py): the engine output kept in the replica's engine.log."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coldstart.launcher.cli import main as cli


def test_prints_the_newest_launchers_log_of_that_replica(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "launcher-100" / "r1" / "engine.log"
    new = tmp_path / "launcher-200" / "r1" / "engine.log"
    for path, text in ((old, "old boot\n"), (new, "".join(f"line {i}\n" for i in range(80)))):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    os.utime(old, (1, 1))
    assert cli.main(["logs", "r1", "--work-dir", str(tmp_path), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert out == f"==> {new} <==\nline 77\nline 78\nline 79\n"
    assert cli.main(["logs", "r1", "--work-dir", str(tmp_path), "--all"]) == 0
    assert capsys.readouterr().out.split() == [str(new), str(old)]


def test_a_replica_without_a_log_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["logs", "r9", "--work-dir", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"coldstart logs: no engine.log of replica r9 under {tmp_path} (pass --work-dir?)"
    )
    assert cli.main(["logs", "../etc", "--work-dir", str(tmp_path)]) == 2
