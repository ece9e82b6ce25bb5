"""Build and cache the optional C++ CPU kernels in models/csrc (torch cpp_extension, on first use).

Each kernel is a speed feature with a PyTorch fallback: if a compiler, ninja or the headers are
missing, `load_kernel` logs why once and returns None, and callers keep the plain path. Builds
are cached under ~/.cache/torch_extensions and redone only when the source or flags change.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# -march=native: AVX-512 / AMX where this CPU has them (each source has a portable branch).
# -ffast-math lets float reductions vectorize (no kernel relies on inf/NaN). -fopenmp makes
# at::parallel_for use every intra-op thread instead of running serially.
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]

_loaded: dict[str, ModuleType | None] = {}


def load_kernel(name: str, source: str) -> ModuleType | None:
    """The compiled module for csrc/`source`, or None when it cannot be built here."""
    if name not in _loaded:
        try:
            from torch.utils.cpp_extension import load

            _loaded[name] = load(name=name, sources=[str(CSRC / source)], extra_cflags=CFLAGS, verbose=False)
        except Exception as e:  # compiler missing, headers missing, ninja missing ...
            log.warning("%s unavailable, using the PyTorch path: %s", source, str(e).splitlines()[0][:200])
            _loaded[name] = None
    return _loaded[name]
