"""The main benchmark job: ss2d and attention cost versus resolution on whatever device is here.

Runs the sweeps of bench_ss2d.py and bench_attention.py (the GPU ones on a GPU, the small CPU
ones otherwise), writes ss2d.json / .md and attention.json / .md under --out and prints a short
table. The selective-scan and cross-scan benchmarks run on their own (bench/README.md).

    python bench/run.py [--device auto|cpu|cuda] [--quick] [--out build/bench-results]
"""

from __future__ import annotations

import argparse
import time

import bench_attention
import bench_ss2d
import harness


def main(argv=None):
    args = harness.add_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])
                            ).parse_args(argv)
    device = harness.resolve_device(args.device, args.threads)
    start = time.perf_counter()
    rows = []
    for name, module in (("ss2d", bench_ss2d), ("attention", bench_attention)):
        rows += harness.run_benchmark(name, module.cases(device, args.quick), module.NOTES, args,
                                      device, show=False)
    print(harness.short_table(rows))
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f} s; full tables in {args.out}")


if __name__ == "__main__":
    main()
