"""eval suite on tiny random encoders: CLIP_benchmark-layout folders built from offline data
(Fashion-MNIST test images, the tiny pair set, MNIST written as torchvision files), scored
through the suite and compared bitwise with eval classify / eval retrieval on the same images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import build_tiny_cache
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.data.builtin import fashion_root
from featcache.pipeline.data.catalog import load_dataset
from featcache.pipeline.evaluate.suite_file import builtin_names, load_suite
from featcache.pipeline.evaluate.suite_table import Outcome, averages, bootstrap_mean
from featcache.pipeline.train.runs import list_runs, read_json

runner = CliRunner()
LIMIT = 24


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_wds(root: Path, samples: list[tuple[bytes, str, bytes]], per_shard: int = 10) -> Path:
    """CLIP_benchmark's export layout: test/N.tar of (image, .cls or .txt) samples, nshards.txt."""
    (root / "test").mkdir(parents=True)
    n = (len(samples) + per_shard - 1) // per_shard
    for s in range(n):
        with tarfile.open(root / "test" / f"{s}.tar", "w") as tf:
            for i in range(s * per_shard, min(len(samples), (s + 1) * per_shard)):
                image, ext, payload = samples[i]
                _add(tf, f"s{i:07d}.png", image)
                _add(tf, f"s{i:07d}.{ext}", payload)
    (root / "test" / "nshards.txt").write_text(f"{n}\n")
    return root


