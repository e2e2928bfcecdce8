"""The demo's terminal tables: one per task, metrics as rows, and they fit 100 columns."""

from io import StringIO

from rich.console import Console

from featcache.cli.evaluation import table_view
from featcache.pipeline.app.demo import DemoConfig, demo_metrics, quick, split_limit, task_views
from featcache.pipeline.app.report import build_report
from featcache.pipeline.evaluate.results import Column

SETS = ("tuxpaint", "openmoji", "tuxpaint+openmoji")


def demo_rows() -> list[dict]:
    """Runs as report.run_rows gives them: the demo's grid, 3 seeds, every column the demo evaluates."""
    cols = [Column("retrieval", d, "test", "image", direction, "recall", k)
            for d in SETS for direction in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
    cols += [Column("classify", d, "test-sample100" if "mnist" in d else "test", "class", "image_to_class", m)
             for d in ("tuxpaint-categories", "fashion-mnist", "mnist") for m in ("top1", "top5")]
    rows = []
    for layers in ("last", "auto"):
        for loss in ("clip", "clip+structure"):
            for seed in range(3):
                values = {c: 0.123 + 0.01 * seed + 0.3 * (loss != "clip") for c in cols}
                rows.append({"layers": layers, "loss": loss, "seed": seed, "run": f"{layers}-{loss}-{seed}",
                             "values": values})
    return rows


def render(view, width: int) -> list[str]:
    out = StringIO()
    Console(file=out, width=width, color_system=None).print(table_view(view))
    return out.getvalue().splitlines()


def test_demo_tables_split_by_task_and_fit_100_columns():
    rows = demo_rows()
    report = build_report(rows, ["layers", "loss"], demo_metrics(rows))
    assert len(report.metrics) == 15  # the wide table: 12 recall columns and 3 top-1 columns
    views = task_views(report)
    assert [v.title.split(",")[0].split(" (")[0] for v in views] == ["retrieval", "zero-shot classification"]
    assert [len(v.rows) for v in views] == [12, 3]
    for view in views:
        lines = render(view, width=400)  # the table at its natural width, nothing squeezed
        assert max(map(len, lines)) <= 100, "\n".join(lines)
        assert render(view, width=100) == lines
        text = "\n".join(lines)
        for row in view.rows:  # every label and cell whole on its line, none folded
            assert any(row[0] in line and row[-1] in line for line in lines), row
        assert "clip+structure" in text and "43.3 ± 1.0" in text and "13.3 ± 1.0" in text
    assert any("tuxpaint+openmoji t2i R@10" == r[0] for r in views[0].rows)


def test_a_combined_set_takes_its_parts_limit():
    assert split_limit(DemoConfig(), "tuxpaint+openmoji") is None
    assert split_limit(quick(DemoConfig()), "tuxpaint+openmoji") == 120


def test_the_default_demo_trains_on_tux_paint_and_the_union_is_one_switch_away():
    from featcache.pipeline.app.demo import with_openmoji

    cfg = DemoConfig()
    assert cfg.train_dataset == "tuxpaint" and ("openmoji", ("test",), None) in cfg.extracts
    union = with_openmoji(cfg)
    assert union.train_dataset == "tuxpaint+openmoji" and ("openmoji", None, None) in union.extracts
    assert union.retrieval_sets == ("tuxpaint", "openmoji", "tuxpaint+openmoji")
