"""ossscope: an interactive interpretability lab for OpenAI's gpt-oss models."""

from __future__ import annotations

import os as _os

# In a source checkout that was not pip-installed (the GPU machine, say), kernels/ and widgets/ sit beside
# this package rather than inside it; let `ossscope.kernels` and `ossscope.widgets` resolve there too.
_repo_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_repo_root, "pyproject.toml")):
    __path__.append(_repo_root)

__version__ = "0.1.0"

from .config import PRESETS, GptOssConfig
from .loading import CheckpointError, load, random_model, write_checkpoint
from .model import Model
from .trace import ToolCall, Trace


def load_ipython_extension(ipython) -> None:
    """`%load_ext ossscope`: register the %oss / %%oss magics."""
    from .magics import load_ipython_extension as register

    register(ipython)


__all__ = [
    "PRESETS",
    "CheckpointError",
    "GptOssConfig",
    "Model",
    "ToolCall",
    "Trace",
    "__version__",
    "load",
    "random_model",
    "write_checkpoint",
]
