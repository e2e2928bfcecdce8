"""Stage two on caches of tiny random encoders (fast); the real run is in test_real_pipeline."""

import json

import pytest
import torch
from conftest import align_then_eval_with_tracker, build_tiny_cache
from typer.testing import CliRunner

from featcache.cache.errors import FeatcacheError
from featcache.cli.main import app
from featcache.pipeline.train.config import AlignConfig
from featcache.pipeline.train.heads import ResidualMLPHead
from featcache.pipeline.train.loop import train, validation_losses
from featcache.pipeline.train.plan import load_cached
from featcache.pipeline.train.runs import find_run, list_runs, load_heads, read_json
from featcache.pipeline.train.sweep import sweep

runner = CliRunner()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # benchmarks/gpu_smoke.sh runs these on CUDA


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return build_tiny_cache(tmp_path_factory.mktemp("tiny-cache"), n=72)


def _cfg(tiny_cache, tmp_path, **kw):
    base = dict(image_model=tiny_cache["vit"], text_model=tiny_cache["bert"], dataset=str(tiny_cache["pairs"]),
                cache_dir=tiny_cache["cache"], runs_dir=tmp_path / "runs", epochs=15, patience=5, batch_size=16,
                lam_warmup_steps=10)
    base.update(kw)
    return AlignConfig(**base)


def test_same_seed_same_results(tiny_cache, tmp_path):
    a = train(_cfg(tiny_cache, tmp_path, seed=3))
    b = train(_cfg(tiny_cache, tmp_path, seed=3))
    c = train(_cfg(tiny_cache, tmp_path, seed=4))
    metrics = lambda r: (r / "metrics.jsonl").read_text()
    assert metrics(a) == metrics(b)
    assert (a / "heads.safetensors").read_bytes() == (b / "heads.safetensors").read_bytes()
    assert metrics(a) != metrics(c)


def test_run_record_and_best_weights_restored(tiny_cache, tmp_path):
    cfg = _cfg(tiny_cache, tmp_path, epochs=40, patience=40, lr=3e-2)
    run = train(cfg)
    config, summary = read_json(run / "config.json"), read_json(run / "summary.json")
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert config["lr"] == 3e-2 and config["cache"]["train"]["image"]["encoder"]["weights_sha256"]
    assert (run / "layer_scores.json").exists()  # layers=auto records the table it chose from
    # the configured lr is the peak of a single cosine decay: never replaced by anything else
    assert rows[0]["lr"] <= 3e-2 and all(r1["lr"] >= r2["lr"] for r1, r2 in zip(rows, rows[1:]))
    best = min(rows, key=lambda r: r["val_clip"])
    assert summary["best_epoch"] == best["epoch"]
    model, _ = load_heads(run)
    data = load_cached(cfg)
    vi = torch.from_numpy(data.features("val", "image", summary["image_layer"]))
    vt = torch.from_numpy(data.features("val", "text", summary["text_layer"]))
    assert validation_losses(model, cfg, vi, vt)["clip"] == pytest.approx(best["val_clip"], rel=1e-5)


