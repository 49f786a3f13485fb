"""Package versions recorded in every output, so results can be traced to their software."""

from __future__ import annotations

import platform
from importlib import metadata

_PACKAGES = ("lipcert", "torch", "numpy", "safetensors", "torchattacks")


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages lipcert's numbers depend on."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
