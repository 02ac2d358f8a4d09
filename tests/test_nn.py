import math
import re

import pytest
import torch

import steadytrain
from steadytrain.nn import (
    Consolidating,
    DualMemory,
    MemoryBuffer,
    MemoryGate,
    SoftTopK,
    consolidate_memories,
    gumbel_noise,
    hard_topk_mask,
    keep_count,
    mix_memories,
    soft_topk_mask,
)

# -- memory gate ------------------------------------------------------------------------


def gate_reference(gate, current, stm, ltm, temperature):
    """The document's formula written out with the gate's weights."""
    w, b = gate.gate_proj.weight.detach(), gate.gate_proj.bias.detach()
    inputs = torch.cat([current, stm, ltm], dim=-1)
    logits = inputs @ w.T + b + gate.gate_bias.detach()
    e = torch.exp(logits / temperature)
    g = e / e.sum(dim=-1, keepdim=True)
    out = g[..., 0:1] * current + g[..., 1:2] * stm + g[..., 2:3] * ltm
    return out, g


def test_gate_initialises_bias_and_temperature_as_the_document():
    gate = MemoryGate(5)
    assert torch.equal(gate.gate_bias.detach(), torch.tensor([0.5, 0.3, 0.2]))
    assert torch.equal(gate.temperature.detach(), torch.ones(1))
    assert gate.gate_proj.in_features == 15 and gate.gate_proj.out_features == 3


@pytest.mark.parametrize("shape", [(4, 6), (2, 3, 6)])
def test_gate_output_is_the_gated_mix_over_the_last_dimension(shape):
    torch.manual_seed(0)
    gate = MemoryGate(6)
    current, stm, ltm = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
    gate = gate.double()
    out, gates = gate(current, stm, ltm)
    want_out, want_gates = gate_reference(gate, current, stm, ltm, 1.0)
    assert gates.shape == (*shape[:-1], 3)
    torch.testing.assert_close(gates, want_gates)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(gates.sum(-1), torch.ones(shape[:-1], dtype=torch.float64))


def test_mix_memories_is_the_residual_form():
    torch.manual_seed(1)
    current, stm, ltm = torch.randn(3, 2, 4).unbind(0)
    gates = torch.softmax(torch.randn(2, 3), dim=-1)
    want = current + gates[:, 1:2] * (stm - current) + gates[:, 2:3] * (ltm - current)
    torch.testing.assert_close(mix_memories(current, stm, ltm, gates), want)


@pytest.mark.parametrize(("learned", "used"), [(0.01, 0.1), (-3.0, 0.1), (2.5, 2.5)])
def test_gate_temperature_is_clamped_at_its_minimum(learned, used):
    torch.manual_seed(2)
    gate = MemoryGate(3).double()
    with torch.no_grad():
        gate.temperature.fill_(learned)
    current, stm, ltm = (torch.randn(4, 3, dtype=torch.float64) for _ in range(3))
    out, gates = gate(current, stm, ltm)
    torch.testing.assert_close(gates, gate_reference(gate, current, stm, ltm, used)[1])
    out.sum().backward()
    clamped = learned < 0.1
    assert (gate.temperature.grad.abs().sum() == 0) == clamped


def test_gate_reports_its_gates_into_the_open_step():
    gate = MemoryGate(4)
    pipe = steadytrain.Pipeline().setup(gate)
    ctx = pipe.before_step()
    x = torch.randn(2, 5, 4)
    _, gates = gate(x, x + 1, x - 1)
    assert ctx.outputs["gates"] is gates


def test_gates_reported_twice_in_one_step_become_a_list_and_names_are_configurable():
    first, second = MemoryGate(4), MemoryGate(4)
    quiet = MemoryGate(4, report_as=None)
    named = MemoryGate(4, report_as="layer_gates")
    pipe = steadytrain.Pipeline().setup(torch.nn.ModuleList([first, second, quiet, named]))
    ctx = pipe.before_step()
    x = torch.randn(3, 4)
    g1, g2 = first(x, x, x)[1], second(x, x, x)[1]
    quiet(x, x, x)
    g4 = named(x, x, x)[1]
    assert isinstance(ctx.outputs["gates"], list)
    assert [g is want for g, want in zip(ctx.outputs["gates"], (g1, g2), strict=True)] == [
        True, True]
    assert ctx.outputs["layer_gates"] is g4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim: must be an integer >= 1, got 0"),
        ({"dim": 4, "min_temperature": 0.0}, "min_temperature: must be a positive number, got 0.0"),
        ({"dim": 4, "bias": (0.5, 0.5)}, "bias: must have 3 values"),
    ],
)
def test_gate_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape("MemoryGate." + message)):
        MemoryGate(**kwargs)


