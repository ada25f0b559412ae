"""What the machine can do: peak FLOP/s by device, a measured matmul peak, CPU allocator tuning."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

# Dense (no sparsity) bf16 tensor-core peak, FLOP/s, keyed by the device name as
# torch.cuda.get_device_name() reports it, normalised by _normalise_device_name. Only figures
# taken from the vendors' datasheets; a GPU whose figure is uncertain is left out (A10G: NVIDIA
# publishes no datasheet for it), so its MFU reads as unknown rather than wrong.
GPU_PEAK_FLOPS = {
    "h100 80gb hbm3": 989.4e12,  # H100 SXM5
    "h100 pcie": 756e12,
    "h100 nvl": 835e12,  # per GPU
    "h200": 989e12,
    "gh200 480gb": 989e12,
    "a100-sxm4-80gb": 312e12,
    "a100-sxm4-40gb": 312e12,
    "a100-pcie-40gb": 312e12,
    "a100 80gb pcie": 312e12,
    "a10": 125e12,
    "l4": 121e12,
    "l40": 181e12,
    "l40s": 362e12,
    # Volta has no bf16: these are its fp16 tensor-core peaks.
    "tesla v100-sxm2-16gb": 125e12,
    "tesla v100-sxm2-32gb": 125e12,
    "tesla v100-pcie-16gb": 112e12,
    "tesla v100-pcie-32gb": 112e12,
    "amd instinct mi300x": 1307e12,
}


def _normalise_device_name(device_name: str) -> str:
    """Collapse whitespace, lower-case, and drop a leading "NVIDIA " prefix."""
    name = " ".join(device_name.split()).lower()
    return name.removeprefix("nvidia ")


def gpu_peak_flops(device_name: str) -> float | None:
    """Vendor dense (no sparsity) bf16 tensor-core peak FLOP/s for a GPU (fp16 for the V100, which
    has no bf16), looked up by exact device name after normalising whitespace, case and an optional
    "NVIDIA " prefix. An unknown name gives None, never a near match's figure."""
    return GPU_PEAK_FLOPS.get(_normalise_device_name(device_name))


def measure_matmul_flops(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, reps: int = 10
) -> float:
    """Best observed FLOP/s of an n x n x n matmul into a preallocated output (so page faults
    on a fresh buffer do not lower the figure)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap instead of returning them to the OS.

    By default each tensor over a few MB is mmap'd and unmapped again, so every training step
    page-faults its activations in anew; CRATE's (tokens x m) sparse codes make that a large
    share of a CPU step. Returns False where glibc's mallopt is not available.
    """
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = mallopt(m_mmap_threshold, 32 << 20)  # the largest value glibc accepts
    ok &= mallopt(m_trim_threshold, 1 << 30)
    ok &= mallopt(m_top_pad, 64 << 20)
    return bool(ok)
