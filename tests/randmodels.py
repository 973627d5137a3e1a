"""Seeded random traceable models, for property tests over every pass.

`random_model(seed)` returns `(model, example_inputs)`: a small DAG in eval mode whose forward replays a
list of steps (each step reads earlier values and appends its results), so torch.fx unrolls it into a
plain graph. The same seed always gives the same architecture, weights, statistics and inputs.

Values have one of four kinds: "image" (N, C, H, W), "seq" (N, T, D), "flat" (N, D) and "tokens"
(N, T), integer. Each op below is a builder (which values it takes, what it creates) paired with the
forward function it appends; `KIND_OPS` says which ops apply to which kind, and how often.

The second half holds the checks the tests and benchmarks/random_models.py run on these models:
each pass alone (`check_pass`) and the properties in `PROPERTIES`.
"""
from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from zeroing import pick_half, zero_classes
from fxcompress.channels import ChannelGraph
from fxcompress.errors import FxCompressError, VerificationError
from fxcompress.kernels.native import NativeLayer
from fxcompress.quant.integer import IntegerLayer
from fxcompress.pass_base import PassContext
from fxcompress.passes import (ActivationConfig, FoldBatchNorm, InsertFakeQuant, InsertMasks, LowerDynamicInt8,
                               LowerToEncoded, LowerToInteger, LowerToSparse, LowerWeightOnly, PruneChannels,
                               ScaleChannels, SparseGPT)
from fxcompress.tracing import trace

BATCH = 2
WIDTHS = (4, 6, 8, 12, 16)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "hardswish": F.hardswish}
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ReLU6)
FLATTEN_FORMS = {"method": lambda x: x.flatten(1), "reshape": lambda x: x.reshape(x.size(0), -1),
                 "function": lambda x: torch.flatten(x, 1)}
POOLS = {"max": F.max_pool2d, "avg": F.avg_pool2d}
SIZE_READS = {"shape[-2:]": lambda ref: ref.shape[-2:], "shape[2:]": lambda ref: ref.shape[2:],
              "size()[-2:]": lambda ref: ref.size()[-2:], "size(2), size(3)": lambda ref: (ref.size(2), ref.size(3))}


@dataclass(frozen=True)
class Value:
    kind: str
    shape: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class Step:
    op: str
    inputs: tuple[int, ...]  # indices of earlier values
    module: str | None = None  # the submodule (or prefix of submodules) this step calls
    arg: object = None  # plain data the forward function needs (dims, sizes, names)


# ---- forward functions: (net, step, *tensors) -> tuple of new values ------------------------------

def _module(net, step, x):
    return (net.get_submodule(step.module)(x),)


def _activation(net, step, x):
    return (ACTIVATIONS[step.arg](x),)


def _add(net, step, a, b):
    return (a + b,)


def _cat(net, step, a, b):
    return (torch.cat([a, b], step.arg),)


def _split(net, step, x):
    sizes, dim = step.arg
    parts = torch.split(x, sizes, dim)
    return tuple(parts[k] for k in range(len(sizes)))  # a traced result cannot be iterated, only indexed


def _chunk(net, step, x):
    parts = x.chunk(2, step.arg)
    return parts[0], parts[1]


def _pool(net, step, x):
    return (POOLS[step.arg](x, 2),)


def _global_pool(net, step, x):
    return (x.mean(dim=(2, 3)) if step.arg == "mean" else F.adaptive_avg_pool2d(x, 1).flatten(1),)


def _flatten(net, step, x):
    return (FLATTEN_FORMS[step.arg](x),)


def _channels_last_linear(net, step, x):
    return (net.get_submodule(step.module)(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2),)


def _to_seq(net, step, x):
    return (x.flatten(2).transpose(1, 2),)


def _squeeze_excite(net, step, x):
    scale = torch.sigmoid(net.get_submodule(step.module + "_up")(F.relu(
        net.get_submodule(step.module + "_down")(x.mean(dim=(2, 3))))))
    return (x * scale[:, :, None, None],)


def _interpolate(net, step, small, ref):
    """Resize to a size read from another value's shape, then merge with it (an FPN-style top-down path)."""
    mode, size, merge = step.arg
    up = F.interpolate(small, size=SIZE_READS[size](ref), mode=mode)
    return (ref + up if merge == "add" else torch.cat([ref, up], 1),)


