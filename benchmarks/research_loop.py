"""The research loop's costs as whole commands (start-up included), side by side in one run:
evaluating a sweep's runs in one call against one run's evaluation, and a small-head sweep with
one CPU thread against torch's default. Needs the Tux Paint cache of dinov2 and minilm
(the README's first command makes it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def featcache(*argv: str, env: dict | None = None) -> float:
    """Seconds of one ``featcache`` command in a fresh interpreter; a failure stops the benchmark."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "featcache.cli.main", *argv], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"featcache {' '.join(argv)} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.perf_counter() - start


def bench_batch_eval(quick: bool) -> dict:
    """18 runs evaluated by one ``eval retrieval --run all`` against one ``eval retrieval --run ID``
    (target: <= 3x), and against 18 separate commands (the cost before batch evaluation)."""
    epochs = "2" if quick else "5"
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(tmp) / "runs"
        featcache("sweep", "--layers", "last;auto", "--loss", "clip+structure", "--seeds", "0,1,2",
                  "--lam", "1,3,10", "--epochs", epochs, "--batch-size", "512", "--runs-dir", str(runs))
        ids = sorted(p.name for p in runs.iterdir() if not p.name.startswith("."))
        assert len(ids) == 18, ids
        one = [featcache("eval", "retrieval", "--run", ids[i], "--runs-dir", str(runs)) for i in (0, 1)]
        batch = [featcache("eval", "retrieval", "--run", "all", "--runs-dir", str(runs)) for _ in range(2)]
    t_one, t_all = min(one), min(batch)
    out = {"runs": 18, "one_run_s": t_one, "all_runs_s": t_all, "ratio_all_to_one": t_all / t_one,
           "separate_commands_s": 18 * t_one, "speedup_vs_separate": 18 * t_one / t_all, "readings": [one, batch]}
    print(f"batch_eval: one run {t_one:.1f}s, 18 runs in one call {t_all:.1f}s ({t_all / t_one:.2f}x one run; "
          f"18 separate commands ~{18 * t_one:.0f}s, {18 * t_one / t_all:.1f}x slower)")
    return out


def bench_threads(quick: bool) -> dict:
    """A 4-run sweep (clip+structure, small heads) with --threads 1 against torch's default threads
    and the default of --threads (the cores this process may use)."""
    epochs = "10" if quick else "40"
    env = {k: "" for k in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK") if k in os.environ}
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in (("threads_1", ["--threads", "1"]), ("threads_default", []),
                             ("threads_1_again", ["--threads", "1"])):
            runs = Path(tmp) / label
            times[label] = [featcache("sweep", "--layers", "last", "--loss", "clip+structure", "--seeds", "0,1,2,3",
                                      "--epochs", epochs, "--batch-size", "256", "--d-out", "256", "--no-vectorize",
                                      "--rerun", "--runs-dir", str(runs), *extra, env=env)]
    one = min(times["threads_1"] + times["threads_1_again"])
    default = times["threads_default"][0]
    cores = len(os.sched_getaffinity(0))
    out = {"cores": cores, "threads_1_s": one, "threads_default_s": default, "ratio_default_to_1": default / one,
           "load_avg": os.getloadavg(), "readings": times}
    print(f"threads: 4-run sweep, --threads 1 {one:.1f}s, default ({cores} cores) {default:.1f}s "
          f"({default / one:.2f}x), load average {os.getloadavg()[0]:.1f}")
    return out