def test_gate_rejects_inputs_of_the_wrong_width_or_of_different_shapes():
    gate = MemoryGate(4)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"MemoryGate\(dim=4.*stm must have 4 features.*\(2, 3\)"):
        gate(x, torch.randn(2, 3), x)
    with pytest.raises(ValueError, match=r"must have one shape, got \(2, 4\), \(1, 2, 4\)"):
        gate(x, torch.randn(1, 2, 4), x)
    with pytest.raises(TypeError, match="ltm must be a tensor"):
        gate(x, x, [0.0] * 4)


# -- soft top-k -------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "target", "k"), [(20, 0.15, 3), (3, 0.15, 1), (10, 1.0, 10),
                                                  (100, 0.05, 5), (7, 0.5, 4)])
def test_keep_count_rounds_the_target_and_keeps_at_least_one(dim, target, k):
    assert keep_count(dim, target) == k
    assert SoftTopK(dim, target).k == k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_gumbel_noise_is_finite_at_both_ends_of_the_unit_interval(dtype):
    noise = gumbel_noise(torch.tensor([0.0, 1.0], dtype=dtype))
    assert torch.isfinite(noise).all()
    assert noise[0] < noise[1]


def test_gumbel_noise_is_minus_log_minus_log_inside_the_interval_and_gumbel_distributed():
    u = torch.tensor([1e-6, 0.25, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(gumbel_noise(u), -torch.log(-torch.log(u)))
    torch.manual_seed(3)
    samples = gumbel_noise(torch.rand(200_000, dtype=torch.float64))
    euler_gamma = 0.5772156649015329
    assert abs(samples.mean().item() - euler_gamma) < 0.01
    assert abs(samples.var().item() - math.pi**2 / 6) < 0.03


def test_soft_mask_is_a_sigmoid_around_each_rows_kth_score():
    torch.manual_seed(4)
    scores = torch.randn(2, 3, 9, dtype=torch.float64)
    k = 3
    kth = scores.sort(dim=-1, descending=True).values[..., k - 1 : k]
    want = 1 / (1 + torch.exp(-10 * (scores - kth)))
    torch.testing.assert_close(soft_topk_mask(scores, k), want)
    torch.testing.assert_close(soft_topk_mask(scores, k, sharpness=2.0),
                               1 / (1 + torch.exp(-2 * (scores - kth))))


def test_hard_mask_has_exactly_k_ones_per_row_at_the_largest_scores():
    torch.manual_seed(5)
    scores = torch.randn(4, 5, 12)
    mask = hard_topk_mask(scores, 4)
    assert torch.equal(mask.sum(-1), torch.full((4, 5), 4.0))
    top = scores.argsort(dim=-1, descending=True)[..., :4]
    assert torch.equal(mask.gather(-1, top), torch.ones(4, 5, 4))


def test_soft_topk_in_training_follows_the_noisy_formula():
    torch.manual_seed(6)
    layer = SoftTopK(10, 0.3).double()
    with torch.no_grad():
        layer.temperature.fill_(0.5)
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    torch.manual_seed(7)
    out, mask = layer(x)
    torch.manual_seed(7)
    u = torch.rand(2, 4, 10, dtype=torch.float64)
    scores = x @ layer.importance.weight.detach().T + layer.importance.bias.detach()
    noisy = (scores - torch.log(-torch.log(u))) / 0.5
    kth = noisy.sort(dim=-1, descending=True).values[..., 2:3]
    want = torch.sigmoid(10 * (noisy - kth))
    torch.testing.assert_close(mask, want)
    torch.testing.assert_close(out, x * want)
    out.sum().backward()
    assert layer.importance.weight.grad.abs().sum() > 0


def test_soft_topk_in_eval_keeps_exactly_k_features_of_each_token_on_their_own():
    torch.manual_seed(8)
    layer = SoftTopK(20).eval()
    x = torch.randn(3, 7, 20)
    out, mask = layer(x)
    assert torch.equal(mask.sum(-1), torch.full((3, 7), 3.0))
    assert torch.equal(out, x * mask)
    # Each token is sparse on its own: its mask does not depend on the rest of the batch.
    assert torch.equal(layer(x[1:2, 4:5])[1], mask[1:2, 4:5])


def test_soft_topk_reports_its_mask_into_the_open_step():
    layer = SoftTopK(8, 0.25)
    pipe = steadytrain.Pipeline().setup(layer)
    ctx = pipe.before_step()
    _, mask = layer(torch.randn(2, 8))
    assert ctx.outputs["sparsity_mask"] is mask


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 4, "target_sparsity": 0.0}, "target_sparsity: must be in (0.0, 1.0]"),
        ({"dim": 4, "target_sparsity": 1.5}, "target_sparsity: must be in (0.0, 1.0]"),
        ({"dim": 4, "sharpness": -1.0}, "sharpness: must be a positive number, got -1.0"),
        ({"dim": 2.5}, "dim: must be an integer >= 1"),
    ],
)
def test_soft_topk_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        SoftTopK(**kwargs)
    assert str(info.value).startswith("SoftTopK." + message)


