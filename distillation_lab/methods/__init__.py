"""The distillation methods: one module per loss term, each registering itself with `register_term`.

Every module of this package is imported here, so a new method is one file dropped in beside these
(and one test): it is then a name in `loss`, listed in --help and in errors.
"""
from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
