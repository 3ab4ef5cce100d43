"""oomguard's bootstrap, run by Python's ``site`` at start-up (this folder is first on PYTHONPATH).

1. Chain: run the ``sitecustomize`` this file shadows (the next one on ``sys.path``), as
   ``site`` would have, errors reported the same way.
2. Under oomguard only (``OOMGUARD_RUN_DIR`` set, ``OOMGUARD_BOOTSTRAP`` not 0): register
   the post-import hooks of ``oomguard.bootstrap.injection``. Stdlib imports only here.
"""

import os
import sys


def _chain() -> None:
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module  # the shadowed module is the one the world sees
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # as site.execsitecustomize does: report, never stop the interpreter
        if sys.flags.verbose:
            sys.excepthook(*sys.exc_info())
        else:
            print(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}",
                  file=sys.stderr)


def _install() -> None:
    if not os.environ.get("OOMGUARD_RUN_DIR", "").strip():
        return  # outside oomguard: no trace (not even an import of oomguard)
    if os.environ.get("OOMGUARD_BOOTSTRAP", "").strip().lower() in ("0", "off", "false", "no"):
        return
    try:
        from oomguard.bootstrap.injection import install
    except ImportError as exc:
        print(f"oomguard bootstrap: cannot import oomguard in this interpreter ({sys.executable}): {exc}; "
              "the run continues unguarded in-process (flags and stderr classification still apply). "
              "Install oomguard into this environment to get the in-process guard.", file=sys.stderr)
        return
    install()


_chain()
_install()
