"""What the machine can do: peak FLOP/s by device, a measured matmul peak, CPU allocator tuning."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import torch

# Dense bf16/fp16 tensor-core peak (no sparsity), FLOP/s, by substring of the device name.
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, see below
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
}


def gpu_peak_flops(device_name: str) -> float | None:
    """Vendor peak for a known GPU name (longest matching key wins), else None."""
    matches = [k for k in GPU_PEAK_FLOPS if k in device_name]
    return GPU_PEAK_FLOPS[max(matches, key=len)] if matches else None


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
