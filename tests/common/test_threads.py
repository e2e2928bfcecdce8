"""CPU threads: the default is the cores this process may use, and --threads sets torch's."""

import os

import pytest
import torch
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cli.main import app
from featcache.pipeline.common.device import default_threads, set_threads, usable_cores


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_thread_default_honours_the_job_share_then_the_affinity(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert default_threads() == usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert default_threads() == usable_cores() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert default_threads() == 1
    assert usable_cores() == 3  # a thread setting is not a core count: decoding workers ignore it
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")  # not a count: the next rule decides
    assert default_threads() == 3


def test_set_threads_sets_torch_and_refuses_zero():
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(FeatcacheError, match="--threads 0"):
        set_threads(0)
    with pytest.raises(FeatcacheError, match="threads"):  # a huge pool crashed torch's forward (the option fuzz)
        set_threads(10**11)


def test_the_option_reaches_torch_before_the_command_runs(tmp_path):
    out = CliRunner().invoke(app, ["align", "--threads", "1", "--runs-dir", str(tmp_path), "--cache-dir",
                                   str(tmp_path / "empty"), "--epochs", "1"])
    assert out.exit_code != 0 and torch.get_num_threads() == 1  # set, then the missing cache is reported
    out = CliRunner().invoke(app, ["sweep", "--threads", "0", "--runs-dir", str(tmp_path)])
    assert out.exit_code != 0 and "--threads 0" in out.output
