"""Build and cache the optional C++ CPU kernels in models/csrc (torch cpp_extension, on first use).

Each kernel is a speed feature with a PyTorch fallback: if a compiler, ninja or the headers are
missing, `load_kernel` logs why once and returns None, and callers keep the plain path. Builds
are cached under ~/.cache/torch_extensions and redone only when the source or flags change.
Where `can_build()` says the tools are all here, a failed build is a bug, and the tests fail on
it instead of quietly testing the fallback (`build_error` keeps the reason).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -march=native: AVX-512 / AMX where this CPU has them (each source has a portable branch).
# -ffast-math lets float reductions vectorize (no kernel relies on inf/NaN). -fopenmp makes
# at::parallel_for use every intra-op thread instead of running serially.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

# name -> source of every kernel in csrc (their Python wrappers call load_kernel with these).
KERNELS = {"nanoserve_amx_linear": "amx_linear.cpp", "nanoserve_bf16_dot_linear": "bf16_dot_linear.cpp",
           "nanoserve_bf16_avx2_linear": "bf16_avx2_linear.cpp",
           "nanoserve_paged_decode": "paged_decode_attention.cpp", "nanoserve_rms_norm": "rms_norm.cpp",
           "nanoserve_int8_linear": "int8_linear.cpp", "nanoserve_int8_avx2_linear": "int8_avx2_linear.cpp",
           "nanoserve_int4_linear": "int4_linear.cpp", "nanoserve_grouped_avx2_linear": "grouped_avx2_linear.cpp",
           "nanoserve_argmax": "argmax.cpp", "nanoserve_elementwise": "elementwise.cpp"}

_loaded: dict[str, ModuleType | None] = {}
_errors: dict[str, str] = {}


def load_kernel(name: str, source: str) -> ModuleType | None:
    """The compiled module for csrc/`source`, or None when it cannot be built here."""
    if name not in _loaded:
        try:
            from torch.utils.cpp_extension import load

            _loaded[name] = load(name=name, sources=[str(CSRC / source)], extra_cflags=CFLAGS,
                                 extra_include_paths=[str(CSRC)], verbose=False)
        except Exception as e:  # compiler missing, headers missing, ninja missing ...
            _errors[name] = str(e)
            log.warning("%s unavailable, using the PyTorch path: %s", source, str(e).splitlines()[0][:200])
            _loaded[name] = None
    return _loaded[name]


def build_error(name: str) -> str | None:
    """Why kernel `name` failed to build (None if it built or was never tried)."""
    return _errors.get(name)


def can_build() -> bool:
    """Whether this machine has what the kernels need: a C++ compiler and ninja."""
    from torch.utils.cpp_extension import is_ninja_available

    return shutil.which(os.environ.get("CXX", "c++")) is not None and is_ninja_available()
