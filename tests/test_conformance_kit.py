"""The conformance kit: every discovered plugin passes it, and each check fails a plugin that
breaks the rule it checks."""

import os
import subprocess
import sys
import textwrap

import attrs
import pytest
import torch
from expect import raises

import steadytrain
from steadytrain import ConfigError, Registry, hookimpl
from steadytrain.testing import CHECKS, ConformanceError, Fixture, check_plugin, run_check

REGISTRY = Registry.discover()  # built-ins and installed third-party plugins alike

CASES = [pytest.param(n, c, id=f"{n}-{c}") for n in REGISTRY.names() for c in CHECKS]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("name", "check"), CASES)
def test_every_discovered_plugin_passes_the_conformance_kit(name, check, request):
    device = request.config.getoption("conformance_device", default="cpu")
    run_check(check, REGISTRY.get(name), device=device)


def test_every_built_in_is_in_the_kit_run():
    built_ins = Registry.discover(autoload=False).names()
    assert built_ins and set(built_ins) <= set(REGISTRY.names())


# -- each check fails the plugin that breaks its rule -------------------------------------------


class L2(steadytrain.Plugin):
    """Mean square of the selected parameters: a plugin that passes every check."""

    name = "kit_l2"

    @hookimpl
    def setup(self, run):
        names = self.filter.select([n for n, _ in run.named_parameters()], kind="parameter")
        params = dict(run.named_parameters())
        self.params = [params[n] for n in names]

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"l2": torch.stack([p.square().mean() for p in self.params]).mean()}


def variant(name, **members):
    """A subclass of :class:`L2` called *name* with *members* replaced."""
    class_name = name.title().replace("_", "")
    for member in members.values():
        if callable(member) and hasattr(member, "__code__"):
            # pluggy strips ``self`` from functions whose qualified name says "method"
            member.__qualname__ = f"{class_name}.{member.__name__}"
    return type(class_name, (L2,), {"name": name, **members})


def fails(check, plugin, *parts):
    return raises(ConformanceError, f"plugin {plugin.name!r}", f"fails conformance check {check}",
                  *parts)


def test_a_plugin_that_follows_the_rules_passes_every_check():
    check_plugin(L2)


def test_a_required_option_fails_the_defaults_check():
    @attrs.frozen
    class Config:
        scale: float

    plugin = variant("kit_required", Config=Config)
    with fails("builds_from_defaults", plugin, "give every option a default"):
        run_check("builds_from_defaults", plugin)


def test_an_option_that_is_not_plain_data_fails_the_round_trip_check():
    @attrs.frozen
    class Config:
        tags: frozenset[str] = frozenset({"a"})  # unstructures to a set, which JSON lacks

    plugin = variant("kit_set", Config=Config)
    with fails("config_round_trips", plugin, "not plain data"):
        run_check("config_round_trips", plugin)


def test_a_plugin_without_hooks_fails_the_spec_check():
    plugin = type("Idle", (steadytrain.Plugin,), {"name": "kit_idle"})
    with fails("hooks_match_spec", plugin, "implements no hook"):
        run_check("hooks_match_spec", plugin)


def test_a_hook_with_an_argument_outside_the_spec_fails_the_spec_check():
    def after_backward(self, ctx, scaler):
        pass

    plugin = variant("kit_extra_arg", after_backward=hookimpl(after_backward))
    with fails("hooks_match_spec", plugin, "scaler"):
        run_check("hooks_match_spec", plugin)


def test_a_non_finite_metric_fails_the_training_check():
    def after_backward(self, ctx):
        ctx.log("ratio", torch.zeros(()) / torch.zeros(()))

    plugin = variant("kit_nan", after_backward=hookimpl(after_backward))
    with fails("trains_in_plain_loop", plugin, "non-finite metrics", "under_test/ratio"):
        run_check("trains_in_plain_loop", plugin)


def test_state_left_out_of_the_checkpoint_fails_the_resume_check():
    def compute_regularizers(self, ctx):
        self.calls = getattr(self, "calls", 0) + 1  # grows the term, but is not saved
        return {"l2": self.calls * torch.stack([p.square().mean() for p in self.params]).mean()}

    plugin = variant("kit_forgetful", compute_regularizers=hookimpl(compute_regularizers))
    with fails("resumes_bit_exactly", plugin, "differ", "Return everything"):
        run_check("resumes_bit_exactly", plugin)


def test_a_plugin_that_never_resolves_its_filter_fails_the_filter_check():
    def setup(self, run):
        self.params = [p for _, p in run.named_parameters()]

    plugin = variant("kit_unfiltered", setup=hookimpl(setup))
    with fails("filters_reject_unmatched_patterns", plugin, "was accepted",
               "self.filter.select"):
        run_check("filters_reject_unmatched_patterns", plugin)


