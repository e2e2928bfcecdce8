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
])
def test_bad_options_are_one_line(argv, needle, tmp_path):
    out = runner.invoke(app, [*argv, "--cache-dir", str(tmp_path / "cache")])
    assert out.exit_code == 2 and needle in " ".join(out.output.split()), out.output
    assert "Traceback" not in out.output and not (tmp_path / "cache").exists()
