"""Random command lines: every failure is a clean message and a non-zero exit, never a traceback."""

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from featcache.cli.main import app

runner = CliRunner()
text = st.text(alphabet=string.ascii_letters + string.digits + ":/,._-+ ", max_size=24)
layer_specs = st.one_of(text, st.sampled_from(["all", "last", "last:0", "last:99", "-99", "0,,1", "embed,final"]),
                        st.lists(st.integers(-40, 40), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))))
numbers = st.one_of(st.integers(-5, 10**6).map(str), text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(["extract", "align", "layers", "eval retrieval", "eval classify", "report", "export"]),
       model=st.one_of(text, st.sampled_from(["dinov2", "minilm", "hf:", "timm:", "hf:/nonexistent", "timm:vit_small_patch14_dinov2.lvd142m", "hf:org/model"])),
       layers=layer_specs, dataset=st.one_of(text, st.sampled_from(["tuxpaint", "nosuch", "a+b", "/tmp/x.jsonl"])),
       number=numbers)
def test_random_command_lines_never_trace(tmp_path_factory, command, model, layers, dataset, number):
    root = tmp_path_factory.getbasetemp() / "fuzz"
    common = ["--cache-dir", str(root / "cache")]
    argv = {
        "extract": ["extract", "--model", model, "--layers", layers, "--dataset", dataset, "--batch-size", number,
                    "--limit", "2", *common],
        "align": ["align", "--image-model", model, "--layers", layers, "--dataset", dataset, "--epochs", number,
                  "--runs-dir", str(root / "runs"), *common],
        "layers": ["layers", "--image-model", model, "--dataset", dataset, "--n", number, *common],
        "eval retrieval": ["eval", "retrieval", "--run", model, "--dataset", dataset, "--runs-dir", str(root / "r"),
                           *common],
        "eval classify": ["eval", "classify", "--dataset", dataset, "--limit", number, "--runs-dir", str(root / "r"),
                          *common],
        "report": ["report", "--group-by", layers, "--runs-dir", str(root / "r")],
        "export": ["export", dataset, str(root / "out.h5")],
    }[command]
    result = runner.invoke(app, argv)
    if result.exit_code == 0:
        return
    # a usage error (2, from typer) or a featcache error (2): both exit through SystemExit
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