def test_pairs_subsample_is_reproducible(tiny_cache, tmp_path):
    a = train(_cfg(tiny_cache, tmp_path, pairs=20, seed=1))
    b = train(_cfg(tiny_cache, tmp_path, pairs=20, seed=1))
    assert read_json(a / "summary.json")["train_pairs"] == 20
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_mlp_gate_and_branch_train():
    torch.manual_seed(0)
    head = ResidualMLPHead(8, 4)
    w2, gate = head.w2.weight.detach().clone(), head.gate.detach().clone()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    x, y = torch.randn(64, 8), torch.randn(64, 4)
    for _ in range(5):
        loss = ((head(x) - torch.tanh(y * 3)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(head.w2.weight, w2) and head.w2.weight.abs().sum() > 0
    assert head.gate.item() != gate.item()


def test_sweep_grid_from_cache_only(tiny_cache, tmp_path, monkeypatch):
    import featcache.pipeline.extract.loading as loading
    import featcache.pipeline.extract.run as extract

    def no_encoders(*a, **k):
        raise AssertionError("a sweep must not load an encoder")

    for module in (loading, extract):  # the name as defined and where extraction bound it
        monkeypatch.setattr(module, "load_encoder", no_encoders)
    runs = sweep(_cfg(tiny_cache, tmp_path, epochs=3), ["last", "auto"], ["clip", "clip+structure"], [0, 1])
    assert len(runs) == 8 == len(list_runs(tmp_path / "runs"))
    cells = {(read_json(r / "config.json")["layers"], read_json(r / "config.json")["loss"],
              read_json(r / "config.json")["seed"]) for r in runs}
    assert len(cells) == 8
    assert find_run(tmp_path / "runs", "latest") in runs


def test_cli_align_layers_and_runs(tiny_cache, tmp_path):
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"])]
    out = runner.invoke(app, ["layers", *common, "--out", str(tmp_path / "h.png")])
    assert out.exit_code == 0, out.output
    assert "best pair" in out.output and (tmp_path / "h.png").stat().st_size > 1000
    out = runner.invoke(app, ["align", *common, "--runs-dir", str(tmp_path / "runs"), "--epochs", "3",
                              "--head", "mlp", "--loss", "clip+structure", "--levels", "2", "--layers", "-1,-1"])
    assert out.exit_code == 0, out.output
    cfg = read_json(find_run(tmp_path / "runs") / "config.json")
    assert cfg["head"] == "mlp" and cfg["levels"] == 2 and cfg["image_layer"] == "block.02"
    out = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path / "runs")])
    assert out.exit_code == 0 and "mlp" in out.output


@pytest.mark.parametrize("argv, needle", [
    (["--image-model", "dinov2-s", "--dataset", "tuxpaint"], "featcache extract --model dinov2-s"),
    (["--loss", "triplet"], "unknown loss"),
    (["--layers", "99,0"], "out of range"),
    (["--head", "transformer"], "unknown head"),
])
def test_cli_align_errors(tiny_cache, tmp_path, argv, needle):
    base = {"--image-model": tiny_cache["vit"], "--text-model": tiny_cache["bert"],
            "--dataset": str(tiny_cache["pairs"]), "--cache-dir": str(tiny_cache["cache"]),
            "--runs-dir": str(tmp_path / "runs"), "--epochs": "2"}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    out = runner.invoke(app, ["align", *[x for kv in base.items() for x in kv]])
    assert out.exit_code == 2, out.output
    assert needle in out.output and "Traceback" not in out.output
    assert not list((tmp_path / "runs").glob(".partial-*"))  # nothing half-written is left


def test_structure_switches_sweep_as_an_ablation_table(tiny_cache, tmp_path):
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["sweep", *common, "--layers", "last", "--loss", "clip+structure", "--seeds", "0",
                              "--epochs", "2", "--batch-size", "16", "--centering", "none,mean,standard",
                              "--similarity", "cosine,rbf", "--fixed-structure", "false,true"])
    assert out.exit_code == 0, out.output
    configs = [read_json(r / "config.json") for r in list_runs(tmp_path / "runs")]
    cells = {(c["centering"], c["similarity"], c["fixed_structure"]) for c in configs}
    assert len(configs) == 12 == len(cells)
    out = runner.invoke(app, ["align", *common, "--epochs", "2", "--centering", "sideways"])
    assert out.exit_code == 2 and "unknown centering" in out.output


def test_fixed_structure_changes_only_the_regularizer_batch(tiny_cache, tmp_path):
    a = train(_cfg(tiny_cache, tmp_path, seed=1, loss="clip+structure", lam_warmup_steps=0))
    b = train(_cfg(tiny_cache, tmp_path, seed=1, loss="clip+structure", lam_warmup_steps=0, fixed_structure=True))
    c = train(_cfg(tiny_cache, tmp_path, seed=1, loss="clip", fixed_structure=True))
    d = train(_cfg(tiny_cache, tmp_path, seed=1, loss="clip"))
    rows = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
    assert rows(a)[0]["train_structure"] != rows(b)[0]["train_structure"]
    assert rows(c) == rows(d)  # without R_S the switch changes nothing, batch order included


