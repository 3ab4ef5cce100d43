"""Sharded checkpoints (FSDP, DeepSpeed ZeRO) inside an HF ``checkpoint-N`` folder: what they hold and
whether every shard is there and whole. Read-only; never imports torch (the supervisor's rule).

What HF Trainer writes (transformers 5.x with accelerate 1.x; the same names since transformers 4.36):

- **FSDP, ``SHARDED_STATE_DICT``** (``accelerate.utils.save_fsdp_model`` / ``save_fsdp_optimizer``):
  ``pytorch_model_fsdp_0/`` and ``optimizer_0/``, each a torch.distributed.checkpoint (DCP) folder:
  ``.metadata`` (a pickle of ``dcp.Metadata``) and one ``__<rank>_<k>.distcp`` data file per writer;
  ``rng_state_<rank>.pth`` per rank. The metadata names, for every tensor chunk, the file, offset and
  length it was written to: a missing or short data file is found without reading tensors.
- **FSDP, ``FULL_STATE_DICT``** with PEFT: the ordinary ``adapter_model.safetensors`` (rank 0 gathers).
- **DeepSpeed ZeRO** (``model_wrapped.save_checkpoint``): ``global_step<N>/`` holding
  ``mp_rank_00_model_states.pt`` and one ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per
  data-parallel rank, and ``latest`` naming that folder. Each ``.pt`` is a torch zip archive (checked
  like every torch file: :func:`oomguard.supervisor.checkpoints.torch_file_problem`).

A DCP ``.metadata`` is a pickle that refers to torch classes. It is read with an unpickler that builds
inert stand-ins for every class (:class:`_Inert`) and calls nothing but pickle's own reconstructors, so
reading it neither imports torch nor runs code from the file.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from pathlib import Path
from typing import Any, Callable

__all__ = ["DCP_METADATA", "ShardedLayout", "dcp_problems", "find_layout", "read_dcp_storage", "sharded_problems"]

DCP_METADATA = ".metadata"
_DCP_DIR_RE = re.compile(r"^(pytorch_model_fsdp|optimizer)_\d+$")
_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")
_DS_STEP_RE = re.compile(r"^global_step(\d+)$")
_DS_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")
_DS_MODEL_RE = re.compile(r"^(?:zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")


@dataclasses.dataclass(frozen=True)
class ShardedLayout:
    """The sharded parts of one checkpoint folder. ``kind``: ``fsdp`` or ``deepspeed``; ``dirs``: the
    DCP folders (FSDP) or the ``global_step<N>`` folder (DeepSpeed); ``ranks``: how many ranks saved
    RNG state (``rng_state_<r>.pth``), the world size when HF wrote it, else None."""

    kind: str
    dirs: tuple[Path, ...]
    ranks: int | None

    @property
    def holds_weights(self) -> bool:
        """A model shard folder is there (FSDP ``pytorch_model_fsdp_*`` or a DeepSpeed step folder)."""
        return self.kind == "deepspeed" or any(d.name.startswith("pytorch_model_fsdp") for d in self.dirs)


def find_layout(path: Path) -> ShardedLayout | None:
    """The sharded layout of checkpoint folder ``path``, or None for an unsharded one."""
    try:
        entries = list(path.iterdir())
    except OSError:
        return None
    ranks = {int(m.group(1)) for p in entries if (m := _RNG_RE.match(p.name))}
    world = max(ranks) + 1 if ranks else None
    dcp = tuple(sorted(p for p in entries if p.is_dir() and _DCP_DIR_RE.match(p.name)))
    if dcp:
        return ShardedLayout("fsdp", dcp, world)
    steps = tuple(sorted(p for p in entries if p.is_dir() and _DS_STEP_RE.match(p.name)))
    if steps or (path / "latest").is_file():
        return ShardedLayout("deepspeed", steps, world)
    return None


def sharded_problems(layout: ShardedLayout, checkpoint: Path,
                     torch_file_problem: Callable[[Path], str | None]) -> list[str]:
    """What makes the sharded parts unusable for a resume (empty: complete)."""
    if layout.kind == "fsdp":
        return [p for d in layout.dirs for p in dcp_problems(d)]
    return _deepspeed_problems(layout, checkpoint, torch_file_problem)


# --- FSDP: torch.distributed.checkpoint folders ----------------------------------------------------


def dcp_problems(folder: Path) -> list[str]:
    """A DCP folder's problems: no or unreadable ``.metadata``, or a data file it names that is
    missing or shorter than the bytes the metadata says were written to it."""
    name = folder.name
    try:
        storage = read_dcp_storage(folder / DCP_METADATA)
    except FileNotFoundError:
        return [f"{name}/{DCP_METADATA} missing: the sharded save did not finish"]
    except (OSError, ValueError) as exc:
        return [f"{name}/{DCP_METADATA} unreadable ({exc})"]
    problems = []
    for file, needed in sorted(storage.items()):
        try:
            size = (folder / file).stat().st_size
        except OSError:
            problems.append(f"{name}/{file} missing (the metadata names it: a rank's shard was not written)")
            continue
        if size < needed:
            problems.append(f"{name}/{file} is truncated ({size} of {needed} bytes)")
    return problems


def read_dcp_storage(metadata: Path) -> dict[str, int]:
    """``data file -> bytes it must hold`` (the furthest offset + length written to it) from a DCP
    ``.metadata``. ValueError when the file is not a DCP metadata pickle."""
    data = metadata.read_bytes()
    try:
        meta = _InertUnpickler(data).load()
    except Exception as exc:  # a damaged pickle raises any of several types: all mean "unreadable"
        raise ValueError(f"not a readable pickle: {type(exc).__name__}: {exc}") from None
    storage = getattr(meta, "storage_data", None)
    if not isinstance(storage, dict):
        raise ValueError("no storage_data in it (not a torch.distributed.checkpoint metadata file)")
    needed: dict[str, int] = {}
    for info in storage.values():
        file, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        if not isinstance(file, str) or not isinstance(offset, int) or not isinstance(length, int):
            raise ValueError(f"a storage entry without relative_path/offset/length: {info!r}")
        needed[file] = max(needed.get(file, 0), offset + length)
    return needed


class _Inert:
    """A stand-in for any class a pickle names: takes any arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots) of a class with __slots__
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.__dict__}>"


