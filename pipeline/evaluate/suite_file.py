"""A benchmark suite: a small TOML or YAML file listing, per benchmark, its name, task, data-set
source and split. The built-in suites ship as such files (``suites/*.toml``), so a user's own
suite is the same thing with other lines, and nothing about a suite lives in code.

```toml
name = "mine"
[[benchmark]]
name = "cifar10"                   # how the table and the result files name it
task = "classify"                  # classify | retrieval
source = "clip_benchmark:cifar10"  # a featcache data set spec, or clip_benchmark:NAME
split = "test"                     # [default: test]
```

Sources are resolved later, against the disk (``app/suite.py``): parsing a suite reads no data.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from featcache.cache.errors import FeatcacheError

TASKS = ("classify", "retrieval")
CLIP_BENCHMARK = "clip_benchmark:"


@dataclass(frozen=True)
class Benchmark:
    name: str
    task: str
    source: str  # a data set spec (name, path, wds:, hfds:) or clip_benchmark:NAME
    split: str = "test"


@dataclass(frozen=True)
class Suite:
    name: str
    benchmarks: tuple[Benchmark, ...]
    folder: Path | None = None  # where relative paths in sources are read from (a user's file)
    description: str = ""


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in resources.files("featcache.pipeline.evaluate")
                  .joinpath("suites").iterdir() if p.name.endswith(".toml"))


def load_suite(spec: str) -> Suite:
    """A built-in suite's name (``offline``, ``paper``, ``vtab``, ...) or a suite file's path."""
    path = Path(spec)
    if spec in builtin_names() and not path.is_file():
        text = resources.files("featcache.pipeline.evaluate").joinpath("suites", f"{spec}.toml").read_text()
        return parse_suite(tomllib.loads(text), spec, None)
    if not path.is_file():
        raise FeatcacheError(f"no suite {spec!r}", f"built-in suites: {', '.join(builtin_names())}; or the path of a "
                                                   "suite file (.toml or .yaml)")
    try:
        data = _read(path)
    except ValueError as err:  # tomllib's, yaml's (converted in _read) and UTF-8 errors
        raise FeatcacheError(f"the suite file {path} cannot be read: {str(err).splitlines()[0]}",
                             "write TOML or YAML (see docs/usage.md)") from None
    return parse_suite(data, path.stem, path.resolve().parent, str(path))


def _read(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() not in (".yaml", ".yml"):
        return tomllib.loads(text)
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from None


def parse_suite(data, default_name: str, folder: Path | None, where: str | None = None) -> Suite:
    where = where or f"the suite {default_name}"
    if not isinstance(data, dict) or not isinstance(data.get("benchmark"), list) or not data["benchmark"]:
        raise FeatcacheError(f"{where} lists no benchmark", "write one [[benchmark]] table (TOML) or a 'benchmark' "
                                                            "list (YAML) per benchmark")
    out, seen = [], set()
    for i, item in enumerate(data["benchmark"]):
        at = f"{where}: benchmark {i + 1}"
        if not isinstance(item, dict):
            raise FeatcacheError(f"{at} is not a table", "give each benchmark name, task, source and split")
        unknown = set(item) - {"name", "task", "source", "split"}
        if unknown:
            raise FeatcacheError(f"{at} has unknown key(s) {', '.join(sorted(unknown))}",
                                 "keys: name, task, source, split")
        for key in ("name", "task", "source"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise FeatcacheError(f"{at} needs a {key} (a non-empty string)")
        if item["task"] not in TASKS:
            raise FeatcacheError(f"{at} ({item['name']}): unknown task {item['task']!r}", f"tasks: {', '.join(TASKS)}")
        split = item.get("split", "test")
        if not isinstance(split, str) or not split.strip():
            raise FeatcacheError(f"{at} ({item['name']}): the split must be a non-empty string")
        key = (item["name"], item["task"])
        if key in seen:
            raise FeatcacheError(f"{at}: {item['name']} ({item['task']}) is listed twice", "name each benchmark once")
        seen.add(key)
        out.append(Benchmark(item["name"].strip(), item["task"], item["source"].strip(), split.strip()))
    name = data.get("name", default_name)
    return Suite(str(name), tuple(out), folder, str(data.get("description", "")))
