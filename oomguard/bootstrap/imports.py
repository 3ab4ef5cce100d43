"""Post-import hooks: run a callback right after a named module finishes executing. Stdlib only.

The bootstrap must not import torch or transformers itself (a launcher parent, or a child
that never trains, pays nothing), yet must patch ``transformers.Trainer`` before the
child's code uses it. A ``sys.meta_path`` finder sees every import; for a watched name it
lets the other finders locate the module and wraps the loader so the callback runs after
the module body. No third-party library ships this small piece (``wrapt`` has it, but is
not a dependency of the stack).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Callable

from oomguard.bootstrap.failsafe import failsafe

__all__ = ["PostImportFinder", "uninstall", "when_imported"]

Hook = Callable[[ModuleType], None]


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader; runs the hooks once the module body has run."""

    def __init__(self, loader, hooks: list[Hook]):
        self._loader = loader
        self._hooks = hooks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for hook in list(self._hooks):
            _run_hook(hook, module)

    def __getattr__(self, name: str):  # get_source, get_resource_reader, is_package...
        return getattr(self._loader, name)


class PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the spec of each watched module; every other import passes straight through."""

    def __init__(self) -> None:
        self.hooks: dict[str, list[Hook]] = {}
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.hooks or getattr(self._busy, fullname.replace(".", "_"), False):
            return None
        flag = fullname.replace(".", "_")
        setattr(self._busy, flag, True)  # our own search below must not find ourselves again
        try:
            spec = _find_elsewhere(self, fullname, path, target)
        finally:
            setattr(self._busy, flag, False)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, self.hooks[fullname])
        return spec


def _find_elsewhere(me, fullname, path, target):
    for finder in sys.meta_path:
        if finder is me or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


_finder: PostImportFinder | None = None


def when_imported(name: str, hook: Hook) -> None:
    """Call ``hook(module)`` after ``name`` is imported; at once if it already is."""
    global _finder
    module = sys.modules.get(name)
    if module is not None:
        _run_hook(hook, module)
        return
    if _finder is None or _finder not in sys.meta_path:
        _finder = PostImportFinder()
        sys.meta_path.insert(0, _finder)
    _finder.hooks.setdefault(name, []).append(hook)


def _run_hook(hook: Hook, module: ModuleType) -> None:
    """A hook that raises leaves the module unpatched and the child running (said, journaled)."""
    with failsafe(f"the bootstrap's hook on {module.__name__}",
                  "that module runs unpatched: the guard may not reach this run's Trainer"):
        hook(module)


def uninstall() -> None:
    """Remove the finder (tests; a child never needs it)."""
    global _finder
    if _finder is not None and _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    _finder = None