def test_layers_and_auto_selection_by_any_metric(tiny_cache, tmp_path):
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"])]
    for metric, rule in (("cycle_knn", "sqrt"), ("cknna", "sturges"), ("svcca", "rice")):
        out = runner.invoke(app, ["layers", *common, "--metric", metric, "--k-rule", rule,
                                  "--out", str(tmp_path / f"{metric}.png")])
        assert out.exit_code == 0 and metric in out.output, out.output
        assert read_json(tmp_path / f"{metric}.json")["metric"] == metric
    out = runner.invoke(app, ["align", *common, "--runs-dir", str(tmp_path / "runs"), "--epochs", "2",
                              "--select-metric", "unbiased_cka"])
    assert out.exit_code == 0, out.output
    run = find_run(tmp_path / "runs")
    assert read_json(run / "layer_scores.json")["metric"] == "unbiased_cka"
    assert read_json(run / "config.json")["select"]["metric"] == "unbiased_cka"
    for bad in (["--metric", "nope"], ["--k-rule", "fibonacci"]):
        out = runner.invoke(app, ["layers", *common, *bad])
        assert out.exit_code == 2 and "unknown" in out.output
    # query rows: an estimate of the table from a seeded subset of rows, recorded as such
    out = runner.invoke(app, ["layers", *common, "--queries", "20", "--out", str(tmp_path / "q.png")])
    assert out.exit_code == 0, out.output
    assert read_json(tmp_path / "q.json")["queries"] == 20
    out = runner.invoke(app, ["layers", *common, "--queries", "20", "--metric", "cka"])
    assert out.exit_code == 2 and "query rows work with" in out.output


@pytest.mark.parametrize("method", ["procrustes", "csa", "csa+structure", "asif"])
def test_training_free_methods_are_runs_like_any_other(tiny_cache, tmp_path, method):
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["align", *common, "--method", method, "--layers", "last"])
    assert out.exit_code == 0, out.output
    run = find_run(tmp_path / "runs")
    config, summary = read_json(run / "config.json"), read_json(run / "summary.json")
    assert config["method"] == method == summary["method"] and (run / "heads.safetensors").exists()
    out = runner.invoke(app, ["eval", "retrieval", *common[6:], "--run", run.name])
    assert out.exit_code == 0, out.output
    res = next((run / "eval").glob("retrieval-*.json"))
    assert all(0 <= v <= 1 for d in read_json(res)["metrics"].values() for v in d.values())
    model, _ = load_heads(run)
    assert model.image_head(torch.zeros(2, 32)).shape[0] == 2


def test_a_sweep_over_methods_is_a_method_comparison(tiny_cache, tmp_path):
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["sweep", *common, "--layers", "last", "--loss", "clip", "--seeds", "0,1",
                              "--epochs", "2", "--batch-size", "16", "--method", "heads,csa,asif"])
    assert out.exit_code == 0, out.output
    for run in list_runs(tmp_path / "runs"):
        assert runner.invoke(app, ["eval", "retrieval", *common[6:], "--run", run.name]).exit_code == 0
    out = runner.invoke(app, ["report", "--runs-dir", str(tmp_path / "runs"), "--group-by", "method"])
    assert out.exit_code == 0 and "csa" in out.output and "asif" in out.output, out.output


def test_sweeps_never_record_what_they_did_not_read_and_reports_keep_ablations_apart(tiny_cache, tmp_path):
    from featcache.pipeline.app.report import build_report, run_rows

    with pytest.raises(FeatcacheError, match="cannot vary image_model"):
        sweep(_cfg(tiny_cache, tmp_path), ["last"], ["clip"], [0], grid={"image_model": ["a", "b"]})
    runs = sweep(_cfg(tiny_cache, tmp_path, epochs=2), ["last"], ["clip", "clip+structure"], [0, 1],
                 grid={"method": ["heads", "csa"], "centering": ["none", "mean"]})
    configs = [read_json(r / "config.json") for r in runs]
    assert sum(c["method"] == "csa" for c in configs) == 2  # one csa run per centering, not per loss or seed
    rep = build_report(run_rows(tmp_path / "runs"))
    assert "centering" in rep.group_by and all(g["n"] <= 2 for g in rep.groups)


