"""Choosing a kernel by timing every candidate form of a layer on that layer's own inputs.

Kernels that win on paper lose on real shapes (torch's weight-only int8 ran slower than fp32 at batch 1
here), so a lowering pass never trusts a kernel: it times the candidates interleaved (each round calls
every candidate once, so a slow spell of the machine hits all of them alike), takes medians, and keeps
the baseline unless another form is faster by `margin`.

`MeasuredLayer` is the one home of what a lowered layer with several kernels needs around that choice:
its table of kernels (`Kernel`: why it cannot run a layer, how to build it), the candidates it times,
the recorded choice (kept in files through `config()`), building the chosen kernel at first use (and
naming a kernel the machine cannot run), describing the choice for summaries, and `remeasure` (choosing
again on another machine or batch size).
"""
from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError, PreconditionError


@dataclass(frozen=True)
class KernelChoice:
    """The kernel a layer runs, and the median milliseconds per call measured for each candidate."""

    kernel: str
    times_ms: Mapping[str, float]

    @property
    def ms(self) -> float:
        return self.times_ms[self.kernel]

    def speedup_over(self, baseline: str) -> float:
        return self.times_ms[baseline] / self.times_ms[self.kernel]

    def as_stats(self) -> dict[str, Any]:
        """Plain data for pass statistics, history and files."""
        return {"kernel": self.kernel, "times_ms": {k: round(v, 6) for k, v in self.times_ms.items()}}

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> "KernelChoice":
        times = {str(k): float(v) for k, v in stats["times_ms"].items()}
        if stats["kernel"] not in times:
            raise ConfigError(f"kernel choice names {stats['kernel']!r}, which was not measured ({sorted(times)})")
        return cls(str(stats["kernel"]), times)


