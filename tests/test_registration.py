"""Registration: every way a plugin could be registered and then silently never act is refused.

A hook that would never run, an argument pluggy would never pass, a name or a class where an
instance belongs, a weight or an option that cannot be applied, patterns that select
nothing: each is an error naming the instance (or the plugin and where it comes from).
"""

from importlib import metadata

import attrs
import pytest
import torch
from distributions import install
from expect import raises
from packaging.version import Version
from torch import nn

import steadytrain
from steadytrain import (
    ConfigError,
    FilterError,
    Pipeline,
    Registry,
    RegistryError,
    UsageError,
    hookimpl,
)
from steadytrain.plugins.corrector.corrector_penalty import apply_corrector
from steadytrain.plugins.grad_norm import GradNorm

# -- hooks that would never run ----------------------------------------------------------------


class Unmarked(steadytrain.Plugin):
    name = "unmarked"

    def after_backward(self, ctx):  # no @hookimpl: pluggy would never call it
        raise AssertionError("never runs")


class Defaulted(steadytrain.Plugin):
    name = "defaulted"

    @hookimpl
    def before_step(self, ctx=None):  # pluggy never passes an argument that has a default
        raise AssertionError("never runs")


class PlainUnmarked:
    def consolidate(self, ctx):
        raise AssertionError("never runs")


ROUTES = {
    "Pipeline()": lambda plugin: Pipeline([plugin]),
    "register()": lambda plugin: Pipeline([]).register(plugin),
}


@pytest.mark.parametrize("route", ROUTES)
def test_a_method_named_like_a_hook_without_hookimpl_is_refused(route):
    with raises(RegistryError, "plugin instance 'unmarked'", "method after_backward",
                "not marked with @steadytrain.hookimpl", "mark it, or rename it"):
        ROUTES[route](Unmarked())


def test_a_plain_object_with_an_unmarked_hook_is_refused_by_register():
    with raises(RegistryError, "plugin instance 'mine'", "method consolidate",
                "@steadytrain.hookimpl"):
        Pipeline([]).register(PlainUnmarked(), "mine")


def test_a_plugin_class_with_an_unmarked_hook_is_refused_by_the_registry():
    with raises(RegistryError, "cannot register 'unmarked'", "method after_backward",
                "@steadytrain.hookimpl"):
        Registry().register(Unmarked)


@pytest.mark.parametrize("route", ROUTES)
def test_a_hook_argument_with_a_default_is_refused(route):
    with raises(RegistryError, "plugin instance 'defaulted'", "hook before_step",
                "argument(s) ctx have a default", "def before_step(self, ctx) without a default"):
        ROUTES[route](Defaulted())


def test_a_plugin_class_whose_hook_argument_has_a_default_is_refused_by_the_registry():
    with raises(RegistryError, "cannot register 'defaulted'", "argument(s) ctx have a default"):
        Registry().register(Defaulted)


# -- names and classes where an instance belongs --------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_a_plugin_name_in_place_of_an_instance_is_refused(route):
    with raises(UsageError, "the plugin name 'ema'", "where a plugin instance belongs",
                "Pipeline.from_config({'plugins': [{'plugin': 'ema'}]})"):
        ROUTES[route]("ema")


@pytest.mark.parametrize("route", ROUTES)
def test_a_plugin_class_in_place_of_an_instance_is_refused(route):
    with raises(UsageError, "the class GradNorm", "where a plugin instance belongs",
                "pass GradNorm()"):
        ROUTES[route](GradNorm)


def test_a_string_in_place_of_the_list_of_instances_is_refused():
    with raises(UsageError, "Pipeline() takes a list of plugin instances", "'ema'",
                "Pipeline.from_config"):
        Pipeline("ema")


# -- the weight of a registered object -----------------------------------------------------------


class HalfWeighted:
    """Not a steadytrain.Plugin: a plain object with a weight and one term."""

    def __init__(self, weight):
        self.weight = weight

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"sq": ctx.outputs["pred"].pow(2).mean()}


