import pytest

from featcache.cache.errors import FeatcacheError
from featcache.pipeline.common.layerspec import resolve_layers


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
