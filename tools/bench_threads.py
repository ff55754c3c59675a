"""Wall time of one ``vbxfx compress`` run per torch thread setting, with the load around it.

    python tools/bench_threads.py                          # resnet18, threads 1, 2 and auto
    python tools/bench_threads.py --threads 1 2 --repeat 3 --model demo

Each run is a fresh ``vbxfx compress MODEL -o <tmp>/m.onnx`` subprocess with
``OMP_NUM_THREADS`` removed from its environment; ``auto`` passes no ``--threads`` (the CLI's
default, :func:`vbxfx.cli.default_threads`). Runs alternate between the settings so that a
change in the machine's load hits all of them alike. Prints a table: setting, each run's
seconds, the median, and the 1-minute load average before each run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["run_once", "main"]


def run_once(model: str, threads: str, out_dir: str, timeout: float = 1800) -> float:
    """Seconds of one compress + export + check run (raises on a non-zero exit)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.setdefault("YOLO_OFFLINE", "1")
    cmd = [sys.executable, "-m", "vbxfx", "-q"]
    if threads != "auto":
        cmd += ["--threads", threads]
    cmd += ["compress", model, "-o", os.path.join(out_dir, "m.onnx")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> list[tuple[str, list[float], list[float]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="torchvision:resnet18")
    parser.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {t: [] for t in args.threads}
    loads: dict[str, list[float]] = {t: [] for t in args.threads}
    with tempfile.TemporaryDirectory() as out_dir:
        for _ in range(args.repeat):
            for t in args.threads:
                loads[t].append(os.getloadavg()[0])
                times[t].append(run_once(args.model, t, out_dir))
                print(f"  threads {t}: {times[t][-1]:.1f} s (load before {loads[t][-1]:.2f})",
                      file=sys.stderr, flush=True)
    print(f"vbxfx compress {args.model} -o m.onnx, {os.cpu_count()} CPUs")
    print(f"{'threads':>8}  {'runs (s)':<24}  {'median s':>8}  load before each run")
    rows = []
    for t in args.threads:
        runs = ", ".join(f"{s:.1f}" for s in times[t])
        print(f"{t:>8}  {runs:<24}  {statistics.median(times[t]):8.1f}  "
              + ", ".join(f"{v:.2f}" for v in loads[t]))
        rows.append((t, times[t], loads[t]))
    return rows


if __name__ == "__main__":
    main()