def _attention(net, step, x):
    heads, head_dim, fused = step.arg
    b, t = x.size(0), x.size(1)
    q, k, v = (net.get_submodule(f"{step.module}_{name}")(x) for name in "qkv")
    if heads > 1:
        q, k, v = (y.view(b, t, heads, -1).transpose(1, 2) for y in (q, k, v))
    if fused:
        y = F.scaled_dot_product_attention(q, k, v)
    else:
        y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1) @ v
    if heads > 1:
        y = y.transpose(1, 2).reshape(b, t, -1)
    return (net.get_submodule(f"{step.module}_out")(y),)


def _seq_mean(net, step, x):
    return (x.mean(dim=1),)


FORWARD = {"module": _module, "activation": _activation, "add": _add, "cat": _cat, "split": _split,
           "chunk": _chunk, "pool": _pool, "global_pool": _global_pool, "flatten": _flatten,
           "channels_last_linear": _channels_last_linear, "to_seq": _to_seq, "squeeze_excite": _squeeze_excite,
           "interpolate": _interpolate, "attention": _attention, "seq_mean": _seq_mean}


class RandomNet(nn.Module):
    """Replays `steps` over its inputs; torch.fx traces the unrolled loop."""

    def __init__(self, steps: list[Step], output: int) -> None:
        super().__init__()
        self.steps, self.output = steps, output

    def replay(self, *inputs):
        values = list(inputs)
        for step in self.steps:
            values.extend(FORWARD[step.op](self, step, *(values[i] for i in step.inputs)))
        return values[self.output]


class OneInput(RandomNet):
    def forward(self, x):  # torch.fx needs named inputs, not *args
        return self.replay(x)


class TwoInputs(RandomNet):
    def forward(self, x, tokens):
        return self.replay(x, tokens)


# ---- builders -------------------------------------------------------------------------------------

