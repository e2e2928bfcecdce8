"""A model folder's README: what the model is, how well it did, and how to load it, so a folder
handed on says what it holds without featcache at hand."""

from __future__ import annotations

from featcache.pipeline.model.spec import ModelSpec


def readme(spec: ModelSpec, results: list[dict], name: str) -> str:
    i, t, o = spec.image, spec.text, spec.origin
    lines = [f"# {name}: an aligned image-text model (featcache)", "",
             f"Exported from run `{o.get('run_id')}`, trained on `{o.get('dataset')}` "
             f"({o.get('train_pairs')} pairs, loss {o.get('loss')}).", "",
             "| side | encoder | layer | pooling | weights sha256 |", "| --- | --- | --- | --- | --- |"]
    for s in (i, t):
        lines.append(f"| {s.modality} | `{s.model}` | {s.layer} | {s.pooling} | "
                     f"`{s.identity.get('weights_sha256', '?')[:16]}...` |")
    lines += ["", f"Heads: {spec.head.get('head')} to {spec.head.get('d_out')} dimensions "
                  f"(method {spec.head.get('method')}), in `heads.safetensors`.", "", "## Results", ""]
    if results:
        lines += ["| task | data set | split | metric | value |", "| --- | --- | --- | --- | --- |"]
        for r in results:
            for metric, value in _flat(r.get("metrics", {})):
                lines.append(f"| {r['task']} | {r['dataset']} | {r['split']} | {metric} | {value:.3f} |")
    else:
        lines.append("The run was not evaluated before export (`featcache eval retrieval --run RUN`).")
    summary = o.get("summary", {})
    if "best_val_clip" in summary or "best_epoch" in summary:
        lines += ["", f"Best validation epoch: {summary.get('best_epoch')}."]
    lines += ["", "## Use", "", "The encoders are referenced, not copied: their weights must be on the machine "
              "(the names above), and their sha256 digests are checked when the model loads.", "", "```python",
              "from featcache import AlignedModel", "", f'model = AlignedModel.load("{name}")',
              'emb = model.encode_image(["cat.png"])  # L2-normalised rows',
              'print(model.classify(["cat.png"], ["cat", "dog"]).top(2))', "```", "",
              f"or: `featcache predict --run {name} cat.png --labels cat,dog`", ""]
    return "\n".join(lines)


def _flat(metrics: dict, prefix: str = ""):
    for key, value in metrics.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key} ")
        elif isinstance(value, (int, float)):
            yield f"{prefix}{key}", float(value)
