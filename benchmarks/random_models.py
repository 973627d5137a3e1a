"""Long-mode property run over seeded random models: every pass and property on N graphs.

    python benchmarks/random_models.py --graphs 500 [--start 0] [--residual-blocks]

Prints, per pass and per property, how many graphs ended in each outcome ("verified", a typed
refusal, a crash inside a pass that compile wrapped, a violated property), the first seed of every
outcome other than "verified" (to reproduce: `random_model(seed)` in tests/randmodels.py, with
`residual_blocks=True` after `--residual-blocks`, which grows ResNet blocks among the image ops), and time.
"""
import argparse
import collections
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the generator lives with the tests
from randmodels import PROPERTIES, check_pass, outcome, pass_pipelines, random_model  # noqa: E402


def tally(seeds: range, checks: dict[str, Callable], make: Callable = random_model
          ) -> tuple[dict, dict, collections.Counter]:
    """Run every check on the model `make(seed)` gives for each seed: per label, the count of each outcome, the
    first seed of each (label, outcome), and the seconds spent."""
    counts = {label: collections.Counter() for label in checks}
    first_seed, seconds = {}, collections.Counter()
    for seed in seeds:
        model, inputs = make(seed)
        for label, check in checks.items():
            start = time.perf_counter()
            result = outcome(check, model, inputs, seed)
            seconds[label] += time.perf_counter() - start
            counts[label][result] += 1
            first_seed.setdefault((label, result), seed)
    return counts, first_seed, seconds


def print_table(title: str, column: str, seeds: range, counts: dict, first_seed: dict,
                seconds: collections.Counter) -> None:
    print(f"{title}, seeds {seeds.start}..{seeds.stop - 1}, torch {torch.__version__}, 1 thread\n")
    print(f"| {column} | outcome | graphs | first seed | ms per graph |")
    print("|---|---|---:|---:|---:|")
    for label, outcomes in counts.items():
        for result, n in sorted(outcomes.items(), key=lambda item: -item[1]):
            seed = "" if result == "verified" else first_seed[label, result]
            print(f"| {label} | {result} | {n} | {seed} | {1000 * seconds[label] / len(seeds):.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=int, default=200)
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--residual-blocks", action="store_true", help="grow ResNet blocks among the image ops")
    args = parser.parse_args()
    torch.set_num_threads(1)
    checks = {name: (lambda name: lambda m, x, s: check_pass(name, m, x, s))(name) for name in pass_pipelines()}
    checks.update(PROPERTIES)
    seeds = range(args.start, args.start + args.graphs)
    make = functools.partial(random_model, residual_blocks=args.residual_blocks)
    blocks = ", residual blocks" if args.residual_blocks else ""
    print_table(f"{args.graphs} random models{blocks}", "pass / property", seeds, *tally(seeds, checks, make))


if __name__ == "__main__":
    main()