def test_register_honours_the_float_weight_of_a_plain_object(model):
    pipe = Pipeline([])
    pipe.register(HalfWeighted(0.5), "half")
    pipe.setup(model, None)
    x = torch.randn(5, 4)
    pipe.before_step()
    pred = model(x)
    loss = pipe.compute_loss(pred.sum(), outputs={"pred": pred})
    pipe.after_backward()
    pipe.consolidate()
    torch.testing.assert_close(loss, pred.sum() + 0.5 * pred.pow(2).mean())
    metrics = pipe.metrics()
    assert metrics["reg_weighted/half/sq"] == pytest.approx(0.5 * metrics["reg/half/sq"])


@pytest.mark.parametrize(
    ("weight", "problem"),
    [("x", "must be a number or a steadytrain.schedules schedule, got str 'x'"),
     (True, "got bool True"),
     (None, "got NoneType None"),
     (-0.5, "must be >= 0")],
)
def test_register_refuses_a_weight_that_cannot_weigh_the_terms(weight, problem):
    with raises(ConfigError, "half.weight", problem):
        Pipeline([]).register(HalfWeighted(weight), "half")


class Probe(steadytrain.Plugin):
    """A term of 1·(mean output), and a record of the after_backward calls."""

    name = "probe"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"mean": ctx.outputs["pred"].mean()}

    @hookimpl
    def after_backward(self, ctx):
        self.calls += 1


class Loud(Probe):
    """A term that would dominate the loss, were its instance registered."""

    name = "loud"

    @hookimpl
    def compute_regularizers(self, ctx):
        return {"big": ctx.outputs["pred"].abs().sum() * 1e6}


class LoudUnmarked(Loud):
    def consolidate(self, ctx):
        pass


REFUSED = {
    "bad weight": (lambda: Loud(id="extra", weight=1.0), "x", ConfigError),
    "unmarked hook": (lambda: LoudUnmarked(id="extra"), None, RegistryError),
    "taken id": (lambda: Loud(id="kept"), None, ConfigError),
    "a class": (lambda: Loud, None, UsageError),
}


@pytest.mark.parametrize("reason", REFUSED)
def test_a_refused_register_leaves_the_pipeline_unchanged(model, reason):
    make, bad_weight, error = REFUSED[reason]
    kept = Probe(id="kept")
    pipe = Pipeline([kept])
    refused = make()
    if bad_weight is not None:
        refused.weight = bad_weight
    with raises(error):
        pipe.register(refused)
    assert list(pipe.plugins) == ["kept"]
    pipe.setup(model, None)
    pipe.before_step()
    pred = model(torch.randn(3, 4))
    loss = pipe.compute_loss(pred.sum(), outputs={"pred": pred})
    pipe.after_backward()
    torch.testing.assert_close(loss, pred.sum() + pred.mean())
    assert kept.calls == 1
    assert getattr(refused, "calls", 0) == 0


def test_the_id_of_a_refused_register_stays_free():
    pipe = Pipeline([])
    bad = HalfWeighted("x")
    with raises(ConfigError):
        pipe.register(bad, "half")
    pipe.register(HalfWeighted(0.5), "half")
    assert list(pipe.plugins) == ["half"]


# -- the distributions the registry reads ---------------------------------------------------------

TWICE = '''
import steadytrain


class Good(steadytrain.Plugin):
    """A plugin of a distribution installed twice."""

    name = "good"
'''


def test_a_shadowed_copy_of_a_distribution_adds_no_entry_points(tmp_path, monkeypatch):
    first, shadowed = tmp_path / "first", tmp_path / "shadowed"
    first.mkdir()
    shadowed.mkdir()
    install(first, "acme-twice", "acme_twice", TWICE, {"good": "Good"})
    install(shadowed, "acme-twice", "acme_twice", TWICE, {"good": "Good", "stale": "Gone"})
    monkeypatch.syspath_prepend(str(shadowed))
    monkeypatch.syspath_prepend(str(first))
    imported = sorted(ep.name for ep in metadata.entry_points(group="steadytrain.plugins"))
    assert "stale" not in imported
    assert Registry.discover().names() == imported


