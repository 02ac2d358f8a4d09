"""Checkpoints are all-or-nothing: a refused load or setup changes nothing, and what
``state_dict()`` returns always loads with ``torch.load(weights_only=True)``."""

import collections
import copy
import enum
import fractions
import pickle

import pytest
import torch
import torch.nn.functional as F
from exact import assert_same
from expect import raises
from helpers import round_trip
from torch import nn

import steadytrain
from steadytrain import CheckpointError, HookError, Pipeline, Registry, hookimpl
from steadytrain.plugins.corrector.corrector_penalty import apply_corrector
from steadytrain.plugins.ema import EMA
from steadytrain.plugins.gate_entropy import GateEntropy
from steadytrain.plugins.grad_norm import GradNorm
from steadytrain.plugins.guard import Guard

# -- a pipeline with state in several instances -------------------------------------------------


class Tally(steadytrain.Plugin):
    """Counts the closed steps and sums the step losses."""

    name = "tally"

    @hookimpl
    def setup(self, run):
        self.steps, self.total = 0, torch.zeros(())

    @hookimpl
    def consolidate(self, ctx):
        self.steps += 1
        self.total += ctx.step_loss

    def state_dict(self):
        return {"steps": self.steps, "total": self.total.clone()}

    def load_state_dict(self, state):
        self.check_state(state, ("steps", "total"))
        self.steps, self.total = state["steps"], state["total"].clone()


class Fussy(Tally):
    """Refuses a state that carries a 'corrupt' entry, with a plain exception."""

    name = "fussy"

    def load_state_dict(self, state):
        if "corrupt" in state:
            raise ValueError("the state is corrupt")
        super().load_state_dict(state)


def trained(steps):
    """A model and a set-up pipeline of four stateful instances after *steps* steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pipe = Pipeline([EMA(EMA.Config(decay=0.5), id="ema"), Tally(id="tally"),
                     Guard(id="guard"), Fussy(id="fussy")])
    pipe.setup(model, optimizer, total_steps=10)
    for _ in range(steps):
        x = torch.randn(8, 4)
        pipe.before_step(batch=x)
        pipe.compute_loss(model(x).pow(2).mean()).backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
    return pipe, model


def _set(path, value):
    def change(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        state[last] = value
    return change


def _drop(*path):
    def change(state):
        *parents, last = path
        for key in parents:
            state = state[key]
        del state[last]
    return change


REFUSED_LOADS = {
    "wrong format": (_set(["format"], 2), ["not a steadytrain pipeline checkpoint",
                                            "pass what Pipeline.state_dict() returned"]),
    "no format": (_drop("format"), ["not a steadytrain pipeline checkpoint"]),
    "missing counters": (_drop("counters"), ["no 'counters' table", "unmodified"]),
    "missing instances": (_drop("instances"), ["no 'instances' table"]),
    "a missing counter": (_drop("counters", "epoch"), ["counters epoch", "integers >= 0"]),
    "a float counter": (_set(["counters", "step"], 2.0), ["counters step", "integers >= 0"]),
    "a bool counter": (_set(["counters", "step"], True), ["counters step"]),
    "a string counter": (_set(["counters", "skipped_steps"], "0"), ["counters skipped_steps"]),
    "a negative counter": (_set(["counters", "epoch"], -1), ["counters epoch"]),
    "an entry without state": (_drop("instances", "tally", "state"),
                               ["entry for instance 'tally' needs 'plugin' and 'state'"]),
    "an entry without plugin": (_drop("instances", "guard", "plugin"),
                                ["entry for instance 'guard' needs 'plugin' and 'state'"]),
    "a state that is no mapping": (_set(["instances", "fussy", "state"], [1]),
                                   ["entry for instance 'fussy'"]),
    "a missing instance": (_drop("instances", "guard"),
                           ["another plugin set", "instances not in the checkpoint: guard",
                            "Load it with the config it was saved with"]),
    "an extra instance": (_set(["instances", "other"], {"plugin": "tally", "state": {}}),
                          ["another plugin set", "instances only in the checkpoint: other"]),
    "another plugin under an id": (_set(["instances", "ema", "plugin"], "grad_norm"),
                                   ["instance 'ema' is ema here but grad_norm in the checkpoint"]),
    "an instance raising after others loaded": (
        _set(["instances", "fussy", "state", "corrupt"], True),
        ["plugin instance 'fussy' could not load its state", "ValueError: the state is corrupt"]),
    "a guard state of another window": (
        _set(["instances", "guard", "state", "history"], torch.zeros(3)),
        ["guard.window", "the checkpoint holds 3 losses", "resume with the window"]),
    "a guard failing half-way through its own load": (
        _set(["instances", "guard", "state", "counters"], torch.zeros(99, dtype=torch.int64)),
        ["plugin instance 'guard' could not load its state"]),
    "a tally state missing a key": (_drop("instances", "tally", "state", "total"),
                                    ["plugin instance 'tally' (tally)", "expected ['steps', "
                                     "'total']"]),
}


@pytest.fixture(scope="module")
def later():
    """A checkpoint of the same run two steps on: every part differs from ``trained(2)``'s."""
    return trained(4)[0].state_dict()


