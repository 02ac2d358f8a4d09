import fnmatch
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadytrain import FilterError, VariableFilter
from steadytrain.filters import matches

NAMES = ["encoder.0.weight", "encoder.0.bias", "memory.gate.weight", "thetao_0", "thetao_12",
         "thetao_mean", "thetao", "sea_ice_fraction"]


@given(
    pattern=st.text(alphabet="ab.*?", min_size=0, max_size=6),
    name=st.text(alphabet="ab.", min_size=0, max_size=6),
)
def test_globs_agree_with_fnmatch(pattern, name):
    assert matches(pattern, name) == fnmatch.fnmatchcase(name, pattern)


def test_hash_matches_one_or_more_digits():
    selected = VariableFilter(include=("thetao_#",)).select(NAMES)
    assert selected == ("thetao_0", "thetao_12")


def test_character_classes_work_as_in_fnmatch():
    assert matches("thetao_[0-5]", "thetao_3") and not matches("thetao_[!0-5]", "thetao_3")


def test_exclude_wins_over_include_and_order_is_kept():
    f = VariableFilter(include=("encoder.*", "memory.*"), exclude=("*.bias",))
    assert f.select(NAMES) == ("encoder.0.weight", "memory.gate.weight")


def test_a_pattern_matching_nothing_is_an_error_with_suggestions():
    f = VariableFilter(exclude=("sea_ice_fractoin",), owner="ocean")
    with pytest.raises(FilterError) as info:
        f.select(NAMES, kind="output variable")
    message = str(info.value)
    assert message.startswith("ocean.exclude: pattern 'sea_ice_fractoin' matches no output "
                              "variable (did you mean 'sea_ice_fraction'?)")
    assert "on_unmatched = 'warn'" in message


def test_unmatched_can_warn_or_be_ignored():
    f = VariableFilter(include=("nothing*", "thetao_#"), owner="p", on_unmatched="warn")
    with pytest.warns(UserWarning, match="p.include: pattern 'nothing\\*'"):
        assert f.select(NAMES) == ("thetao_0", "thetao_12")
    quiet = VariableFilter(include=("nothing*", "thetao_#"), on_unmatched="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quiet.select(NAMES) == ("thetao_0", "thetao_12")


def test_a_selection_of_nothing_is_an_error_unless_allowed():
    for include, exclude in ((("*",), ("*",)), ((), ())):
        with pytest.raises(FilterError, match=r"p: include .* select none of the variables"):
            VariableFilter(include=include, exclude=exclude, owner="p").select(NAMES)
    empty = VariableFilter(include=("*",), exclude=("*",), allow_empty=True)
    assert empty.select(NAMES) == ()
    with pytest.raises(FilterError, match=r"pattern 'nothing\*' matches no variable"):
        VariableFilter(include=("nothing*",), on_unmatched="error").select(NAMES)


def test_on_unmatched_is_validated():
    with pytest.raises(ValueError, match="on_unmatched"):
        VariableFilter(on_unmatched="loud")


def test_patterns_that_select_nothing_whatever_the_names_are_known_without_names():
    assert VariableFilter(include=()).selects_nothing
    assert VariableFilter(exclude=("*",)).selects_nothing
    assert not VariableFilter(include=("a*",), exclude=("b*",)).selects_nothing
    with pytest.raises(FilterError, match=r"p: include \[\] .* whatever they are"):
        VariableFilter(include=(), owner="p").check_selects_something()
    VariableFilter(include=(), allow_empty=True).check_selects_something()
