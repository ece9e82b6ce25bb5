"""Print a `TraceResult` as a module tree per step: shapes with their letters, dtype, bytes.

Layers whose calls have the same shapes as the layer before them fold into one line
("layers 1-11: same shapes as layer 0"), unless `all_layers` is set; a MoE model's dense first
layers and its sparse ones stay apart because their shapes differ.
"""
from __future__ import annotations

import itertools
import re
from typing import TextIO

from server.lab.trace import LAYER_INDEX, ModuleCall, StepTrace, TraceResult

LIST_HEAD = 16  # list items shown before "... (+k more)"


def render_trace(result: TraceResult, out: TextIO, all_layers: bool = False) -> None:
    print(f"{result.model}: {result.family}, {result.dtype} on {result.device}", file=out)
    print("dims: " + "  ".join(f"{k}={v}" for k, v in result.dims.items()), file=out)
    kv = result.kv_cache
    pool = ", ".join(f"{k}={v}" for k, v in zip(("NB", "BS", "KVH", "D"), kv["pool_shape"]))
    print(f"KV cache: {kv['pools_per_layer']} pool(s) per layer of ({pool}); {kv['per_token']}", file=out)
    for step in result.steps:
        print(file=out)
        _render_step(step, out, all_layers)


def _render_step(step: StepTrace, out: TextIO, all_layers: bool) -> None:
    sampled = ", ".join(repr(t) for t in step.sampled_text)
    print(f"step {step.index} - {step.kind}: N={step.num_tokens} tokens from {step.num_seqs} sequence(s), "
          f"S={step.num_sampled} sampled -> {sampled}", file=out)
    meta = step.metadata
    rows = [("input_ids", step.input_ids), ("positions", step.positions),
            ("query_start_loc", meta["query_start_loc"]), ("seq_lens", meta["seq_lens"]),
            ("num_decode_seqs", meta["num_decode_seqs"]), ("slot_mapping", meta["slot_mapping"]),
            ("block_tables", meta["block_tables"]), ("KV blocks in use", step.blocks_used)]
    for label, value in rows:
        print(f"  {label:<17}{_short(value)}", file=out)
    width = max(2 * c.depth + len(_leaf(c.name)) + len(c.type) + 3 for c in step.modules)
    print(f"  {'module':<{width}}  {'inputs -> outputs':<60}  {'dtype':<9}{'out bytes':>10}", file=out)
    for line in _module_lines(step.modules, width, all_layers):
        print("  " + line, file=out)
    if step.not_called:
        print(f"  fused into their parent's kernel this step (no module call): {_fold_names(step.not_called)}", file=out)


def _module_lines(calls: list[ModuleCall], width: int, all_layers: bool):
    """One line per call; a run of layers with identical shapes folds into one line."""
    previous, folded = None, []
    for layer, group in itertools.groupby(calls, key=lambda c: _layer_of(c.name)):
        group = list(group)
        signature = [(LAYER_INDEX.sub(".#", c.name), [i.shape for i in c.inputs + c.outputs]) for c in group]
        if layer is not None and not all_layers and previous is not None and signature == previous[1]:
            folded.append(layer)
            continue
        if folded:
            yield _fold_line(folded, *previous[::2])
            folded = []
        if layer is not None:
            previous = (layer, signature, group[0].depth)
        yield from (_call_line(c, width) for c in group)
    if folded:
        yield _fold_line(folded, *previous[::2])


def _call_line(call: ModuleCall, width: int) -> str:
    name = f"{'  ' * call.depth}{_leaf(call.name)} ({call.type})"
    ins = ", ".join(t.text for t in call.inputs)
    outs = ", ".join(t.text for t in call.outputs)
    dtype = call.outputs[0].dtype if call.outputs else ""
    return f"{name:<{width}}  {ins + ' -> ' + outs:<60}  {dtype:<9}{_bytes(sum(t.bytes for t in call.outputs)):>10}"


def _fold_line(layers: list[int], same_as: int, depth: int) -> str:
    span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
    return f"{'  ' * depth}{span}: same shapes as layer {same_as}"


def _layer_of(name: str) -> int | None:
    match = LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1] if name else "model"


def _fold_names(names: list[str]) -> str:
    """`transformer.h.0.mlp.c_fc, transformer.h.1.mlp.c_fc` -> `transformer.h.*.mlp.c_fc`."""
    return ", ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def _short(value) -> str:
    if isinstance(value, list) and len(value) > LIST_HEAD:
        return f"{value[:LIST_HEAD]} ... (+{len(value) - LIST_HEAD} more)"
    return str(value)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024 or unit == "MiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
