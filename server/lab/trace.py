"""`nanoserve trace`: every module's shapes through real engine steps.

A real `Engine` (paged KV pool, scheduler, packed kernels) runs the prompts' prefill and N
decode steps greedily while forward hooks on every module record what goes in and out. Each
step also keeps what the model runner handed the model: token ids, positions and the attention
metadata (slot mapping, block tables, context lengths, query offsets), and how many KV blocks
the step holds. Dimensions are named with the model files' letters (server/lab/shape_names.py).
Rendering is server/lab/trace_render.py; `--json` dumps `TraceResult` as data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from models.attention import AttentionMetadata
from models.layers import RotaryTables
from models.loader import LoadedModel
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.sampling_params import SamplingParams
from server.lab.shape_names import dimension_names, format_shape, name_dims

MOE_MODULES = {"SparseMoE", "TopKRouter", "Experts"}
MOE_LETTERS = {"E", "K", "2Ie", "Ie", "2Is", "Is"}
LAYER_INDEX = re.compile(r"\.(?:h|layers)\.(\d+)(?=\.|$)")  # transformer.h.3 / model.layers.3


@dataclass
class TensorInfo:
    shape: list[int]
    dims: list[str]       # shape letters, filled once the step's sizes are known
    dtype: str
    bytes: int

    @property
    def text(self) -> str:
        return format_shape(tuple(self.shape), self.dims)


@dataclass
class ModuleCall:
    name: str             # qualified name, "" for the model itself
    type: str
    depth: int
    inputs: list[TensorInfo] = field(default_factory=list)
    outputs: list[TensorInfo] = field(default_factory=list)


@dataclass
class StepTrace:
    index: int
    kind: str             # prefill, decode or mixed
    num_tokens: int       # N
    num_seqs: int         # sequences in the forward
    num_sampled: int      # S: rows that sampled a token
    input_ids: list[int]
    positions: list[int]
    metadata: dict        # query_start_loc, seq_lens, num_decode_seqs, slot_mapping, block_tables
    blocks_used: int
    sampled_text: list[str]
    modules: list[ModuleCall]
    not_called: list[str]  # modules with weights that a fused kernel ran inside their parent


@dataclass
class TraceResult:
    model: str
    family: str
    dtype: str
    device: str
    dims: dict[str, int]
    kv_cache: dict
    steps: list[StepTrace]


class ModuleRecorder:
    """Forward hooks on every module of a model: call order, depth, input and output tensors."""

    def __init__(self, model: nn.Module, probe=None):
        """probe(): called when the model's forward starts; its value is kept as `probed`."""
        self.model, self.calls, self._open, self.probe = model, [], {}, probe
        self.input_ids, self.positions, self.meta, self.probed = [], [], None, None
        self._handles = []

    def __enter__(self) -> ModuleRecorder:
        for name, module in self.model.named_modules():
            self._handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            call = ModuleCall(name, type(module).__name__, len(self._open),  # depth: calls still open
                              inputs=_tensors(list(args) + list(kwargs.values())))
            self.calls.append(call)  # pre-order: a parent is listed before its children
            self._open[id(module)] = call
            if not name:  # the model itself: forward(input_ids (N,), positions (N,), meta)
                self.input_ids, self.positions, self.meta = args[0].tolist(), args[1].tolist(), args[2]
                self.probed = self.probe() if self.probe else None
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self._open.pop(id(module)).outputs = _tensors([output])
        return hook


def _tensors(values: list) -> list[TensorInfo]:
    """Tensors among the values, one level into tuples and lists (KV pools) and a step's RoPE
    tables (cos, signed sin)."""
    out = []
    for value in values:
        if isinstance(value, RotaryTables):
            value = (value.cos, value.signed_sin)
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor):
                out.append(TensorInfo(list(t.shape), [], str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()))
    return out