def test_a_plugin_without_variables_that_drops_patterns_fails_the_filter_check():
    def __init__(self, config=None, **settings):
        settings.pop("include", None)  # silently ignores what the user asked for
        steadytrain.Plugin.__init__(self, config, **settings)

    plugin = variant("kit_no_vars", uses_filter=False, __init__=__init__)
    with fails("filters_reject_unmatched_patterns", plugin, "uses_filter is False"):
        run_check("filters_reject_unmatched_patterns", plugin)


def test_reading_a_value_on_the_host_fails_the_no_sync_check():
    def after_backward(self, ctx):
        if self.params[0].grad.abs().max().item() > 1e6:
            ctx.request_skip("huge gradient")

    plugin = variant("kit_item", after_backward=hookimpl(after_backward))
    with fails("records_metrics_without_host_sync", plugin, "step 1, after_backward()",
               "item()", "keep the value on the device"):
        run_check("records_metrics_without_host_sync", plugin)


@pytest.mark.parametrize("index", ["mask", "tuple"])
def test_indexing_with_a_boolean_mask_fails_the_no_sync_check(index):
    def compute_regularizers(self, ctx):
        weight = self.params[0]
        mask = weight > 0
        picked = weight[mask] if index == "mask" else weight[(mask,)]
        return {"l2": picked.square().sum()}

    plugin = variant("kit_mask", compute_regularizers=hookimpl(compute_regularizers))
    with fails("records_metrics_without_host_sync", plugin, "indexing with a boolean mask"):
        run_check("records_metrics_without_host_sync", plugin)


def test_metrics_named_by_hand_fail_the_two_instance_check():
    def after_backward(self, ctx):
        ctx.run.metrics.record("kit/norm", self.params[0].grad.norm())

    plugin = variant("kit_hand_named", after_backward=hookimpl(after_backward))
    with fails("survives_two_instances", plugin, "ctx.log"):
        run_check("survives_two_instances", plugin)


def test_state_shared_between_instances_fails_the_two_instance_check():
    shared = torch.zeros(3)

    def state_dict(self):
        return {"total": shared}

    def load_state_dict(self, state):
        shared.copy_(state["total"])

    plugin = variant("kit_shared", state_dict=state_dict, load_state_dict=load_state_dict)
    with fails("survives_two_instances", plugin, "share state tensors"):
        run_check("survives_two_instances", plugin)


# -- the kit's own inputs ------------------------------------------------------------------------


def test_check_plugin_lists_every_failing_check():
    plugin = type("Idle", (steadytrain.Plugin,), {"name": "kit_idle"})
    with raises(ConformanceError) as info:
        check_plugin(plugin)
    failed = [c for c in CHECKS if f"fails conformance check {c}:" in str(info.value)]
    assert "hooks_match_spec" in failed and "filters_reject_unmatched_patterns" in failed
    assert "builds_from_defaults" not in failed


def test_an_unknown_check_name_is_refused_with_the_names():
    with pytest.raises(KeyError, match="builds_from_defaults"):
        run_check("builds", L2)


def test_a_fixture_method_returning_something_else_is_refused():
    plugin = variant("kit_bad_fixture", conformance_fixture=classmethod(lambda cls: {}))
    with fails("builds_from_defaults", plugin, "conformance_fixture() must return a "
               "steadytrain.testing.Fixture, got dict"):
        run_check("builds_from_defaults", plugin)


@pytest.mark.parametrize(("settings", "parts"), [
    ({"steps": 1}, ("Fixture.steps", "at least 2")),
    ({"steps": 3, "warmup_steps": 3}, ("Fixture.warmup_steps", "below steps (3)")),
])
def test_a_fixture_that_leaves_nothing_to_check_is_refused(settings, parts):
    with raises(ConfigError, *parts):
        Fixture(**settings)


def test_the_fixture_options_reach_the_plugin_config():
    @attrs.frozen
    class Config:
        scale: float = 1.0

    seen = []

    def compute_regularizers(self, ctx):
        seen.append(self.config.scale)
        return {"l2": self.config.scale * self.params[0].square().mean()}

    plugin = variant("kit_scaled", Config=Config,
                     compute_regularizers=hookimpl(compute_regularizers),
                     conformance_fixture=classmethod(lambda cls: Fixture(options={"scale": 3.0})))
    run_check("trains_in_plain_loop", plugin)
    assert seen == [3.0] * Fixture().steps


TEST_FILE = """
import steadytrain

class Nothing(steadytrain.Plugin):
    name = "nothing"

def test_conformance(conformance_check):
    conformance_check(Nothing)
"""


@pytest.mark.slow
def test_the_pytest_plugin_runs_one_test_per_check(tmp_path):
    (tmp_path / "test_nothing.py").write_text(textwrap.dedent(TEST_FILE))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_nothing.py"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )
    for check in CHECKS:
        assert f"test_nothing.py::test_conformance[{check}]" in result.stdout, result.stdout
    assert "FAILED test_nothing.py::test_conformance[hooks_match_spec]" in result.stdout
    assert "PASSED test_nothing.py::test_conformance[builds_from_defaults]" in result.stdout
