"""The operators' scripts (``data_pipelines/*.py``) loaded as modules, so that a test runs a script's
``main`` in its own process: a new interpreter would spend seconds of CPU importing torch and this
package again."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

DATA_PIPELINES = Path(__file__).resolve().parents[2] / "data_pipelines"


def load_script(name: str) -> ModuleType:
    """The script ``data_pipelines/<name>.py`` as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, DATA_PIPELINES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
