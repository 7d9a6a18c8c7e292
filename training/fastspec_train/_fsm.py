"""Access to the pure-NumPy model-file writer `fastspec.model_format`, with or without a built core.

`import fastspec.model_format` runs `fastspec/__init__.py`, which needs the compiled `_core`. In a
source checkout where the core is not built yet, load the (pure NumPy) module straight from its file.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def model_format():
    try:
        from fastspec import model_format as mf

        return mf
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[2] / "python" / "fastspec" / "model_format.py"
    if not path.is_file():
        raise ImportError("fastspec.model_format is not importable: install fastspec (pip install -e .) "
                          f"or run from a source checkout that has {path}")
    name = "_fastspec_model_format"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
