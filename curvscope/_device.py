"""What a device holds for this process and what it has free (CPU: /proc, CUDA: the allocator).

Below the numerics so that operators can size what they keep (the Hessian's kept graphs) and
the command line can estimate a run's memory (:mod:`curvscope.app`) from the same figures.
"""

from __future__ import annotations

import math
import os
import time

import torch

__all__ = [
    "available_memory",
    "cgroup_cpus",
    "cgroup_free",
    "contended",
    "free_memory",
    "in_use",
    "peak_in_use",
    "usable_cpus",
]


def in_use(device: torch.device | str) -> int:
    """Bytes the process holds now: resident set (CPU) or allocated tensors (CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_in_use(device: torch.device | str) -> int:
    """The process's peak so far: resident set (CPU) or allocated tensors (CUDA), bytes.

    On Linux the resident set's high-water mark of this program (``VmHWM``), not
    ``ru_maxrss``, which Linux carries over ``exec``: a command started from a larger
    process (a test runner, a notebook) would report that process's peak.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def available_memory(device: torch.device | str) -> int | None:
    """What the device can give this process: free plus what it holds (``None``: unknown).

    On the CPU, the free memory is the smaller of the machine's (``MemAvailable``) and what
    the process's memory cgroup still allows (containers and batch schedulers, where
    ``/proc/meminfo`` shows the whole host).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: line.split()[1] for line in fh}
        free = int(info["MemAvailable"]) * 1024
    except (OSError, KeyError, ValueError, IndexError):
        return None
    limited = cgroup_free()
    return min(free, limited if limited is not None else free) + in_use(device)


_UNLIMITED = 2**60


def _cgroups(proc: str) -> list[tuple[str, str]]:
    """``(controllers, path)`` of each line of ``/proc/self/cgroup`` (``""``: cgroup v2)."""
    try:
        with open(proc) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[1], parts[2]))
    return out


def cgroup_free(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> int | None:
    """Bytes the process's memory cgroup (v2 or v1) allows beyond its usage (``None``: no limit).

    v1 counts reclaimable page cache as usage, so this errs low, the safe side.
    """
    for controllers, path in _cgroups(proc):
        if controllers == "":  # v2: one unified hierarchy
            base, files = f"{root}{path}", ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = f"{root}/memory{path}", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            with open(f"{base.rstrip('/')}/{files[0]}") as fh:
                limit = fh.read().strip()
            with open(f"{base.rstrip('/')}/{files[1]}") as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= _UNLIMITED:
            continue
        return max(0, int(limit) - usage)
    return None


def free_memory(device: torch.device | str) -> int | None:
    """What the device could still give this process (``None``: unknown)."""
    total = available_memory(device)
    return None if total is None else max(0, total - in_use(device))


def cgroup_cpus(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs the process's cgroup quota allows (v2 ``cpu.max``, v1 ``cfs_quota_us``), or ``None``.

    A container or batch job limited to 2 CPUs on a 64-core host sees 64 cores, and one
    thread per core would oversubscribe its quota 32 times.
    """
    for controllers, path in _cgroups(proc):
        try:
            if controllers == "":
                with open(f"{root}{path}".rstrip("/") + "/cpu.max") as fh:
                    quota, period = fh.read().split()[:2]
            elif "cpu" in controllers.split(","):
                base = f"{root}/{controllers}{path}".rstrip("/")
                with open(f"{base}/cpu.cfs_quota_us") as fh:
                    quota = fh.read().strip()
                with open(f"{base}/cpu.cfs_period_us") as fh:
                    period = fh.read().strip()
            else:
                continue
        except (OSError, ValueError):
            continue
        if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or int(period) <= 0:
            continue
        return int(quota) / int(period)
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = cgroup_cpus()
    if quota is not None:
        n = min(n, max(1, int(quota)))
    return max(1, n)


def contended(threads: int, *, size: int = 128, rounds: int = 3) -> bool:
    """Whether ``threads`` torch threads are no faster than one here and now (other jobs).

    Times short parallel regions (a small product and a tanh, 40 times, as a backward pass
    has many) with one thread, then with ``threads``: sharing the cores with other busy
    processes makes each region wait at its barrier for a thread that lost its core, so the
    threaded run is then not clearly faster. A threaded run is stopped as soon as it falls
    behind, so the probe costs a few milliseconds even where contention makes it slow.
    """
    if threads <= 1:
        return False
    a = torch.randn(size, size)
    before = torch.get_num_threads()

    def run(limit: float) -> float:
        t0 = time.perf_counter()
        for _ in range(40):
            torch.tanh(a @ a)
            if time.perf_counter() - t0 > limit:
                return math.inf
        return time.perf_counter() - t0

    try:
        torch.set_num_threads(1)
        one = min(run(math.inf) for _ in range(rounds))
        torch.set_num_threads(threads)
        return all(run(0.8 * one) == math.inf for _ in range(rounds))
    finally:
        torch.set_num_threads(before)
