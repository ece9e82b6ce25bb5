"""Tensor-parallel worker processes, seen from rank 0 (the process that serves HTTP).

    rank 0 (engine thread)                         rank r = 1 .. P-1 (tp_worker.py)
    ----------------------                         ---------------------------------
    spawn P-1 workers, join the process group      join the process group, load the model,
    shard its own model, wait for "ready"   <----  shard it, allocate its share of the pool
    per step: ForwardInputs over a pipe  --------> the same forward on its shard
              all-reduces / logit gather <-------> (torch.distributed: gloo on CPU, NCCL on CUDA)
    close(): None over the pipe          --------> exit 0

Rank 0 owns the scheduler, the block manager, sampling and HTTP; a worker keeps no state but
its weights and its slice of the KV pool, indexed by the block tables rank 0 sends, so blocks
freed on rank 0 are free on every rank. A monitor thread watches the workers: one that exits
unexpectedly sets `failure` (one line for the log and /health) and calls `on_failure`.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import socket
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from models.kv_int8 import pool_dtype
from models.loader import LoadedModel
from models.parallel import TensorParallel
from models.shm_all_reduce import SharedMemoryAllReduce
from models.tp_shard import check_shardable, is_sharded
from server.engine.tp_worker import COLLECTIVE_TIMEOUT, worker_main

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0                    # loading + packing on a worker


def start_workers(loaded: LoadedModel, config, num_blocks: int) -> "WorkerGroup | None":
    """The workers of a `config.tensor_parallel_size` > 1 engine (None for one process).

    Raises:
        ValueError: the model does not split evenly over that many ranks (before anything starts).
    """
    size = config.tensor_parallel_size
    if size == 1:
        return None
    if config.quantization == "gguf":
        raise ValueError("--quantization gguf keeps the file's tensors whole; it runs with --tensor-parallel-size 1")
    if not is_sharded(loaded.model):  # a model an earlier engine already cut was checked then
        check_shardable(loaded.model, size)
    if loaded.device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor-parallel size {size} needs {size} GPUs; this machine has {torch.cuda.device_count()}")
    return WorkerGroup(loaded, size, dict(num_blocks=num_blocks, block_size=config.block_size,
                                          fast_kernels=config.fast_kernels, mla_mode=config.mla_mode,
                                          quantization=config.quantization,
                                          kv_dtype=pool_dtype(config.kv_cache_dtype, loaded.dtype),
                                          kernel_backend=config.kernel_backend))


class WorkerGroup:
    """Ranks 1..P-1 of one tensor-parallel engine, and rank 0's membership of the group."""

    def __init__(self, loaded: LoadedModel, size: int, runner_args: dict):
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine already runs in this process; close it first")
        self.size, self.failure = size, None
        self.on_failure: list[Callable[[str], None]] = []
        self._closing = threading.Event()
        self._conns, self._procs = [], []
        self._threads_before = torch.get_num_threads()
        on_cpu = loaded.device.type == "cpu"
        self._shm_path = _shared_memory_file(size) if on_cpu else None
        try:
            self._start(loaded, runner_args, on_cpu)
        except BaseException:  # a start that failed half way: kill what was spawned, free what was made
            self.close(grace_s=0)
            raise

    def _start(self, loaded: LoadedModel, runner_args: dict, on_cpu: bool) -> None:
        size = self.size
        backend = "nccl" if not on_cpu else "gloo"
        threads = max(1, len(os.sched_getaffinity(0)) // size) if on_cpu else None
        address = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.get_context("spawn")  # a fresh interpreter: no forked threads or torch state
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            os.set_blocking(ours.fileno(), True)  # non-blocking if gevent patched this process (see tp_worker.worker_main)
            args = (rank, size, backend, address, self._shm_path, threads, _load_args(loaded, rank), runner_args,
                    theirs, logging.getLogger().getEffectiveLevel())
            proc = context.Process(target=worker_main, args=args, name=f"nanoserve-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
            log.info("tensor parallel: started rank %d (pid %d)", rank, proc.pid)
        if threads is not None:
            torch.set_num_threads(threads)
        dist.init_process_group(backend, init_method=address, rank=0, world_size=size, timeout=COLLECTIVE_TIMEOUT)
        shm = None if self._shm_path is None else SharedMemoryAllReduce(
            self._shm_path, 0, size, COLLECTIVE_TIMEOUT.total_seconds())
        self.tp = TensorParallel(0, size, shm)
        log.info("tensor parallel: %d ranks over %s%s%s", size, backend,
                 " (all-reduce through shared memory)" if shm is not None else "",
                 f", {threads} CPU thread(s) each" if threads is not None else "")

    def wait_ready(self) -> None:
        """Block until every worker built its shard; raise if one died instead."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive() or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"tensor-parallel rank {rank} (pid {proc.pid}) did not start "
                                       f"(exit code {proc.exitcode}); its log above says why")
            conn.recv()
        self._unlink_shm()  # every rank mapped it: the memory lives until the last one exits
        threading.Thread(target=self._monitor, name="tp-monitor", daemon=True).start()

    def send(self, message) -> None:
        """One step's inputs (or None: exit) to every worker."""
        if self.failure is not None:
            raise RuntimeError(self.failure)
        for conn in self._conns:
            conn.send(message)

    def close(self, grace_s: float = 10.0) -> None:
        """Stop every worker (asked to exit, SIGKILL after grace_s) and leave the process group."""
        if self._closing.is_set():
            return
        self._closing.set()
        for conn in self._conns if grace_s else ():
            try:
                conn.send(None)
            except OSError:  # that worker is gone already
                pass
        for proc in self._procs:
            proc.join(grace_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)
        self._unlink_shm()
        log.info("tensor parallel: workers stopped")

    def _monitor(self) -> None:
        from multiprocessing.connection import wait

        ready = wait([proc.sentinel for proc in self._procs])  # returns as soon as any worker exits
        if self._closing.is_set():
            return
        rank, proc = next((r, p) for r, p in enumerate(self._procs, start=1) if p.sentinel in ready)
        proc.join(5)  # its pipe closes a moment before it can be reaped
        self.failure = (f"tensor-parallel worker rank {rank} (pid {proc.pid}) died with exit code "
                        f"{proc.exitcode}; no step can run without it")
        log.error("%s", self.failure)
        if self.tp.shared_memory is not None:  # an all-reduce waiting for it gives up now
            self.tp.shared_memory.abort_reason = self.failure
        for callback in self.on_failure:
            callback(self.failure)


    def _unlink_shm(self) -> None:
        if self._shm_path is not None and os.path.exists(self._shm_path):
            os.unlink(self._shm_path)


def _shared_memory_file(size: int) -> str | None:
    """The all-reduce mapping for CPU ranks, or None (gloo all-reduces) where it cannot serve:
    not x86 (its store order is what makes the flags safe), or /dev/shm too small."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("tensor parallel: all-reduce over gloo (the shared-memory path needs x86's store order)")
        return None
    try:
        return SharedMemoryAllReduce.create(size)
    except OSError as error:
        log.warning("tensor parallel: all-reduce over gloo, no room for the shared-memory one (%s)", error)
        return None


def _load_args(loaded: LoadedModel, rank: int) -> dict:
    """What a worker passes to load_model to build the same model as rank 0 (on the rank-th
    GPU counted from rank 0's)."""
    device = f"cuda:{(loaded.device.index or 0) + rank}" if loaded.device.type == "cuda" else "cpu"
    return dict(spec=loaded.name, dtype=loaded.dtype, device=device, seed=loaded.seed, overrides=loaded.overrides)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
