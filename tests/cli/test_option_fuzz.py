"""Every command's numeric and list options, at their extremes, on a tiny cache: each command
ends with exit 0 or a clean error (exit 2, no traceback) within a timeout, never a traceback or
a hang. The options are read from the typer app itself, so a new option is fuzzed unasked."""

from __future__ import annotations

import inspect
import shutil
import threading
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from featcache.cli.main import app

runner = CliRunner()
TIMEOUT_S = 60  # per command line; the slowest valid one here (a sweep of 2 epochs) takes ~3 s

# String options that hold lists although their help does not show a comma.
EXTRA_LISTS = {("study", "--seeds"), ("study", "--layers"), ("study", "--pairs"), ("report", "--group-by"),
               ("sweep", "--pairs"), ("sweep", "--center-first"), ("sweep", "--fixed-structure")}


def commands(group=None, prefix=()):
    """(command path, its function) for every command of the app, sub-apps included."""
    group = group or typer.main.get_command(app)
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):
            yield from commands(cmd, prefix + (name,))
        else:
            fn = cmd.callback
            while hasattr(fn, "__wrapped__"):  # under @friendly
                fn = fn.__wrapped__
            yield prefix + (name,), fn


def fuzzed_options() -> list[tuple[tuple[str, ...], str, str]]:
    """(command, option, kind) for every int, float and list option: kind is int, float, list
    (one comma or ';' list) or multi (the option repeated, or a list argument)."""
    out = []
    for path, fn in commands():
        hints = typing.get_type_hints(fn)
        for name, par in inspect.signature(fn).parameters.items():
            info, hint = par.default, hints[name]
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint
            is_option = isinstance(info, typer.models.OptionInfo)
            flag = (info.param_decls or (f"--{name.replace('_', '-')}",))[0] if is_option else name
            helps = (getattr(info, "help", None) or "").lower()
            if base in (int, float):
                kind = base.__name__
            elif typing.get_origin(base) is list:
                kind = "multi"
            elif base is str and (any(s in helps for s in ("comma", "';'", "i/n:")) or (path[-1], flag) in EXTRA_LISTS):
                kind = "list"
            else:
                continue
            out.append((path, flag, kind))
    return out


OPTIONS = fuzzed_options()

INTS = ["-1", "0", "1", "2", "-2147483649", "4294967296", "99999999999999999999", "1e3", "nan", "inf", "", " ",
        "0x10", "1_000", "-0"]
