"""Evaluation and reports on caches of tiny random encoders."""

import pytest
from conftest import build_tiny_cache, make_pairs, save_tiny_bert, save_tiny_vit
from PIL import Image
from typer.testing import CliRunner

from featcache.cli.main import app
from featcache.pipeline.common.names import canonical_name
from featcache.pipeline.train.runs import find_run, read_json

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tiny = build_tiny_cache(root, n=60)
    pairs = tiny["pairs"]
    folder = root / "shapes"
    for cls, colour in (("red", (220, 30, 30)), ("blue", (30, 60, 220))):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (30 + i, 30), colour).save(folder / cls / f"{i}.png")
    common = ["--cache-dir", str(root / "cache"), "--runs-dir", str(root / "runs")]
    models = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(pairs)]
    out = runner.invoke(app, ["sweep", *models, *common, "--epochs", "3", "--layers", "last;auto",
                              "--loss", "clip,clip+structure", "--seeds", "0,1,2"])
    assert out.exit_code == 0, out.output
    return {"root": root, "common": common, "folder": folder, "pairs": pairs}


def test_eval_retrieval_writes_one_result(env):
    out = runner.invoke(app, ["eval", "retrieval", *env["common"]])
    assert out.exit_code == 0, out.output
    run = find_run(env["root"] / "runs")
    res = read_json(run / "eval" / f"retrieval-{canonical_name(str(env['pairs']))}-test.json")
    assert res["dataset"] == str(env["pairs"]) and res["split"] == "test" and res["positive_rule"] == "image"
    assert res["ks"] == [1, 5, 10] and res["cache"]["image"]["weights_sha256"]
    for direction in ("image_to_text", "text_to_image"):
        r = res["metrics"][direction]
        assert 0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1
    assert res["baseline"]["method"] == "procrustes"  # both tiny encoders are 32 wide
    out = runner.invoke(app, ["eval", "retrieval", *env["common"], "--positives", "caption"])
    assert out.exit_code == 0, out.output
    assert (run / "eval" / f"retrieval-{canonical_name(str(env['pairs']))}-test-caption-positives.json").exists()


def test_eval_classify_image_folder_with_extract(env, tmp_path):
    argv = ["eval", "classify", "--dataset", str(env["folder"]), *env["common"]]
    out = runner.invoke(app, argv)
    assert out.exit_code == 2 and "featcache extract --model hf:" in out.output and "--extract" in out.output
    out = runner.invoke(app, argv + ["--extract"])
    assert out.exit_code == 0, out.output
    res = read_json(find_run(env["root"] / "runs") / "eval" / f"classify-{canonical_name(str(env['folder']))}-test.json")
    assert res["classes"] == 2 and res["images"] == 8 and "top5" not in res["metrics"]
    templates = tmp_path / "t.txt"
    templates.write_text("a {} thing.\nsomething {}.\n")
    out = runner.invoke(app, argv + ["--extract", "--templates", str(templates)])
    assert out.exit_code == 0, out.output
    files = [p.name for p in (find_run(env["root"] / "runs") / "eval").glob("classify-shapes*")]
    assert len(files) == 2  # user templates are another prompt set, stored apart


def test_report_mean_std_and_outputs(env, tmp_path):
    for run in sorted((env["root"] / "runs").iterdir()):
        out = runner.invoke(app, ["eval", "retrieval", *env["common"], "--run", run.name])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["report", "--runs-dir", str(env["root"] / "runs"), "--group-by", "layers,loss",
                              "--out", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    assert "±" in out.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert sum(l.startswith("|") for l in md.splitlines()) == 2 + 4  # header, rule, 2 layers x 2 losses
    assert "sample std over seeds (ddof=1)" in md  # the one spread convention, stated
    assert "| 3 |" in md  # three seeds per cell
    csv = (tmp_path / "rep" / "report.csv").read_text().splitlines()
    assert csv[0].startswith("layers,loss,n,") and len(csv) == 5
    assert (tmp_path / "rep" / "report-bars.png").stat().st_size > 1000
    bad = runner.invoke(app, ["report", "--runs-dir", str(env["root"] / "runs"), "--group-by", "colour"])
    assert bad.exit_code == 2 and "unknown group key" in bad.output


def test_combined_pair_sets_read_each_part_cache(tmp_path):
    a = make_pairs(tmp_path / "a", n=30, seed=1)
    b = make_pairs(tmp_path / "b", n=30, seed=2)
    b = b.rename(b.with_name("other.jsonl"))
    vit, bert = save_tiny_vit(tmp_path / "vit"), save_tiny_bert(tmp_path / "bert")
    spec = f"{a}+{b}"
    common = ["--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs")]
    for model in (vit, bert):
        out = runner.invoke(app, ["extract", "--model", f"hf:{model}", "--dataset", spec, "--cache-dir",
                                  str(tmp_path / "cache")])
        assert out.exit_code == 0, out.output
    # each part cached apart, under its stem and a digest of its path and content
    assert {p.name.split(".")[0] for p in (tmp_path / "cache").iterdir()} == {"pairs", "other"}
    out = runner.invoke(app, ["align", "--image-model", f"hf:{vit}", "--text-model", f"hf:{bert}", "--dataset", spec,
                              "--epochs", "2", *common])
    assert out.exit_code == 0, out.output
    run = find_run(tmp_path / "runs")
    assert read_json(run / "summary.json")["train_pairs"] == 2 * 20  # 20 train pairs in each part
    out = runner.invoke(app, ["eval", "retrieval", *common])
    assert out.exit_code == 0, out.output
    res = read_json(next((run / "eval").glob("retrieval-*.json")))
    assert res["images"] == 10 and res["captions"] == 10