def test_sweep_shards_split_the_grid_and_combine_to_the_whole(tiny_cache, tmp_path, monkeypatch):
    argv = lambda runs: ["sweep", "--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"],
                         "--dataset", str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]),
                         "--runs-dir", str(runs), "--layers", "last;auto", "--loss", "clip", "--seeds", "0,1,2",
                         "--epochs", "2", "--batch-size", "16"]
    assert runner.invoke(app, argv(tmp_path / "one")).exit_code == 0
    assert runner.invoke(app, [*argv(tmp_path / "shared"), "--shard", "0/2"]).exit_code == 0
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")  # the second share found from a Slurm array
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert runner.invoke(app, argv(tmp_path / "shared")).exit_code == 0

    def cells(runs_dir):
        out = {}
        for run in list_runs(runs_dir):
            c = read_json(run / "config.json")
            out[(c["layers"], c["seed"])] = _rows(run)
        return out

    one, shared = cells(tmp_path / "one"), cells(tmp_path / "shared")
    assert len(one) == 6 and one.keys() == shared.keys()  # the same cells
    for key in one:  # the same metrics (cells stacked six or three at a time: equal to float rounding)
        _assert_same_curves(one[key], shared[key])


def _rows(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_curves(a: list[dict], b: list[dict], tol: float = 1e-4):
    assert len(a) == len(b) and all(ra.keys() == rb.keys() for ra, rb in zip(a, b))
    for ra, rb in zip(a, b):
        for k in ra:
            assert ra[k] == pytest.approx(rb[k], abs=tol, rel=0), (k, ra, rb)


@pytest.mark.parametrize("device", DEVICES)
def test_vectorized_cells_equal_their_sequential_runs(tiny_cache, tmp_path, device):
    """Cells stacked in one batched model (seeds x lambda x tau x pair counts) against the same
    configs trained one by one: the same records, curves, early stops, weights and recalls.
    On CUDA the curves part by up to 3e-5 at this lr (1.2e-4 at lr 3e-2), growing from the first
    step; two sequential runs there are bitwise equal (docs/benchmarks.md)."""
    from safetensors.torch import load_file

    from featcache.pipeline.evaluate.retrieval import RetrievalConfig, eval_retrieval

    grid, runs, lr = {"lam": [1.0, 10.0], "temperature": [0.05, 0.1]}, {}, 1e-2
    for mode in ("seq", "vec"):
        base = _cfg(tiny_cache, tmp_path / mode, epochs=12, patience=3, lr=lr, layers="last", device=device)
        runs[mode] = sweep(base, ["last"], ["clip+structure"], [0, 1], [40, 44], grid=grid,
                           vectorize=mode == "vec")
    assert len(runs["seq"]) == len(runs["vec"]) == 16
    stopped, batched, weight_diff, weight_rel = set(), set(), [], []
    for seq, vec in zip(runs["seq"], runs["vec"]):
        cs, cv = read_json(seq / "config.json"), read_json(vec / "config.json")
        assert cs.pop("runs_dir") != cv.pop("runs_dir") and cs == cv  # the same cell, recorded the same way
        ss, sv = read_json(seq / "summary.json"), read_json(vec / "summary.json")
        batched.add(sv.pop("batched_cells"))
        for key in ("best_epoch", "epochs_run", "steps", "train_pairs", "image_layer", "checkpoint_on"):
            assert ss[key] == sv[key], key
        assert ss["best_val"] == pytest.approx(sv["best_val"], abs=1e-4)
        stopped.add(ss["epochs_run"] < 12)
        _assert_same_curves(_rows(seq), _rows(vec))
        recalls = [eval_retrieval(RetrievalConfig(run=str(r), baseline=False, cache_dir=tiny_cache["cache"],
                                                  runs_dir=r.parent))["metrics"] for r in (seq, vec)]
        for direction in recalls[0]:
            assert recalls[0][direction] == pytest.approx(recalls[1][direction], abs=1e-4)
        ws, wv = load_file(str(seq / "heads.safetensors")), load_file(str(vec / "heads.safetensors"))
        assert ws.keys() == wv.keys()
        weight_diff.append(max(float((ws[k] - wv[k]).abs().max()) for k in ws))
        weight_rel.append(max(float((ws[k] - wv[k]).norm() / ws[k].norm()) for k in ws))
    if device == "cpu":  # the same kernels: the same weights
        assert max(weight_diff) <= 1e-4, weight_diff
    else:  # stacked products take other cuBLAS kernels, and Adam's first step moves a weight by about
        # +-lr whatever its gradient's size: weights with a gradient that is zero up to rounding can
        # part by ~2 lr. A mixed-up cell would part every weight.
        assert max(weight_diff) <= 2.5 * lr and max(weight_rel) <= 1e-2, (weight_diff, weight_rel)
    assert stopped == {True, False}  # some cells stopped early inside the stack, others ran on
    assert batched == {16}  # one stack: 40 and 44 pairs both give 2 steps of 16


def test_tensorboard_tracker_holds_the_curves_and_the_final_recalls(tiny_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = align_then_eval_with_tracker(tiny_cache, tmp_path, "tensorboard")
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/clip", "train/structure", "val/clip", "val/total", "lambda", "lr"} <= tags
    assert [e.step for e in events.Scalars("val/clip")] == [0, 1, 2, 3]
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("val/clip")] == pytest.approx([l["val_clip"] for l in lines])
    assert any(t.startswith("eval/retrieval/") and t.endswith("R@1") for t in tags)
    common = ["--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"], "--dataset",
              str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]), "--runs-dir", str(tmp_path / "runs")]
    out = runner.invoke(app, ["align", *common, "--epochs", "1", "--log", "mlflow"])
    assert out.exit_code == 2 and "unknown tracker" in out.output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vectorize", [False, True])
