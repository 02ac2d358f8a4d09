
import pytest
import structlog
import torch
import torch.nn.functional as F
from helpers import round_trip
from structlog.testing import capture_logs

import steadytrain
from steadytrain import Pipeline
from steadytrain.nn import DualMemory, MemoryGate, SoftTopK, consolidating_modules
from steadytrain.plugins.consolidation import ScheduledConsolidation, consolidate_modules


class Tally(torch.nn.Module):
    """A consolidating module that counts its consolidations."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def consolidate(self):
        self.calls += 1
        return {"calls": self.calls.double()}


class Tallies(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.enc = torch.nn.ModuleDict({"memory": Tally()})
        self.dec = torch.nn.ModuleDict({"memory": Tally()})

    def forward(self, x):
        return self.lin(x)


class MemoryModel(torch.nn.Module):
    """A tiny model with short/long-term memory, a memory gate and soft top-k sparsity."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(4, 8)
        self.memory = DualMemory(8, stm_capacity=6, ltm_capacity=10, threshold=2)
        self.gate = MemoryGate(8)
        self.sparse = SoftTopK(8, 0.25)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        stm, ltm = self.memory.retrieve(h)
        mixed, _ = self.gate(h, stm, ltm)
        sparse, _ = self.sparse(mixed)
        self.memory.store(h.detach().mean(0), sparse.detach().mean(0))
        return self.head(sparse)


class SkipAt(steadytrain.Plugin):
    """Ask the host to skip the optimizer steps whose index is in ``steps``."""

    name = "skip_at"
    steps: frozenset = frozenset()

    @steadytrain.hookimpl
    def after_backward(self, ctx):
        if ctx.step in self.steps:
            ctx.request_skip("test")


def one_step(pipe, model, opt, x, y):
    pipe.before_step()
    loss = pipe.compute_loss(F.mse_loss(model(x), y))
    loss.backward()
    if not pipe.after_backward().skip:
        opt.step()
    pipe.consolidate()
    opt.zero_grad()
    return loss.detach()


