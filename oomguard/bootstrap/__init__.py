"""The bootstrap: guard an unchanged training command from inside its own process.

The supervisor puts :data:`SITE_DIR` first on the child's ``PYTHONPATH``
(:func:`oomguard.supervisor.launch.bootstrap_env`). Python runs its ``sitecustomize``
at start-up in every interpreter of the run — the launcher (``accelerate launch``,
``torchrun``, ``trl``) and each worker it spawns. That file chains to any other
``sitecustomize`` and, under oomguard only (``OOMGUARD_RUN_DIR`` set), registers
post-import hooks; nothing heavier is imported until the child imports transformers.

Importing this package imports only the standard library.
"""

from __future__ import annotations

from pathlib import Path

SITE_DIR = Path(__file__).with_name("site")  # holds sitecustomize.py

__all__ = ["SITE_DIR"]