FLOATS = ["nan", "-nan", "inf", "-inf", "1e308", "1e-320", "-1e-9", "0", "-0", "1e400", "", "99999999999999999999"]
ATOMS = INTS + FLOATS + ["last", "auto", "all", "clip", "true", "false", "0/1", "1/0", "-1/2", "a=b", "=", ".."]
int_values = st.one_of(st.sampled_from(INTS), st.integers(-10**12, 10**12).map(str))
float_values = st.one_of(st.sampled_from(FLOATS), st.floats(allow_nan=True, allow_infinity=True).map(repr))
items = st.lists(st.sampled_from(ATOMS), max_size=4)
list_values = st.one_of(st.sampled_from(["", ",", ";", " , ", "1,1", "0,0,0"]),
                        st.tuples(items, st.sampled_from([",", ";", ", "])).map(lambda t: t[1].join(t[0])))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny cache, a copy for extract to write into, and one finished run to evaluate."""
    from conftest import build_tiny_cache

    root = tmp_path_factory.mktemp("option-fuzz")
    tiny = build_tiny_cache(root / "tiny", n=24)
    shutil.copytree(tiny["cache"], root / "cache-extract")
    (root / "texts.txt").write_text("a red circle\na blue square\n")
    models = ["--image-model", tiny["vit"], "--text-model", tiny["bert"], "--dataset", str(tiny["pairs"]),
              "--cache-dir", str(tiny["cache"])]
    out = runner.invoke(app, ["align", *models, "--runs-dir", str(root / "runs"), "--epochs", "2", "--d-out", "8"])
    assert out.exit_code == 0, out.output
    return {**tiny, "root": root, "models": models}


def base_args(command: tuple[str, ...], t: dict) -> list[str]:
    """A cheap, valid command line for each command; the fuzzed option is set after it."""
    root, models = t["root"], t["models"]
    train = ["--runs-dir", str(root / "runs-fuzz"), "--epochs", "2", "--patience", "2", "--batch-size", "16",
             "--d-out", "8", "--compile", "off"]
    return {
        ("extract",): ["--model", t["vit"], "--dataset", str(t["pairs"]), "--cache-dir", str(root / "cache-extract")],
        ("layers",): [*models, "--out", str(root / "heat.png"), "--n", "16"],
        ("align",): [*models, *train],
        ("sweep",): [*models, *train, "--seeds", "0", "--loss", "clip", "--layers", "last"],
        ("runs",): ["--runs-dir", str(root / "runs")],
        ("report",): ["--runs-dir", str(root / "runs")],
        ("eval", "classify"): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"])],
        ("verify",): ["--cache-dir", str(t["cache"])],
        # no user pair set is extracted for the built-in models: what is checked is that every
        # value is parsed and checked before the data is looked for, or refused then in one line
        ("study",): ["--out", str(root / "study"), "--dataset", str(root / "nosuch.jsonl"), "--epochs", "1",
                     "--cache-dir", str(root / "study-cache")],
        ("demo",): ["--out", str(root / "demo"), "--dataset", str(root / "nosuch.jsonl"), "--quick",
                    "--cache-dir", str(root / "demo-cache")],
        ("eval", "retrieval"): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"]), "--no-baseline"],
        ("eval", "suite"): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"]), "--suite", "paper",
                            "--out", str(root / "suite")],
        ("embed",): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"]), "--device", "cpu",
                     "--texts", str(root / "texts.txt"), "--out", str(root / "embedded.npy")],
        ("predict",): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"]), "--device", "cpu",
                       str(Path(t["pairs"]).parent / "img000.png"), "--labels", "red,blue"],
        ("search",): ["--runs-dir", str(root / "runs"), "--cache-dir", str(t["cache"]), "--device", "cpu",
                      "--dataset", str(t["pairs"]), "--split", "train", "a red circle"],
    }[command]


def with_option(argv: list[str], flag: str, kind: str, value) -> list[str]:
    """argv with ``flag`` (and its base value) replaced by the fuzzed value."""
    if flag in argv:
        i = argv.index(flag)
        argv = argv[:i] + argv[i + 2:]
    if kind == "multi":
        return argv + list(value) if not flag.startswith("-") else argv + [a for v in value for a in (flag, v)]
    return argv + [flag, value]


def invoke_within(argv: list[str], seconds: float):
    """runner.invoke in a daemon thread: a hang fails the example instead of the whole run."""
    box = {}
    worker = threading.Thread(target=lambda: box.setdefault("out", runner.invoke(app, argv)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"hung for {seconds} s: featcache {' '.join(argv)}"
    return box["out"]


def check(argv: list[str]) -> None:
    """Exit 0, or a clean failure: 2 (usage or featcache error), or 1 from verify (bad stores)."""
    out = invoke_within(argv, TIMEOUT_S)
    shown = f"featcache {' '.join(argv)}\n{out.output}"
    assert "Traceback" not in out.output, shown
    if out.exit_code == 0:
        return
    # a usage error (typer) or a featcache error: SystemExit with 2, never another exception
    codes = (1, 2) if argv[0] == "verify" else (2,)
    assert isinstance(out.exception, SystemExit) and out.exit_code in codes, f"{out.exception!r}\n{shown}"
    errors = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(errors) <= 1, shown  # a featcache error is one line (rich never wraps it: soft_wrap)


def test_every_command_with_numeric_or_list_options_is_fuzzed():
    """The option list is read from the app; each command it names has a valid base command
    line, and the options that matter most are there."""
    names = {(" ".join(c), f) for c, f, _ in OPTIONS}
    assert {("layers", "--n"), ("align", "--d-out"), ("sweep", "--seeds"), ("study", "--n-boot"),
            ("extract", "--image-size"), ("runs", "--last"), ("eval classify", "--limit")} <= names
    for command in {c for c, _, _ in OPTIONS}:
        base_args(command, {"root": Path("/nowhere"), "models": [], "vit": "", "pairs": "", "cache": ""})


@pytest.mark.slow
# No shrinking: a timed-out example leaves its thread running, and every shrink would run beside
# it; the failing command line is printed whole, which is all a fix needs.
@settings(max_examples=400, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          report_multiple_bugs=False, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_extreme_option_values_never_trace_or_hang(tiny, data):
    command, flag, kind = data.draw(st.sampled_from(OPTIONS), label="option")
    value = data.draw({"int": int_values, "float": float_values, "list": list_values,
                       "multi": st.lists(st.sampled_from(ATOMS), max_size=3)}[kind], label="value")
    check([*command, *with_option(base_args(command, tiny), flag, kind, value)])


@pytest.mark.slow
@pytest.mark.parametrize("command, flag, kind", OPTIONS, ids=[f"{' '.join(c)} {f}" for c, f, _ in OPTIONS])
def test_each_option_at_its_named_extremes(tiny, command, flag, kind):
    """Every option once with each named extreme, so none is left to chance."""
    values = {"int": ["-1", "0", "99999999999999999999", "nan"], "float": ["nan", "-inf", "1e400", "-1e-9"],
              "list": ["", ",", "1,1", "nan,inf"], "multi": [[], ["", ""], ["-1"]]}[kind]
    for value in values:
        check([*command, *with_option(base_args(command, tiny), flag, kind, value)])
