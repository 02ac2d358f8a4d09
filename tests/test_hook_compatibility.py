"""Hook-spec evolution: a plugin written against an older spec, whose hooks take fewer
arguments than today's, still registers, runs and passes the conformance kit."""

import torch

import steadytrain
from steadytrain import Pipeline, hookimpl
from steadytrain.testing import check_plugin


class Counter(steadytrain.Plugin):
    """Counts steps and epochs, written when hooks passed nothing."""

    name = "old_counter"
    uses_filter = False

    def __init__(self, config=None, **settings):
        super().__init__(config, **settings)
        self.calls = {"setup": 0, "before_step": 0, "after_backward": 0, "consolidate": 0,
                      "on_epoch_end": 0}

    @hookimpl
    def setup(self):
        self.calls["setup"] += 1

    @hookimpl
    def before_step(self):
        self.calls["before_step"] += 1

    @hookimpl
    def after_backward(self):
        self.calls["after_backward"] += 1

    @hookimpl
    def consolidate(self):
        self.calls["consolidate"] += 1

    @hookimpl
    def on_epoch_end(self):
        self.calls["on_epoch_end"] += 1

    def state_dict(self):
        return {"calls": dict(self.calls)}

    def load_state_dict(self, state):
        self.check_state(state, ["calls"])
        self.calls = dict(state["calls"])


def test_hooks_without_arguments_are_called_at_their_points(model):
    counter = Counter()
    pipe = Pipeline([counter]).setup(model, None)
    pipe.epoch_start()
    for _ in range(3):
        for micro_batch in range(2):
            pipe.before_step(micro_batch=micro_batch, num_micro_batches=2)
            pipe.compute_loss(model(torch.ones(1, 4)).sum()).backward()
        pipe.after_backward()
        pipe.consolidate()
    pipe.epoch_end()
    assert counter.calls == {"setup": 1, "before_step": 6, "after_backward": 3,
                             "consolidate": 3, "on_epoch_end": 1}


def test_a_plugin_written_against_an_older_spec_passes_the_conformance_kit():
    check_plugin(Counter)
