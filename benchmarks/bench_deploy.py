"""Deployment speed: what compression buys at inference time, every row beside its peers in one run.

For each model, thread count (one, and all of torch's) and batch size (1 and 32), these forms of one
model are timed in interleaved rounds (each round runs every form once, in a rotating order; the
median over rounds is reported, with its ratio to fp32 eager of the same run: above 1 is faster):

- fp32 eager: the model as built;
- fp32 folded: FoldBatchNorm, channels-last for convolutional models;
- torch.ao FX int8: prepare_fx / convert_fx with the x86 backend's default qconfig, and torch.ao
  dynamic: `quantize_dynamic` of the linear layers (both deprecated in torch but still importable;
  measured while they are);
- torchao int8 dynamic / weight-only: `quantize_` with Int8DynamicActivationInt8WeightConfig and
  Int8WeightOnlyConfig, when torchao is installed (optional; a line says when it is not);
- ORT fp32: ONNX Runtime on `export.to_onnx` of the model; ORT int8 ours: on `export.to_onnx_int8`
  of our fake-quant model (QDQ, our scales); ORT int8 quantize_static: ONNX Runtime's own static
  QDQ quantization (per channel, calibrated on the same batches), for comparison; ONNX Runtime is
  optional too;
- ours reference: LowerToInteger(backend="reference"), the exact integer oracle (float64 kernels: timed at
  --reference-batches only, batch 1 by default, and run on the first inputs of a batch for the agreement);
- ours native: LowerToInteger(), each layer on the fastest of oneDNN's int8 kernel, its float kernel
  and our C int8 kernel (linear layers), chosen again at each batch size it is timed at
  (`kernels.timing.remeasure`); ours native int8/float: the same without our C kernel (the choice
  before it existed); ours native, adds fused: the model quantized with fuse_adds=True, each residual add
  whose sum meets an 8-bit grid inside the convolution before it (oneDNN's sum post-op; shown where any
  was); ours native compiled: the first through torch.compile (inductor, freezing:
  oneDNN's packed weights become constants; no per-call size asserts), which removes the per-node Python
  dispatch between kernels but adds torch.compile's own per-call cost (benchmarks/bench_compiled_native.py);
  fp32 compiled: the fp32 model through the same torch.compile, the like-for-like baseline of that row.

Ours are quantized with InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)
and 8-bit activations, or 7-bit activations on a CPU without VNNI, where uint8 x int8 products
are summed in int16 pairs and 8 / 8 bits could saturate (torch.ao's x86 default reduces activations to
7 bits there too). ONNX Runtime saturates the same way at 8 / 8 bits, so its QDQ model takes 7-bit
weights and 8-bit activations there (ORT's own `reduce_range`). Residual adds stay integer
(ActivationConfig(joins=True)). Models have random weights (nothing downloads); calibration uses
random inputs, which is all a latency needs. Agreement lines compare the native model's and ORT's
int8 outputs with the reference / fake-quant ones on the timed batch as a sanity check.

The other tables of the issue come from the files that build those forms, imported when present:
`benchmarks/deploy_sparse.py` (Deep Compression's layer table at 91 / 91 / 75% and 96 / 96 / 77%
sparsity, whole models through LowerToSparse) and `benchmarks/deploy_decode.py` (a GPT-style decoder
generating one token at a time: weight-only int8 / int4, dynamic int8) and `benchmarks/deploy_memory.py`
(the resident memory of each native model loaded from its file, against the bytes it holds).

    python benchmarks/bench_deploy.py [--models lenet5 lenet300 resnet18 mobilenet_v2] [--batches 1 32]
                                      [--threads 1 all] [--rounds 5] [--resnet-size 224] [--no-compile]
                                      [--no-sparse] [--no-decode] [--no-memory]

resnet18 and mobilenet_v2 are torchvision's when torchvision is installed, otherwise definitions of our
own with the same shapes.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling deploy_* benchmarks

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress import export
from fxcompress.errors import PreconditionError
from fxcompress.passes import ActivationConfig, FoldBatchNorm, InsertFakeQuant, LowerToInteger
from fxcompress.quant import ActivationQuant
from fxcompress.kernels import native
from fxcompress.kernels.native import NativeLayer
from fxcompress.kernels.timing import CLOCKS, remeasure
from fxcompress.zoo import BasicBlock, LeNet5, LeNet300100

MIN_SAMPLE_S = 0.02  # each timed sample loops the forward until it takes at least this long
Form = tuple[Callable, object]  # a callable and the input it takes (a tensor, or ONNX Runtime's feed dict)


class ResNet18(nn.Module):
    """torchvision's resnet18 shapes: a 7x7 stem, max pooling, four stages of two BasicBlocks."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, relu6: bool = True) -> list:
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6()] if relu6 else layers


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: 1x1 expansion (none when t = 1), 3x3 depthwise, 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        expansion = _conv_bn(cin, hidden, 1) if expand != 1 else []
        self.block = nn.Sequential(*expansion, *_conv_bn(hidden, hidden, 3, stride, hidden),
                                   *_conv_bn(hidden, cout, 1, relu6=False))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 shapes (width 1.0): 17 inverted residual blocks, a 1280-wide head."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))  # (expansion t, channels c, repeats n, first stride s)

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers, cin = _conv_bn(3, 32, 3, 2), 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.features = nn.Sequential(*layers, *_conv_bn(cin, 1280, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def _torchvision(name: str, fallback: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        try:
            import torchvision
        except ImportError:
            return fallback()
        return getattr(torchvision.models, name)(weights=None)
    return make


def models(image_size: int) -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    return {"lenet5": (LeNet5, (1, 28, 28)), "lenet300": (LeNet300100, (1, 28, 28)),
            "resnet18": (_torchvision("resnet18", ResNet18), (3, image_size, image_size)),
            "mobilenet_v2": (_torchvision("mobilenet_v2", MobileNetV2), (3, image_size, image_size))}


def activation_bits() -> int:
    return 8 if native.vnni() else 7


def _has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def fp32_folded(model: nn.Module, x: torch.Tensor) -> nn.Module:
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=(x,))
    return gm.to(memory_format=torch.channels_last) if x.ndim == 4 and _has_conv(model) else gm


def torch_ao(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor]) -> dict[str, nn.Module]:
    """torch.ao's FX int8 (x86) and quantize_dynamic, each reported and skipped if it fails."""
    forms = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated: measured while it is importable
        from torch.ao.quantization import get_default_qconfig_mapping, quantize_dynamic
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        torch.backends.quantized.engine = "x86"
        try:
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
            with torch.no_grad():
                for batch in calibration:
                    prepared(batch)
            forms["torch.ao FX int8"] = convert_fx(prepared)
        except Exception as exc:  # noqa: BLE001 - a deprecated peer that may fail: reported, never fatal
            print(f"  torch.ao FX int8 unavailable: {type(exc).__name__}: {exc}")
        forms["torch.ao dynamic"] = quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
    return forms


def torchao_forms(model: nn.Module) -> dict[str, nn.Module]:
    """torchao's CPU int8 paths when torchao is installed (an optional peer)."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        print(f"  torchao not available ({exc}): its rows are left out")
        return {}
    forms = {}
    for name, config in (("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        try:
            quantized = copy.deepcopy(model)
            quantize_(quantized, config)
            forms[name] = quantized
        except Exception as exc:  # noqa: BLE001 - an optional peer: reported, never fatal
            print(f"  {name} unavailable: {type(exc).__name__}: {exc}")
    return forms


def fake_quant(model: nn.Module, x: torch.Tensor, calibration: list[torch.Tensor], weight_bits: int,
               act_bits: int, fuse_adds: bool = False) -> torch.fx.GraphModule:
    """The fake-quant model ours lower; with `fuse_adds`, residual adds modelled inside the convolution before
    them (one rounding of the sum, as PT2E's x86 lowering models them)."""
    quantize = InsertFakeQuant(method="linear", bits=weight_bits, symmetric=True, per_channel=True,
                               activations=ActivationConfig(bits=act_bits, joins=True, fuse_adds=fuse_adds))
    return fxcompress.compile(model, [FoldBatchNorm(), quantize], example_inputs=(x,), calibration_data=calibration)


def _grids(gm: torch.fx.GraphModule) -> int:
    return sum(isinstance(m, ActivationQuant) for m in gm.modules())


def ours(fq: torch.fx.GraphModule, fq_fused: torch.fx.GraphModule, x: torch.Tensor,
         compile_native: bool) -> dict[str, nn.Module]:
    forms = {"ours reference": fxcompress.compile(fq, [LowerToInteger(backend="reference")], example_inputs=(x,))}
    fast = fxcompress.compile(fq, [LowerToInteger()], example_inputs=(x,))
    stats = fxcompress.history(fast)[-1].stats
    if stats["backend"] != "native":
        print(f"  native backend refused: {stats['native_refused']}")
        return forms | {"ours default (fell back to reference)": fast}
    forms["ours native"] = fast
    if _grids(fq_fused) < _grids(fq):  # fuse_adds took some add into its convolution (LeNets have none)
        fused = fxcompress.compile(fq_fused, [LowerToInteger()], example_inputs=(x,))
        print(f"  ours native, adds fused: {fxcompress.history(fused)[-1].stats['residual_adds_fused']} residual "
              "adds inside their convolutions")
        forms["ours native, adds fused"] = fused
    forms["ours native int8/float"] = fxcompress.compile(fq, [LowerToInteger(kernels=("int8", "float"))],
                                                         example_inputs=(x,))
    if compile_native:
        forms["ours native compiled"] = compiled(fast)
    return forms


def compiled(module: nn.Module) -> nn.Module:
    """torch.compile as the compiled rows run it: inductor with freezing (it lowers oneDNN's int8 kernels only
    with constant packed weights, and prepacks fp32 weights too) and without its per-call size asserts (5-12%
    less per call on the LeNets, bench_compiled_native.py)."""
    torch._inductor.config.freezing = True
    return torch.compile(module, backend="inductor", dynamic=False, options={"size_asserts": False})


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over our calibration batches."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = iter([{"x": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.batches, None)


def onnx_files(model: nn.Module, fq_ort: torch.fx.GraphModule, x: torch.Tensor, calibration: list[torch.Tensor],
               folder: Path) -> dict[str, Path]:
    """fp32, our QDQ and ORT's quantize_static models on disk (ONNX Runtime optional: {} without it)."""
    try:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        print(f"  ONNX Runtime not available ({exc}): its rows are left out")
        return {}
    files = {"ORT fp32": folder / "fp32.onnx", "ORT int8 ours": folder / "ours.onnx",
             "ORT int8 quantize_static": folder / "static.onnx"}
    export.to_onnx(fxcompress.compile(model, [], example_inputs=(x,)), files["ORT fp32"], (x,), input_names=["x"])
    try:
        export.to_onnx_int8(fq_ort, files["ORT int8 ours"], (x,), input_names=["x"])
    except PreconditionError as exc:  # reported with its reason, the other rows still run
        print(f"  ORT int8 ours unavailable: {exc}")
        del files["ORT int8 ours"]
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calibration)
    quantize_static(str(files["ORT fp32"]), str(files["ORT int8 quantize_static"]), reader,
                    quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=not native.vnni())
    return files


def ort_sessions(files: dict[str, Path], threads: int) -> dict[str, Callable]:
    import onnxruntime as ort
    sessions = {}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        sessions[name] = lambda feed, session=session: session.run(None, feed)[0]
    return sessions


def settle_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """BatchNorm statistics from the calibration batches, then eval mode: a random deep net whose
    BatchNorms are the identity shrinks its activations layer after layer (mobilenet_v2's reach
    1e-10 by the classifier, whose bias then fits no int32 accumulator scale); trained nets do not."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def build(make: Callable[[], nn.Module], shape: tuple[int, ...], args, folder: Path) -> tuple[dict, dict]:
    """The torch forms (module per name) and the ONNX files of one model."""
    torch.manual_seed(0)
    model = make()
    x = torch.rand(2, *shape)
    calibration = [torch.rand(8, *shape) for _ in range(4)]
    settle_batchnorm(model, calibration)
    forms = {"fp32 eager": model, "fp32 folded": fp32_folded(model, x), **torch_ao(model, x, calibration),
             **torchao_forms(model)}
    if not args.no_compile:  # the baseline of the compiled native row: torch.compile's own cost on both
        forms["fp32 compiled"] = compiled(model)
    fq = fake_quant(model, x, calibration, 8, activation_bits())
    fq_fused = fake_quant(model, x, calibration, 8, activation_bits(), fuse_adds=True)
    forms |= ours(fq, fq_fused, x, not args.no_compile)
    # ORT's u8 x s8 kernels saturate at 8 / 8 bits without VNNI: its QDQ model takes 7-bit weights there
    fq_ort = fq if native.vnni() else fake_quant(model, x, calibration, 7, 8)
    files = onnx_files(model, fq_ort, x, calibration, folder)
    forms["fake-quant"], forms["fake-quant for ORT"] = fq, fq_ort  # agreement checks only, not timed
    return forms, files


def inputs_of(forms: dict[str, Callable], x: torch.Tensor, reference: bool = True) -> dict[str, Form]:
    """Each timed form with the input it takes: channels-last, a feed dict for ONNX Runtime (the reference
    oracle only with `reference`)."""
    timed = {}
    for name, form in forms.items():
        if name.startswith("fake-quant") or (name == "ours reference" and not reference):
            continue
        if name.startswith("ORT"):
            timed[name] = (form, {"x": x.numpy()})
        elif name == "fp32 folded" and x.ndim == 4:
            timed[name] = (form, x.contiguous(memory_format=torch.channels_last))
        else:
            timed[name] = (form, x)
    return timed


def _loops(fn: Callable, x) -> int:
    """How many calls make one sample of at least MIN_SAMPLE_S."""
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < MIN_SAMPLE_S:
        fn(x)
        count += 1
    return count


def time_forms(forms: dict[str, Form], rounds: int, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each form, over interleaved rounds in rotating order; `clock` is wall time
    or (--clock thread) the calling thread's CPU time, which a loaded machine's preemption does not inflate."""
    names = list(forms)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for fn, x in forms.values():
            fn(x)  # warm-up: a compiled form compiles here, not inside a timed sample
        loops = {name: _loops(*forms[name]) for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                fn, x = forms[name]
                start = clock()
                for _ in range(loops[name]):
                    fn(x)
                samples[name].append((clock() - start) / loops[name])
    return {name: statistics.median(values) for name, values in samples.items()}


AGREEMENT_INPUTS = 8  # the reference runs float64 kernels: mobilenet_v2 at 224 takes seconds an input


def agreement(forms: dict[str, Callable], x: torch.Tensor) -> str:
    """The native and ORT int8 outputs against their exact references, in 8-bit steps of the logits, on the
    batch's first AGREEMENT_INPUTS inputs. The fake-quant model against the reference is the scale of the
    rounding differences alone: the same codes rounded in float32 instead of fixed point."""
    x = x[:AGREEMENT_INPUTS]
    with torch.no_grad():
        expected = forms["ours reference"](x)
        checks = [("native vs reference", forms.get("ours native"), expected),
                  ("fake-quant vs reference", forms["fake-quant"], expected),
                  ("ORT int8 ours vs fake-quant", forms.get("ORT int8 ours"), forms["fake-quant for ORT"](x))]
        parts = []
        for label, form, want in checks:
            if form is None:
                continue
            got = torch.as_tensor(np.asarray(form({"x": x.numpy()}) if label.startswith("ORT") else form(x)))
            step = (want.max() - want.min()).item() / 255
            same = (want.argmax(1) == got.argmax(1)).float().mean().item()
            parts.append(f"{label}: predictions {100 * same:.1f}% equal, max |diff| "
                         f"{(want - got).abs().max().item() / step:.2f} steps")
    return "; ".join(parts) or "nothing to compare"


def model_rows(name: str, make: Callable[[], nn.Module], shape: tuple[int, ...], args) -> list[dict]:
    """Every form of one model at every thread count and batch size: ms and speed-up over fp32 eager."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        torch.set_num_threads(1)  # built (calibrated, compiled) on one thread, as it is timed first
        forms, files = build(make, shape, args, Path(folder))
        for threads in args.threads:
            torch.set_num_threads(threads)
            runnable = forms | ort_sessions(files, threads) if files else forms
            for batch in args.batches:
                x, start = torch.rand(batch, *shape), time.perf_counter()
                choose_native(runnable, x)
                chosen = time.perf_counter()
                times = time_forms(inputs_of(runnable, x, batch in args.reference_batches), args.rounds,
                                   CLOCKS[args.clock])
                print(f"  {name}, batch {batch}: kernels chosen in {chosen - start:.0f} s, timed in "
                      f"{time.perf_counter() - chosen:.0f} s", flush=True)
                for form, seconds in times.items():
                    row = {"model": name, "threads": threads, "batch": batch, "form": form, "ms": 1e3 * seconds,
                           "speedup": times["fp32 eager"] / seconds}
                    rows.append(row)
                    print(f"| {name} | {threads} | {batch} | {form} | {row['ms']:.3f} | {row['speedup']:.2f}x |")
                print(f"  {name}, {threads} thread(s), batch {batch}: {agreement(runnable, x)}", flush=True)
    return rows


NATIVE_KERNELS = {"ours native": NativeLayer.KERNELS, "ours native int8/float": ("int8", "float"),
                  "ours native, adds fused": NativeLayer.KERNELS}


def choose_native(forms: dict[str, Callable], x: torch.Tensor) -> None:
    """Each native form's kernels chosen again on this batch at this thread count (the layers' real inputs)."""
    for name, kernels in NATIVE_KERNELS.items():
        if name in forms:
            chosen = remeasure(forms[name], (x,), {NativeLayer: kernels})
            counts = {k: sum(c["kernel"] == k for c in chosen.values()) for k in kernels}
            print(f"  {name} kernels at batch {x.shape[0]}: {counts}", flush=True)
            for path, c in chosen.items():  # the linear layers' times, where our C kernel was a candidate
                if name == "ours native" and "c_int8" in c["times_ms"]:
                    times = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in c["times_ms"].items())
                    print(f"    {path}: {c['kernel']} (us per call: {times})")


LIKE_FOR_LIKE = ("ours native compiled", "fp32 compiled")  # a compiled form against the compiled fp32 model


def pivot(rows: list[dict]) -> str:
    """One line per model / threads / batch, one column per form: speed-up over fp32 eager; the last column
    is compiled native over compiled fp32, where both ran (torch.compile's own per-call cost on both sides)."""
    forms = list(dict.fromkeys(r["form"] for r in rows if r["form"] != "fp32 eager"))
    paired = all(f in forms for f in LIKE_FOR_LIKE)
    extra = " | compiled native vs compiled fp32" if paired else ""
    lines = ["| model | threads | batch | " + " | ".join(forms) + extra + " |",
             "|---|---|---|" + "---|" * (len(forms) + paired)]
    keys = list(dict.fromkeys((r["model"], r["threads"], r["batch"]) for r in rows))
    for key in keys:
        found = {r["form"]: r["speedup"] for r in rows if (r["model"], r["threads"], r["batch"]) == key}
        cells = [f"{found[f]:.2f}x" if f in found else "-" for f in forms]
        if paired:
            ours, base = (found.get(f) for f in LIKE_FOR_LIKE)
            cells.append(f"{ours / base:.2f}x" if ours and base else "-")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sibling_tables(args) -> None:
    """The sparse, decoding and memory tables, from the benchmarks that build those forms, when they exist."""
    speed = "one thread; speed-up against its own fp32 in the same run"
    sections = [("sparse", args.no_sparse, "deploy_sparse", ("layer_rows", "model_rows"), speed),
                ("decode", args.no_decode, "deploy_decode", ("decode_rows",), speed),
                ("memory", args.no_memory, "deploy_memory", ("resident_rows",),
                 "resident growth of each native model loaded from its file, against the bytes it holds")]
    torch.set_num_threads(1)
    for label, skipped, module, functions, caption in sections:
        if skipped:
            print(f"\n{label} rows: skipped (--no-{label})")
            continue
        try:
            source = __import__(module)
            found = [getattr(source, f) for f in functions]
            format_rows = getattr(__import__("deploy_sparse"), "format_rows")
        except (ImportError, AttributeError) as exc:
            print(f"\n{label} rows: not available ({module}.py: {type(exc).__name__}: {exc})")
            continue
        for function in found:
            print(f"\n{module}.{function.__name__}() ({caption}):")
            print(format_rows(function()), flush=True)


def _threads(values: list[str]) -> list[int]:
    every = torch.get_num_threads()
    return list(dict.fromkeys(every if v == "all" else int(v) for v in values))


class _OneOp(nn.Module):
    def forward(self, x):
        return x + 1


def compile_floor(rounds: int, clock: str) -> None:
    """torch.compile's own cost per call here: a one-op module compiled against its eager call (guards, the
    compiled wrapper), the floor under every compiled row, which small models at batch 1 cannot win back."""
    torch._inductor.config.freezing = True
    eager = _OneOp()
    compiled = torch.compile(eager, backend="inductor", dynamic=False)
    times = time_forms({"eager": (eager, torch.rand(1, 784)), "compiled": (compiled, torch.rand(1, 784))},
                       max(rounds, 5), CLOCKS[clock])
    print(f"torch.compile floor: a one-op module takes {1e6 * times['eager']:.1f} us a call eager, "
          f"{1e6 * times['compiled']:.1f} us compiled ({clock} clock)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5", "lenet300", "resnet18", "mobilenet_v2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", nargs="+", default=["1", "all"], help="thread counts; 'all' is torch's default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or the calling thread's CPU time (one thread only: steadier on a loaded "
                             "machine, blind to work on other threads)")
    parser.add_argument("--resnet-size", type=int, default=224, help="image side of resnet18 and mobilenet_v2")
    parser.add_argument("--reference-batches", nargs="+", type=int, default=[1],
                        help="batch sizes the reference oracle is timed at (float64 kernels: mobilenet_v2 at 224 "
                             "and batch 32 takes about a minute a call)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    parser.add_argument("--no-sparse", action="store_true", help="leave out deploy_sparse's tables")
    parser.add_argument("--no-decode", action="store_true", help="leave out deploy_decode's table")
    parser.add_argument("--no-memory", action="store_true", help="leave out deploy_memory's table")
    args = parser.parse_args()
    args.threads = _threads(args.threads)
    if args.clock == "thread" and args.threads != [1]:
        parser.error("--clock thread counts the calling thread only: use it with --threads 1")
    table = models(args.resnet_size)
    print(f"torch {torch.__version__}, threads {args.threads}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, VNNI {native.vnni()}, ours at 8-bit weights / "
          f"{activation_bits()}-bit activations, {args.clock} clock")
    print("| model | threads | batch | form | ms / batch | speed-up vs fp32 eager |")
    print("|---|---|---|---|---|---|")
    if not args.no_compile:
        compile_floor(args.rounds, args.clock)
    rows = []
    for name in args.models:
        make, shape = table[name]
        rows += model_rows(name, make, shape, args)
    print("\nSpeed-up over fp32 eager of the same run (above 1 is faster):")
    print(pivot(rows))
    sibling_tables(args)


if __name__ == "__main__":
    main()
