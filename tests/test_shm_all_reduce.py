"""The shared-memory all-reduce against gloo's, across two real processes: same sums (the same
bits on every rank), back-to-back calls through the alternating slots, and the tensors it does
not take (larger than a slot, not contiguous) left to the process group."""
from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.parallel import TensorParallel
from models.shm_all_reduce import SLOT_BYTES, SharedMemoryAllReduce


def _rank(rank: int, size: int, address: str, path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=size, timeout=timedelta(seconds=60))
    shm = SharedMemoryAllReduce(path, rank, size, timeout_s=60)
    tp = TensorParallel(rank, size, shm)
    torch.manual_seed(rank)
    same, taken = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for shape in [(1, 64), (7, 896), (33, 1600), (5, 3, 8)]:
            for _ in range(3):  # back to back: generation g and g + 1 use different slots
                x = torch.randn(shape).to(dtype)
                expected = x.clone()
                dist.all_reduce(expected)
                taken.append(shm.takes(x))
                same.append(torch.equal(tp.all_reduce(x), expected))
    big = torch.ones(SLOT_BYTES // 4 + 1)  # one float past the slot: the process group sums it
    strided = torch.ones(8, 8)[:, ::2]
    taken += [not shm.takes(big), not shm.takes(strided)]
    same += [bool((tp.all_reduce(big) == size).all())]
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump([all(same), all(taken)], f)
    dist.destroy_process_group()


def test_shared_memory_all_reduce_equals_gloo(tmp_path):
    from tests.api_fixtures import free_port

    size = 2
    path = SharedMemoryAllReduce.create(size)
    try:
        mp.spawn(_rank, args=(size, f"tcp://127.0.0.1:{free_port()}", path, str(tmp_path)), nprocs=size)
    finally:
        os.unlink(path)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(size)]
    assert results == [[True, True]] * size  # (sums equal gloo's, slot choices right) on every rank