def test_soft_topk_rejects_inputs_of_the_wrong_width():
    with pytest.raises(ValueError, match=r"SoftTopK\(dim=8.*x must have 8 features.*\(2, 3\)"):
        SoftTopK(8)(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        SoftTopK(1)(torch.tensor(1.0))


# -- memory buffer ----------------------------------------------------------------------


def rows(*values, dim=2):
    return torch.tensor([[float(v)] * dim for v in values])


def test_buffer_state_is_registered_buffers_in_the_state_dict():
    buffer = MemoryBuffer(4, 3)
    assert set(buffer.state_dict()) == {
        "keys", "values", "importance", "age", "valid", "access_counts", "write_ptr"}
    assert buffer.double().keys.dtype == torch.float64
    assert buffer.max_age == 8


def test_buffer_ages_and_decays_earlier_entries_once_per_write():
    buffer = MemoryBuffer(4, 2)
    for i, importance in enumerate((1.0, 2.0, 3.0)):
        buffer.store(rows(i)[0], rows(10 + i)[0], importance)
    assert torch.equal(buffer.age, torch.tensor([2, 1, 0, 0]))
    torch.testing.assert_close(buffer.importance, torch.tensor([0.95**2, 2 * 0.95, 3.0, 0.0]))
    assert torch.equal(buffer.valid, torch.tensor([True, True, True, False]))
    assert torch.equal(buffer.keys[:3, 0], torch.tensor([0.0, 1.0, 2.0]))
    assert torch.equal(buffer.values[:3, 1], torch.tensor([10.0, 11.0, 12.0]))
    assert int(buffer.write_ptr) == 3


def test_buffer_is_a_ring_that_overwrites_the_oldest_entry():
    buffer = MemoryBuffer(3, 2, decay=0.5)
    for i in range(5):
        buffer.store(rows(i)[0], rows(i)[0])
    assert torch.equal(buffer.keys[:, 0], torch.tensor([3.0, 4.0, 2.0]))
    assert torch.equal(buffer.age, torch.tensor([1, 0, 2]))
    torch.testing.assert_close(buffer.importance, torch.tensor([0.5, 1.0, 0.25]))
    assert int(buffer.write_ptr) == 2


def test_a_batch_is_one_write_and_keeps_its_last_capacity_rows():
    buffer = MemoryBuffer(3, 2)
    buffer.store(rows(7)[0], rows(7)[0], 1.0)
    buffer.store(rows(0, 1), rows(0, 1), torch.tensor([2.0, 4.0]))
    assert torch.equal(buffer.keys[:, 0], torch.tensor([7.0, 0.0, 1.0]))
    assert torch.equal(buffer.age, torch.tensor([1, 0, 0]))
    torch.testing.assert_close(buffer.importance, torch.tensor([0.95, 2.0, 4.0]))
    # Five rows from slot 0 land on slots 0, 1, 2, 0, 1: the last three survive.
    buffer.store(rows(10, 11, 12, 13, 14), rows(10, 11, 12, 13, 14))
    assert torch.equal(buffer.keys[:, 0], torch.tensor([13.0, 14.0, 12.0]))
    assert torch.equal(buffer.age, torch.zeros(3, dtype=torch.long))
    assert int(buffer.write_ptr) == 2


def test_entries_older_than_max_age_are_invalidated():
    buffer = MemoryBuffer(4, 2, max_age=2)
    for i in range(4):
        buffer.store(rows(i)[0], rows(i)[0])
    assert torch.equal(buffer.age, torch.tensor([3, 2, 1, 0]))
    assert torch.equal(buffer.valid, torch.tensor([False, True, True, True]))


def test_with_the_default_max_age_the_ring_overwrites_before_anything_expires():
    buffer = MemoryBuffer(3, 2)
    for i in range(30):
        buffer.store(rows(i)[0], rows(i)[0])
        assert buffer.valid[: i + 1].all()
    assert int(buffer.age.max()) == 2


def test_stored_entries_are_detached_copies():
    buffer = MemoryBuffer(2, 3)
    key = torch.randn(3, requires_grad=True)
    value = torch.randn(3)
    original = value.clone()
    buffer.store(key * 2, value)
    value.add_(1.0)
    assert not buffer.keys.requires_grad
    assert torch.equal(buffer.keys[0], (key * 2).detach())
    assert torch.equal(buffer.values[0], original)


def test_retrieve_is_softmax_attention_over_the_valid_entries():
    torch.manual_seed(9)
    buffer = MemoryBuffer(5, 4).double()
    keys, values = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    buffer.store(keys, values)
    query = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    value, weights = buffer.retrieve(query)
    want_w = torch.softmax(query @ keys.T / 2.0, dim=-1)
    torch.testing.assert_close(weights[..., :3], want_w)
    assert torch.equal(weights[..., 3:], torch.zeros(2, 6, 2, dtype=torch.float64))
    torch.testing.assert_close(value, want_w @ values)
    value.sum().backward()
    assert query.grad.abs().sum() > 0


def test_retrieve_then_store_in_one_forward_pass_backpropagates_through_the_old_entries():
    torch.manual_seed(11)
    buffer = MemoryBuffer(3, 2).double()
    buffer.store(torch.randn(3, 2), torch.randn(3, 2))
    keys, values = buffer.keys.clone(), buffer.values.clone()
    query = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    value, _ = buffer.retrieve(query)
    buffer.store(torch.randn(2), torch.randn(2))
    value.sum().backward()
    again = query.detach().requires_grad_()
    (torch.softmax(again @ keys.T / math.sqrt(2), dim=-1) @ values).sum().backward()
    torch.testing.assert_close(query.grad, again.grad)


def test_retrieve_from_an_empty_buffer_is_zero_and_finite():
    buffer = MemoryBuffer(3, 2)
    query = torch.randn(4, 2, requires_grad=True)
    value, weights = buffer.retrieve(query)
    assert torch.equal(value, torch.zeros(4, 2)) and torch.equal(weights, torch.zeros(4, 3))
    value.sum().backward()
    assert torch.isfinite(query.grad).all()
    assert torch.equal(buffer.access_counts, torch.zeros(3, dtype=torch.long))


def test_retrieve_counts_an_access_for_each_querys_top_entry_in_training_only():
    buffer = MemoryBuffer(4, 3)
    keys = 10 * torch.eye(3)
    buffer.store(keys, keys)
    buffer.retrieve(keys[[0, 2, 2, 2, 1, 0]])
    assert torch.equal(buffer.access_counts, torch.tensor([2, 1, 3, 0]))
    buffer.eval()
    buffer.retrieve(keys)
    assert torch.equal(buffer.access_counts, torch.tensor([2, 1, 3, 0]))
    buffer.train()
    buffer.store(keys[0], keys[0])  # overwrites slot 3 and starts its count at 0
    buffer.store(keys[1], keys[1])  # overwrites slot 0
    assert torch.equal(buffer.access_counts, torch.tensor([0, 1, 3, 0]))


def test_buffer_state_dict_round_trip_continues_identically():
    torch.manual_seed(10)
    first = MemoryBuffer(4, 3)
    for _ in range(6):
        first.store(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2))
        first.retrieve(torch.randn(5, 3))
    second = MemoryBuffer(4, 3)
    second.load_state_dict(first.state_dict())
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name
    key, query = torch.randn(3), torch.randn(2, 3)
    for buffer in (first, second):
        buffer.store(key, key * 2, 0.5)
    assert torch.equal(first.retrieve(query)[0], second.retrieve(query)[0])
    for name, tensor in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacity": 0, "dim": 2}, "capacity: must be an integer >= 1, got 0"),
        ({"capacity": 2, "dim": -1}, "dim: must be an integer >= 1, got -1"),
        ({"capacity": 2, "dim": 2, "decay": 1.5}, "decay: must be in (0.0, 1.0], got 1.5"),
        ({"capacity": 2, "dim": 2, "max_age": 0}, "max_age: must be an integer >= 1, got 0"),
    ],
)
def test_buffer_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError) as info:
        MemoryBuffer(**kwargs)
    assert str(info.value) == "MemoryBuffer." + message