def drive(pipe, model, steps, *, epoch_length=None):
    """Run *steps* steps; return the step counts after which a Tally consolidated."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    tally = model.enc["memory"]
    seen = []
    for _ in range(steps):
        before = int(tally.calls)
        one_step(pipe, model, opt, x, y)
        if epoch_length and pipe.run.step % epoch_length == 0:
            pipe.epoch_end()
        if int(tally.calls) > before:
            seen.append(pipe.run.step)
    return seen


def make(config, model, *extra, **settings):
    pipe = Pipeline([*extra, ScheduledConsolidation(config, **settings)])
    return pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1), total_steps=100)


def test_consolidates_every_interval_optimizer_steps():
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=3), model)
    assert drive(pipe, model, 10) == [3, 6, 9]
    assert int(model.dec["memory"].calls) == 3


def test_consolidates_at_epoch_ends_only_when_asked():
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=0, at_epoch_end=True), model)
    assert drive(pipe, model, 12, epoch_length=5) == [5, 10]
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=3), model)
    assert drive(pipe, model, 12, epoch_length=5) == [3, 6, 9, 12]


def test_an_epoch_end_right_after_an_interval_consolidation_does_not_repeat_it():
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=2, at_epoch_end=True), model)
    assert drive(pipe, model, 9, epoch_length=3) == [2, 3, 4, 6, 8, 9]
    assert int(model.enc["memory"].calls) == 6


def test_a_consolidation_due_on_a_skipped_step_waits_for_the_next_completed_step():
    model = Tallies()
    skip = SkipAt()
    skip.steps = frozenset({2, 3, 8, 9})  # step indices: index 2 completes the third step
    pipe = make(ScheduledConsolidation.Config(interval=3), model, skip)
    assert drive(pipe, model, 13) == [5, 6, 11, 12]


def test_metrics_report_what_each_module_moved():
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=2, at_epoch_end=True), model, id="cons")
    drive(pipe, model, 3, epoch_length=3)
    metrics = pipe.metrics()
    # Consolidations after steps 2 and 3 returned calls = 1 and 2: the metric is their mean.
    assert metrics["cons/enc.memory/calls"] == 1.5
    assert metrics["cons/dec.memory/calls"] == 1.5


def test_a_consolidation_emits_a_structlog_event():
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=2), model, include=["enc.*"])
    with capture_logs() as logs:
        drive(pipe, model, 2)
    events = [e for e in logs if e["event"] == "consolidation.ran"]
    assert events == [{
        "event": "consolidation.ran", "log_level": "info", "id": "scheduled_consolidation",
        "step": 2, "epoch": 0, "trigger": "interval", "modules": ["enc.memory"],
    }]
    assert int(model.dec["memory"].calls) == 0


def test_include_and_exclude_select_modules_by_name():
    model = Tallies()
    pipe = make(ScheduledConsolidation.Config(interval=1), model, exclude=["dec.*"])
    drive(pipe, model, 2)
    assert (int(model.enc["memory"].calls), int(model.dec["memory"].calls)) == (2, 0)


def test_a_dual_memory_moves_its_well_used_entries_through_the_pipeline():
    torch.manual_seed(0)
    model = MemoryModel()
    pipe = make(ScheduledConsolidation.Config(interval=4), model, id="cons")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(5, 4), torch.randn(5, 1)
    stm, ltm = model.memory.stm, model.memory.ltm
    for _ in range(3):
        one_step(pipe, model, opt, x, y)
    # The fourth step retrieves (counting accesses) and stores before consolidation runs:
    # replay its forward on a copy of the memory to know the candidates independently.
    probe = MemoryModel()
    probe.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    probe(x)
    expected = (probe.memory.stm.valid & (probe.memory.stm.access_counts >= 2)).sum()
    torch.manual_seed(1)
    one_step(pipe, model, opt, x, y)
    assert int(expected) > 0
    assert int(ltm.valid.sum()) == int(expected)
    assert pipe.metrics()["cons/memory/moved"] == float(expected)
    assert int(stm.access_counts.max()) < 2


def test_state_resumes_bit_exact_from_a_checkpoint_with_a_pending_consolidation():
    def build():
        torch.manual_seed(0)
        model = MemoryModel()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        skip = SkipAt()
        skip.steps = frozenset({5})
        pipe = Pipeline([skip, ScheduledConsolidation(ScheduledConsolidation.Config(interval=3))])
        pipe.setup(model, opt, total_steps=12)
        return model, opt, pipe

    x, y = torch.randn(5, 4), torch.randn(5, 1)
    model, opt, pipe = build()
    for _ in range(6):
        one_step(pipe, model, opt, x, y)
    assert pipe.plugins["scheduled_consolidation"].pending  # due after step 6, which skipped
    saved = round_trip({"pipe": pipe.state_dict(), "model": model.state_dict(),
                        "opt": opt.state_dict(), "rng": torch.get_rng_state()})
    reference = [one_step(pipe, model, opt, x, y) for _ in range(5)]

    resumed, resumed_opt, resumed_pipe = build()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_pipe.load_state_dict(saved["pipe"])
    torch.set_rng_state(saved["rng"])
    losses = [one_step(resumed_pipe, resumed, resumed_opt, x, y) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(losses, reference, strict=True))
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    assert resumed_pipe.state_dict() == pipe.state_dict()
    assert pipe.plugins["scheduled_consolidation"].state_dict() == {
        "last_step": 9, "pending": False, "runs": 3}


def test_consolidate_modules_is_usable_without_a_pipeline():
    model = Tallies()
    recorded = {}
    moved = consolidate_modules(consolidating_modules(model), recorded.__setitem__)
    assert list(moved) == ["enc.memory", "dec.memory"]
    assert recorded == {"enc.memory/calls": torch.tensor(1.0, dtype=torch.float64),
                        "dec.memory/calls": torch.tensor(1.0, dtype=torch.float64)}
    root = Tally()
    assert consolidate_modules(consolidating_modules(root), recorded.__setitem__) == {
        "": {"calls": torch.tensor(1.0, dtype=torch.float64)}}
    assert "calls" in recorded


def test_is_registered_and_configurable_from_toml(tmp_path):
    assert "scheduled_consolidation" in steadytrain.Registry.discover().names()
    path = tmp_path / "run.toml"
    path.write_text('[[plugins]]\nplugin = "scheduled_consolidation"\ninterval = 2\n'
                    'at_epoch_end = true\ninclude = ["enc.*"]\n')
    pipe = Pipeline.from_config(path)
    model = Tallies()
    pipe.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert drive(pipe, model, 5, epoch_length=5) == [2, 4, 5]
    assert int(model.dec["memory"].calls) == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"interval": -1}, "plugins[0].interval: must be an integer >= 0, got -1"),
        ({"interval": 0}, "plugins[0].interval: is 0 and at_epoch_end is false"),
        ({"interval": 2.5}, "plugins[0].interval: expected an integer, got 2.5"),
        ({"at_epoch_end": "yes"}, "plugins[0].at_epoch_end: expected true or false"),
        ({"intervall": 5}, "plugins[0]: unknown key 'intervall' (did you mean 'interval'?)"),
    ],
)
def test_bad_options_are_errors_with_their_path(options, message):
    with pytest.raises(steadytrain.ConfigError) as info:
        Pipeline.from_config({"plugins": [{"plugin": "scheduled_consolidation", **options}]})
    assert message in str(info.value)


def test_a_model_without_consolidating_modules_is_an_error_naming_the_instance():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(steadytrain.ConfigError, match="mem: the model has no module with a "
                       r"consolidate\(\) method"):
        make(ScheduledConsolidation.Config(), model, id="mem")
    with pytest.raises(steadytrain.ConfigError, match="mem: no model is bound"):
        Pipeline([ScheduledConsolidation(id="mem")]).setup(None)


def test_patterns_that_match_no_consolidating_module_are_errors():
    with pytest.raises(steadytrain.FilterError,
                       match=r"mem\.include: pattern 'lin' matches no consolidating module"):
        make(ScheduledConsolidation.Config(), Tallies(), id="mem", include=["lin"])
    with pytest.raises(steadytrain.FilterError,
                       match=r"mem\.exclude: pattern 'enc\.mem' matches no"):
        make(ScheduledConsolidation.Config(), Tallies(), id="mem", exclude=["enc.mem"])
    with pytest.raises(steadytrain.FilterError, match=r"mem: include .* select none"):
        make(ScheduledConsolidation.Config(), Tallies(), id="mem", exclude=["*.memory"])


class Broken(torch.nn.Module):
    def consolidate(self):
        return 3


class BrokenModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.mem = Broken()

    def forward(self, x):
        return self.lin(x)


def test_a_module_whose_consolidate_returns_no_mapping_is_named_in_the_error():
    model = BrokenModel()
    pipe = make(ScheduledConsolidation.Config(interval=1), model, id="cons")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(steadytrain.HookError,
                       match=r"'cons'.*module 'mem' \(Broken\): consolidate\(\) must return a "
                       "mapping of statistics, got int"):
        one_step(pipe, model, opt, torch.randn(3, 2), torch.randn(3, 1))


def test_a_checkpoint_with_other_state_keys_is_rejected():
    pipe = make(ScheduledConsolidation.Config(), Tallies(), id="mem")
    with pytest.raises(steadytrain.CheckpointError, match=r"'mem'.*has keys \['step'\], expected"):
        pipe.plugins["mem"].load_state_dict({"step": 3})


class NeedsArguments(torch.nn.Module):
    """Consolidates like the source's GradualConsolidation: it wants the memories."""

    def consolidate(self, stm, ltm, force=False):
        return {}