# -- options the core would shadow ---------------------------------------------------------

#: The keys of a config entry the core reads for every instance.
FRAMEWORK_KEYS = ("plugin", "id", "enabled", "weight", "include", "exclude", "on_unmatched")


def shadowing_plugin(key):
    config = type("Config", (), {"__annotations__": {key: str}, key: "x"})
    return type("Shadowing", (steadytrain.Plugin,), {
        "name": "shadowing", "Config": attrs.frozen(config)})


@pytest.mark.parametrize("key", FRAMEWORK_KEYS)
def test_a_plugin_option_named_like_a_framework_key_is_refused_by_registry_register(key):
    with raises(RegistryError, "cannot register 'shadowing'", f"Shadowing.Config has option(s) "
                f"{key}", "keys the core reads for every instance", "rename it"):
        Registry().register(shadowing_plugin(key))


SHADOWING = '''
import attrs
import steadytrain


class Shadowing(steadytrain.Plugin):
    """Its option named weight could never be set from a config."""

    name = "shadowing"

    @attrs.frozen
    class Config:
        weight: float = 2.0
        decay: float = 0.9


class Good(steadytrain.Plugin):
    """A plugin whose entry point has another name."""

    name = "good"
'''


@pytest.fixture
def site(tmp_path, monkeypatch):
    install(tmp_path, "acme-extra", "acme_extra", SHADOWING,
            {"shadowing": "Shadowing", "alias": "Good"})
    monkeypatch.syspath_prepend(str(tmp_path))
    return Registry.discover()


def test_a_plugin_option_named_like_a_framework_key_is_refused_at_entry_point_load(site):
    with raises(RegistryError, "plugin 'shadowing'", "distribution acme-extra 1.0",
                "Shadowing.Config has option(s) weight", "rename it"):
        site.get("shadowing")


def test_a_config_naming_a_plugin_with_a_shadowed_option_is_refused(site):
    with raises(ConfigError, "plugins[0].plugin", "Shadowing.Config has option(s) weight"):
        steadytrain.load_config({"plugins": [{"plugin": "shadowing", "weight": 3.0}]},
                                registry=site)


def test_an_entry_point_whose_name_differs_from_the_plugin_name_is_refused(site):
    with raises(RegistryError, "plugin 'alias'", "acme_extra:Good",
                "the entry point is called 'alias' but Good.name is 'good'",
                "the two must be equal"):
        site.get("alias")


def test_registering_a_class_under_another_name_is_refused():
    class Good(steadytrain.Plugin):
        name = "good"

    with raises(RegistryError, "cannot register 'alias'", "Good.name is 'good'"):
        Registry().register(Good, name="alias")


# -- requires_core ------------------------------------------------------------------------------

CORE = Version(steadytrain.__version__)
NEWER = [f"{CORE.major}.{CORE.minor}.{CORE.micro + 1}", f"{CORE.base_version}.post1",
         f"{CORE.major}.{CORE.minor + 10}", f"{CORE.major + 1}"]
OLDER_OR_EQUAL = [steadytrain.__version__, f"{CORE.base_version}rc1",
                  f"{CORE.major}.{CORE.minor}", f"0{CORE.major}.0{CORE.minor}"]


def needing(version):
    return type("Needy", (steadytrain.Plugin,), {"name": "needy", "requires_core": version})


@pytest.mark.parametrize("version", OLDER_OR_EQUAL)
def test_requires_core_up_to_this_version_is_accepted(version):
    registry = Registry()
    registry.register(needing(version))
    assert "needy" in registry