@pytest.mark.parametrize("case", REFUSED_LOADS)
def test_a_refused_load_leaves_the_counters_and_every_instance_as_they_were(case, later):
    change, parts = REFUSED_LOADS[case]
    pipe, model = trained(2)
    before = copy.deepcopy(pipe.state_dict())
    weights = copy.deepcopy(model.state_dict())
    checkpoint = round_trip(later)
    change(checkpoint)
    with raises(CheckpointError, *parts):
        pipe.load_state_dict(checkpoint)
    assert_same(pipe.state_dict(), before)
    assert_same(model.state_dict(), weights)


def test_the_checkpoint_of_the_refused_loads_loads_when_unchanged(later):
    pipe, _ = trained(2)
    pipe.load_state_dict(round_trip(later))
    assert_same(pipe.state_dict(), later)


def test_a_load_before_setup_that_an_instance_refuses_fails_setup_and_changes_no_counter():
    pipe, _ = trained(2)
    checkpoint = round_trip(pipe.state_dict())
    checkpoint["instances"]["fussy"]["state"]["corrupt"] = True
    fresh = Pipeline([EMA(EMA.Config(decay=0.5), id="ema"), Tally(id="tally"),
                      Guard(id="guard"), Fussy(id="fussy")])
    counters = (fresh.run.step, fresh.run.epoch, fresh.run.skipped_steps)
    fresh.load_state_dict(checkpoint)  # the instances get their states in setup
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with raises(CheckpointError, "plugin instance 'fussy' could not load its state"):
        fresh.setup(model, None, total_steps=10)
    assert not fresh.is_setup
    assert (fresh.run.step, fresh.run.epoch, fresh.run.skipped_steps) == counters


# -- values weights_only loading refuses -------------------------------------------------------

Pair = collections.namedtuple("Pair", "a b")


class Colour(enum.Enum):
    RED = 1


class Holding(steadytrain.Plugin):
    """Keeps whatever it is given as its state."""

    name = "holding"

    def __init__(self, state, **kwargs):
        super().__init__(**kwargs)
        self.held = state

    def state_dict(self):
        return self.held


@pytest.mark.parametrize(
    "value",
    [collections.deque([1.0, 2.0]), range(3), Pair(1, 2), frozenset({1})],
    ids=["deque", "range", "namedtuple", "frozenset"],
)
def test_state_dict_refuses_a_value_weights_only_loading_refuses(value):
    with pytest.raises(pickle.UnpicklingError):  # the premise: torch would not load it back
        round_trip({"history": value})
    pipe = Pipeline([Holding({"history": value}, id="holder")])
    with raises(CheckpointError, "plugin instance 'holder'", "state_dict()['history']",
                type(value).__qualname__, "torch.load(weights_only=True) refuses",
                "store tensors, numbers, strings"):
        pipe.state_dict()


def test_state_dict_names_the_path_to_a_refused_value_inside_containers():
    pipe = Pipeline([Holding({"memory": {"recent": [0, collections.deque()]}}, id="holder")])
    with raises(CheckpointError, "plugin instance 'holder'",
                "state_dict()['memory']['recent'][1]", "collections.deque"):
        pipe.state_dict()


VALUES = {
    "deque": collections.deque([1]), "range": range(2), "namedtuple": Pair(1, 2),
    "frozenset": frozenset({1}), "defaultdict": collections.defaultdict(int, a=1),
    "slice": slice(1, 2), "ellipsis": ..., "fraction": fractions.Fraction(1, 2),
    "enum": Colour.RED, "set": {1, 2}, "OrderedDict": collections.OrderedDict(a=1),
    "Counter": collections.Counter(a=1), "bytes": b"x", "bytearray": bytearray(b"x"),
    "complex": 1j, "Size": torch.Size([2]), "dtype": torch.float16,
    "device": torch.device("cpu"), "None": None, "nan": float("nan"),
    "int keys": {1: 2}, "tuple keys": {(1, 2): 3}, "a namedtuple as a key": {Pair(1, 2): 0},
    "Parameter": nn.Parameter(torch.ones(2)), "nested tensors": [{"t": (torch.zeros(1),)}],
}


@pytest.mark.parametrize("name", VALUES)
def test_state_dict_accepts_exactly_what_weights_only_loading_accepts(name):
    state = {"value": VALUES[name]}
    try:
        round_trip(state)
        torch_loads = True
    except pickle.UnpicklingError:
        torch_loads = False
    pipe = Pipeline([Holding(state, id="holder")])
    try:
        pipe.state_dict()
        we_save = True
    except CheckpointError:
        we_save = False
    assert we_save == torch_loads


# -- every built-in plugin, saved and loaded back -----------------------------------------------


