"""Issue 17: the NVML view of torch's two device queries while the spare imports bitsandbytes
(``oomguard/spare/cuda_view.py``), on a stand-in for ``torch.cuda`` (the real one is proven on a GPU:
tests/gpu/test_gpu_spare.py)."""

from __future__ import annotations

import types

import pytest

from oomguard.spare import cuda_view


class FakeCuda(types.SimpleNamespace):
    def __init__(self, count=2, nvml=(5, 3)):
        super().__init__(calls=[])
        self._count, self._nvml = count, nvml

        def is_available():
            self.calls.append("is_available")
            return True

        def get_device_capability(device=None):
            self.calls.append(("capability", device))
            return (1, 0)

        self.is_available, self.get_device_capability = is_available, get_device_capability

    def _device_count_nvml(self):
        return self._count

    def _get_nvml_device_index(self, i):
        return self._nvml[i]


class Device:  # torch.cuda.device(i) has .idx; torch.device has .index
    def __init__(self, idx):
        self.idx = idx


def test_the_view_answers_from_nvml_inside_the_block_and_puts_torch_back_after(monkeypatch):
    cuda = FakeCuda()
    original = cuda.is_available, cuda.get_device_capability
    with cuda_view.nvml_view(cuda, ((8, 0), (9, 0))):
        bound = cuda.is_available  # what `from torch.cuda import is_available` would hold
        assert cuda.is_available() is True
        assert [cuda.get_device_capability(d) for d in (None, 0, 1, "cuda:1", Device(1))] == \
            [(8, 0), (8, 0), (9, 0), (9, 0), (9, 0)]
        assert cuda.calls == []  # torch's own functions (CUDA) never ran
    assert (cuda.is_available, cuda.get_device_capability) == original
    assert bound() is True and cuda.calls == ["is_available"]  # a bound copy calls torch's own once closed


def test_no_visible_device_or_no_nvml_means_no_view(monkeypatch):
    assert isinstance(cuda_view.answers(FakeCuda(count=0)), str)
    assert isinstance(cuda_view.answers(FakeCuda(count=-1)), str)
    monkeypatch.setattr(cuda_view, "_capabilities", lambda indices: ((9, 0),) * len(indices))
    assert cuda_view.answers(FakeCuda(count=2)) == ((9, 0), (9, 0))
    seen = []
    monkeypatch.setattr(cuda_view, "_capabilities", lambda indices: seen.append(indices) or ((9, 0),))
    cuda_view.answers(FakeCuda(count=2, nvml=(5, 3)))
    assert seen == [[5, 3]]  # CUDA_VISIBLE_DEVICES order, mapped to NVML's indices by torch's helper


def test_without_libnvidia_ml_the_capabilities_say_why(monkeypatch):
    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cuda_view.ctypes, "CDLL", no_lib)
    got = cuda_view._capabilities([0])
    assert isinstance(got, str) and "no NVML library" in got


def test_the_driver_is_not_initialised_where_it_is_not_even_mapped():
    torch = pytest.importorskip("torch")
    if torch.version.cuda:
        pytest.skip("a CUDA build maps libcuda; the GPU test checks cuInit there")
    assert cuda_view.driver_initialised() is False