@pytest.mark.parametrize("version", NEWER)
def test_requires_core_above_this_version_is_refused(version):
    with raises(RegistryError, "cannot register 'needy'", f"needs steadytrain >= {version}",
                f"this is {steadytrain.__version__}", "upgrade steadytrain"):
        Registry().register(needing(version))


@pytest.mark.parametrize("version", ["latest", "0.x", "1.0 beta"])
def test_requires_core_that_is_not_a_version_is_refused(version):
    with raises(RegistryError, "cannot register 'needy'", f"requires_core = {version!r}",
                "is not a version"):
        Registry().register(needing(version))


# -- patterns that select nothing --------------------------------------------------------------


class Memory(nn.Module):
    """A module that offers to consolidate (steadytrain.nn's protocol)."""

    def __init__(self):
        super().__init__()
        self.slots = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return x + self.slots

    def consolidate(self):
        return {}


class Tiny(nn.Module):
    """Parameters, a gate module to tap and a consolidating module: enough for every plugin."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.memory = Memory()
        self.gate = nn.Sequential(nn.Linear(4, 3), nn.Softmax(-1))

    def forward(self, x):
        return self.gate(self.memory(self.enc(x)))


#: Options a plugin needs so that its include/exclude select something in ``Tiny``.
OPTIONS = {name: {"taps": ["gate"]}
           for name in ("gate_entropy", "gate_smoothness", "sparsity_target")}
#: Plugins that resolve their patterns when the names first appear in a step, not in setup.
RESOLVED_LATER = {
    "corrector_penalty": "the corrected variables are known at the first step",
    "pre_corrector_optimization": "the corrected variables are known at the first step",
}
REGISTRY = Registry.discover()
SELECTING_NOTHING = {"include": {"include": []}, "exclude": {"exclude": ["*"]}}


def cases():
    for name in REGISTRY.names():
        for option in SELECTING_NOTHING:
            yield pytest.param(name, option, id=f"{name}-{option}")


def instance(name, option):
    entry = {"plugin": name, "id": "sel", **SELECTING_NOTHING[option], **OPTIONS.get(name, {})}
    return Pipeline.from_config({"plugins": [entry]}, registry=REGISTRY)


def set_up(pipe):
    model = Tiny()
    return pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=10)


@pytest.mark.parametrize(("name", "option"), cases())
def test_an_instance_whose_patterns_select_nothing_is_refused_at_setup(name, option):
    if not REGISTRY.get(name).uses_filter:
        with raises(ConfigError, "sel.include", f"{name} has no variables for include/exclude",
                    "remove them from this instance"):
            instance(name, option)
        return
    pipe = instance(name, option)
    with raises(FilterError, "sel: include", "select none of the", "act on nothing",
                "widen include or narrow exclude"):
        set_up(pipe)
    assert not pipe.is_setup


#: Patterns that select nothing only once the names are known (the variable is "t").
EXCLUDING_THE_NAMES = {"exclude": {"exclude": ["t"]}, "include": {"include": ["u*"],
                                                                   "on_unmatched": "ignore"}}


@pytest.mark.parametrize("option", EXCLUDING_THE_NAMES)
@pytest.mark.parametrize("name", RESOLVED_LATER)
def test_an_instance_resolving_at_its_first_step_that_selects_nothing_is_refused_there(
    name, option
):
    model = Tiny()
    entry = {"plugin": name, "id": "sel", **EXCLUDING_THE_NAMES[option]}
    pipe = set_up(Pipeline.from_config({"plugins": [entry]}, registry=REGISTRY))
    with raises(FilterError, "sel: include", "select none of the corrected variables"):
        pipe.before_step()
        fields = apply_corrector(lambda f: {"t": f["t"].clamp(min=0.4)},
                                 {"t": model(torch.randn(2, 4))})
        for_loss = getattr(pipe.plugins["sel"], "for_loss", lambda fields: fields)
        pipe.compute_loss(for_loss(fields)["t"].sum())


def test_every_plugin_has_the_options_it_needs_to_select_in_the_tiny_model():
    unknown = sorted((set(OPTIONS) | set(RESOLVED_LATER)) - set(REGISTRY.names()))
    assert not unknown, f"no such plugins any more: {unknown}"


# -- a string where a list of patterns belongs ------------------------------------------------


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_string_pattern_is_refused_by_the_plugin_constructor(option):
    with raises(ConfigError, f"grad_norm.{option}", "expected a list of patterns, got 'enc.*'",
                f"write {option}=['enc.*']"):
        GradNorm(**{option: "enc.*"})


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_a_string_pattern_is_refused_in_a_config(option):
    with raises(ConfigError, f"plugins[0].{option}", "got the string 'enc.*'",
                'write ["enc.*"]'):
        steadytrain.load_config({"plugins": [{"plugin": "grad_norm", option: "enc.*"}]},
                                registry=REGISTRY)


# -- assembly from a config -------------------------------------------------------------------


def test_from_config_discovers_the_registry_once(monkeypatch):
    calls = []
    discover = Registry.discover.__func__

    def counted(cls, **kwargs):
        calls.append(kwargs)
        return discover(cls, **kwargs)

    monkeypatch.setattr(Registry, "discover", classmethod(counted))
    pipe = Pipeline.from_config({"plugins": [{"plugin": "grad_norm"}, {"plugin": "ema"}]})
    assert list(pipe.plugins) == ["grad_norm", "ema"]
    assert len(calls) == 1


def test_an_instance_config_carries_its_plugin_class():
    config = steadytrain.load_config({"plugins": [{"plugin": "grad_norm", "id": "norms"}]},
                                     registry=REGISTRY)
    (entry,) = config.plugins
    assert entry.factory is GradNorm
    plugin = entry.build()
    assert type(plugin) is GradNorm and plugin.id == "norms"


def test_an_instance_config_without_its_class_cannot_be_built():
    entry = steadytrain.InstanceConfig(plugin="grad_norm", options=GradNorm.Config(), id="n")
    with raises(ConfigError, "n: this InstanceConfig does not know its plugin class",
                "steadytrain.load_config"):
        entry.build()


# -- one name for an instance's identity -------------------------------------------------------


class Named(steadytrain.Plugin):
    """Records the id it sees in its hooks, logs, returns a term and asks to skip."""

    name = "named"
    seen = ()

    @hookimpl
    def compute_regularizers(self, ctx):
        self.seen = (*self.seen, ctx.id)
        ctx.log("seen", 1.0)
        return {"t": ctx.outputs["pred"].pow(2).mean()}

    @hookimpl
    def after_backward(self, ctx):
        self.seen = (*self.seen, ctx.id)
        ctx.request_skip("asked", when=False)
        if ctx.step == 1:
            raise RuntimeError("boom")


def test_an_instance_is_named_by_its_id_in_the_plugin_the_context_metrics_and_errors(model):
    left = Named(id="left")
    pipe = Pipeline([left, Named(id="right")]).setup(model, None)
    assert list(pipe.plugins) == ["left", "right"] and left.id == "left"
    for step in range(2):
        pipe.before_step()
        pred = model(torch.randn(3, 4))
        pipe.compute_loss(pred.sum(), outputs={"pred": pred})
        if step == 0:
            outcome = pipe.after_backward()
            pipe.consolidate()
    assert left.seen == ("left", "left", "left")
    assert [r.id for r in outcome.requests] == ["left", "right"]
    assert {"left/seen", "reg/left/t", "reg_weighted/right/t"} <= set(pipe.metrics())
    with raises(steadytrain.HookError, "plugin instance 'left' (named)", "after_backward",
                "step 1", "boom") as info:
        pipe.after_backward()
    assert (info.value.id, info.value.hook, info.value.step) == ("left", "after_backward", 1)
