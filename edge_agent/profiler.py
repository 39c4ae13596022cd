"""Measures the device an agent runs on: memory (torch.cuda or host), and sustained matmul FLOP/s."""

from __future__ import annotations

import os
import platform
import resource
import time

import torch

from common.types import DeviceProfile


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


def measure_flops(device: torch.device, dtype: torch.dtype, seconds: float = 1.0, size: int = 0) -> float:
    """Sustained FLOP/s of square matmuls in dtype, timed for about `seconds` after a warm-up."""
    n = size or (4096 if device.type == "cuda" else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    iterations = 0
    start = time.perf_counter()
    while True:
        torch.matmul(a, b)
        iterations += 1
        if device.type == "cuda" and iterations % 8:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2.0 * n**3 * iterations / elapsed


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
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


def profile(device: torch.device, dtype: torch.dtype, num_train: int, num_val: int) -> DeviceProfile:
    """Measure this device; the sample counts come from the agent's local data."""
    host_total, host_free = host_memory_bytes()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    else:
        total, free, name = host_total, host_free, cpu_name()
    return DeviceProfile(
        device=str(device),
        device_name=name,
        total_memory_bytes=int(total),
        free_memory_bytes=int(free),
        host_memory_bytes=int(host_total),
        flops_per_s=measure_flops(device, dtype),
        compute_dtype=str(dtype).removeprefix("torch."),
        threads=torch.get_num_threads(),
        num_train_samples=num_train,
        num_val_samples=num_val,
    )