def test_no_host_reads_inside_the_step_loop(tiny_cache, tmp_path, monkeypatch, vectorize, device):
    """Losses stay on the device during an epoch: the number of device-to-host reads does not
    grow with the steps per epoch (one read per epoch), sequential or stacked."""
    import sys
    from pathlib import Path

    import featcache.pipeline

    ours = str(Path(featcache.pipeline.__file__).parent)  # reads made by featcache's code (torch's
    reads = []  # AdamW reads its step counter, which it keeps on the host on purpose)

    def counted(name, original):
        def read(self, *a, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                reads.append(name)
            return original(self, *a, **k)
        return read

    for name in ("item", "tolist", "cpu", "__float__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))

    def count(batch_size):
        reads.clear()
        sweep(_cfg(tiny_cache, tmp_path / str(batch_size), epochs=3, patience=10, batch_size=batch_size,
                   layers="last", device=device), ["last"], ["clip+structure"], [0, 1], vectorize=vectorize)
        return len(reads)

    assert count(24) == count(8)  # 2 and 6 steps per epoch


def test_sweep_takes_every_training_option_of_align(tiny_cache, tmp_path):
    """align and sweep declare their shared options once: what align can set, a sweep can fix."""
    out = runner.invoke(app, ["sweep", "--image-model", tiny_cache["vit"], "--text-model", tiny_cache["bert"],
                              "--dataset", str(tiny_cache["pairs"]), "--cache-dir", str(tiny_cache["cache"]),
                              "--runs-dir", str(tmp_path / "runs"), "--layers", "last", "--loss", "clip+structure",
                              "--seeds", "0", "--epochs", "2", "--batch-size", "16", "--d-out", "16",
                              "--lam-warmup", "0", "--weighting", "inverse", "--divergence", "js",
                              "--learn-temperature"])
    assert out.exit_code == 0, out.output
    config = read_json(next((tmp_path / "runs").iterdir()) / "config.json")
    assert (config["d_out"], config["lam_warmup_steps"], config["weighting"], config["divergence"],
            config["learn_temperature"]) == (16, 0, "inverse", "js", True)


def test_identical_runs_started_at_once_never_share_an_id(tmp_path):
    from featcache.pipeline.train.runs import RunWriter

    writers = [RunWriter(tmp_path / "runs", {"same": "config"}) for _ in range(3)]
    assert len({w.run_id for w in writers}) == 3 and len({w.tmp for w in writers}) == 3
    for w in writers:
        w.abort()
