"""CPU seconds of the HTML report's pictures for a CLI-sized model, per figure.

The model is what `fxcompress run --quick` reports on: LeNet-300-100 (784 inputs), 90% pruned, 5-bit
k-means, encoded (and a layer of 1.2 million weights on one centroid, whose count axes need an offset
text). One thread; the kinds of picture are interleaved, each drawn --repeats times, and
medians are printed. Histograms and the bars are drawn two ways in the same run: on the kept figure
(the report's way) and on a new figure each time with matplotlib placing the titles (the way before
the kept figures); the ratio is kept / new. The whole write_report is timed too, and matplotlib's import
once (it is paid once per process).

    python benchmarks/bench_report.py [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(1)


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    start = time.process_time()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    print(f"matplotlib import: {time.process_time() - start:.3f} s CPU (once per process)")

    import fxcompress
    from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
    from fxcompress.report import LayerWeights, figures, layer_weights, write_report
    from fxcompress.zoo import LeNet300100

    torch.manual_seed(0)
    x = torch.randn(1, 784)
    fake_quant = fxcompress.compile(LeNet300100().eval(), [InsertMasks(sparsity=0.9),
                                                           InsertFakeQuant(bits=5, method="kmeans")], (x,))
    encoded = fxcompress.compile(fake_quant, [LowerToEncoded()], (x,))
    rows = fxcompress.summary(encoded, (x,)).rows
    layers = layer_weights(encoded, reference=fake_quant)
    many = torch.full((1_200_000,), 0.5)  # a layer whose count axes need an offset text ("1e6")
    layers.append(LayerWeights("big", many, many, torch.tensor([0.5])))
    pin = figures._pin_titles

    def new_figure(kind, draw, *data):  # the way before: a new figure, matplotlib placing the titles
        kept = getattr(figures._SPARE, kind, None)
        setattr(figures._SPARE, kind, None)
        figures._pin_titles = lambda fig: False
        try:
            draw(*data)
        finally:
            figures._pin_titles = pin
            setattr(figures._SPARE, kind, kept)

    jobs = {"bars kept": lambda: figures.bytes_and_sparsity(rows),
            "bars new": lambda: new_figure("bars", figures.bytes_and_sparsity, rows)}
    for w in layers:
        jobs[f"hist {w.name} kept"] = lambda w=w: figures.histogram(w)
        jobs[f"hist {w.name} new"] = lambda w=w: new_figure("histogram", figures.histogram, w)
    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "report.html"
        report = {"reference": fake_quant, "example_inputs": (x,)}
        jobs["write_report"] = lambda: write_report(encoded, page, **report)
        for job in jobs.values():  # warm: fonts, caches, the kept figure
            job()
        seconds = {name: [] for name in jobs}
        for _ in range(args.repeats):
            for name, job in jobs.items():
                seconds[name].append(_cpu(job))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{'figure':28s} {'CPU s (median)':>14s}")
    for name, value in median.items():
        print(f"{name:28s} {value:14.3f}")
    for label, key in [("bars", "bars"), *((f"histogram {w.name}", f"hist {w.name}") for w in layers)]:
        print(f"{label}: kept / new figure = {median[f'{key} kept'] / median[f'{key} new']:.2f}")


if __name__ == "__main__":
    main()
