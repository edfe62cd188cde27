#!/usr/bin/env python3
"""CPU per second of a process, its busiest threads, and optionally a second process (a broker).

    thread-cpu.py PID [OTHER_PID] > cpu.log

Prints one line a second until PID exits: seconds since start, the other process's CPU % (-1 when
not given), PID's CPU %, and PID's five busiest threads by name (threads of one name summed), in %
of one core. Used in BENCHMARKS.md to tell which thread bounds a phase (for example the
projector's writer `tl-projector` against the tokio workers). Linux only (reads /proc).
"""

import os
import sys
import time

HZ = os.sysconf("SC_CLK_TCK")


def ticks(stat_path):
    """utime + stime of a /proc stat file, or None when it is gone."""
    try:
        with open(stat_path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def threads(pid):
    """Ticks per thread name of `pid`."""
    by_name = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return by_name
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                name = comm.read().strip()
        except OSError:
            continue
        used = ticks(f"/proc/{pid}/task/{task}/stat")
        if used is not None:
            by_name[name] = by_name.get(name, 0) + used
    return by_name


def percent(now, before):
    if now is None or before is None:
        return -1.0
    return 100.0 * (now - before) / HZ


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    pid = int(sys.argv[1])
    other = int(sys.argv[2]) if len(sys.argv) == 3 else None
    started = time.time()
    before = None
    while os.path.exists(f"/proc/{pid}"):
        now = (
            ticks(f"/proc/{other}/stat") if other else None,
            ticks(f"/proc/{pid}/stat"),
            threads(pid),
        )
        if before:
            busiest = sorted(
                ((name, percent(used, before[2].get(name, 0))) for name, used in now[2].items()),
                key=lambda item: -item[1],
            )[:5]
            print(
                f"{time.time() - started:6.1f} other {percent(now[0], before[0]):5.0f} "
                f"process {percent(now[1], before[1]):5.0f} | "
                + " ".join(f"{name}:{share:.0f}" for name, share in busiest),
                flush=True,
            )
        before = now
        time.sleep(1)


if __name__ == "__main__":
    main()