def test_buffer_rejects_entries_and_queries_of_the_wrong_shape():
    buffer = MemoryBuffer(4, 3)
    with pytest.raises(ValueError, match=r"MemoryBuffer\(capacity=4, dim=3.*key must have 3"):
        buffer.store(torch.randn(2, 2), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"key and value must both be \(dim,\) or \(n, dim\)"):
        buffer.store(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"\(dim,\) or \(n, dim\), got shapes \(1, 2, 3\)"):
        buffer.store(torch.randn(1, 2, 3), torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match=r"one value per entry \(2\), got shape \(3,\)"):
        buffer.store(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="query must have 3 features"):
        buffer.retrieve(torch.randn(5, 4))


# -- consolidation ----------------------------------------------------------------------


def filled(capacity, dim, *keys):
    buffer = MemoryBuffer(capacity, dim)
    for key in keys:
        buffer.store(rows(key, dim=dim)[0], rows(-key, dim=dim)[0])
    return buffer


def test_consolidation_copies_well_used_entries_and_halves_them_in_short_term():
    stm = filled(4, 2, 1, 2, 3, 4)
    stm.access_counts.copy_(torch.tensor([3, 1, 5, 0]))
    ltm = filled(3, 2, 9)
    before = stm.importance.clone()
    moved = consolidate_memories(stm, ltm, threshold=3)
    assert float(moved["moved"]) == 2
    torch.testing.assert_close(moved["mean_importance"], (before[0] + before[2]) / 2)
    # Short term keeps both entries, at half importance and with a fresh access count.
    torch.testing.assert_close(stm.importance, before * torch.tensor([0.5, 1, 0.5, 1]))
    assert torch.equal(stm.access_counts, torch.tensor([0, 1, 0, 0]))
    assert stm.valid.all()
    # Long term got them as one write, oldest first, with their short-term importance.
    assert torch.equal(ltm.keys[:, 0], torch.tensor([9.0, 1.0, 3.0]))
    assert torch.equal(ltm.values[:, 0], torch.tensor([-9.0, -1.0, -3.0]))
    torch.testing.assert_close(ltm.importance, torch.tensor([0.95, before[0], before[2]]))
    assert torch.equal(ltm.age, torch.tensor([1, 0, 0]))


