"""Ctrl-C with a real signal: `progadv score` / `evaluate` in a subprocess get SIGINT while scoring or while writing,
and leave the previous complete output (or none) and no temporary file.

No sleeps or timings: the child announces on stdout that it reached the point to interrupt (a wrapper around one
library function prints a line, then waits for the signal), and the parent sends SIGINT only after reading it.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from reliability_helpers import one_torch_thread  # noqa: F401 - autouse
from conftest import make_trajectory

# Runs the real CLI with one function wrapped: on its first call it prints READY (and what it holds), then waits.
CHILD = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
target, argv = sys.argv[1], sys.argv[2:]

def announce(*what):
    print("READY", *what, flush=True)
    signal.pause()  # returns only by the KeyboardInterrupt that SIGINT raises
    raise SystemExit("no signal came")

if target == "scoring":
    import progadv_trl.engine as engine
    real = engine.taken_token_stats
    calls = []
    def wrapped(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # mid-way: some batches done
            announce()
        return real(*a, **k)
    engine.taken_token_stats = wrapped
else:  # "write:NAME": interrupt when the temporary file for NAME is complete, just before it is renamed
    name = target.split(":", 1)[1]
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(str(dst)) == name:
            announce(src)
        return real_replace(src, dst, *a, **k)
    os.replace = replace

from progadv_trl.cli import main
sys.exit(main(argv))
"""


def _interrupt(target, argv, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, target, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    line = "-"
    while line and not line.startswith("READY"):  # blocks until the child is where we want it (or exits)
        line = proc.stdout.readline()  # (evaluate prints its table first)
    if not line.startswith("READY"):
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"child never got there: {line!r} {out!r} {err[-3000:]}")
    held = line.split()[1:]
    if held:
        assert os.path.getsize(held[0]) > 0  # the temporary file is really there, written in full, at that moment
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)  # a safety net, not a measurement
    return proc.returncode, err, held


@pytest.fixture
def big_input(tmp_path):
    recs = [make_trajectory(i, n_turns=1 + i % 3, success=bool(i % 2), group=f"g{i // 4}", failure_step=None if i % 2 else 0)
            for i in range(48)]
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return src


def _litter(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp"))


def test_sigint_while_scoring_keeps_the_previous_output(tiny_dir, tmp_path, big_input):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "s.jsonl"
    out.write_text('{"previous": "complete run"}\n')
    argv = ["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(big_input),
            "-o", str(out), "--batch-tokens", "2048"]
    rc, err, _ = _interrupt("scoring", argv, tmp_path)
    assert rc == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert out.read_text() == '{"previous": "complete run"}\n'
    assert _litter(out_dir) == []


def test_sigint_during_the_write_leaves_no_file_and_no_temporary(tiny_dir, tmp_path, big_input):
    out = tmp_path / "out" / "s.jsonl"
    argv = ["score", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(big_input), "-o", str(out)]
    rc, err, held = _interrupt("write:s.jsonl", argv, tmp_path)
    assert rc == 130, err[-2000:]
    assert held and held[0].endswith(".tmp")  # interrupted with the whole new file written beside the target
    assert not out.exists()
    assert _litter(out.parent) == []


def test_sigint_while_writing_an_evaluation_report(tiny_dir, tmp_path, big_input):
    """Interrupted mid-report: metrics.json (whose presence means "complete") is gone, not stale; every file left is
    whole; no temporary file."""
    from progadv_trl.cli import main

    report = tmp_path / "eval"
    base = ["evaluate", "--policy", str(tiny_dir["policy"]), "--reference", str(tiny_dir["reference"]), str(big_input),
            "-o", str(report), "--n-boot", "0"]
    assert main(base) == 0  # a previous complete report
    assert (report / "metrics.json").is_file()
    rc, err, held = _interrupt("write:best_of_n.png", base + ["--seed", "1"], tmp_path)
    assert rc == 130, err[-2000:]
    assert not (report / "metrics.json").exists()
    assert _litter(report) == []
    for png in report.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")
