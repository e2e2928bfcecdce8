"""study on a user's own encoders and data: only those encoders are extracted, and salts only
where a salt redraws a split (issue 23, items 1 and 2)."""

import json

import pytest
from typer.testing import CliRunner

from featcache.cli.main import app


def _stores(cache) -> list:
    from featcache.cache.store import FeatureStore

    return [FeatureStore.open(p) for p in sorted(cache.rglob("*.zarr"))]


def test_study_of_own_encoders_on_explicit_splits(tmp_path):
    """The acceptance command: ``study --image-model hf:A --text-model hf:B --pairs 50,all
    --seeds 0`` on a JSONL with a split column."""
    from conftest import make_pairs, save_tiny_bert, save_tiny_vit

    from featcache.pipeline.common.names import canonical_name

    pairs = make_pairs(tmp_path / "data", n=78)  # 52 train, 13 val, 13 test rows
    assert all("split" in json.loads(line) for line in pairs.read_text().splitlines())
    a, b = f"hf:{save_tiny_vit(tmp_path / 'A')}", f"hf:{save_tiny_bert(tmp_path / 'B')}"
    cache, out = tmp_path / "cache", tmp_path / "study"
    common = ["study", "--image-model", a, "--text-model", b, "--dataset", str(pairs), "--cache-dir", str(cache),
              "--out", str(out), "--epochs", "2", "--patience", "2", "--batch-size", "16", "--n-boot", "100"]
    runner = CliRunner()

    refused = runner.invoke(app, [*common, "--pairs", "50,all", "--seeds", "0", "--salts", ",1,2"])
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert refused.exit_code == 2 and len(lines) == 1 and "--salts" in lines[0] and "drop --salts" in lines[0], \
        refused.output
    assert not cache.exists()  # refused before anything was extracted

    result = runner.invoke(app, [*common, "--pairs", "50,all", "--seeds", "0"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "explicit splits" in line]
    assert len(said) == 1 and "one split" in said[0]

    stores = _stores(cache)
    names = [set(s.attrs.get("names", [])) | {s.encoder_identity["name"]} for s in stores]
    assert all(a in n or b in n for n in names), names  # only A and B: no built-in DINOv2 or MiniLM
    assert sum(a in n for n in names) == sum(b in n for n in names) == 3  # train, val, test of each
    datasets = {p.relative_to(cache).parts[0] for p in cache.rglob("*.zarr")}
    assert datasets == {canonical_name(str(pairs))}  # no salted copy of the data
    assert [p.name for p in (out / "runs").iterdir()] == ["default"]

    md = (out / "scaling.md").read_text()
    assert f"`{a}`" in md and f"`{b}`" in md and f"`{pairs}`" in md
    assert "explicit" in md and "seeds and test items" in md
    assert "nan" not in md  # one split and one seed: a mean without a spread, never "± nan"
    scaling = json.loads((out / "scaling.json").read_text())
    assert scaling["study"]["image_model"] == a and scaling["study"]["text_model"] == b
    assert scaling["study"]["dataset"] == str(pairs) and scaling["study"]["splits"]["rule"] == "explicit"
    assert scaling["salts"] == [""] and [s["pairs"] for s in scaling["sizes"]] == [50, "all"]
    settings = json.loads((out / "ranks.json").read_text())["settings"]
    assert settings["image_model"] == a and settings["salted_parts"] == []


def test_salts_redraw_only_hash_split_parts(tmp_path):
    """A table without a split column is redrawn by every salt; in ``a+b`` a part with its own
    splits keeps them (no salted copy); an explicit salt on explicit splits is refused."""
    from conftest import make_pairs

    from featcache.cache.errors import FeatcacheError
    from featcache.pipeline.app.study_splits import DEFAULT_SALTS, plan_splits, salted_spec
    from featcache.pipeline.data.catalog import load_dataset

    explicit = make_pairs(tmp_path / "own", n=12)
    hashed = tmp_path / "hashed" / "pairs.jsonl"
    make_pairs(hashed.parent, n=12)
    hashed.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "split"}) + "\n"
                              for line in hashed.read_text().splitlines()))

    assert plan_splits(str(explicit), None).salts == ("",) and plan_splits(str(explicit), ("",)).explicit
    with pytest.raises(FeatcacheError, match="--salts"):
        plan_splits(str(explicit), ("", "1"))
    plan = plan_splits(str(hashed), None)
    assert plan.salts == DEFAULT_SALTS and plan.salted_parts == (str(hashed),)
    assert plan_splits(str(hashed), ("7",)).salts == ("7",)

    both = f"{hashed}+{explicit}"
    mixed = plan_splits(both, None)
    assert mixed.salted_parts == (str(hashed),)
    assert salted_spec(both, "1", mixed.salted_parts) == f"{hashed}:salt=1+{explicit}"
    # a part's own options stay options: the salt joins them rather than corrupting one
    spec = salted_spec(f"{hashed}:outside=allow", "2")
    assert spec == f"{hashed}:outside=allow,salt=2" and set(load_dataset(spec)) == {"train", "val", "test"}


