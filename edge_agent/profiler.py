"""Measures the device an agent runs on: memory (torch.cuda or host), and sustained matmul FLOP/s.

Operator caps (edge_agent.caps) are part of the measurement: memory figures are clipped to the memory
cap, and the FLOP/s benchmark runs under the compute throttle, so a share of 0.25 measures about a
quarter of the device's FLOP/s.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import time

import torch

from common.types import DeviceProfile
from edge_agent.caps import Throttle


def host_memory_bytes() -> tuple[int, int]:
    """(total, available) host memory from /proc/meminfo, falling back to sysconf."""
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo") as handle:
            for line in handle:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def cpu_name() -> str:
    """The CPU model name, for the profile."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure_flops(
    device: torch.device, dtype: torch.dtype, seconds: float = 1.0, size: int = 0, throttle: Throttle | None = None
) -> float:
    """Sustained FLOP/s of square matmuls in dtype, timed for about `seconds` after a warm-up, throttle included."""
    n = size or (4096 if device.type == "cuda" else 512)
    throttle = throttle or Throttle(1.0)
    # CUDA launches are asynchronous: the throttle must time a synchronized group of matmuls, not launches.
    # On a CPU single matmuls measured closer to the share than groups of 8 (longer sleeps, slower wake-ups).
    group = 8 if device.type == "cuda" else 1
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    iterations = 0
    start = time.perf_counter()
    while True:
        with throttle:
            for _ in range(group):
                torch.matmul(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        iterations += group
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * iterations / elapsed


def _status_kib(field: str) -> int | None:
    """A "<field>: N kB" line of /proc/self/status in KiB, None where there is no such file or line."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's, or the process's high-water mark (VmHWM) on CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    _release_free_heap()
    try:
        # "5" resets VmHWM to the current RSS (Linux >= 4.0); elsewhere the peak stays the process's lifetime one.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def _release_free_heap() -> None:
    """Give freed heap back to the OS (glibc malloc_trim), so the new peak starts from memory in use.

    Without it the resident set keeps what an earlier, larger run freed, and a smaller run's peak would
    read as high as the larger one's.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the peak includes retained heap, an upper bound


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory since reset_peak_memory: CUDA allocator peak on GPU, resident set high-water mark on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    # ru_maxrss cannot be reset: the lifetime peak is an upper bound of the run's.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def memory_in_use_bytes(device: torch.device) -> int:
    """Memory in use now: CUDA allocated on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_memory_bytes(device)


def profile(
    device: torch.device,
    dtype: torch.dtype,
    num_train: int,
    num_val: int,
    memory_cap_bytes: int = 0,
    compute_share: float = 1.0,
) -> DeviceProfile:
    """Measure this device under the operator's caps; the sample counts come from the agent's local data."""
    host_total, host_free = host_memory_bytes()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)  # the card's figures: the allocator fraction is not in them
        name = torch.cuda.get_device_name(device)
    else:
        total, free, name = host_total, host_free, cpu_name()
    if memory_cap_bytes > 0:
        total, free = min(total, memory_cap_bytes), min(free, memory_cap_bytes)
    return DeviceProfile(
        device=str(device),
        device_name=name,
        total_memory_bytes=int(total),
        free_memory_bytes=int(free),
        host_memory_bytes=int(host_total),
        flops_per_s=measure_flops(device, dtype, throttle=Throttle(compute_share)),
        compute_dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        num_train_samples=num_train,
        num_val_samples=num_val,
        memory_cap_bytes=memory_cap_bytes,
        compute_share=compute_share,
    )
