"""Error paths of the core that the other test modules do not reach."""

import pytest
import torch
from helpers import L2Outputs

import steadytrain
from steadytrain import ConfigError, Pipeline, Registry, RegistryError, hookimpl, validators


def test_unknown_finite_check_is_an_error():
    with pytest.raises(ConfigError, match="finite_check: must be one of auto, step, log"):
        Pipeline([], finite_check="sometimes")


def test_setup_twice_and_steps_after_close_are_errors(model):
    pipe = Pipeline([L2Outputs()]).setup(model, None)
    with pytest.raises(steadytrain.UsageError, match="already called"):
        pipe.setup(model, None)
    pipe.close()
    pipe.close()  # closing twice is harmless
    with pytest.raises(steadytrain.UsageError, match="closed pipeline"):
        pipe.before_step()


def test_no_task_loss_and_no_terms_is_an_error(model):
    pipe = Pipeline([]).setup(model, None)
    pipe.before_step()
    with pytest.raises(steadytrain.UsageError, match="no task loss and no plugin returned a term"):
        pipe.compute_loss(None)


def test_a_plugin_config_of_the_wrong_class_is_an_error():
    with pytest.raises(ConfigError, match=r"L2Outputs: config must be a NoOptions, got dict"):
        L2Outputs({"decay": 0.5})


def test_taps_need_a_model():
    class Tapper(steadytrain.Plugin):
        name = "tapper"

        @hookimpl
        def setup(self, run):
            run.tap(self, "layer")

    with pytest.raises(steadytrain.ConfigError, match=r"tapper\.taps: the instance taps modules"):
        Pipeline([Tapper()]).setup(None, None)


def test_a_nameless_class_cannot_be_registered():
    class Anonymous(steadytrain.Plugin):
        pass

    with pytest.raises(RegistryError, match="has no name: pass name="):
        Registry().register(Anonymous)


def test_a_plugin_failing_to_load_its_state_is_named(model):
    class Fussy(steadytrain.Plugin):
        name = "fussy"

        def state_dict(self):
            return {"x": torch.zeros(1)}

        def load_state_dict(self, state):
            raise KeyError("y")

    pipe = Pipeline([Fussy(id="f")]).setup(model, None)
    with pytest.raises(steadytrain.CheckpointError,
                       match=r"'f' could not load its state: KeyError"):
        pipe.load_state_dict(pipe.state_dict())


@pytest.mark.parametrize(
    ("validator", "value", "message"),
    [
        (validators.in_range(0, 1, include_high=True), 1.5, r"must be in \(0, 1\], got 1.5"),
        (validators.positive, 0, "must be a positive number, got 0"),
        (validators.non_negative, -1.0, "must be a number >= 0, got -1.0"),
        (validators.finite, float("inf"), "must be a finite number, got inf"),
        (validators.positive_int, True, "must be an integer >= 1, got True"),
        (validators.non_negative_int, -2, "must be an integer >= 0, got -2"),
        (validators.boolean, "yes", "must be true or false, got 'yes'"),
        (validators.non_empty_str, "", "must be a non-empty string, got ''"),
        (validators.one_of("mse", "l1"), "mae", r"must be one of 'mse', 'l1', got 'mae'"),
        (validators.norm_order, -1, r"must be a number > 0 \(or inf for the max-abs norm\)"),
    ],
)
def test_validators_name_the_option(validator, value, message):
    class Attribute:
        name = "option"

    with pytest.raises(steadytrain.OptionError, match=message) as info:
        validator(None, Attribute, value)
    assert info.value.option == "option"


def test_check_applies_a_validator_to_a_plain_argument():
    assert validators.check(3, validators.positive_int, "Buffer.capacity") == 3
    with pytest.raises(ConfigError, match=r"^Buffer\.capacity: must be an integer >= 1, got 0$"):
        validators.check(0, validators.positive_int, "Buffer.capacity")


def test_validators_accept_good_values():
    class Attribute:
        name = "option"

    validators.in_range(0, 1)(None, Attribute, 0.5)
    validators.optional(validators.positive)(None, Attribute, None)
    validators.one_of("mse", "l1")(None, Attribute, "l1")


def test_hook_wrappers_are_refused():
    class Wrapping:
        @hookimpl(wrapper=True)
        def before_step(self, ctx):
            return (yield)

    pipe = Pipeline([])
    with pytest.raises(RegistryError, match=r"'w' .*before_step: hook wrappers are not"):
        pipe.register(Wrapping(), name="w")
    assert list(pipe.plugins) == []  # the refused object left nothing behind

    class WrappingPlugin(steadytrain.Plugin):
        name = "wrapping"
        before_step = Wrapping.before_step

    with pytest.raises(RegistryError, match="hook wrappers are not supported"):
        Registry().register(WrappingPlugin)


def test_is_setup_follows_setup(model):
    pipe = Pipeline([L2Outputs()])
    assert not pipe.is_setup
    assert pipe.setup(model, None).is_setup


def test_a_steadytrain_error_from_a_hook_keeps_its_type_and_gains_a_note(model):
    class Strict(steadytrain.Plugin):
        name = "strict"

        @hookimpl
        def before_step(self, ctx):
            raise ConfigError("strict.level: must be set")

    pipe = Pipeline([Strict()]).setup(model, None)
    with pytest.raises(ConfigError) as info:
        pipe.before_step()
    assert "in plugin instance 'strict', hook before_step, step 0" in info.value.__notes__
