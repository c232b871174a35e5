"""Load open_clip's tokenizer and text transformer as independent references, without torchvision."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from functools import cache

import pytest
from torch import nn


@cache
def open_clip_module(name: str) -> types.ModuleType:
    """Import ``open_clip.<name>`` while skipping the package __init__ (which needs torchvision).

    open_clip is installed with --no-deps; only its ``utils`` imports torchvision (for a batch-norm
    class the text tower never uses), so a stand-in is placed in ``sys.modules`` for the import
    and removed afterwards with open_clip's modules, leaving other tests' view of it unchanged.
    """
    if "open_clip" in sys.modules:
        return importlib.import_module(f"open_clip.{name}")
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    before = set(sys.modules)
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    stand_ins = {"open_clip": package}
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = nn.Identity
        stand_ins.update(
            {
                "torchvision": types.ModuleType("torchvision"),
                "torchvision.ops": types.ModuleType("torchvision.ops"),
                "torchvision.ops.misc": misc,
            }
        )
    sys.modules.update(stand_ins)
    try:
        return importlib.import_module(f"open_clip.{name}")
    finally:
        # Only our stand-ins and open_clip's own modules go: a C extension imported on the way
        # (numpy, regex) must stay, since re-importing one in the same process can break it.
        for added in set(sys.modules) - before:
            if added in stand_ins or added.startswith("open_clip."):
                del sys.modules[added]
