"""Every provider module of this package, found by its SPECS: adding a provider is adding a
module (plus its fake and tests)."""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from pgnotify_worker.adapters import providers
from pgnotify_worker.adapters.providers.spec import ProviderSpec


@functools.cache
def provider_specs() -> dict[str, ProviderSpec[Any]]:
    """name -> spec, in module order."""
    found: dict[str, ProviderSpec[Any]] = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(providers.__path__)):
        loaded = importlib.import_module(f"{providers.__name__}.{module}")
        for spec in getattr(loaded, "SPECS", ()):
            if spec.name in found:
                raise RuntimeError(f"two provider modules declare {spec.name!r}")
            found[spec.name] = spec
    return found
