"""How the process uses the CPU: how torch's idle OpenMP threads wait (spin when nothing else competes for the cores
now, else sleep) and whether freed memory goes back to the kernel (`keep_freed_memory`). Torch-free.

Why it matters: the demo's tiny model runs thousands of small ops a second. Between two ops torch's OpenMP threads
either spin (OpenMP's default) or sleep (`OMP_WAIT_POLICY=PASSIVE`). On an idle 2-core machine spinning threads
sampled 1.6x faster than sleeping ones; beside other CPU-bound work spinning threads fight them for the cores, and
one decode step of the demo's model took 180 ms of CPU instead of 3 (`benchmarks/openmp_probe.py`, beside another
2-thread job: 4 steps/s spinning, 163 sleeping).

What can change when: GNU OpenMP (torch's wheels bundle libgomp) reads OMP_WAIT_POLICY once, when torch loads it.
Setting it after `import torch` changes nothing (measured: the same 4 steps/s as never setting it), so the choice is
made once, before torch is imported, from what runs at that moment. The thread count can change later
(`torch.set_num_threads`), but it changes how reductions split their work, so the figures would depend on the load;
the demo never sets its threads from the load (only from a decoding batch's size, `demo/rollout.ONE_THREAD_ROWS`) and
reports, stage by stage, whether other work competed (`other_runnable`).

The reading: runnable tasks on the machine (`/proc/loadavg`'s running count, a Linux instant figure) minus this
process's own running threads, averaged over a few samples. The 1-minute load average, used before, lags: right
after `pip install` or the tests it reads >= 1 on an idle 2-core machine and sent the whole demo to sleeping threads.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Samples of the running count, and the pause between them: 10 x 20 ms, so a short-lived task (a shell command, a
# kernel thread) weighs little and a CPU-bound job weighs ~1.
SAMPLES, INTERVAL_S = 10, 0.02


def _read_running() -> tuple[int, int] | None:
    """(runnable tasks on the machine, this process's own running threads), or None where /proc has no such file."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    own = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return running, max(own, 1)  # the reader itself is running


def other_runnable(samples: int = SAMPLES, interval: float = INTERVAL_S, read=_read_running) -> float | None:
    """Mean number of runnable tasks other than this process's threads, over `samples` readings `interval` apart;
    None where the platform has no instant figure. `read()` -> (machine's runnable, ours) (tests inject it)."""
    seen = []
    for k in range(samples):
        r = read()
        if r is None:
            return None
        seen.append(max(0, r[0] - r[1]))
        if k + 1 < samples and interval > 0:
            time.sleep(interval)
    return sum(seen) / len(seen)


def cores() -> int:
    """Cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose(others: float | None, n_cores: int, threads: int, load1: float | None = None) -> str | None:
    """None (spin: OpenMP's default) when `threads` fit beside the `others` runnable tasks on `n_cores`, else
    "PASSIVE". Without an instant reading (`others` None), the 1-minute load average decides as it did before
    (below half the cores: spin); without either, PASSIVE (the choice that is never much slower)."""
    if others is None:
        return None if load1 is not None and load1 < 0.5 * n_cores else "PASSIVE"
    return None if others + min(threads, n_cores) <= n_cores + 0.5 else "PASSIVE"


def openmp_wait_policy(threads: int | None = None, *, read=_read_running, loadavg=os.getloadavg, samples: int = SAMPLES,
                       interval: float = INTERVAL_S) -> str | None:
    """Choose how torch's idle OpenMP threads wait, before torch starts (a value you set wins). Sets and returns
    "PASSIVE" when other work competes for the cores now; returns None (OpenMP's spinning default) when it does not.
    `threads`: the torch threads the job will use (default: every core). `read`/`loadavg`: injected by tests."""
    if "OMP_WAIT_POLICY" in os.environ:
        return os.environ["OMP_WAIT_POLICY"]
    n = cores()
    others = other_runnable(samples, interval, read)
    load1 = None
    if others is None:
        try:
            load1 = loadavg()[0]
        except OSError:
            pass
    policy = choose(others, n, threads or n, load1)
    if policy:
        os.environ["OMP_WAIT_POLICY"] = policy
    return policy


def spinning() -> bool:
    """Whether this process's OpenMP threads spin (no policy set, or ACTIVE)."""
    return os.environ.get("OMP_WAIT_POLICY", "").upper() not in ("PASSIVE", "FALSE")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks below it come from the heap and are reused
TRIM_THRESHOLD = 256 << 20  # free memory at the heap's top kept up to this much


def keep_freed_memory() -> bool:
    """Keep freed blocks in the process for reuse instead of handing them back to the kernel (glibc's malloc; False
    elsewhere, nothing changed). Why: torch frees and allocates the same few-MB tensors thousands of times a second
    (logits, attention scores, gradients). glibc serves such blocks with mmap, or trims them off the heap's top,
    and every new one then costs a page fault per 4 KB page that the kernel zeroes: the demo took 28 million minor
    page faults and 72 s of system time out of 412 s of CPU. Numbers are unchanged (torch aligns every tensor to
    64 bytes either way); the cost is a resident size that stays near its peak."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