_SAFE = {("copyreg", "_reconstructor"), ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"),
         ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple"),
         ("builtins", "list"), ("builtins", "dict"), ("builtins", "bytes"), ("builtins", "bytearray"),
         ("builtins", "slice"), ("collections", "OrderedDict")}


class _InertUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._made: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        key = (module, name)
        if key not in self._made:
            self._made[key] = type(name, (_Inert,), {"__module__": module})
        return self._made[key]

    def persistent_load(self, pid: Any) -> Any:  # tensors stored by reference: not in a DCP metadata
        return _Inert(pid)


# --- DeepSpeed ZeRO ---------------------------------------------------------------------------


def _deepspeed_problems(layout: ShardedLayout, checkpoint: Path,
                        torch_file_problem: Callable[[Path], str | None]) -> list[str]:
    latest = checkpoint / "latest"
    folders = list(layout.dirs)
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (checkpoint / tag).is_dir():
            return [f"latest names {tag!r}, which is not there: the DeepSpeed save did not finish"]
        folders = [checkpoint / tag]
    if not folders:
        return ["no global_step<N> folder: the DeepSpeed save did not finish"]
    problems = []
    for folder in folders:
        files = [p for p in folder.iterdir() if p.is_file()]
        if not any(_DS_MODEL_RE.match(p.name) for p in files):
            problems.append(f"{folder.name}: no mp_rank_*_model_states.pt (the model states were not written)")
        shards = {int(m.group(1)) for p in files if (m := _DS_OPTIM_RE.match(p.name))}
        want = layout.ranks if layout.ranks is not None else (max(shards) + 1 if shards else None)
        missing = sorted(set(range(want)) - shards) if want else []
        if missing:
            problems.append(f"{folder.name}: optimizer shards of rank(s) {', '.join(map(str, missing))} missing "
                            f"(expected {want}, one per rank)")
        problems.extend(f"{folder.name}/{p}" for f in sorted(files) if f.suffix == ".pt"
                        and (p := torch_file_problem(f)))
    return problems
