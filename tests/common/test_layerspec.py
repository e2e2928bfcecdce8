import pytest

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import layer_choices, one_choice, pair_parts, resolve_layers


def test_all_is_embedding_plus_every_block():
    assert resolve_layers("all", 12, True) == ["embed"] + [f"block.{i:02d}" for i in range(12)]
    assert len(resolve_layers("all", 6, False)) == 7


def test_last_and_last_n():
    assert resolve_layers("last", 12, True) == ["block.11"]
    assert resolve_layers("last:3", 12, True) == ["block.09", "block.10", "block.11"]


def test_indices_follow_timm_rules_and_names_mix():
    assert resolve_layers("0,5,-1", 12, True) == ["block.00", "block.05", "block.11"]
    assert resolve_layers("embed,-1,final", 12, True) == ["embed", "block.11", "final"]
    assert resolve_layers("-1,11", 12, True) == ["block.11"]  # duplicates collapse


@pytest.mark.parametrize("spec", ["12", "-13", "last:0", "last:13", "foo", "", "final", "1,,x"])
def test_bad_specs_name_the_valid_range(spec):
    with pytest.raises(FeatcacheError) as err:
        resolve_layers(spec, 12, False)
    assert "-12..11" in err.value.hint


def test_one_grammar_choices_split_on_semicolons_layers_on_commas():
    assert layer_choices("last;auto;9, 5") == ["last", "auto", "9,5"]
    assert one_choice(" block.09 , block.05 ") == "block.09,block.05"
    assert pair_parts("auto") is None and pair_parts("last") == ["last", "last"]
    assert pair_parts("9,-1") == ["9", "-1"] and pair_parts("-1") == ["-1", "-1"]


@pytest.mark.parametrize("spec", ["", ";", "last;", " ; auto"])
def test_empty_choices_are_refused(spec):
    with pytest.raises(FeatcacheError, match="empty layer choice"):
        layer_choices(spec)


@pytest.mark.parametrize("choice", ["last,auto", "1,2,3", "all", "last:2", "auto,9"])
def test_a_pair_is_auto_one_layer_or_two(choice):
    with pytest.raises(FeatcacheError) as err:
        pair_parts(choice)
    assert "IMAGE,TEXT" in err.value.hint and "';'" in err.value.hint


def test_commands_that_take_one_choice_say_so():
    with pytest.raises(FeatcacheError, match="2 choices") as err:
        one_choice("last;auto")
    assert "sweep" in err.value.hint
    with pytest.raises(FeatcacheError, match="one set of layers"):
        resolve_layers("all;last", 12, True)


def test_study_takes_choices_in_the_same_grammar(tmp_path):
    from typer.testing import CliRunner

    from featcache.cli.main import app

    out = CliRunner().invoke(app, ["study", "--layers", "last,auto", "--out", str(tmp_path / "s")])
    assert out.exit_code != 0 and "last;auto" in out.output and not (tmp_path / "s").exists()
