"""What the spare imports before it is needed: the heavy stack the script names. Stdlib only here.

A script's own ``import``/``from ... import`` statements (anywhere in the file) name the packages;
only those in :data:`HEAVY` are imported (the user's own modules run later, under the attempt's
environment). ``from transformers import Trainer`` also resolves ``Trainer`` (transformers imports
lazily: that is where the seconds go). A ``-m`` module's source is found without running its
package. A script that names none of them (a console script) gets :data:`DEFAULT`; one of the
standard library alone gets no spare. Never ``bitsandbytes``: it initialises CUDA at import on a
GPU machine, and peft (trl through it) imports it at import, so with a CUDA torch and bitsandbytes
installed those are left to the child (:func:`cuda_unsafe`) unless NVML can answer bitsandbytes'
two device queries (:mod:`.cuda_view`): then they are imported under that view, and CUDA stays
untouched. (Rolling back a half-done import was tried and is unsafe: torchvision's kernel
registrations do not survive a second import.) A module
whose import initialises CUDA anyway stops the preload (the spare exits with ``EXIT_CUDA``; the
supervisor starts the next spare without that module).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import sys
import time
from typing import Any, Iterable

__all__ = ["BNB_IMPORTERS", "DEFAULT", "HEAVY", "cuda_initialised", "cuda_unsafe", "module_source", "named_imports",
           "preload", "stdlib_only", "wanted"]

HEAVY = frozenset({"torch", "transformers", "peft", "trl", "datasets", "accelerate", "safetensors", "tokenizers",
                   "numpy", "pandas", "pyarrow", "evaluate", "sentencepiece"})
DEFAULT = ("torch", "transformers", "transformers.trainer", "datasets", "accelerate", "peft", "trl")
NEVER = frozenset({"bitsandbytes", "unsloth", "deepspeed", "vllm", "flash_attn"})  # CUDA or patches at import


def _imports(source: str) -> list[tuple[str, tuple[str, ...]]] | None:
    """(module, names) of every absolute import in ``source``, in order; None if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    found: list[tuple[str, tuple[str, ...]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, tuple(a.name for a in node.names if a.name != "*")))
    return found