class Memory(nn.Module):
    """A consolidating module (steadytrain.nn's protocol)."""

    def __init__(self, width):
        super().__init__()
        self.slots = nn.Parameter(torch.zeros(width))

    def forward(self, h):
        return h + self.slots

    def consolidate(self):
        with torch.no_grad():
            self.slots.mul_(0.5)
        return {"mean": self.slots.mean()}


class MLP(nn.Module):
    """A two-layer MLP; its softmax is a gate to tap, its hidden layer a memory."""

    def __init__(self):
        super().__init__()
        self.enc, self.memory, self.head = nn.Linear(4, 8), Memory(8), nn.Linear(8, 3)
        self.gate = nn.Softmax(-1)

    def forward(self, x):
        logits = self.head(self.memory(torch.tanh(self.enc(x))))
        self.gate(logits)
        return logits


BUILT_INS = Registry.discover(autoload=False)
OPTIONS = {
    "corrector_penalty": {"std": {"y": 1.0}},
    "ema": {"decay": 0.5},
    "gate_entropy": {"taps": ["gate"], "target": 0.5},
    "gate_smoothness": {"taps": ["gate"]},
    "sparsity_target": {"taps": ["gate"]},
    "scheduled_consolidation": {"interval": 1},
    "stability_monitor": {"window": 2, "check_every": 1},
    "guard": {"check_every": 1},
}


def every_built_in(steps):
    torch.manual_seed(0)
    model = MLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    config = {"plugins": [{"plugin": name, **OPTIONS.get(name, {})}
                          for name in BUILT_INS.names()]}
    pipe = Pipeline.from_config(config, registry=BUILT_INS)
    pipe.setup(model, optimizer, total_steps=10)
    pre_corrector = pipe.plugins["pre_corrector_optimization"]
    for _ in range(steps):
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        pipe.before_step(batch=x, targets=y)
        logits = model(x)
        fields = apply_corrector(lambda f: {"y": f["y"].clamp(-0.2, 0.2)}, {"y": logits})
        task = F.cross_entropy(pre_corrector.for_loss(fields)["y"], y)
        loss = pipe.compute_loss(task, outputs={"logits": logits})
        loss.backward()
        steadytrain.step_optimizer(optimizer, pipe.after_backward())
        pipe.consolidate()
        optimizer.zero_grad()
    return pipe


def test_the_state_of_every_built_in_plugin_round_trips_through_weights_only_loading():
    pipe = every_built_in(3)
    assert list(pipe.plugins) == BUILT_INS.names()
    state = pipe.state_dict()
    loaded = round_trip(state)
    fresh = every_built_in(0)
    fresh.load_state_dict(loaded)
    assert_same(fresh.state_dict(), state)


# -- a refused setup ------------------------------------------------------------------------------


class FailsOnce(steadytrain.Plugin):
    """Raises in its first setup."""

    name = "fails_once"
    failed = False

    @hookimpl
    def setup(self, run):
        if not self.failed:
            self.failed = True
            raise RuntimeError("the device is busy")


def gate_model():
    torch.manual_seed(0)
    return MLP()


def hooked_modules(model):
    return [name for name, module in model.named_modules() if module._forward_hooks]


def test_a_refused_setup_leaves_no_forward_hook_and_the_pipeline_unbound():
    model = gate_model()
    pipe = Pipeline([GateEntropy(GateEntropy.Config(taps=("gate",), target=0.5)), FailsOnce()])
    with raises(HookError, "plugin instance 'fails_once'", "RuntimeError in setup",
                "the device is busy"):
        pipe.setup(model, None, total_steps=5)
    assert hooked_modules(model) == []
    assert not pipe.is_setup
    assert pipe.run.model is None and pipe.run.taps == {}


def test_setup_can_be_called_again_after_a_refused_one_and_taps_once():
    model = gate_model()
    pipe = Pipeline([GateEntropy(GateEntropy.Config(taps=("gate",), target=0.5)), FailsOnce()])
    with raises(HookError):
        pipe.setup(model, None, total_steps=5)
    pipe.setup(model, None, total_steps=5)
    assert hooked_modules(model) == ["gate"]
    assert len(model.gate._forward_hooks) == 1
    pipe.before_step()
    logits = model(torch.randn(3, 4))
    pipe.compute_loss(logits.sum()).backward()
    pipe.after_backward()
    pipe.consolidate()
    assert "reg/gate_entropy/entropy_deficit" in pipe.metrics()


def test_a_real_plugin_refusing_setup_after_another_tapped_leaves_no_forward_hook():
    model = gate_model()
    pipe = Pipeline([GateEntropy(GateEntropy.Config(taps=("gate",), target=0.5)),
                     GradNorm(include=["decoder.*"])])
    with raises(steadytrain.FilterError, "grad_norm.include", "'decoder.*'"):
        pipe.setup(model, None, total_steps=5)
    assert hooked_modules(model) == []
    assert not pipe.is_setup


def test_state_dict_before_setup_names_the_instance_that_has_no_state_yet():
    with raises(CheckpointError, "plugin instance 'ema': state_dict() raised",
                "before pipe.setup(model, optimizer)"):
        Pipeline([EMA(id="ema")]).state_dict()
