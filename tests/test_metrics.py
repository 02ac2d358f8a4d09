import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from steadytrain import MetricStore
from steadytrain.metrics import FOLD_EVERY


def test_means_over_the_window_and_reset():
    store = MetricStore()
    values = torch.randn(3 * FOLD_EVERY + 5, dtype=torch.float64)
    for step, v in enumerate(values):
        store.record("a", v, step=step)
        store.record("b", 2.0)
    result = store.compute()
    assert result["a"] == pytest.approx(values.mean().item(), rel=1e-12)
    assert result["b"] == 2.0
    assert (store.first_step, store.last_step) == (0, len(values) - 1)
    store.reset()
    assert store.compute() == {} and "a" not in store


def test_recording_keeps_no_graph_and_rejects_non_scalars():
    store = MetricStore()
    w = torch.ones((), requires_grad=True)
    store.record("w2", w * 2)
    assert store.compute()["w2"] == 2.0
    with pytest.raises(ValueError, match=r"metric 'v' must be a scalar, got .* shape \(2,\)"):
        store.record("v", torch.ones(2))


def _rank_main(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        store = MetricStore()
        for value in ([1.0, 2.0] if rank == 0 else [6.0]):
            store.record("loss", torch.tensor(value))
        results[rank] = store.compute()["loss"]
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_average_across_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank_main, args=(port, results), nprocs=2, join=True)
    assert dict(results) == {0: 3.0, 1: 3.0}