def run_trace(loaded: LoadedModel, spec: str, prompts: list[list[int]], decode_steps: int,
              block_size: int = 16, kv_cache_memory: int = 64 * 2**20) -> TraceResult:
    """Prefill `prompts` together and decode `decode_steps` more tokens, recording every step."""
    engine = Engine(loaded, EngineConfig(max_num_seqs=len(prompts), block_size=block_size,
                                         kv_cache_memory=kv_cache_memory, enable_prefix_caching=False))
    model, blocks = engine.runner.model, engine.block_manager
    params = SamplingParams(temperature=0.0, max_tokens=decode_steps + 1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"trace-{i}", prompt, params)
    names = dimension_names(model.config) + [("BS", block_size)]
    moe_first = sorted(names, key=lambda n: (n[0] != "C", n[0] not in MOE_LETTERS))  # a router's (N, K) is not (N, KVH)
    weighted = {name.removesuffix(".kernel")  # a Linear's kernel holds its weight; the Linear is what runs
                for name, m in model.named_modules() if name and any(True for _ in m.parameters(recurse=False))}
    steps = []
    while engine.has_unfinished():
        with ModuleRecorder(model, lambda: _probe(engine)) as recorder:
            deltas, stats = engine.step()
        if not recorder.calls:  # nothing ran (e.g. only a finished request was reaped)
            continue
        meta = recorder.meta
        leading = [("N", stats.num_batched_tokens), ("S", stats.num_generation_tokens), ("NB", blocks.num_blocks)]
        for call in recorder.calls:
            for info in call.inputs + call.outputs:
                info.dims = name_dims(tuple(info.shape), moe_first if call.type in MOE_MODULES else names, leading)
                if len(info.shape) == 4 and info.shape[:2] == [blocks.num_blocks, block_size]:  # a KV pool
                    info.dims[:2] = ["NB", "BS"]
        blocks_used, prefilling = recorder.probed
        steps.append(StepTrace(
            index=len(steps), kind="prefill" if prefilling == meta.num_seqs else "decode" if not prefilling else "mixed",
            num_tokens=stats.num_batched_tokens, num_seqs=meta.num_seqs, num_sampled=stats.num_generation_tokens,
            input_ids=recorder.input_ids, positions=recorder.positions,
            metadata=_metadata(meta), blocks_used=blocks_used,
            sampled_text=[d.text for d in deltas if d.token_ids], modules=recorder.calls,
            not_called=sorted(weighted - {c.name for c in recorder.calls})))
    spec_kv = model.kv_cache_spec
    return TraceResult(
        model=spec, family=type(model).__name__, dtype=str(loaded.dtype).removeprefix("torch."), device=str(loaded.device),
        dims=dict(names), steps=steps,
        kv_cache={"per_token": spec_kv.describe(loaded.dtype), "num_blocks": blocks.num_blocks, "block_size": block_size,
                  "pools_per_layer": spec_kv.num_pools,
                  "pool_shape": [blocks.num_blocks, block_size, spec_kv.num_kv_heads, spec_kv.head_dim]})


def _probe(engine: Engine) -> tuple[int, int]:
    """At the forward's start: KV blocks held, and sequences still computing their prompt."""
    blocks = engine.block_manager
    prefilling = sum(seq.num_computed_tokens < seq.num_prompt_tokens for seq in engine.scheduler.running)
    return blocks.num_blocks - blocks.num_free_blocks, prefilling


def _metadata(meta: AttentionMetadata) -> dict:
    """The step's attention bookkeeping as plain lists (block tables padded with 0, as the kernel sees them)."""
    return {"query_start_loc": list(meta.query_start_loc), "seq_lens": list(meta.seq_lens),
            "num_decode_seqs": meta.num_decode_seqs,
            "slot_mapping": meta.slot_mapping.tolist() if meta.slot_mapping is not None else None,
            "block_tables": meta.block_tables.tolist() if meta.block_tables is not None else None}

