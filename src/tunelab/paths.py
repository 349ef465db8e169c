"""Path helpers: `pkg://package/sub/path` names a folder that an installed Python package ships."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from tunelab.errors import TunelabError


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve `pkg://pkg_name/rel/path` to the folder inside the installed package; expand `~` otherwise."""
    s = str(path)
    if s.startswith("pkg://"):
        rest = s[len("pkg://") :]
        pkg, _, rel = rest.partition("/")
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise TunelabError(
                f"`{s}`: package `{pkg}` is not installed (pip install {pkg.replace('_', '-')})"
            )
        base = Path(next(iter(spec.submodule_search_locations)))
        return base / rel if rel else base
    return Path(os.path.expanduser(s))
