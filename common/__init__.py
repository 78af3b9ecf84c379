"""Shared pieces of cxr-features: everything two jobs use, and nothing that starts Spark."""

import importlib
import sys

__version__ = "0.1.0"

_MODULES = {"scikit-learn": "sklearn"}  # distribution name -> the module that carries its __version__


def software(*packages: str) -> dict:
    """What a record (a run's config.json, a store's manifest) was made with: this project, Python, and each
    named package's version as the running process has it."""
    versions = {"cxr-features": __version__, "python": sys.version.split()[0]}
    for name in packages:
        versions[name] = importlib.import_module(_MODULES.get(name, name)).__version__
    return versions
