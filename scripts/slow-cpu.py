#!/usr/bin/env python3
"""Runs a command while a busy loop takes a share of every CPU: a slower machine, on demand.

    python3 scripts/slow-cpu.py 0.45 -- ./target/release/parley-bench --federation ...

On each CPU the process may use, a child pinned to that CPU spins for DUTY of every 10 ms and
sleeps the rest, competing with the command at normal priority. BENCHMARKS.md uses it to hold
the federation benchmark at the load of this VM's slow hours (its servers near 1.3 cores at
10,000 msgs/s) on a fast hour, so that two builds can be compared under the same pressure.
"""
import os
import subprocess
import sys
import time

PERIOD = 0.010


def burn(duty):
    while True:
        start = time.perf_counter()
        end = start + duty * PERIOD
        while time.perf_counter() < end:
            pass
        time.sleep(max(0.0, PERIOD - (time.perf_counter() - start)))


def main():
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit("usage: slow-cpu.py DUTY -- command [args...]   (DUTY between 0 and 1)")
    duty = float(sys.argv[1])
    if not 0.0 <= duty <= 1.0:
        sys.exit("DUTY must be between 0 and 1")
    burners = []
    for cpu in sorted(os.sched_getaffinity(0)):
        pid = os.fork()
        if pid == 0:
            os.sched_setaffinity(0, {cpu})
            burn(duty)
        burners.append(pid)
    try:
        code = subprocess.call(sys.argv[3:])
    finally:
        for pid in burners:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    sys.exit(code)


if __name__ == "__main__":
    main()
