"""The default run (or `bench --tiny`, or the unit tests) alone, then sharing the machine with busy processes: wall
times and their ratio.

    python scripts/bench_shared_cpu.py                     # the whole default run (750 steps), alone and beside 1 busy process
    python scripts/bench_shared_cpu.py --steps 60 --busy 1 # a shorter run (validation still runs once, at the end)
    python scripts/bench_shared_cpu.py --machine-threads   # as before: torch's threads follow the machine's core count
    python scripts/bench_shared_cpu.py --what bench-tiny   # python -m ov_train.bench --tiny
    python scripts/bench_shared_cpu.py --what unit-tests   # python -m pytest -q -m "not slow"

A fair share of the machine beside one busy process is about 2x slower on 2 cores (goal: at most 2.5x). The load
average before each run is printed: other jobs on the machine count too, so state it with the figures.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"
# torch.set_num_threads made a no-op: the run keeps torch's default (the machine's cores), the behaviour before
# threads followed the CPUs the process may use.
MACHINE_THREADS = ("import sys, torch; torch.set_num_threads = lambda n: None; sys.argv = ['ov-train', *sys.argv[1:]];"
                   " from ov_train.cli import main; main()")


COMMANDS = {"bench-tiny": [sys.executable, "-m", "ov_train.bench", "--tiny"],
            "unit-tests": [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider"]}


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return time.perf_counter() - start


def run(overrides: list[str], machine_threads: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="ov_bench_shared_") as run_dir:
        args = [f"hydra.run.dir={run_dir}", "logger=none", "trainer.enable_progress_bar=false", *overrides]
        cmd = [sys.executable, "-c", MACHINE_THREADS, *args] if machine_threads else [sys.executable, "train.py", *args]
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"the run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        choice = next((line.split(" - ", 1)[-1] for line in done.stdout.splitlines() + done.stderr.splitlines()
                       if "usable by this process" in line), "")
        print(f"  {choice}" + (f" [threads not set: torch's default, {os.cpu_count()}]" if machine_threads else ""),
              flush=True)
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default: the default run's)")
    parser.add_argument("--busy", type=int, default=1, help="busy processes beside the shared run (default 1)")
    parser.add_argument("--machine-threads", action="store_true", help="torch threads by the machine's core count")
    parser.add_argument("--what", choices=("train", *COMMANDS), default="train", help="what is timed (default: train)")
    parser.add_argument("overrides", nargs="*", help="more ov-train overrides")
    args = parser.parse_args()
    overrides = ["stage=onevision", *([f"trainer.max_steps={args.steps}"] if args.steps else []), *args.overrides]
    if args.what == "train":
        run(["trainer.max_steps=1", "trainer.limit_val_batches=0", "export=false"], False)  # tokenizer and data built once
        measure = lambda: run(overrides, args.machine_threads)
    else:
        measure = lambda: timed(COMMANDS[args.what])

    print(f"alone (load average {os.getloadavg()[0]:.1f}):", flush=True)
    alone = measure()
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        time.sleep(2)
        print(f"beside {args.busy} busy process(es) (load average {os.getloadavg()[0]:.1f}):", flush=True)
        shared = measure()
    finally:
        for process in busy:
            process.kill()
            process.wait()
    what = {"train": "default run" + (" (machine threads)" if args.machine_threads else "")}.get(args.what, args.what)
    print(f"{what}: alone {alone:.0f} s, shared {shared:.0f} s, ratio {shared / alone:.2f} (goal <= 2.5)")


if __name__ == "__main__":
    main()
