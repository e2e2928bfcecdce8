"""Options that used to trace, hang or run something else: each is one line and exit 2."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from featcache.cli.main import app

runner = CliRunner()


@pytest.mark.parametrize("argv, needle", [
    (["extract", "--dataset", "+"], "nothing on one side"),
    (["extract", "--dataset", "tuxpaint+"], "nothing on one side"),
    (["align", "--dataset", "tuxpaint+tuxpaint"], "appears twice"),
    (["align", "--seed", "-1"], "the seed must be a whole number"),
    (["align", "--seed", "99999999999999999999"], "the seed must be a whole number"),
    (["sweep", "--seeds", ""], "is empty"),
    (["study", "--seeds", ""], "is empty"),
    (["study", "--merge", ""], "is empty"),
    # found by tests/cli/test_option_fuzz.py
    (["study", "--pairs", "1,1"], "bad --pairs size '1'"),
    (["study", "--pairs", "nan"], "bad --pairs size 'nan'"),
    (["extract", "--num-workers", "99999999999999999999"], "decoding processes"),
    (["extract", "--image-size", "14000"], "PIL's decompression-bomb check"),
    (["align", "--levels", "4199"], "use at most 64"),
    (["align", "--lr", "3.83e68"], "beyond float32"),
])
def test_bad_options_are_one_line(argv, needle, tmp_path):
    out = runner.invoke(app, [*argv, "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and needle in " ".join(out.output.split()), out.output
    assert "Traceback" not in out.output and not (tmp_path / "cache").exists()


def test_heads_that_cannot_fit_are_refused_ahead_in_one_line(tmp_path):
    from conftest import build_tiny_cache

    tiny = build_tiny_cache(tmp_path / "tiny", n=24)
    common = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
              "--cache-dir", str(tiny["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["align", *common, "--d-out", "500000000", "--epochs", "1"])
    assert out.exit_code == 2 and "--d-out 500000000" in out.output and "GiB" in out.output, out.output
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())
    out = runner.invoke(app, ["layers", *common[:-2], "--calibrate", "100000", "--n", "20"])
    assert out.exit_code == 2 and "at most 1000" in out.output, out.output


def test_every_align_option_is_a_sweep_option():
    """align and sweep share one option set: what align can set, a sweep can fix or vary
    (seed as the axis seeds); a new align option without its sweep twin fails here."""
    import typer.main

    from featcache.cli.main import app

    commands = typer.main.get_command(app).commands
    align = {p.name for p in commands["align"].params}
    sweep = {p.name for p in commands["sweep"].params}
    assert align - {"seed"} <= sweep and "seeds" in sweep
    shared = {p.name: p for p in commands["align"].params}
    for p in commands["sweep"].params:
        if p.name in shared and p.name not in ("lam", "temperature", "centering", "center_first", "similarity",
                                                "margin", "fixed_structure", "method", "layers", "loss", "pairs", "config"):  # axes: lists
            assert p.help == shared[p.name].help, p.name  # declared once: the same Option, the same text


def test_a_layer_table_that_cannot_fit_is_one_line_naming_n(tmp_path, monkeypatch):
    from conftest import build_tiny_cache

    from featcache.pipeline.common import device

    tiny = build_tiny_cache(tmp_path / "tiny", n=24)
    argv = ["layers", "--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
            "--cache-dir", str(tiny["cache"]), "--metric", "hcs", "--n", "50000", "--out", str(tmp_path / "h.png")]
    monkeypatch.setattr(device, "available_bytes", lambda dev: 4096)  # a process with 4 KiB to spare
    out = runner.invoke(app, argv)
    line = " ".join(out.output.split())
    assert out.exit_code == 2 and "--n" in line and "needs about" in line and "lower --n" in line, out.output
    assert "Traceback" not in out.output and not (tmp_path / "h.png").exists()
    monkeypatch.undo()
    assert runner.invoke(app, argv).exit_code == 0  # the same table (24 rows) fits a real machine