def fashion_wds(root: Path) -> Path:
    """The very images eval classify --dataset fashion-mnist --limit LIMIT reads, in its order."""
    split = load_dataset("fashion-mnist")["test"].limited(LIMIT)
    index = {c: i for i, c in enumerate(split.classnames)}
    samples = [(_png(split.images.load(i)), "cls", str(index[g]).encode()) for i, g in enumerate(split.images.groups)]
    write_wds(root, samples)
    (root / "classnames.txt").write_text("\n".join(split.classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "\n".join(t.replace("{}", "{c}") for t in split.templates) + "\n")
    return root


def pairs_wds(root: Path, pairs: Path) -> Path:
    """The tiny pair set's test split as a CLIP_benchmark retrieval export (captions in .txt)."""
    split = load_dataset(str(pairs))["test"]
    captions: dict[str, list[str]] = {}
    for g, t in zip(split.texts.groups, split.texts.texts):
        captions.setdefault(g, []).append(t)
    samples = [(split.images.raw(i), "txt", "\n".join(captions[g]).encode()) for i, g in enumerate(split.images.ids)]
    write_wds(root, samples)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


def mnist_torchvision(root: Path) -> Path:
    """MNIST 5k's first images written as torchvision's MNIST files (ROOT/mnist/MNIST/raw)."""
    split = load_dataset("mnist")["test"].limited(LIMIT)
    pixels = np.stack([np.asarray(split.images.load(i).convert("L")) for i in range(len(split.images))])
    labels = np.asarray([int(g) if g.isdigit() else split.classnames.index(g) for g in split.images.groups],
                        dtype=np.uint8)
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            b"\0\0\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in pixels.shape) + pixels.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            b"\0\0\x08\x01" + len(labels).to_bytes(4, "big") + labels.tobytes())
    return root


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if not fashion_root().exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("suite")
    tiny = build_tiny_cache(root, n=60)
    common = ["--cache-dir", str(root / "cache"), "--runs-dir", str(root / "runs")]
    out = runner.invoke(app, ["sweep", "--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset",
                              str(tiny["pairs"]), *common, "--epochs", "2", "--seeds", "0,1,2"])
    assert out.exit_code == 0, out.output
    runs = [r.name for r in list_runs(root / "runs")]
    bench = root / "benchmarks"
    fashion_wds(bench / "wds_fmnist")
    pairs_wds(bench / "wds_shapes", tiny["pairs"])
    suite = root / "mine.toml"
    suite.write_text('name = "mine"\n'
                     '[[benchmark]]\nname = "fmnist-wds"\ntask = "classify"\nsource = "clip_benchmark:fmnist"\n'
                     '[[benchmark]]\nname = "fashion-mnist"\ntask = "classify"\nsource = "fashion-mnist"\n'
                     '[[benchmark]]\nname = "shapes"\ntask = "retrieval"\nsource = "benchmarks/wds_shapes"\n')
    return {"root": root, "common": common, "runs": runs, "bench": bench, "suite": suite, "pairs": tiny["pairs"]}


def _suite(env, *args):
    return runner.invoke(app, ["eval", "suite", "--suite", str(env["suite"]), "--benchmark-root", str(env["bench"]),
                               "--limit", str(LIMIT), *env["common"], *args])


def test_suite_equals_eval_classify_and_retrieval_bitwise(env):
    out_dir = env["root"] / "out1"
    out = _suite(env, "--run", env["runs"][0], "--baseline", env["runs"][1], "--extract", "--out", str(out_dir))
    assert out.exit_code == 0, out.output
    summary = read_json(out_dir / "suite.json")
    by_name = {b["name"]: b for b in summary["benchmarks"]}
    assert not any(b["skipped"] for b in by_name.values())
    assert summary["extracted"], "the first suite run extracts the benchmarks"
    # eval classify on the built-in set, on the same LIMIT images: the same numbers, bitwise
    for run, key in ((env["runs"][0], "metrics"), (env["runs"][1], "baseline")):
        cli = runner.invoke(app, ["eval", "classify", "--dataset", "fashion-mnist", "--limit", str(LIMIT), "--run", run,
                                  "--no-baseline", *env["common"]])
        assert cli.exit_code == 0, cli.output
        ref = read_json(next((env["root"] / "runs").glob(f"{run}/eval/classify-fashion-mnist-test-sample{LIMIT}.json")))
        assert by_name["fmnist-wds"][key] == ref["metrics"] == by_name["fashion-mnist"][key]
        cli = runner.invoke(app, ["eval", "retrieval", "--dataset", str(env["pairs"]), "--run", run, "--no-baseline",
                                  *env["common"]])
        assert cli.exit_code == 0, cli.output
        ref = read_json(next((env["root"] / "runs" / run / "eval").glob("retrieval-pairs*-test.json")))
        assert by_name["shapes"][key] == ref["metrics"]
    # one CLIP_benchmark-like JSON per (run, benchmark, task), with split, k and templates
    record = read_json(out_dir / "json" / env["runs"][0] / "fmnist-wds-classify.json")
    assert record["task"] == "zeroshot_classification" and record["split"] == f"test-sample{LIMIT}"
    assert record["metrics"]["acc1"] == by_name["fmnist-wds"]["metrics"]["top1"] and record["ks"] == [1, 5]
    assert record["templates"] == len(load_dataset("fashion-mnist")["test"].templates)
    assert record["class_sources"]["classnames"].endswith("wds_fmnist/classnames.txt")
    assert record["class_sources"]["templates"].endswith("zeroshot_classification_templates.txt")
    retrieval = read_json(out_dir / "json" / env["runs"][1] / "shapes-retrieval.json")
    assert retrieval["metrics"]["image_retrieval_recall@1"] == by_name["shapes"]["baseline"]["text_to_image"]["R@1"]
    table = (out_dir / "suite.md").read_text()
    assert "Average relative improvement" in table and "fmnist-wds" in table
    csv = (out_dir / "suite.csv").read_text().splitlines()
    assert csv[0] == "benchmark,task,metric,run,baseline,relative,note" and len(csv) == 1 + 3 + 3 + 6

    # another run of the same encoders extracts nothing
    out_dir = env["root"] / "out2"
    out = _suite(env, "--run", env["runs"][2], "--baseline", env["runs"][0], "--extract", "--out", str(out_dir))
    assert out.exit_code == 0, out.output
    again = read_json(out_dir / "suite.json")
    assert again["extracted"] == []
    assert {b["name"]: b["baseline"] for b in again["benchmarks"]} == {k: v["metrics"] for k, v in by_name.items()}


def test_templates_override_is_recorded(env, tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a {} thing.\nsomething {}.\n")
    out = _suite(env, "--run", env["runs"][0], "--extract", "--templates", str(templates), "--out", str(tmp_path / "o"))
    assert out.exit_code == 0, out.output
    record = read_json(tmp_path / "o" / "json" / env["runs"][0] / "fmnist-wds-classify.json")
    assert record["templates"] == 2 and record["class_sources"]["templates"] == str(templates)
    assert "Average relative improvement" not in (tmp_path / "o" / "suite.md").read_text()  # no baseline run


def test_paper_suite_without_data_exits_zero_naming_each_missing_set(env, tmp_path):
    out = runner.invoke(app, ["eval", "suite", "--suite", "paper", "--run", env["runs"][0], "--baseline", env["runs"][1],
                              "--benchmark-root", str(tmp_path / "none"), "--out", str(tmp_path / "p"), *env["common"]])
    assert out.exit_code == 0, out.output
    paper = load_suite("paper")
    skipped = [line for line in out.output.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == len(paper.benchmarks) == 28
    assert any("wds_cifar10" in line for line in skipped)
    table = (tmp_path / "p" / "suite.md").read_text()
    assert "28 of 28 benchmarks skipped" in table


def test_clip_benchmark_torchvision_mnist(env, tmp_path):
    pytest.importorskip("clip_benchmark")
    root = mnist_torchvision(tmp_path / "bench")
    suite = tmp_path / "tv.yaml"
    suite.write_text("benchmark:\n  - {name: mnist, task: classify, source: 'clip_benchmark:mnist'}\n")
    out = runner.invoke(app, ["eval", "suite", "--suite", str(suite), "--run", env["runs"][0], "--benchmark-root",
                              str(root), "--extract", "--out", str(tmp_path / "o"), *env["common"]])
    assert out.exit_code == 0, out.output
    record = read_json(tmp_path / "o" / "json" / env["runs"][0] / "mnist-classify.json")
    assert record["images"] == LIMIT and record["class_sources"]["classnames"].startswith("clip_benchmark")
    spec = record["spec"]
    cli = runner.invoke(app, ["eval", "classify", "--dataset", spec, "--run", env["runs"][0], "--no-baseline",
                              *env["common"]])
    assert cli.exit_code == 0, cli.output
    ref = read_json(Path(record["featcache_result"]))
    assert ref["metrics"]["top1"] == record["metrics"]["acc1"]


def test_builtin_suites_parse():
    assert {"offline", "paper", "vtab", "retrieval"} <= set(builtin_names())
    offline = load_suite("offline")
    assert [(b.name, b.task) for b in offline.benchmarks] == [
        ("fashion-mnist", "classify"), ("mnist", "classify"), ("tuxpaint-categories", "classify"),
        ("tuxpaint", "retrieval")]


def test_bootstrap_over_benchmarks():
    mean, lo, hi = bootstrap_mean([0.1, 0.3, 0.5])
    assert mean == pytest.approx(0.3) and 0.1 <= lo <= mean <= hi <= 0.5
    outcomes = [Outcome("a", "classify", {"top1": 0.6}, {"top1": 0.5}), Outcome("b", "classify", {"top1": 0.2},
                                                                                    {"top1": 0.4}),
                Outcome("c", "classify", skipped="not on disk")]
    avg = averages(outcomes)
    assert avg["classify"]["mean"] == pytest.approx((0.2 - 0.5) / 2) and avg["classify"]["benchmarks"] == 2


@pytest.mark.parametrize("text, suffix, words", [
    ("[[benchmark]\n", ".toml", "cannot be read"),
    ("benchmark: [\n", ".yaml", "cannot be read"),
    ('[[benchmark]]\nname = "a"\ntask = "segment"\nsource = "mnist"\n', ".toml", "unknown task"),
    ('[[benchmark]]\nname = "a"\ntask = "classify"\n', ".toml", "needs a source"),
    ("name = 'x'\n", ".toml", "lists no benchmark"),
])
def test_bad_suite_files_are_one_line(tmp_path, text, suffix, words):
    path = tmp_path / f"s{suffix}"
    path.write_text(text)
    out = runner.invoke(app, ["eval", "suite", "--suite", str(path), "--runs-dir", str(tmp_path)])
    assert out.exit_code != 0 and words in out.output and "Traceback" not in out.output