def median_ms(fn: Callable[..., Any], args: tuple, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of `fn(*args)` without autograd."""
    return choose_kernel({"only": fn}, args, repeats=repeats, warmup=warmup, baseline="only").ms


CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # CPU seconds of the calling thread: on a shared machine, time the process spends preempted is not
    # counted (single-threaded kernels only: work on other threads is not counted either)
    "thread": time.thread_time,
}


def choose_kernel(candidates: Mapping[str, Callable[..., Any]], args: tuple, *, baseline: str,
                  repeats: int = 7, warmup: int = 2, margin: float = 1.05, clock: str = "wall",
                  references: Sequence[str] = ()) -> KernelChoice:
    """Time each candidate on `args` (interleaved rounds, medians) and pick the fastest; the baseline
    stays unless a candidate is at least `margin` times faster, so noise never swaps kernels. `clock`
    is "wall" (elapsed time) or "thread" (the calling thread's CPU time, see CLOCKS). `references` are
    timed beside the others (their times recorded) but never chosen: the float layer a lowered layer
    replaced, whose speed the ratios are quoted against."""
    if baseline not in candidates or baseline in references:
        raise ConfigError(f"baseline kernel {baseline!r} is not among the choosable candidates "
                          f"{sorted(set(candidates) - set(references))}")
    if clock not in CLOCKS:
        raise ConfigError(f"choose_kernel: clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if repeats < 1 or warmup < 0 or margin < 1.0:
        raise ConfigError(f"choose_kernel needs repeats >= 1, warmup >= 0 and margin >= 1 "
                          f"(got {repeats}, {warmup}, {margin})")
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.no_grad():
        for round_ in range(warmup + repeats):
            for name, fn in candidates.items():
                start = now()
                fn(*args)
                if round_ >= warmup:
                    samples[name].append((now() - start) * 1e3)
    times = {name: statistics.median(values) for name, values in samples.items()}
    return KernelChoice(_pick(times, baseline, margin, references), times)


def _pick(times: Mapping[str, float], baseline: str, margin: float, references: Sequence[str]) -> str:
    fastest = min((name for name in times if name not in references), key=times.__getitem__)
    return fastest if times[fastest] * margin <= times[baseline] else baseline


EVICT_BYTES = 64 << 20  # more than the last-level cache of the machines here


def measure(candidates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]], rows: torch.Tensor, *, baseline: str,
            repeats: int, margin: float, cold: bool, references: Sequence[str] = ()) -> KernelChoice:
    """`choose_kernel` on one input. With `cold`, every timed call first writes a buffer larger than the
    caches, as the other layers of a model do between two calls of one layer (decoding: each layer's
    weights come from memory, where fewer bytes win); the writing's own median is subtracted from every
    candidate's, and the margin applies to what is left."""
    if not cold:
        return choose_kernel(candidates, (rows,), baseline=baseline, repeats=repeats, margin=margin,
                             references=references)
    scratch = torch.zeros(EVICT_BYTES // 4)

    def evicting(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: (scratch.add_(1.0), fn(t))[1]
    timed = {name: evicting(fn) for name, fn in candidates.items()} | {"evict": lambda t: scratch.add_(1.0)}
    raw = choose_kernel(timed, (rows,), baseline=baseline, repeats=repeats, margin=margin,
                        references=(*references, "evict")).times_ms
    times = {name: max(raw[name] - raw["evict"], 1e-6) for name in candidates}
    return KernelChoice(_pick(times, baseline, margin, references), times)


# ---- lowered layers whose kernel is chosen by measurement ----------------------------------------

Rows = Callable[[torch.Tensor], torch.Tensor]  # float32 [rows, in_features] -> [rows, out_features]


@dataclass(frozen=True)
class Kernel:
    """A way to run a MeasuredLayer: `refusal(m)` says why it cannot (None: it can), `build(m)` returns
    the function computing the layer on 2-D float inputs (bias included)."""

    name: str
    refusal: Callable[[Any], str | None]
    build: Callable[[Any], Rows]


REFERENCE = "fp32"  # the float layer the lowered one replaced: timed beside the kernels, never run by them
CHUNK_ELEMENTS = 1 << 20  # the float kernel dequantizes at most this many weights (4 MB) at a time


def _float_on_the_fly(module: "MeasuredLayer") -> Rows:
    """The float layer without a float weight held between calls: each call dequantizes slices of output
    channels (CHUNK_ELEMENTS weights at most) and multiplies them with torch's matmul."""
    step = max(1, CHUNK_ELEMENTS // module.in_features)

    def run(x: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, module.out_features, step):
            stop = min(start + step, module.out_features)
            bias = None if module.bias is None else module.bias[start:stop]
            parts.append(torch.nn.functional.linear(x, module.dequantize_rows(start, stop), bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return run


FLOAT = Kernel("float", lambda module: None, _float_on_the_fly)


class MeasuredLayer(nn.Module):
    """Base of lowered linear layers that run one of the kernels of their class's table `KERNELS`,
    chosen by timing each on the layer's real input (`choose`) or set by hand / from a file.

    Subclasses define `KERNELS` (name -> Kernel, `BASELINE` among them: it runs everywhere),
    `in_features`, `out_features`, a `bias` buffer (or None), `dequantize_rows(start, stop)` (the float
    weight of those output channels), and call `_init_kernel` in their constructor. A subclass's
    `config()` includes `choice_config()`, so files keep the kernel and its measured times.
    """

    KERNELS: ClassVar[Mapping[str, Kernel]] = {"float": FLOAT}
    BASELINE: ClassVar[str] = "float"

    def _init_kernel(self, kernel: str, times_ms: Mapping[str, float] | None) -> None:
        self.kernel = kernel
        self.kernel_choice = None if times_ms is None else KernelChoice.from_stats({"kernel": kernel,
                                                                                    "times_ms": times_ms})
        self._run: Rows | None = None  # the chosen kernel, built at first use (never stored, never saved)
        self._where = type(self).__name__

    @property
    def times_ms(self) -> dict[str, float] | None:
        return None if self.kernel_choice is None else dict(self.kernel_choice.times_ms)

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The float weight [out, in]."""
        return self.dequantize_rows(0, self.out_features)

    def dense_module(self) -> nn.Module:
        """An nn.Linear of the dequantized weight and the bias (what `fxcompress.decode` puts in this one's place;
        a layer whose kernel quantizes its input at run time computes without that rounding there)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(self.dequantize())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def refusals(self, kernels: Sequence[str]) -> dict[str, str]:
        """Why each of `kernels` cannot run this layer here (kernels that can are absent)."""
        return {name: reason for name in kernels if (reason := self.KERNELS[name].refusal(self)) is not None}

    def candidates(self, kernels: Sequence[str]) -> list[str]:
        """The baseline and every kernel of `kernels` that can run this layer here."""
        refused = self.refusals(kernels)
        return [self.BASELINE, *(k for k in kernels if k != self.BASELINE and k not in refused)]

    def choose(self, x: torch.Tensor, kernels: Sequence[str], *, repeats: int = 7, margin: float = 1.05,
               cold: bool = False) -> KernelChoice:
        """Time the float layer (REFERENCE: a temporary float weight, dropped after), the baseline and
        every kernel of `kernels` that fits on input `x`; set the fastest (the baseline unless a kernel
        beats it by `margin`) as this layer's kernel. Only the chosen kernel's form is kept."""
        rows = x.detach().reshape(-1, self.in_features).float().contiguous()
        built = {name: self.KERNELS[name].build(self) for name in self.candidates(kernels)}
        weight = self.dequantize()
        timed = {REFERENCE: lambda t: torch.nn.functional.linear(t, weight, self.bias), **built}
        choice = measure(timed, rows, baseline=self.BASELINE, repeats=repeats, margin=margin, cold=cold,
                         references=(REFERENCE,))
        self.kernel, self.kernel_choice, self._run = choice.kernel, choice, built[choice.kernel]
        return choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._run is None:
            refusal = self.KERNELS[self.kernel].refusal(self)
            if refusal is not None:  # a file lowered on another machine: say so rather than crash in torch
                raise PreconditionError(f"{self._where}: kernel {self.kernel!r} cannot run here ({refusal}); "
                                        f"choose again with fxcompress.kernels.timing.remeasure(model, inputs)")
            self._run = self.KERNELS[self.kernel].build(self)
        rows = x.reshape(-1, self.in_features)
        return self._run(rows.float().contiguous()).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn, recurse=True):  # moved or converted buffers: the run-time form is remade
        self._run = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles rebuild the run-time form from the buffers
        state = dict(self.__dict__)
        state["_run"] = None
        return state

    def held_bytes(self) -> int:
        """Bytes of the stored tensors (the run-time form of the C and float kernels adds none)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def choice_config(self) -> dict[str, Any]:
        """The kernel and its measured times as constructor arguments (files keep the choice)."""
        return {"kernel": self.kernel, "times_ms": self.times_ms}

    def choice_repr(self) -> str:
        chosen = "" if self.kernel_choice is None else f", {self.kernel_choice.ms:.3f} ms"
        return f"kernel={self.kernel}{chosen}"

    def describe(self) -> dict[str, Any]:
        """The kernel run and its measured milliseconds per call, for summaries (None: set by hand)."""
        return {"kernel": self.kernel, "latency_ms": None if self.kernel_choice is None else self.kernel_choice.ms}

    def choice_stats(self, kernels: Sequence[str]) -> dict[str, Any]:
        """Pass statistics of the choice: kernel, times, speed-up over the float layer, kernels refused."""
        stats = {"kernel": self.kernel, "times_ms": self.times_ms, "speedup": None, "refused": self.refusals(kernels)}
        if self.kernel_choice is not None:
            stats |= self.kernel_choice.as_stats()
            if REFERENCE in self.kernel_choice.times_ms:
                stats["speedup"] = round(self.kernel_choice.speedup_over(REFERENCE), 4)
        return stats


@runtime_checkable
class Remeasurable(Protocol):
    """A lowered layer outside MeasuredLayer whose kernel `remeasure` can choose again (the native integer
    layer: its kernels read and write codes, not float rows): its table of kernel names and `choose`."""

    KERNELS: ClassVar[Sequence[str]]

    def choose(self, x: torch.Tensor, kernels: Sequence[str], *, repeats: int = 7, margin: float = 1.05,
               cold: bool = False) -> KernelChoice: ...


def remeasure(model: nn.Module, example_inputs: tuple, kernels: Mapping[type, Sequence[str]] | None = None, *,
              repeats: int = 7, margin: float = 1.05, cold: bool = False) -> dict[str, dict[str, Any]]:
    """Time again and choose again the kernel of every MeasuredLayer (and Remeasurable layer: the native
    integer layers) of `model` on the input it receives from `example_inputs` (a model loaded on another
    machine, or to run at another batch size). `kernels`: the kernels allowed per layer class (default:
    every kernel of its table). Returns {module path: {"kernel", "times_ms"}}."""
    if not isinstance(example_inputs, tuple):
        raise ConfigError(f"remeasure: example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    layers = {path: m for path, m in model.named_modules() if isinstance(m, (MeasuredLayer, Remeasurable))}
    if not layers:
        raise ConfigError("remeasure: the model holds no layer with a measured kernel (lower it with "
                          "LowerWeightOnly, LowerDynamicInt8 or LowerToInteger's native backend first)")
    chosen: dict[str, dict[str, Any]] = {}

    def choose_here(layer: nn.Module, args: tuple, path: str) -> None:
        # chosen as the run reaches it, so it runs its new kernel at once: a kernel this machine lacks (a file's
        # C kernel where no compiler is) is left before the layer has to run it, and each layer is timed on
        # what the layers chosen before it give it
        if path not in chosen:
            allowed = (kernels or {}).get(type(layer), tuple(layer.KERNELS))
            residual = {"residual": args[1]} if len(args) > 1 else {}  # a convolution that adds a residual
            chosen[path] = layer.choose(args[0], allowed, repeats=repeats, margin=margin, cold=cold,
                                        **residual).as_stats()

    run_reaching(model, layers, choose_here, example_inputs)
    return {path: chosen[path] for path in layers if path in chosen}


def layer_inputs(model: nn.Module, layers: Mapping[str, nn.Module], example_inputs: tuple) -> dict[str, torch.Tensor]:
    """The input each of `layers` receives in one run of `model` (first call of each)."""
    inputs: dict[str, torch.Tensor] = {}

    def record(_layer: nn.Module, args: tuple, path: str) -> None:
        inputs.setdefault(path, args[0])

    run_reaching(model, layers, record, example_inputs)
    return inputs


def run_reaching(model: nn.Module, layers: Mapping[str, nn.Module], hook: Callable[..., None],
                 example_inputs: tuple) -> None:
    """One run of `model` on `example_inputs` without gradients, `hook(layer, args, path=...)` called as the run
    reaches each of `layers` (before the layer runs)."""
    handles = [m.register_forward_pre_hook(functools.partial(hook, path=path)) for path, m in layers.items()]
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
