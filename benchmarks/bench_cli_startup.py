"""CPU seconds of fresh `fxcompress` processes: what a command costs from the interpreter's start to its exit.

Each case is a pair run in the same session, interleaved, --repeats times each, medians printed with their
ratio (ours / baseline):

- `inspect` and `run deep_compression_lenet300 --check --quick` as the command line runs them (main()
  without argv freezes the collector's view of the imported heap), against the same command given its argv
  (main(argv): the collector as it was, the way before);
- loading digits (`load_digits()`: scikit-learn's file read here, the split from cached indices) against
  scikit-learn's own loader and train_test_split (the way before: imports scipy and most of scikit-learn);
- for scale, `import torch` alone.

One thread in every process (OMP_NUM_THREADS=1); CPU seconds are the child's user + system time.

    python benchmarks/bench_cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_SAVE = """
import sys, torch, fxcompress
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import LeNet300100
x = torch.rand(4, 1, 8, 8)
gm = fxcompress.compile(LeNet300100(in_features=64).eval(), [InsertMasks(sparsity=0.8, scope="global"),
                        InsertFakeQuant(bits=4)], example_inputs=(x,))
fxcompress.save(fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,)), sys.argv[1])
"""
_WITH_ARGV = "import sys; from fxcompress.cli import main; sys.exit(main(sys.argv[1:]))"
_SKLEARN_DIGITS = """
import numpy as np, torch
from fxcompress.datasets import Dataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
bunch = load_digits()
x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
y = bunch.target.astype(np.int64)
train_test_split(x, y, test_size=360, stratify=y, random_state=0)
"""


def _cpu(cmd: list[str], cwd: str, env: dict) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _cases(py: str, model: str) -> dict[str, tuple[list[str], list[str] | None]]:
    """name -> (our command, the baseline's or None)."""
    run = ["run", "deep_compression_lenet300", "--check", "--quick"]
    return {
        "inspect": ([py, "-m", "fxcompress", "inspect", model], [py, "-c", _WITH_ARGV, "inspect", model]),
        "run --check --quick": ([py, "-m", "fxcompress", *run], [py, "-c", _WITH_ARGV, *run]),
        "load_digits()": ([py, "-c", "from fxcompress.datasets import load_digits; load_digits()"],
                          [py, "-c", _SKLEARN_DIGITS]),
        "import torch": ([py, "-c", "import torch"], None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as work:
        model = str(Path(work, "lenet.fxc"))
        subprocess.run([sys.executable, "-c", _SAVE, model], check=True, env=env)
        cases = _cases(sys.executable, model)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.repeats):
            for name, (ours, baseline) in cases.items():
                times.setdefault((name, "ours"), []).append(_cpu(ours, work, env))
                if baseline is not None:
                    times.setdefault((name, "baseline"), []).append(_cpu(baseline, work, env))
    print(f"{'process':<22}{'ours s':>9}{'before s':>10}{'ratio':>8}   (CPU, medians of {args.repeats})")
    for name, (_, baseline) in cases.items():
        ours = statistics.median(times[(name, "ours")])
        if baseline is None:
            print(f"{name:<22}{ours:>9.2f}")
            continue
        before = statistics.median(times[(name, "baseline")])
        print(f"{name:<22}{ours:>9.2f}{before:>10.2f}{ours / before:>8.2f}")


if __name__ == "__main__":
    main()
