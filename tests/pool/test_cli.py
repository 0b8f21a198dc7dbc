from __future__ import annotations

import json

import pytest

from coldstart.pool.cli import main


def test_help_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "simulate" in capsys.readouterr().out
    assert main(["bogus"]) == 2
    assert main([]) == 2


def test_inventory_and_health_say_there_is_no_driver(capsys: pytest.CaptureFixture[str]) -> None:
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:  # pragma: no cover
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    for cmd in ("inventory", "status", "health"):
        assert main([cmd]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no NVIDIA driver on this host" in err[0]


def test_inventory_of_cpu_slots(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inventory", "--provider", "cpu", "--cpu-slots", "2"]) == 0
    out = capsys.readouterr().out
    assert "capacity 2" in out and "cpu1  free" in out


def test_size_explains_its_decisions(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    types = tmp_path / "types.toml"
    types.write_text(
        '[[type]]\nname = "slow"\nprice_per_hour = 2.0\nlead_time_s = 3000\nsupply_cap = 4\n'
        '[[type]]\nname = "fast"\nprice_per_hour = 6.0\nlead_time_s = 60\nsupply_cap = 100\n'
    )
    assert main(["size", "--mean", "10", "--std", "0", "--types", str(types)]) == 0
    out = capsys.readouterr().out
    assert "slow: hold 4" in out and "supply cap 4 binds" in out and "fast: order 6" in out
    assert main(["size", "--mean", "10", "--std", "0", "--types", str(types), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hold"] == {"slow": 4}
    # a spike of 8 replicas, 2.4 a day: likely within the horizon, not before the fast order lands
    args = ["size", "--mean", "0", "--std", "0", "--spikes-per-day", "2.4", "--spike-size", "8"]
    assert main([*args, "--types", str(types)]) == 0
    out = capsys.readouterr().out
    assert "buffer: hold 0 idle, order 8" in out and "if demand outgrows the buffer, p=4.9%" in out
    assert main(["size", "--mean", "500", "--std", "0", "--types", str(types)]) == 1
    assert "add supply" in capsys.readouterr().err


def test_simulate_prints_a_table_and_writes_plots(capsys: pytest.CaptureFixture[str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    args = ["simulate", "--days", "0.1", "--cold-starts", "300", "--plots", str(tmp_path), "--save-trace",
            str(tmp_path / "t.csv")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| fixed peak |" in out and "| reactive, cold start 300s |" in out and "restore 2s |" in out
    assert (tmp_path / "demand-vs-allocated.png").stat().st_size > 10_000
    assert (tmp_path / "wait-cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--trace", str(tmp_path / "t.csv"), "--cold-starts", "50", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in rows][1] == "reactive, cold start 50s"
    assert main(["simulate", "--cold-starts", "x"]) == 2