def test_pooling_names_both_encoders_or_each():
    from featcache.cache.errors import FeatcacheError
    from featcache.pipeline.app.study import pooling_pair

    assert pooling_pair(None) == (None, None) and pooling_pair("mean") == ("mean", "mean")
    assert pooling_pair("cls+mean,mean") == ("cls+mean", "mean") and pooling_pair("cls+mean,") == ("cls+mean", None)
    for bad in ("a,b,c", ","):
        with pytest.raises(FeatcacheError, match="bad --pooling"):
            pooling_pair(bad)


def test_demo_takes_the_encoders_and_names_them(monkeypatch, tmp_path):
    """The demo's command line reaches its config (the run itself is the real-asset test's)."""
    from featcache.pipeline.app import demo

    seen = {}

    def capture(cfg, *args, **kwargs):
        seen["cfg"] = cfg
        raise demo.FeatcacheError("stopped after parsing")

    monkeypatch.setattr(demo, "run_demo", capture)
    out = CliRunner().invoke(app, ["demo", "--image-model", "hf:A", "--text-model", "hf:B", "--pooling", "cls+mean,",
                                   "--image-size", "-1", "--out", str(tmp_path)])
    assert out.exit_code == 2 and "stopped after parsing" in out.output
    cfg = seen["cfg"]
    assert (cfg.image_model, cfg.text_model, cfg.image_pooling, cfg.text_pooling, cfg.image_size) == \
        ("hf:A", "hf:B", "cls+mean", None, -1)
    assert demo.encoders_line(cfg) == "Image encoder hf:A (pooling cls+mean, size -1), text encoder hf:B, trained on tuxpaint"


def test_own_splits_are_told_apart_with_as_few_loads_as_the_row_count_allows(tmp_path, monkeypatch):
    """A large corpus with its own splits is loaded twice (plain and one salt), not nine times; a
    tiny one is probed with more salts so that a hash split whose few rows all stayed put under
    one salt is not taken for a fixed one."""
    from conftest import make_pairs

    from featcache.pipeline.data import catalog

    loads = []
    real = catalog.load_dataset
    monkeypatch.setattr(catalog, "load_dataset", lambda spec: loads.append(spec) or real(spec))
    assert not catalog.salt_redraws(str(make_pairs(tmp_path / "big", n=40)))
    assert len(loads) == 2
    loads.clear()
    assert not catalog.salt_redraws(str(make_pairs(tmp_path / "small", n=6)))
    assert len(loads) == 1 + 6  # ceil(34 / 6) salts
    loads.clear()
    tiny = tmp_path / "tiny" / "pairs.jsonl"
    make_pairs(tiny.parent, n=2)
    tiny.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "split"}) + "\n"
                            for line in tiny.read_text().splitlines()))
    assert catalog.salt_redraws(str(tiny))  # two hash-split rows: redrawn within the eight probes
