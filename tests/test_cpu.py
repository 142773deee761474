"""The OpenMP wait-policy decision (progadv_trl/cpu.py) from given machine states: the readings are injected."""

import os
from pathlib import Path

import pytest

from progadv_trl import cpu as threads


def _readings(*pairs):
    """A `read` that returns (machine's runnable tasks, ours) pairs in turn, cycling."""
    it = iter(pairs * 100)
    return lambda: next(it)


def _decide(monkeypatch, pairs, load1=0.0, n_cores=2, threads_=None):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(threads, "cores", lambda: n_cores)
    return threads.openmp_wait_policy(threads_, read=_readings(*pairs), loadavg=lambda: (load1, 0.0, 0.0), interval=0)


def test_loaded_machine_sleeps(monkeypatch):
    # two CPU-bound jobs beside ours (and the load average says so too)
    assert _decide(monkeypatch, [(3, 1), (3, 1), (4, 2)], load1=2.6) == "PASSIVE" == os.environ["OMP_WAIT_POLICY"]


def test_idle_after_load_spins(monkeypatch):
    # the tests just finished: the 1-minute average still reads 1.9 on 2 cores, but nothing else runs now
    assert _decide(monkeypatch, [(1, 1), (1, 1), (2, 2)], load1=1.9) is None
    assert "OMP_WAIT_POLICY" not in os.environ  # OpenMP's spinning default


def test_idle_spins_despite_a_passing_task(monkeypatch):
    # a shell command or a kernel thread now and then: 0.3 other tasks on average
    assert _decide(monkeypatch, [(1, 1), (2, 1), (1, 1)], load1=0.02) is None


def test_one_competing_job_depends_on_the_cores_left(monkeypatch):
    assert _decide(monkeypatch, [(2, 1)], n_cores=2) == "PASSIVE"  # our 2 threads and the job share 2 cores
    assert _decide(monkeypatch, [(2, 1)], n_cores=8, threads_=2) is None  # 6 cores are free
    assert _decide(monkeypatch, [(8, 1)], n_cores=8, threads_=2) == "PASSIVE"  # 7 others leave 1 core


def test_without_an_instant_reading_the_load_average_decides(monkeypatch):
    assert _decide(monkeypatch, [None], load1=0.2) is None
    assert _decide(monkeypatch, [None], load1=1.5) == "PASSIVE"

    def no_loadavg():
        raise OSError

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.openmp_wait_policy(read=lambda: None, loadavg=no_loadavg, interval=0) == "PASSIVE"


def test_a_value_you_set_wins(monkeypatch):
    def never():
        raise AssertionError("the machine must not be read when the user chose")

    for value in ("ACTIVE", "PASSIVE"):
        monkeypatch.setenv("OMP_WAIT_POLICY", value)
        assert threads.openmp_wait_policy(read=never, loadavg=never) == value
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert threads.spinning()
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert not threads.spinning()


@pytest.mark.skipif(not Path("/proc/loadavg").exists(), reason="Linux /proc only")
def test_reading_this_machine():
    running, ours = threads._read_running()
    assert running >= 1 and 1 <= ours <= len(list(Path("/proc/self/task").iterdir()))
    others = threads.other_runnable(samples=3, interval=0.001)
    assert others is not None and others >= 0


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_on_glibc():
    assert threads.keep_freed_memory() is True  # both thresholds accepted (glibc refuses out-of-range values)
    assert threads.MMAP_THRESHOLD <= 32 << 20  # glibc's maximum: a larger value would be refused