class Builder:
    """Grows a random program: each op picks its inputs among the live values and registers modules."""

    def __init__(self, rng: random.Random, avoid: frozenset[str], residual_blocks: bool = False) -> None:
        self.rng, self.avoid, self.residual_blocks = rng, avoid, residual_blocks
        self.values: list[Value] = []
        self.uses: list[int] = []
        self.steps: list[Step] = []
        self.modules = nn.Module()

    def add(self, op: str, inputs: tuple[int, ...], outputs: list[Value], module: str | None = None,
            arg: object = None) -> int:
        for i in inputs:
            self.uses[i] += 1
        self.steps.append(Step(op, inputs, module, arg))
        return self.new_values(outputs)

    def new_values(self, outputs: list[Value]) -> int:
        self.values.extend(outputs)
        self.uses.extend([0] * len(outputs))
        return len(self.values) - 1

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.steps)}"

    def register(self, name: str, module: nn.Module) -> str:
        self.modules.add_module(name, module)
        return name

    def partner(self, i: int, fits) -> int | None:
        """A random other value satisfying `fits`, or None."""
        found = [j for j, v in enumerate(self.values) if j != i and fits(v)]
        return self.rng.choice(found) if found else None

    def width(self) -> int:
        return self.rng.choice(WIDTHS)

    # image ops
    def conv(self, i):
        c, h, w = self.values[i].shape
        kind = self.rng.choice(["plain", "depthwise", "grouped"])
        groups = {"plain": 1, "depthwise": c,
                  "grouped": self.rng.choice([g for g in (2, 3, 4) if c % g == 0] or [1])}[kind]
        out = c * self.rng.choice([1, 2]) if kind == "depthwise" else groups * max(1, self.width() // groups)
        k = self.rng.choice([1, 3])
        stride = 2 if h >= 8 and self.rng.random() < 0.2 else 1
        conv = nn.Conv2d(c, out, k, stride, k // 2, groups=groups, bias=self.rng.random() < 0.7)
        size = (h + 2 * (k // 2) - k) // stride + 1
        j = self.add("module", (i,), [Value("image", (out, size, size))], self.register(self.name("conv"), conv))
        return self.batchnorm(j) if self.rng.random() < 0.6 else j  # conv -> BatchNorm, so folds are common

    def batchnorm(self, i):
        v = self.values[i]
        norm = (nn.BatchNorm2d if v.kind == "image" else nn.BatchNorm1d)(v.shape[0])
        with torch.no_grad():  # statistics far from the identity, so a wrong fold or slice shows
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return self.add("module", (i,), [v], self.register(self.name("bn"), norm))

    def activation(self, i):
        if self.rng.random() < 0.5:
            return self.add("activation", (i,), [self.values[i]], arg=self.rng.choice(sorted(ACTIVATIONS)))
        act = self.rng.choice(ACTIVATION_MODULES)()
        return self.add("module", (i,), [self.values[i]], self.register(self.name("act"), act))

    def residual(self, i):
        j = self.partner(i, lambda v: v == self.values[i])
        return None if j is None else self.add("add", (i, j), [self.values[i]])

    def residual_block(self, i):
        """conv(x) [-> BatchNorm] + x [-> ReLU / ReLU6]: a ResNet block's add, whose convolution may take it."""
        c = self.values[i].shape[0]
        k = self.rng.choice([1, 3])
        conv = nn.Conv2d(c, c, k, 1, k // 2, bias=self.rng.random() < 0.7)
        j = self.add("module", (i,), [self.values[i]], self.register(self.name("conv"), conv))
        if self.rng.random() < 0.5:
            j = self.batchnorm(j)
        j = self.add("add", (j, i) if self.rng.random() < 0.5 else (i, j), [self.values[i]])
        if self.rng.random() < 0.7:
            j = self.add("module", (j,), [self.values[i]],
                         self.register(self.name("act"), self.rng.choice([nn.ReLU, nn.ReLU6])()))
        return j

    def concat(self, i):
        v = self.values[i]
        j = self.partner(i, lambda u: u.kind == v.kind and u.shape[1:] == v.shape[1:] if v.kind == "image"
                         else u.kind == v.kind and u.shape[:-1] == v.shape[:-1])
        if j is None:
            return None
        dim = 1 if v.kind == "image" else -1
        axis = 0 if v.kind == "image" else -1
        shape = list(v.shape)
        shape[axis] += self.values[j].shape[axis]
        return self.add("cat", (i, j), [Value(v.kind, tuple(shape))], arg=dim)

    def split(self, i):
        v = self.values[i]
        axis, dim = (0, 1) if v.kind == "image" else (-1, -1)
        width = v.shape[axis]
        if width < 2:
            return None
        if self.rng.random() < 0.5 and width % 2 == 0:
            parts, op, arg = [width // 2] * 2, "chunk", dim
        else:
            first = self.rng.randint(1, width - 1)
            parts, op, arg = [first, width - first], "split", ([first, width - first], dim)
        outputs = []
        for part in parts:
            shape = list(v.shape)
            shape[axis] = part
            outputs.append(Value(v.kind, tuple(shape)))
        return self.add(op, (i,), outputs, arg=arg)

    def pool(self, i):
        c, h, w = self.values[i].shape
        if h < 4 or h % 2:
            return None
        shape = (c, h // 2, w // 2)
        if self.rng.random() < 0.5:
            return self.add("pool", (i,), [Value("image", shape)], arg=self.rng.choice(sorted(POOLS)))
        pool = self.rng.choice([nn.MaxPool2d(2), nn.AvgPool2d(2)])
        return self.add("module", (i,), [Value("image", shape)], self.register(self.name("pool"), pool))

    def channels_last_linear(self, i):
        c, h, w = self.values[i].shape
        out = self.width()
        return self.add("channels_last_linear", (i,), [Value("image", (out, h, w))],
                        self.register(self.name("pointwise"), nn.Linear(c, out)))

    def squeeze_excite(self, i):
        c = self.values[i].shape[0]
        name = self.name("se")
        self.register(name + "_down", nn.Linear(c, max(2, c // 4)))
        self.register(name + "_up", nn.Linear(max(2, c // 4), c))
        return self.add("squeeze_excite", (i,), [self.values[i]], name)

    def interpolate(self, i):
        c, h, w = self.values[i].shape
        j = self.partner(i, lambda u: u.kind == "image" and u.shape[1] > h)
        if j is None:
            return None
        ref = self.values[j]
        merge = "add" if c == ref.shape[0] else "cat"
        out = ref.shape if merge == "add" else (ref.shape[0] + c,) + ref.shape[1:]
        return self.add("interpolate", (i, j), [Value("image", out)],
                        arg=(self.rng.choice(["nearest", "bilinear"]), self.rng.choice(sorted(SIZE_READS)), merge))

    def to_flat(self, i):
        c, h, w = self.values[i].shape
        if c * h * w <= 256 and self.rng.random() < 0.5:
            if self.rng.random() < 0.25:
                return self.add("module", (i,), [Value("flat", (c * h * w,))],
                                self.register(self.name("flatten"), nn.Flatten()))
            return self.add("flatten", (i,), [Value("flat", (c * h * w,))], arg=self.rng.choice(sorted(FLATTEN_FORMS)))
        return self.add("global_pool", (i,), [Value("flat", (c,))], arg=self.rng.choice(["mean", "adaptive"]))

    def to_seq(self, i):
        c, h, w = self.values[i].shape
        return None if h * w > 64 else self.add("to_seq", (i,), [Value("seq", (h * w, c))])

    # seq and flat ops
    def linear(self, i):
        v = self.values[i]
        out = self.width()
        return self.add("module", (i,), [Value(v.kind, v.shape[:-1] + (out,))],
                        self.register(self.name("fc"), nn.Linear(v.shape[-1], out, bias=self.rng.random() < 0.8)))

    def layernorm(self, i):
        norm = nn.LayerNorm(self.values[i].shape[-1])
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        return self.add("module", (i,), [self.values[i]], self.register(self.name("ln"), norm))

    def attention(self, i):
        t, d = self.values[i].shape
        heads = self.rng.choice([h for h in (1, 2, 4) if d % h == 0])
        name = self.name("attn")
        for part in "qkv":
            self.register(f"{name}_{part}", nn.Linear(d, d))
        self.register(f"{name}_out", nn.Linear(d, d))
        return self.add("attention", (i,), [self.values[i]], name, (heads, d // heads, self.rng.random() < 0.5))

    def seq_mean(self, i):
        return self.add("seq_mean", (i,), [Value("flat", self.values[i].shape[-1:])])

    def embed(self, i):
        t = self.values[i].shape[0]
        d = self.width()
        return self.add("module", (i,), [Value("seq", (t, d))], self.register(self.name("embed"), nn.Embedding(10, d)))


# op name -> relative frequency, per kind of the value it starts from
KIND_OPS = {
    "image": {Builder.conv: 5, Builder.batchnorm: 2, Builder.activation: 3, Builder.residual: 2, Builder.concat: 2,
              Builder.split: 1, Builder.pool: 3, Builder.channels_last_linear: 1, Builder.squeeze_excite: 1,
              Builder.interpolate: 4, Builder.to_flat: 1, Builder.to_seq: 1},
    "seq": {Builder.linear: 3, Builder.layernorm: 2, Builder.activation: 2, Builder.residual: 2, Builder.concat: 1,
            Builder.split: 1, Builder.attention: 3, Builder.seq_mean: 1},
    "flat": {Builder.linear: 3, Builder.batchnorm: 1, Builder.activation: 2, Builder.residual: 1, Builder.concat: 1,
             Builder.split: 1},
    "tokens": {Builder.embed: 1},
}
TO_HEAD = {"image": Builder.to_flat, "seq": Builder.seq_mean, "tokens": Builder.embed}
# random_model(residual_blocks=True) adds Builder.residual_block to the image ops with this weight (off by default, so
# every seed keeps its model)
RESIDUAL_BLOCK_WEIGHT = 8


def _inputs(b: Builder) -> list[torch.Tensor]:
    """One or two inputs: an image, a float sequence or integer tokens, sometimes with tokens beside."""
    stem = b.rng.choices(["image", "seq", "tokens"], weights=[6, 2, 2])[0]
    extra_tokens = stem == "image" and b.rng.random() < 0.2
    tensors = []
    for kind in [stem] + (["tokens"] if extra_tokens else []):
        if kind == "image":
            size = b.rng.choice([6, 8, 12, 16])
            shape = (b.rng.randint(1, 4), size, size)
            tensors.append(torch.randn(BATCH, *shape))
        elif kind == "seq":
            shape = (b.rng.randint(2, 8), b.width())
            tensors.append(torch.randn(BATCH, *shape))
        else:
            shape = (b.rng.randint(2, 8),)
            tensors.append(torch.randint(0, 10, (BATCH, *shape)))
        b.new_values([Value(kind, shape)])
    return tensors


def _grow(b: Builder, steps: int) -> None:
    for _ in range(steps):
        unused = [i for i, n in enumerate(b.uses) if n == 0]
        i = b.rng.choice(unused) if unused and b.rng.random() < 0.8 else b.rng.randrange(len(b.values))
        ops = KIND_OPS[b.values[i].kind]
        if b.residual_blocks and b.values[i].kind == "image":
            ops = {**ops, Builder.residual_block: RESIDUAL_BLOCK_WEIGHT}
        for op in b.rng.choices(list(ops), weights=list(ops.values()), k=4):  # a few tries: some ops need a partner
            if op(b, i) is not None:
                break


def _head(b: Builder) -> int:
    """Bring every unused value to a flat vector, concatenate them and add a linear head; with
    probability 0.3 one branch stays dead (computed, never read), unless "dead_branch" is avoided."""
    leaves = [i for i, n in enumerate(b.uses) if n == 0]
    if len(leaves) > 1 and "dead_branch" not in b.avoid and b.rng.random() < 0.3:
        leaves.pop(0)
    flat = []
    for i in leaves:
        while b.values[i].kind != "flat":
            i = TO_HEAD[b.values[i].kind](b, i)
        flat.append(i)
    i = flat[0]
    for j in flat[1:]:
        i = b.add("cat", (i, j), [Value("flat", (b.values[i].shape[0] + b.values[j].shape[0],))], arg=-1)
    out = b.rng.randint(2, 5)
    return b.add("module", (i,), [Value("flat", (out,))], b.register("head", nn.Linear(b.values[i].shape[0], out)))


def random_model(seed: int, avoid: frozenset[str] = frozenset(), residual_blocks: bool = False
                 ) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A random model in eval mode and its example inputs, both determined by `seed` (and the options).

    `avoid` names constructs to leave out: "dead_branch" (a branch whose result is never read).
    `residual_blocks` grows ResNet blocks (`Builder.residual_block`) among the image ops.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        b = Builder(random.Random(seed), avoid, residual_blocks)
        inputs = _inputs(b)
        _grow(b, b.rng.randint(3, 10))
        output = _head(b)
        net = (OneInput if len(inputs) == 1 else TwoInputs)(b.steps, output)
        for name, module in b.modules.named_children():
            net.add_module(name, module)
    return net.eval(), tuple(inputs)


def calibration_batches(inputs: tuple[torch.Tensor, ...], seed: int, count: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """Batches shaped like `inputs` (integers stay in range), for passes that calibrate."""
    generator = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(0, 10, x.shape, generator=generator) if not x.is_floating_point()
                  else torch.randn(x.shape, generator=generator) for x in inputs) for _ in range(count)]


# ---- the properties every pass keeps on these models ---------------------------------------------
# Each check returns a short outcome ("verified", or a note when the property holds vacuously),
# raises AssertionError when the property is broken, and lets typed fxcompress refusals propagate.

def _prerequisites() -> dict:
    return {"kmeans": [InsertMasks(sparsity=0.5), InsertFakeQuant(method="kmeans", bits=4)],
            "linear_calibrated": [InsertFakeQuant(method="linear", bits=8, per_channel=True,
                                                  activations=ActivationConfig(bits=8))],
            "masks": [InsertMasks(sparsity=0.7)],
            "linear_symmetric": [InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True)]}


def pass_pipelines() -> dict[str, tuple[str | None, object]]:
    """Every public pass under test: name -> (prerequisite pipeline or None, the pass)."""
    return {"InsertMasks": (None, InsertMasks(sparsity=0.5)),
            "InsertFakeQuant(linear)": (None, InsertFakeQuant(method="linear", bits=8)),
            "InsertFakeQuant(kmeans)": (None, InsertFakeQuant(method="kmeans", bits=4)),
            "PruneChannels": (None, PruneChannels(amount=0.5)),
            "PruneChannels(heads, normalized)": (None, PruneChannels(amount=0.5, attention="heads",
                                                                     prune_normalized=True)),
            "FoldBatchNorm": (None, FoldBatchNorm()),
            "LowerToEncoded": ("kmeans", LowerToEncoded()),
            "LowerToInteger": ("linear_calibrated", LowerToInteger()),
            # the measured lowerings time their kernels once per layer: the choice, not its quality, is under test
            "LowerToSparse": ("masks", LowerToSparse(repeats=1)),
            "LowerWeightOnly": ("linear_symmetric", LowerWeightOnly(repeats=1)),
            "LowerDynamicInt8": (None, LowerDynamicInt8(repeats=1)),
            "ScaleChannels": (None, ScaleChannels(group_size=None)),  # widths here are no multiple of 128
            "SparseGPT": (None, SparseGPT(sparsity=0.5))}


# passes that read calibration data: they get the batches of `calibration_batches` even without a prerequisite
CALIBRATED = ("ScaleChannels", "SparseGPT")


def prepare(model, inputs, prerequisite: str | None, seed: int):
    """The model after a prerequisite pipeline (traced as is without one), with its calibration data."""
    if prerequisite is None:
        return model, None
    calibration = calibration_batches(inputs, seed)
    return fxcompress.compile(model, _prerequisites()[prerequisite], example_inputs=inputs,
                              calibration_data=calibration), calibration


def check_pass(name: str, model, inputs, seed: int) -> str:
    """The pass gives a graph that compile verified, with the original output shape."""
    prerequisite, p = pass_pipelines()[name]
    base, calibration = prepare(model, inputs, prerequisite, seed)
    if name in CALIBRATED:
        calibration = calibration_batches(inputs, seed)
    gm = fxcompress.compile(base, [p], example_inputs=inputs, calibration_data=calibration)
    with torch.no_grad():
        assert gm(*inputs).shape == model(*inputs).shape, name
    return "verified" if fxcompress.history(gm)[-1].changed else "verified, changed nothing"


def _zero_half(gm, inputs, seed: int) -> bool:
    """Zero a random half of every layer's prunable channels; False when nothing is prunable."""
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph)
    removed = pick_half(cg, seed)
    zero_classes(gm, cg, removed)
    return bool(removed.any())


def check_zeroed_pruning(model, inputs, seed: int) -> str:
    """Removing channels whose parameters are all zero leaves the outputs unchanged."""
    gm = trace(model)
    if not _zero_half(gm, inputs, seed):
        return "nothing prunable"
    with torch.no_grad():
        expected = gm(*inputs)
        pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method="l1")], example_inputs=inputs)
        got = pruned(*inputs)
    torch.testing.assert_close(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in gm.parameters())
    return "verified"


def check_encoded_round_trip(model, inputs, seed: int) -> str:
    """masks -> k-means -> LowerToEncoded -> save -> load: every output bit-identical."""

    fake_quant, _ = prepare(model, inputs, "kmeans", seed)
    lowered = fxcompress.compile(fake_quant, [LowerToEncoded()], example_inputs=inputs)
    with tempfile.TemporaryDirectory() as folder:
        fxcompress.save(lowered, Path(folder) / "model.fxc")
        loaded = fxcompress.load(Path(folder) / "model.fxc")
    with torch.no_grad():
        expected = lowered(*inputs)
        assert torch.equal(expected, fake_quant(*inputs)), "lowering changed the fake-quant model's outputs"
        assert torch.equal(loaded(*inputs), expected), "the loaded model differs from the saved one"
    return "verified"


def check_fold_batchnorm(model, inputs, seed: int) -> str:
    """Folding every BatchNorm it can leaves the outputs equal to float rounding."""
    gm = fxcompress.compile(model, [FoldBatchNorm()], example_inputs=inputs)
    with torch.no_grad():
        expected, got = model(*inputs), gm(*inputs)
    assert torch.allclose(got, expected, atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-4)
    return "verified" if fxcompress.history(gm)[-1].stats["folded"] else "nothing folded"


# LowerToInteger's reference is the calibrated fake-quant model it lowers; they differ by bias and
# requantization rounding (one 8-bit step per layer on the way), so the bound is relative to the output range.
INTEGER_TOLERANCE = 0.05


def check_lower_integer(model, inputs, seed: int) -> str:
    """The integer model computes what its fake-quant reference computes, up to rounding."""
    fake_quant, _ = prepare(model, inputs, "linear_calibrated", seed)
    gm = fxcompress.compile(fake_quant, [LowerToInteger()], example_inputs=inputs)
    with torch.no_grad():
        expected, got = fake_quant(*inputs), gm(*inputs)
    bound = INTEGER_TOLERANCE * max(expected.abs().max().item(), 1e-3)
    assert (got - expected).abs().max().item() <= bound, (got - expected).abs().max().item() / bound
    return "verified" if any(isinstance(m, IntegerLayer) for m in gm.modules()) else "nothing lowered"


def check_native_integer(model, inputs, seed: int) -> str:
    """LowerToInteger's native backend (oneDNN's int8 kernels, our C ones, float where they lose, adds inside
    convolutions) computes what its fake-quant model computes, up to rounding. Symmetric weights, which int8
    kernels take (the check above gets asymmetric ones, so the default backend falls back to the reference
    there); grids at joins; saved and loaded, the same outputs bit for bit. On odd seeds residual adds are
    modelled inside the convolution before them and convolutions run oneDNN's int8 kernel (the one that takes an
    add), on even seeds the faster of int8 and float; on every third seed half the weights are masked first
    (channels of zero weights among them)."""
    odd = seed % 2 == 1
    activations = ActivationConfig(bits=8, joins=True, fuse_adds=odd)
    masks = [InsertMasks(sparsity=0.5)] if seed % 3 == 0 else []
    passes = [FoldBatchNorm(), *masks, InsertFakeQuant(method="linear", bits=8, symmetric=True, per_channel=True,
                                                       activations=activations)]
    fake_quant = fxcompress.compile(model, passes, example_inputs=inputs,
                                    calibration_data=calibration_batches(inputs, seed))
    kernels = ("int8", "c_int8") if odd else ("int8", "float", "c_int8")
    gm = fxcompress.compile(fake_quant, [LowerToInteger(backend="native", kernels=kernels, repeats=1)],
                            example_inputs=inputs)
    with torch.no_grad():
        expected, got = fake_quant(*inputs), gm(*inputs)
    bound = INTEGER_TOLERANCE * max(expected.abs().max().item(), 1e-3)
    assert (got - expected).abs().max().item() <= bound, (got - expected).abs().max().item() / bound
    with tempfile.TemporaryDirectory() as folder:  # the file keeps every kernel choice: the same outputs
        fxcompress.save(gm, Path(folder) / "native.fxc")
        loaded = fxcompress.load(Path(folder) / "native.fxc")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), got), "the loaded native model computes something else"
    fused = fxcompress.history(gm)[-1].stats["residual_adds_fused"]
    if not any(isinstance(m, NativeLayer) for m in gm.modules()):
        return "nothing lowered"
    return f"verified, {fused} adds fused" if fused else "verified"


# What each measured lowering may change, relative to the output range: the sparse and weight-only
# kernels compute the model they lower up to float summation order; dynamic int8 also rounds each
# activation row to 8 bits, as LowerToInteger does.
MEASURED_TOLERANCE = {"LowerToSparse": 1e-4, "LowerWeightOnly": 1e-4, "LowerDynamicInt8": INTEGER_TOLERANCE}


def check_measured_lowerings(model, inputs, seed: int) -> str:
    """Each measured lowering, whatever kernel it chose, computes what the model it lowers computes."""
    lowered = 0
    for name, tolerance in MEASURED_TOLERANCE.items():
        prerequisite, p = pass_pipelines()[name]
        base, _ = prepare(model, inputs, prerequisite, seed)
        gm = fxcompress.compile(base, [p], example_inputs=inputs)
        with torch.no_grad():
            expected, got = base(*inputs), gm(*inputs)
        error = (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-3)
        assert error <= tolerance, (name, error)
        lowered += bool(fxcompress.history(gm)[-1].changed)
    return "verified" if lowered == len(MEASURED_TOLERANCE) else f"verified, {lowered} of 3 lowered something"


PROPERTIES = {"zeroed pruning is exact": check_zeroed_pruning,
              "encoded save/load bit-identical": check_encoded_round_trip,
              "FoldBatchNorm allclose": check_fold_batchnorm, "LowerToInteger matches reference": check_lower_integer,
              "LowerToInteger native matches fake quant": check_native_integer,
              "measured lowerings match their model": check_measured_lowerings}


def classify(error: Exception) -> str:
    """A typed refusal, or an internal crash that compile wrapped into a VerificationError."""
    cause = error.__cause__
    if isinstance(error, VerificationError) and cause is not None and not isinstance(cause, FxCompressError):
        return f"crashed inside the pass: {type(cause).__name__}"
    if isinstance(error, FxCompressError):
        return f"refused: {type(error).__name__}"
    return f"other exception: {type(error).__name__}"


def outcome(check, *args) -> str:
    """Run a check and name what happened: its own outcome, a refusal, a crash, or a broken property."""
    try:
        return check(*args)
    except AssertionError:
        return "PROPERTY VIOLATED"
    except Exception as error:  # noqa: BLE001 - naming every exception is the point
        return classify(error)
