"""Seeded random traceable models, for property tests over every pass.

`random_model(seed)` returns `(model, example_inputs)`: a small DAG in eval mode whose forward replays a
list of steps (each step reads earlier values and appends its results), so torch.fx unrolls it into a
plain graph. The same seed always gives the same architecture, weights, statistics and inputs.

Values have one of four kinds: "image" (N, C, H, W), "seq" (N, T, D), "flat" (N, D) and "tokens"
(N, T), integer. Each op below is a builder (which values it takes, what it creates) paired with the
forward function it appends; `KIND_OPS` says which ops apply to which kind, and how often.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BATCH = 2
WIDTHS = (4, 6, 8, 12, 16)
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "hardswish": F.hardswish}
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ReLU6)
FLATTEN_FORMS = {"method": lambda x: x.flatten(1), "view": lambda x: x.view(x.size(0), -1),
                 "function": lambda x: torch.flatten(x, 1)}
POOLS = {"max": F.max_pool2d, "avg": F.avg_pool2d}


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
    mode, merge = step.arg
    up = F.interpolate(small, size=ref.shape[-2:], mode=mode)
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

    def __init__(self, rng: random.Random, avoid: frozenset[str]) -> None:
        self.rng, self.avoid = rng, avoid
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
        return self.add("module", (i,), [Value("image", (out, size, size))], self.register(self.name("conv"), conv))

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
        if "interpolate_shape" in self.avoid:
            return None
        c, h, w = self.values[i].shape
        j = self.partner(i, lambda u: u.kind == "image" and u.shape[1] > h)
        if j is None:
            return None
        ref = self.values[j]
        merge = "add" if c == ref.shape[0] else "cat"
        out = ref.shape if merge == "add" else (ref.shape[0] + c,) + ref.shape[1:]
        return self.add("interpolate", (i, j), [Value("image", out)],
                        arg=(self.rng.choice(["nearest", "bilinear"]), merge))

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
        for op in b.rng.choices(list(ops), weights=list(ops.values()), k=4):  # a few tries: some ops need a partner
            if op(b, i) is not None:
                break


def _head(b: Builder) -> int:
    """Bring the last unused value (or the last value) to a flat vector, join the other flat leaves, add a linear."""
    unused = [i for i, n in enumerate(b.uses) if n == 0]
    i = unused[-1] if unused else len(b.values) - 1
    while b.values[i].kind != "flat":
        i = TO_HEAD[b.values[i].kind](b, i)
    for j in unused[:-1]:  # other flat leaves (a token branch) join the head
        if b.values[j].kind == "flat" and b.uses[j] == 0:
            i = b.add("cat", (i, j), [Value("flat", (b.values[i].shape[0] + b.values[j].shape[0],))], arg=-1)
    return b.add("module", (i,), [Value("flat", (b.rng.randint(2, 5),))],
                 b.register("head", nn.Linear(b.values[i].shape[0], b.rng.randint(2, 5))))


def random_model(seed: int, avoid: frozenset[str] = frozenset()) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A random model in eval mode and its example inputs, both determined by `seed`.

    `avoid` names constructs to leave out ("interpolate_shape": F.interpolate with size=other.shape[-2:]).
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        b = Builder(random.Random(seed), avoid)
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
