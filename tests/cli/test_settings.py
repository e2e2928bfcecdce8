"""Settings from files and the environment, recorded by source; names and tags on runs; what
trackers and summaries say about a run."""

import json

import pytest
import yaml
from conftest import build_tiny_cache
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.app.report import build_report, run_rows
from featcache.pipeline.train.runs import list_runs

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("settings"), n=48)


@pytest.fixture
def project(tiny, tmp_path, monkeypatch):
    """A project folder whose featcache.toml names the encoders, data and folders."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "featcache.toml").write_text(
        f'image-model = "{tiny["vit"]}"\ntext_model = "{tiny["bert"]}"\ndataset = "{tiny["pairs"]}"\n'
        f'cache_dir = "{tiny["cache"]}"\nruns_dir = "{tmp_path / "runs"}"\n\n[align]\nbatch-size = 16\nd_out = 16\n')
    return tmp_path


def config_of(run):
    return json.loads((run / "config.json").read_text())


def test_project_file_gives_defaults_and_each_run_records_where_settings_came_from(project, monkeypatch):
    out = runner.invoke(app, ["align", "--epochs", "2", "--layers", "last", "--name", "first try", "--tag",
                              "ablation=none", "--tag", "who=me"])
    assert out.exit_code == 0, out.output
    [run] = list_runs(project / "runs")
    cfg = config_of(run)
    assert cfg["batch_size"] == 16 and cfg["d_out"] == 16 and cfg["image_model"].startswith("hf:")
    src = cfg["sources"]
    assert src["image_model"] == "featcache.toml" and src["batch_size"] == "featcache.toml [align]"
    assert src["epochs"] == "command line" and src["lr"] == "default"
    assert (cfg["name"], cfg["tags"]) == ("first try", {"ablation": "none", "who": "me"})
    shown = runner.invoke(app, ["runs"])
    assert shown.exit_code == 0 and "name" in shown.output and "first" in shown.output  # a folded column
    listed = json.loads(runner.invoke(app, ["runs", "--json"]).output)["runs"][0]
    assert (listed["name"], listed["tags"]) == ("first try", {"ablation": "none", "who": "me"})
    monkeypatch.setenv("FEATCACHE_TEXT_MODEL", "minilm")  # the environment over the project file
    out = runner.invoke(app, ["align", "--epochs", "1", "--layers", "last"])
    assert out.exit_code != 0 and "minilm" in out.output  # it looked for minilm's stores


def test_sweep_config_file_holds_a_grid_and_flags_override_it(project):
    grid = project / "grid.yaml"
    grid.write_text(yaml.safe_dump({"layers": ["last", "0,0"], "loss": "clip", "seeds": [0, 1], "lam": [1, 3],
                                    "epochs": 2, "batch_size": 16, "d_out": 16}))
    out = runner.invoke(app, ["sweep", "--config", str(grid), "--seeds", "5", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "4 cells, 0 finished" in out.output  # 2 layer choices x 2 lam x seed 5 (the flag wins)
    out = runner.invoke(app, ["sweep", "--config", str(grid), "--seeds", "5", "--tag", "kind=grid"])
    assert out.exit_code == 0, out.output
    cfgs = [config_of(r) for r in list_runs(project / "runs")]
    assert {c["seed"] for c in cfgs} == {5} and {c["lam"] for c in cfgs} == {1.0, 3.0}
    assert {c["sources"]["lam"] for c in cfgs} == {str(grid)} and {c["sources"]["seeds"] for c in cfgs} == {"command line"}
    assert len({c["group"] for c in cfgs}) == 1  # one sweep, one wandb group
    rows = run_rows(project / "runs")
    assert len(build_report(rows, where={"tag.kind": "grid"}).groups) == 4
    bad = project / "bad.toml"
    bad.write_text("seeds = [0]\nlamda = 3\n")
    out = runner.invoke(app, ["sweep", "--config", str(bad)])
    assert out.exit_code == 2 and "lamda" in out.output and "Traceback" not in out.output


def test_a_bad_project_file_is_one_line(project):
    (project / "featcache.toml").write_text("epochs = 3\n")
    out = runner.invoke(app, ["runs"])
    assert out.exit_code == 2 and "'epochs' is not a setting it can hold" in out.output
    (project / "featcache.toml").write_text("image_model = \n")
    out = runner.invoke(app, ["runs"])
    assert out.exit_code == 2 and "not valid TOML" in out.output


def test_clip_runs_log_no_lambda_and_an_early_checkpoint_is_named(project):
    out = runner.invoke(app, ["align", "--epochs", "2", "--layers", "last", "--loss", "clip"])
    assert out.exit_code == 0, out.output
    [run] = list_runs(project / "runs")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("lambda" not in line for line in lines)
    out = runner.invoke(app, ["align", "--epochs", "3", "--patience", "3", "--layers", "last", "--lam-warmup", "1000"])
    assert out.exit_code == 0, out.output
    [run] = [r for r in list_runs(project / "runs") if config_of(r)["loss"] == "clip+structure"]  # ids sort by second
    summary = json.loads((run / "summary.json").read_text())
    note = summary["best_before_lambda_warmup"]
    assert note["lambda"] < note["lam"] and "note: the best epoch" in out.output


def test_tensorboard_gets_the_hyperparameters(project):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = runner.invoke(app, ["align", "--epochs", "2", "--layers", "last", "--log", "tensorboard", "--tag", "k=v"])
    assert out.exit_code == 0, out.output
    events = EventAccumulator(str(list_runs(project / "runs")[-1] / "tensorboard"))
    events.Reload()
    assert "_hparams_/experiment" in events.summary_metadata and "_hparams_/session_start_info" in events.summary_metadata
    info = events.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert b"d_out" in info and b"tag.k" in info
