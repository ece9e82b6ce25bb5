"""A tensor-parallel worker process (ranks 1..P-1): load the model, keep this rank's shard, then
run every forward rank 0 sends until it sends None or goes away (server/engine/tp_workers.py)."""
from __future__ import annotations

import logging
import os
import signal
import sys
from multiprocessing.connection import Connection

from datetime import timedelta

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = timedelta(minutes=5)  # a collective some peer never joins fails after this


def worker_main(rank: int, size: int, backend: str, address: str, shm_path: str | None, threads: int | None, load_args: dict,
                runner_args: dict, conn: Connection, log_level: int) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C or a group-wide SIGTERM: rank 0 drains, then stops us
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(force=True, level=log_level, format=f"%(asctime)s %(levelname)s [tp rank {rank}] %(name)s: %(message)s")
    log = logging.getLogger(__name__)
    if threads is not None:
        torch.set_num_threads(threads)
    from models.loader import load_model
    from models.parallel import TensorParallel
    from models.shm_all_reduce import SharedMemoryAllReduce
    from server.engine.runner import ModelRunner

    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)
    if load_args["device"].startswith("cuda"):
        torch.cuda.set_device(load_args["device"])
    loaded = load_model(**load_args)
    shm = None if shm_path is None else SharedMemoryAllReduce(shm_path, rank, size, COLLECTIVE_TIMEOUT.total_seconds())
    runner = ModelRunner(loaded, tp=TensorParallel(rank, size, shm), **runner_args)
    # A parent that gevent monkey-patched (anything that imported locust) hands over a
    # non-blocking socketpair, whose recv() raises EAGAIN; this end blocks until a step comes.
    os.set_blocking(conn.fileno(), True)
    conn.send("ready")
    steps = 0
    try:
        while (inputs := conn.recv()) is not None:
            runner.run_forward(inputs)
            steps += 1
    except EOFError:  # rank 0 exited without saying goodbye: nothing left to serve
        log.warning("rank 0 went away; exiting after %d steps", steps)
        sys.exit(1)
    dist.destroy_process_group()