class ForcedOff(torch.nn.Module):
    def consolidate(self, force=False):
        return {"forced": float(force)}


class Holder(torch.nn.Module):
    def __init__(self, memory: torch.nn.Module) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)
        self.gradual = memory

    def forward(self, x):
        return self.lin(x)


def test_a_consolidate_that_needs_arguments_is_refused_at_setup_naming_the_module():
    with pytest.raises(steadytrain.ConfigError,
                       match=r"cons: module 'gradual' \(NeedsArguments\) does not implement "
                       r"steadytrain\.nn\.Consolidating: its consolidate\(stm, ltm, "
                       r"force=False\) takes required arguments.*exclude = \['gradual'\]"):
        make(ScheduledConsolidation.Config(interval=1), Holder(NeedsArguments()), id="cons")


def test_a_model_whose_own_consolidate_needs_arguments_is_refused():
    class Model(NeedsArguments):
        def forward(self, x):
            return x

    with pytest.raises(steadytrain.ConfigError, match=r"cons: the model \(Model\) does not "
                       "implement.*remove this plugin"):
        Pipeline([ScheduledConsolidation(id="cons")]).setup(Model())


class GatedMemory(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.consolidate = torch.nn.Linear(2, 2)  # a gate, not the protocol's method


def test_a_submodule_named_consolidate_is_refused():
    with pytest.raises(steadytrain.ConfigError, match=r"module 'gradual' \(GatedMemory\) does "
                       r"not implement steadytrain\.nn\.Consolidating: its "
                       r"consolidate\(input: torch\.Tensor\) -> torch\.Tensor takes required"):
        make(ScheduledConsolidation.Config(), Holder(GatedMemory()), id="cons")


def test_optional_arguments_and_excluded_modules_are_accepted():
    model = Holder(ForcedOff())
    pipe = make(ScheduledConsolidation.Config(interval=1), model, id="cons")
    one_step(pipe, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(3, 2),
             torch.randn(3, 1))
    assert pipe.metrics()["cons/gradual/forced"] == 0.0
    tallies = Tallies()
    tallies.enc.add_module("gradual", NeedsArguments())
    make(ScheduledConsolidation.Config(), tallies, exclude=["enc.gradual"])


class Counted(torch.nn.Module):
    consolidate = 3  # a setting that happens to carry the protocol's name


def test_a_consolidate_that_is_no_method_is_refused():
    with pytest.raises(steadytrain.ConfigError, match=r"module 'gradual' \(Counted\) does not "
                       "implement steadytrain.nn.Consolidating: its consolidate is a int, not a "
                       "method"):
        make(ScheduledConsolidation.Config(), Holder(Counted()), id="cons")
