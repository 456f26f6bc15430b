"""Contention: one ``anofpdm segment`` beside CPU hogs, its slowdown against the share of CPU it had.

A machine shared with other work gives a run only part of its CPUs. A well-behaved run then slows
down in proportion: with half the CPU it takes twice as long. Too many compute threads do worse,
because each parallel region waits for threads that are descheduled (the issue that led to this
script measured one volume at over 19 minutes instead of about 45 s at a load of 4x the cores).

For each thread setting the same phantom volume is segmented idle, then beside ``--hogs`` busy-loop
processes. For each run the script reads the child's CPU time (``getrusage``), so that:

* ``share`` = (CPU seconds / wall seconds under load) / (the same idle): the fraction of its idle
  CPU rate the run got under load;
* ``slowdown`` = wall under load / wall idle;
* ``excess`` = slowdown x share: 1 means proportional (the target is <= 1, up to noise); above 1 the run
  lost more time than the CPU it was denied explains (threads waiting for each other).

    python benchmarks/contention.py --hogs 8 --threads auto,1,2 --steps 100 --stride 10
    python benchmarks/contention.py --hogs 2 --threads auto --steps 20 --stride 10   # smoke run, ~1 min

``--concurrent 1,2,4`` measures instead K ``segment`` processes of the same volume started together (each its
own output folder), after one run alone: per process the same ``share``, ``slowdown`` and ``excess`` (the
target of issue 25: excess <= 1.25 at 2 and 4 processes).

    python benchmarks/contention.py --concurrent 1,2,4 --threads auto

The volume is one BraTS-layout phantom patient (seed 3); the model is ``bundled`` unless ``--model``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def hog() -> None:
    """Burn one CPU until killed."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2147483648


def segment_argv(model: str, case: Path, out: Path, threads: str, steps: int | None, stride: int | None) -> list[str]:
    argv = [sys.executable, "-m", "pipelines.cli", "segment", "-m", model, "-i", str(case), "-o", str(out), "--device", "cpu"]
    if threads != "auto":
        argv += ["--threads", threads]
    if steps:
        argv += ["--steps", str(steps)]
    if stride:
        argv += ["--stride", str(stride)]
    return argv


def run_together(argvs: list[list[str]]) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds) of each command, all started together (each child's own rusage, ``os.wait4``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    start = time.perf_counter()
    children = {}
    for argv in argvs:
        child = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        children[child.pid] = child
    results = {}
    while len(results) < len(argvs):
        pid, status, usage = os.wait4(-1, 0)
        if pid in children:
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"a segment process failed (exit {os.waitstatus_to_exitcode(status)})")
            children[pid].returncode = 0
            results[pid] = (time.perf_counter() - start, usage.ru_utime + usage.ru_stime)
    return [results[pid] for pid in children]


def timed_segment(model: str, case: Path, out: Path, threads: str, steps: int | None, stride: int | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``segment`` run in a child process."""
    return run_together([segment_argv(model, case, out, threads, steps, stride)])[0]


def against_idle(wall: float, cpu: float, idle_wall: float, idle_cpu: float) -> tuple[float, float, float]:
    """``(share, slowdown, excess)`` of a run of ``wall`` / ``cpu`` seconds against the same run idle (module docstring)."""
    share, slowdown = (cpu / wall) / (idle_cpu / idle_wall), wall / idle_wall
    return share, slowdown, share * slowdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--hogs", type=int, default=4 * (os.cpu_count() or 1), help="busy-loop processes (default 4x the cores)")
    parser.add_argument("--threads", default="auto,1", help="comma-separated --threads settings; auto: the default")
    parser.add_argument("--steps", type=int, default=None, help="override N (default: calibrated) to keep runs short")
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--concurrent", default=None, help="comma-separated counts of segment processes run together "
                        "(e.g. 1,2,4) instead of the hogs")  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON file for the results (e.g. benchmarks/results/contention.json)")
    args = parser.parse_args()

    from anofpdm_monai.threads import available_cpus
    from data_prep.phantom import generate_cohort

    work = Path(tempfile.mkdtemp(prefix="anofpdm_contention_"))
    (case_id,) = generate_cohort(work / "raw", "brats", 1, healthy_fraction=0.0, seed=3, progress=False)
    case = work / "raw" / case_id
    rows = {}
    if args.concurrent:
        for threads in [t.strip() for t in args.threads.split(",") if t.strip()]:
            idle_wall, idle_cpu = timed_segment(args.model, case, work / "idle", threads, args.steps, args.stride)
            print(f"--threads {threads}: alone {idle_wall:.1f} s ({idle_cpu:.1f} CPU-s)", flush=True)
            for count in [int(c) for c in args.concurrent.split(",")]:
                runs = run_together([segment_argv(args.model, case, work / f"concurrent{count}_{i}", threads, args.steps, args.stride)
                                     for i in range(count)])  # fmt: skip
                shares, slowdowns, excess = zip(*(against_idle(wall, cpu, idle_wall, idle_cpu) for wall, cpu in runs))
                rows[f"{count} x --threads {threads}"] = {
                    "alone_s": idle_wall, "wall_s": max(w for w, _ in runs), "share": sum(shares) / count,
                    "slowdown": max(slowdowns), "excess": max(excess), "processes": [list(r) for r in runs],
                }  # fmt: skip
                print(f"{count} processes: wall {max(w for w, _ in runs):.1f} s, mean CPU share {sum(shares) / count:.2f}, "
                      f"worst slowdown {max(slowdowns):.2f}x, worst excess {max(excess):.2f}", flush=True)  # fmt: skip
        print(markdown_table(rows, ["alone_s", "wall_s", "share", "slowdown", "excess"], first="processes"))
        if args.out:
            write_json(args.out, {"concurrent": args.concurrent, "available_cpus": available_cpus(), "steps": args.steps,
                                  "stride": args.stride, "model": args.model, "rows": rows})  # fmt: skip
        return
    for threads in [t.strip() for t in args.threads.split(",") if t.strip()]:
        idle_wall, idle_cpu = timed_segment(args.model, case, work / "idle", threads, args.steps, args.stride)
        hogs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(args.hogs)]
        for process in hogs:
            process.start()
        try:
            load_wall, load_cpu = timed_segment(args.model, case, work / "load", threads, args.steps, args.stride)
        finally:
            for process in hogs:
                process.kill()
                process.join()
        share, slowdown, excess = against_idle(load_wall, load_cpu, idle_wall, idle_cpu)
        rows[f"--threads {threads}"] = {
            "idle_s": idle_wall, "load_s": load_wall, "idle_cpu_s": idle_cpu, "load_cpu_s": load_cpu,
            "share": share, "slowdown": slowdown, "excess": excess,
        }  # fmt: skip
        print(f"--threads {threads}: idle {idle_wall:.1f} s, beside {args.hogs} hogs {load_wall:.1f} s "
              f"(slowdown {slowdown:.2f}x, CPU share {share:.2f}, excess {excess:.2f})", flush=True)  # fmt: skip
    print(markdown_table(rows, ["idle_s", "load_s", "share", "slowdown", "excess"], first="setting"))
    if args.out:
        write_json(args.out, {"hogs": args.hogs, "available_cpus": available_cpus(), "steps": args.steps,
                              "stride": args.stride, "model": args.model, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