def named_imports(source: str) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names) of every absolute import in ``source`` whose package is heavy, in order."""
    return [(m, names) for m, names in _imports(source) or []
            if m.split(".")[0] in HEAVY and m.split(".")[0] not in NEVER]


def stdlib_only(source: str) -> bool:
    """True when ``source`` parses and imports nothing beyond the standard library: nothing to preload."""
    found = _imports(source)
    return found is not None and all(m.split(".")[0] in sys.stdlib_module_names or m == "__future__"
                                     for m, _ in found)


def wanted(kind: str, name: str, drop: Iterable[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """The imports to do for the plan (``drop``: modules the supervisor saw initialise CUDA); [] for a
    script of the standard library alone."""
    text = ""
    source = name if kind == "script" else module_source(name)
    if source:
        try:
            with open(source, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
    if text and stdlib_only(text):
        return []
    plan = named_imports(text) or [(m, ()) for m in DEFAULT]
    dropped = set(drop)
    return [(m, names) for m, names in plan if m not in dropped and m.split(".")[0] not in dropped]


def module_source(name: str) -> str | None:
    """The source file ``python -m name`` would run, found without importing (running) its packages."""
    from importlib.machinery import PathFinder

    path, spec = None, None
    parts = name.split(".")
    for i in range(len(parts)):
        spec = PathFinder.find_spec(".".join(parts[:i + 1]), path)
        if spec is None:
            return None
        path = spec.submodule_search_locations
    if spec is not None and spec.submodule_search_locations:  # a package: its __main__
        spec = PathFinder.find_spec(f"{name}.__main__", spec.submodule_search_locations)
    origin = getattr(spec, "origin", None)
    return origin if origin and origin.endswith(".py") else None


def cuda_initialised() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        return bool(cuda is not None and cuda.is_initialized())
    except Exception:  # noqa: BLE001 - a half-imported torch: not initialised by us
        return False


BNB_IMPORTERS = ("peft", "trl")  # import bitsandbytes at import (peft/helpers.py; trl through peft)


def cuda_unsafe(plan: list[tuple[str, tuple[str, ...]]], cuda_build: bool,
                bnb_installed: bool) -> set[str]:
    """The modules of ``plan`` left to the child because importing them would initialise CUDA: on a
    CUDA build of torch with bitsandbytes installed, peft and trl (they import bitsandbytes, whose
    import queries the device). Measured on an H200: a spare that imported peft had a CUDA context."""
    if not (cuda_build and bnb_installed):
        return set()
    return {m for m, _ in plan if m.split(".")[0] in BNB_IMPORTERS}


def _torch_cuda_build() -> bool:
    torch = sys.modules.get("torch")
    return bool(getattr(getattr(torch, "version", None), "cuda", None))


def _installed(name: str) -> bool:
    from importlib.util import find_spec

    try:
        return find_spec(name) is not None  # a top-level name: finds, never runs it
    except (ImportError, ValueError):
        return False


def preload(plan: list[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """Import ``plan``; what was imported, what was not (module -> why), the seconds, the module that
    initialised CUDA (then the rest is not imported), the NVML view bitsandbytes' importers were
    imported under (or why there was none) and whether anything called ``cuInit``."""
    from oomguard.spare.cuda_view import answers, driver_initialised, nvml_view

    t0, done, failed = time.perf_counter(), [], {}
    unsafe: set[str] | None = None
    view: dict[str, Any] = {}

    def report(cuda: str | None) -> dict[str, Any]:
        return {"imported": done, "failed": failed, "seconds": time.perf_counter() - t0, "cuda": cuda,
                "driver_initialised": driver_initialised(), "bitsandbytes": "bitsandbytes" in sys.modules, **view}

    with contextlib.ExitStack() as stack:
        for module, names in _merged(plan):
            if unsafe is None and "torch" in sys.modules:
                unsafe = cuda_unsafe(plan, _torch_cuda_build(), _installed("bitsandbytes"))
                if unsafe:
                    caps = answers(sys.modules["torch"].cuda)
                    view = {"nvml_view": list(caps)} if isinstance(caps, tuple) else {"no_nvml_view": caps}
                    if isinstance(caps, tuple):
                        stack.enter_context(nvml_view(sys.modules["torch"].cuda, caps))
                        unsafe = set()
            if unsafe and module in unsafe:
                failed[module] = ("left to the child: it imports bitsandbytes, which initialises CUDA, and NVML "
                                  f"could not answer for it ({view.get('no_nvml_view')})")
                continue
            try:
                mod = importlib.import_module(module)
                for attr in names:
                    _resolve(mod, module, attr)
            except Exception as exc:  # noqa: BLE001 - not importable here: the script will say so itself
                failed[module] = f"{type(exc).__name__}: {exc}"[:300]
            if cuda_initialised():
                return report(module)
            if module not in failed:
                done.append(module)
    return report(None)


def _merged(plan: list[tuple[str, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
    """One entry per module (its names merged), in first-seen order; torch first when named."""
    merged: dict[str, list[str]] = {}
    if any(m.split(".")[0] in BNB_IMPORTERS for m, _ in plan) and _installed("torch"):
        merged["torch"] = []  # they import it anyway; first, so the NVML view is up before bitsandbytes
    for module, names in plan:
        merged.setdefault(module, [])
        merged[module] += [n for n in names if n not in merged[module]]
    order = sorted(merged, key=lambda m: m.split(".")[0] != "torch")  # stable: torch, then as written
    return [(m, tuple(merged[m])) for m in order]


def _resolve(mod: Any, module: str, attr: str) -> None:
    """``from module import attr``: the attribute (a lazy module loads it here), else the submodule."""
    try:
        getattr(mod, attr)
    except AttributeError:
        importlib.import_module(f"{module}.{attr}")
