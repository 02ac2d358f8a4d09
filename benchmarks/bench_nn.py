"""Host-sync check and timings of the steadytrain.nn building blocks on a CUDA device.

Runs one training step of a memory block (retrieve from short/long-term memory, gate,
soft top-k, store, backward) under ``torch.cuda.set_sync_debug_mode("error")``, so any
host-device sync raises; then times the step, a store and a consolidation with CUDA
events. Usage: ``python benchmarks/bench_nn.py [--batch 32 --tokens 256 --dim 512]``.
"""

from __future__ import annotations

import argparse

import torch

from steadytrain.nn import DualMemory, MemoryGate, SoftTopK


def cuda_ms(fn, repeat: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--stm", type=int, default=4096)
    parser.add_argument("--ltm", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    gate = MemoryGate(args.dim).to(device)
    topk = SoftTopK(args.dim).to(device)
    memory = DualMemory(args.dim, args.stm, args.ltm, threshold=3).to(device)
    x = torch.randn(args.batch, args.tokens, args.dim, device=device, requires_grad=True)

    def step() -> None:
        stm, ltm = memory.retrieve(x)
        mixed, _ = gate(x, stm, ltm)
        sparse, _ = topk(mixed)
        memory.store(x.detach().mean(1), sparse.detach().mean(1))
        sparse.square().mean().backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    step()
    torch.cuda.set_sync_debug_mode(0)
    print("training step (retrieve, gate, soft top-k, store, backward): no host sync")
    with torch.no_grad():
        key = torch.randn(args.batch, args.dim, device=device)
        print(f"device: {torch.cuda.get_device_name()}; batch {args.batch}, tokens {args.tokens}, "
              f"dim {args.dim}, stm {args.stm}, ltm {args.ltm}")
        store_ms = cuda_ms(lambda: memory.store(key, key), 200)
        print(f"store ({args.batch} entries): {store_ms:.4f} ms")
    print(f"training step: {cuda_ms(step, args.repeat):.3f} ms")
    torch.cuda.set_sync_debug_mode("error")
    try:
        memory.consolidate()
        print("consolidate: no host sync")
    except RuntimeError as exc:
        print(f"consolidate: syncs ({str(exc).splitlines()[0]})")
    torch.cuda.set_sync_debug_mode(0)
    print(f"consolidate: {cuda_ms(memory.consolidate, 20):.3f} ms")


if __name__ == "__main__":
    main()
