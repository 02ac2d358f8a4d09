import pytest
import torch

import steadytrain
from steadytrain.param_groups import param_groups


class MemoryModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(4, 6)
        self.memory_gate = torch.nn.Linear(6, 3)
        self.stm_memory = torch.nn.Linear(6, 6)
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        h = h + torch.tanh(self.stm_memory(h)) * torch.softmax(self.memory_gate(h), -1)[:, :1]
        return self.head(h)


DOCUMENT = [{"name": "memory", "include": ["*memory*"], "lr_scale": 0.1, "weight_decay": 0.001}]


@pytest.fixture
def net():
    torch.manual_seed(0)
    return MemoryModel()


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_document_setup_builds_two_groups(net):
    opt = torch.optim.AdamW(param_groups(net, DOCUMENT, lr=1e-3, weight_decay=0.01))
    memory, rest = opt.param_groups
    assert names_of(net, memory) == [n for n, _ in net.named_parameters() if "memory" in n]
    assert names_of(net, rest) == [n for n, _ in net.named_parameters() if "memory" not in n]
    assert (memory["lr"], memory["weight_decay"], memory["name"]) == (1e-3 * 0.1, 0.001, "memory")
    assert (rest["lr"], rest["weight_decay"], rest["name"]) == (1e-3, 0.01, "default")


def test_one_step_equals_two_separate_optimizers(net):
    reference = MemoryModel()
    reference.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(param_groups(net, DOCUMENT, lr=1e-2, weight_decay=0.01))
    # the document's two optimizers
    main = torch.optim.AdamW([p for n, p in reference.named_parameters() if "memory" not in n],
                             lr=1e-2, weight_decay=0.01)
    memory = torch.optim.AdamW([p for n, p in reference.named_parameters() if "memory" in n],
                               lr=1e-2 * 0.1, weight_decay=0.001)
    torch.manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(5, 4), torch.randn(5, 2)
        for model in (net, reference):
            torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        main.step()
        memory.step()
        opt.zero_grad()
        main.zero_grad()
        memory.zero_grad()
    for (name, ours), theirs in zip(net.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(ours, theirs), name


def test_every_parameter_in_exactly_one_group(net):
    groups = param_groups(net, [{"include": ["encoder.*"], "exclude": ["*.bias"]},
                                {"include": ["head.*"], "lr_scale": 2.0}], lr=0.5)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in net.parameters())
    assert [g["name"] for g in groups] == ["groups[0]", "groups[1]", "default"]
    assert names_of(net, groups[0]) == ["encoder.weight"]
    assert names_of(net, groups[1]) == ["head.weight", "head.bias"] and groups[1]["lr"] == 1.0
    assert names_of(net, groups[2]) == ["encoder.bias", "memory_gate.weight", "memory_gate.bias",
                                        "stm_memory.weight", "stm_memory.bias"]


def test_no_default_group_when_everything_is_assigned(net):
    groups = param_groups(net, [{"include": ["*"], "weight_decay": 0.1}], lr=0.1, weight_decay=0.0)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


def test_overlap_names_both_groups_and_a_parameter(net):
    with pytest.raises(steadytrain.ConfigError) as info:
        param_groups(net, [{"name": "memory", "include": ["*memory*"]},
                           {"name": "gates", "include": ["memory_gate.*"]}], lr=1.0)
    message = str(info.value)
    assert message.startswith("param_groups.groups[1]: parameter 'memory_gate.weight'")
    assert "also in group 'memory'" in message


def test_pattern_matching_nothing_is_an_error(net):
    with pytest.raises(steadytrain.FilterError,
                       match=r"param_groups.groups\[0\].include: pattern 'memroy\.\*'"):
        param_groups(net, [{"include": ["memroy.*"]}], lr=1.0)
    with pytest.raises(steadytrain.FilterError, match=r"groups\[0\].exclude: pattern 'x'"):
        param_groups(net, [{"include": ["head.*"], "exclude": ["x"]}], lr=1.0)


def test_group_whose_matches_are_all_excluded_is_an_error(net):
    with pytest.raises(steadytrain.ConfigError, match="select none of the parameters"):
        param_groups(net, [{"include": ["head.*"], "exclude": ["head.*"]}], lr=1.0)


@pytest.mark.parametrize(
    ("groups", "options", "message"),
    [
        ([{"lr_scale": -0.1}], {}, r"groups\[0\].lr_scale: must be a positive number, got -0.1"),
        ([{"lr_scale": 0}], {}, r"groups\[0\].lr_scale: must be a positive number"),
        ([{"weight_decay": -1}], {}, r"groups\[0\].weight_decay: must be a number >= 0"),
        ([{"lr": 0.1}], {}, r"groups\[0\]: unknown key 'lr'; known keys: include, exclude"),
        (["*memory*"], {}, r"groups\[0\]: expected a table of options"),
        ([{"include": 3}], {}, r"groups\[0\].include: expected a list of strings, got 3"),
        ([], {"lr": 0}, r"param_groups.lr: must be a positive number, got 0"),
        ([], {"weight_decay": float("nan")}, r"param_groups.weight_decay: must be a number"),
    ],
)
def test_bad_input_names_the_option(net, groups, options, message):
    with pytest.raises(steadytrain.ConfigError, match=message):
        param_groups(net, groups, **{"lr": 1.0, **options})


def test_group_specs_may_be_given_as_objects(net):
    from steadytrain import GroupSpec

    as_dicts = param_groups(net, [{"include": ["head.*"], "lr_scale": 0.5}], lr=1.0)
    as_specs = param_groups(net, [GroupSpec(include=("head.*",), lr_scale=0.5)], lr=1.0)
    assert [(g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in as_dicts] == [
        (g["lr"], g["weight_decay"], [id(p) for p in g["params"]]) for g in as_specs
    ]
