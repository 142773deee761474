"""Which OpenMP wait settings take effect, and what each costs, on the demo's model (progadv_trl/cpu.py).

    python benchmarks/openmp_probe.py                 # as the machine is now
    python benchmarks/openmp_probe.py --burners 2     # beside two CPU-bound jobs (busy loops, started here)

Each mode runs in a fresh process: decode steps of the demo's tiny Qwen2 (hidden 96, 3 layers, vocabulary 600, a
batch of 64 rows, one token each) for --seconds, reporting steps per second and the process's CPU seconds per step.
Modes: OMP_WAIT_POLICY unset (spin) or PASSIVE, set before `import torch`; PASSIVE set after the import (before the
first op, and after it): whether the runtime still reads it; one torch thread (`torch.set_num_threads(1)`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

MODES = [("env_before", "unset"), ("env_before", "PASSIVE"), ("env_after_import", "PASSIVE"),
         ("env_after_first_op", "PASSIVE"), ("one_thread", "unset")]  # fmt: skip


def child(mode: str, policy: str, seconds: float) -> None:
    if mode == "env_before" and policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = policy
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if mode == "env_after_import":
        os.environ["OMP_WAIT_POLICY"] = policy
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=600, hidden_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=192)  # fmt: skip
    m = Qwen2ForCausalLM(cfg).eval()
    x = torch.randint(0, 600, (64, 1))
    with torch.no_grad():
        m(input_ids=x)
        if mode == "env_after_first_op":
            os.environ["OMP_WAIT_POLICY"] = policy
        if mode == "one_thread":
            torch.set_num_threads(1)
        t, c, n = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t < seconds:
            m(input_ids=x)
            n += 1
        dt, dc = time.perf_counter() - t, time.process_time() - c
    print(f"{mode:19s} {policy:8s} {n / dt:9.1f} steps/s  {1e3 * dc / n:7.2f} ms CPU/step  threads {torch.get_num_threads()}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--burners", type=int, default=0, help="CPU-bound busy loops to run beside the probe")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(*a.child, a.seconds)
        return 0
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.burners)]
    try:
        print(f"/proc/loadavg: {open('/proc/loadavg').read().strip()}; {a.burners} busy loops beside")
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        for mode, policy in MODES:
            subprocess.run([sys.executable, __file__, "--child", mode, policy, "--seconds", str(a.seconds)], env=env,
                           check=True, stderr=subprocess.DEVNULL)  # fmt: skip
    finally:
        for b in burners:
            b.kill()
            b.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
