"""torch's two device queries answered from NVML while the spare imports bitsandbytes. Stdlib only.

bitsandbytes asks at import whether CUDA is available (``torch.cuda.is_available``: ``cudaGetDeviceCount``,
which calls ``cuInit``) and every visible device's compute capability (``get_device_capability``:
torch's lazy CUDA initialisation). peft imports bitsandbytes at import, and trl imports peft, so
without an answer from elsewhere a spare could not hold them (they were left to the child, and a
warm start saved almost nothing on a GPU machine). NVML gives the same two answers without the CUDA
driver: the device count under ``CUDA_VISIBLE_DEVICES`` (torch's own ``_device_count_nvml``, what
``PYTORCH_NVML_BASED_CUDA_CHECK=1`` uses) and each device's capability from ``libnvidia-ml``.

:func:`answers` computes them once, before any patch; if NVML cannot give all of them, there is no
view (the caller leaves bitsandbytes' importers to the child, as before). :func:`nvml_view` puts
the answers in place of the two functions for the import only, and the originals back after; a
function some module bound by name meanwhile (``from torch.cuda import is_available``) calls the
original once the view is closed. The values are the ones a cold child computes with CUDA, so what
bitsandbytes caches (its library, its backend) is the same; :func:`driver_initialised` lets the
spare check afterwards that nothing called ``cuInit``.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Callable, Iterator

__all__ = ["Answers", "answers", "driver_initialised", "library_mapped", "nvml_view"]

Answers = tuple[tuple[int, int], ...]  # each visible device's (major, minor), in torch's order


def _capabilities(nvml_indices: list[int]) -> Answers | str:
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as exc:
        return f"no NVML library ({exc})"
    if lib.nvmlInit_v2() != 0:
        return "NVML did not initialise"
    try:
        caps = []
        for index in nvml_indices:
            handle, major, minor = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int()
            if lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0:
                return f"NVML has no device {index}"
            if lib.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return f"NVML gave no compute capability for device {index}"
            caps.append((major.value, minor.value))
        return tuple(caps)
    finally:
        lib.nvmlShutdown()


def answers(cuda: Any) -> Answers | str:
    """Each visible device's compute capability from NVML, or why NVML cannot stand in for CUDA here."""
    try:
        count = cuda._device_count_nvml()
        if count <= 0:
            return "NVML sees no visible device" if count == 0 else "NVML could not count the devices"
        indices = [cuda._get_nvml_device_index(i) for i in range(count)]
    except Exception as exc:  # noqa: BLE001 - a torch without these private helpers: no view
        return f"torch's NVML helpers failed ({type(exc).__name__}: {exc})"
    return _capabilities(indices)


def _index(device: Any) -> int:
    """The visible-device index torch would query for ``device``, without initialising CUDA (None and a
    device without an index are the current device, which before initialisation is 0)."""
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    if isinstance(device, str):
        return int(device.split(":", 1)[1]) if ":" in device else 0
    index = getattr(device, "idx", None)  # torch.cuda.device
    if index is None:
        index = getattr(device, "index", None)  # torch.device
    return 0 if index is None else int(index)


@contextlib.contextmanager
def nvml_view(cuda: Any, caps: Answers) -> Iterator[None]:
    """``cuda.is_available`` and ``cuda.get_device_capability`` answered from ``caps`` inside the block."""
    original: dict[str, Callable[..., Any]] = {"is_available": cuda.is_available,
                                               "get_device_capability": cuda.get_device_capability}
    open_ = [True]

    def is_available() -> bool:
        return bool(caps) if open_[0] else original["is_available"]()

    def get_device_capability(device: Any = None) -> tuple[int, int]:
        return caps[_index(device)] if open_[0] else original["get_device_capability"](device)

    is_available.__doc__ = original["is_available"].__doc__
    get_device_capability.__doc__ = original["get_device_capability"].__doc__
    cuda.is_available, cuda.get_device_capability = is_available, get_device_capability
    try:
        yield
    finally:
        open_[0] = False
        cuda.is_available, cuda.get_device_capability = original["is_available"], original["get_device_capability"]


def driver_initialised() -> bool:
    """Whether anything in this process has called ``cuInit``. torch maps the CUDA driver library at
    import (measured on an H200: ``libcuda`` is in ``/proc/self/maps`` after ``import torch``), so the
    mapping says nothing; the driver itself does: ``cuDeviceGet`` answers ``CUDA_ERROR_NOT_INITIALIZED``
    (3) until ``cuInit`` ran, and initialises nothing. False where the library is not mapped at all."""
    if not library_mapped((b"/libcuda.so",)):  # None (unreadable) too: nothing to ask
        return False
    try:
        lib = ctypes.CDLL("libcuda.so.1")  # already loaded: this only finds it
    except OSError:
        return False
    device = ctypes.c_int()
    return lib.cuDeviceGet(ctypes.byref(device), ctypes.c_int(0)) != 3


def library_mapped(names: tuple[bytes, ...], pid: int | str = "self") -> bool | None:
    """Whether a library whose path holds one of ``names`` is mapped in process ``pid`` (``/proc/PID/maps``);
    None when that cannot be read (each caller says what unknown means for it)."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return any(name in line for line in f for name in names)
    except OSError:
        return None