def test_consolidation_skips_invalid_entries_and_moves_nothing_twice():
    stm = filled(4, 2, 1, 2)
    stm.access_counts.fill_(4)  # slots 2 and 3 are empty
    ltm = MemoryBuffer(4, 2)
    assert float(consolidate_memories(stm, ltm, threshold=4)["moved"]) == 2
    state = {name: t.clone() for name, t in ltm.state_dict().items()}
    again = consolidate_memories(stm, ltm, threshold=4)
    assert float(again["moved"]) == 0 and float(again["mean_importance"]) == 0
    for name, tensor in ltm.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_consolidation_follows_accesses_counted_by_retrieve():
    memory = DualMemory(3, stm_capacity=3, ltm_capacity=3, threshold=2)
    keys = 10 * torch.eye(3)
    memory.store(keys, keys)
    memory.retrieve(keys[[1, 1, 2]])
    moved = memory.consolidate()
    assert float(moved["moved"]) == 1
    assert torch.equal(memory.ltm.keys[0], keys[1])
    assert torch.equal(memory.ltm.valid, torch.tensor([True, False, False]))


def test_dual_memory_implements_the_protocol_and_its_buffers_do_not():
    memory = DualMemory(4, 8, 16)
    assert isinstance(memory, Consolidating)
    assert not isinstance(memory.stm, Consolidating)
    assert set(memory.state_dict()) >= {"stm.keys", "ltm.keys", "stm.write_ptr"}


def test_consolidation_rejects_bad_threshold_and_mismatched_buffers():
    with pytest.raises(ValueError, match=r"DualMemory\.threshold: must be an integer >= 1, got 0"):
        DualMemory(4, 8, 16, threshold=0)
    with pytest.raises(ValueError, match=r"DualMemory\.transfer_decay: must be in \(0.0, 1.0\]"):
        DualMemory(4, 8, 16, transfer_decay=0.0)
    with pytest.raises(ValueError, match=r"consolidate_memories\.threshold: must be an integer"):
        consolidate_memories(MemoryBuffer(2, 2), MemoryBuffer(2, 2), threshold=-1)
    with pytest.raises(ValueError, match=r"MemoryBuffer\(capacity=2, dim=2.*same dim"):
        consolidate_memories(MemoryBuffer(2, 2), MemoryBuffer(2, 3), threshold=1)
