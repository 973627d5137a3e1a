"""Weight-only and dynamic int8 linear layers on GPT-style decoding, one token at a time, batch 1.

Two tables, one CPU thread, every row measured in one run beside its baseline (interleaved rounds:
each round runs every form once; medians; ratios against fp32 of the same run, above 1 is faster):

- Layers: the decoder's linear shapes (768 -> 2304 qkv, 768 -> 768 attention output, 768 -> 3072 and
  3072 -> 768 MLP, 768 -> 50304 LM head) at batch 1: fp32 `F.linear`, torch.ao's dynamic int8 Linear
  (fbgemm), and the weight-only kernels of `fxcompress.kernels.weight_only` on int8 per-channel and
  int4 group-wise (32 / 64 / 128) codes, with the kernel `choose` keeps (timed again: a second opinion).
- Decoding: a GPT-2-small-shaped decoder of our own (width 768, 12 layers, 12 heads, 50304-token
  vocabulary, learned positions, a key / value cache in buffers, `F.scaled_dot_product_attention`)
  generating `--tokens` tokens greedily after one token of prompt: tokens per second for fp32,
  torch.ao `quantize_dynamic`, ours weight-only int8 (per channel, symmetric), int4 (group 32 / 64 /
  128, asymmetric), and dynamic int8 (`LowerDynamicInt8`). With the LM head tied to the token
  embedding (GPT-2: 39 M of the 124 M weights) our weight-only forms quantize the shared table too
  (`InsertFakeQuant(select="wte", group_size=...)`: a grid per group of each token's row, the head's
  output channel; int8 per channel is one group per row) and `LowerWeightOnly` runs the head on its
  measured kernel while the embedding gathers its rows from the same packed codes; quantize_dynamic
  leaves F.linear (the tied head) fp32. The "-fp32-head" groups keep the tied head fp32 (as before it
  could be lowered), for comparison. The "untied" groups give the decoder its own LM head (an
  `nn.Linear` holding the same values, as GPT-NeoX / Llama-style models have), which the int4 and
  int8 forms quantize too. Forms are built in
  groups to bound memory, each group with its own fp32 baseline. Our passes pick each layer's kernel
  with warm caches, or with cold ones (`cold=True`: each call after evicting the caches) with --cold.
  Tokens per second are by the thread's CPU time (`--clock thread`, the default: on a shared machine
  the time a process waits preempted is not its own) or elapsed time (`--clock wall`).

Weights are random (nothing downloads): what the kernels see is the same as trained weights.
`benchmarks/bench_deploy.py` imports `layer_rows` and `decode_rows`.

    python benchmarks/deploy_decode.py [--tokens 8] [--rounds 3] [--layers 12] [--skip-layers] [--cold]
                                       [--clock thread|wall]
                                       [--groups int8 int4 int4-untied int8-untied int4-fp32-head int8-fp32-head]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

import fxcompress
from fxcompress.kernels import choose_kernel
from fxcompress.kernels.timing import CLOCKS
from fxcompress.kernels.weight_only import KERNELS, WeightOnlyLinear, choose
from fxcompress.passes import InsertFakeQuant, LowerDynamicInt8, LowerWeightOnly
from fxcompress.quant import GridWeight

WIDTH, HEADS, VOCAB, CONTEXT = 768, 12, 50304, 128
GRIDS = {"int8 per channel": dict(bits=8, symmetric=True, per_channel=True),
         "int4 g32": dict(bits=4, group_size=32), "int4 g64": dict(bits=4, group_size=64),
         "int4 g128": dict(bits=4, group_size=128)}
# "float" (the weight dequantized on the fly, what runs where nothing else fits) is measured by choose
# in the decoding table; the layer table times fp32 itself beside the quantized kernels
WEIGHT_ONLY_KERNELS = ("c_gemv", "int8pack", "int4pack", "fbgemm_fp16")
# Our passes time kernels with warm caches unless --cold: timing after evicting the caches (what decoding
# does to each layer's weights) subtracts two noisy medians, and on a loaded 2-core machine it chose worse
# kernels than warm timing (dynamic int8 1.15x against 1.75x, weight-only int8 0.95x against 1.11x).
COLD = False


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Attention(nn.Module):
    def __init__(self, context: int) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        shape = (1, HEADS, context, WIDTH // HEADS)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("positions", torch.arange(context), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split(WIDTH, dim=-1)
        q, k, v = (t.view(1, 1, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, k, v))
        self.k_cache.index_copy_(2, pos, k)  # the new token's key and value join the cache
        self.v_cache.index_copy_(2, pos, v)
        visible = (self.positions <= pos).view(1, 1, 1, -1)  # earlier positions only
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=visible)
        return self.proj(out.transpose(1, 2).reshape(1, 1, WIDTH))


class Block(nn.Module):
    def __init__(self, context: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(WIDTH), Attention(context)
        self.ln2, self.fc, self.out = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), pos)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class Decoder(nn.Module):
    """One decoding step: token [1, 1] at position pos [1] -> next-token logits [1, 1, vocab].
    `tied`: the LM head reads the token embedding (GPT-2); otherwise it is a linear layer of its own."""

    def __init__(self, layers: int = 12, context: int = CONTEXT, tied: bool = True) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, WIDTH), nn.Embedding(context, WIDTH)
        self.blocks = nn.ModuleList(Block(context) for _ in range(layers))
        self.ln_f = nn.LayerNorm(WIDTH)
        self.head = None if tied else nn.Linear(WIDTH, VOCAB, bias=False)
        for module in self.modules():  # GPT-2's initialisation scale
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        x = self.wte(token) + self.wpe(pos)
        for block in self.blocks:
            x = block(x, pos)
        if self.head is None:
            return F.linear(self.ln_f(x), self.wte.weight)  # the LM head tied to the token embedding
        return self.head(self.ln_f(x))


def generate(model: nn.Module, tokens: int) -> list[int]:
    """Greedy decoding of `tokens` tokens after token 0 (the caches are overwritten position by position)."""
    token, out = torch.zeros(1, 1, dtype=torch.long), []
    with torch.no_grad():
        for position in range(tokens):
            logits = model(token, torch.tensor([position]))
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(int(token))
    return out


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 1, dtype=torch.long), torch.tensor([0])


def _shared_embedding(form: nn.Module, base: Decoder) -> nn.Module:
    """Point the form's float embeddings at the base model's tensors: one copy in memory (a table the
    form lowered with its tied head holds no float weight)."""
    for name in ("wte", "wpe"):
        if isinstance(getattr(getattr(form, name), "weight", None), torch.Tensor):
            getattr(form, name).weight = getattr(base, name).weight
    return form


def forms(base: Decoder, group: str) -> dict[str, tuple[nn.Module, dict]]:
    """The decoder's forms of one group, each with its lowering statistics (kernels chosen per layer).
    With a tied head, the weight-only forms quantize the shared table unless the group ends in -fp32-head."""
    x = example_inputs()
    built: dict[str, tuple[nn.Module, dict]] = {"fp32": (base, {})}
    table = base.head is None and not group.endswith("-fp32-head")
    if group.startswith("int8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao is deprecated: measured while it is importable
            built["torch.ao quantize_dynamic"] = (torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8), {})
        built["ours dynamic int8"] = _lower(base, [LowerDynamicInt8(cold=COLD, **_tied_select(base, group))], x)
        built["ours weight-only int8 per channel"] = _weight_only(base, GRIDS["int8 per channel"], x, table)
    else:
        for name in ("int4 g32", "int4 g64", "int4 g128"):
            built[f"ours weight-only {name}"] = _weight_only(base, GRIDS[name], x, table)
    return built


def _tied_select(base: Decoder, group: str) -> dict:
    """LowerDynamicInt8 lowers a tied head (named `linear` in the traced decoder) unless -fp32-head."""
    return {"select": "(?!linear$).*"} if base.head is None and group.endswith("-fp32-head") else {}


def _weight_only(base: Decoder, grid: dict, x: tuple, table: bool) -> tuple[nn.Module, dict]:
    """Fake-quant linear layers, and with `table` the tied token table (a grid per group of each token's
    row: int8 per channel is one group per row), then LowerWeightOnly."""
    passes = [InsertFakeQuant(method="linear", types=("linear",), **grid)]
    if table:
        row_grid = {k: v for k, v in grid.items() if k != "per_channel"}
        passes.append(InsertFakeQuant(method="linear", select="wte", **({"group_size": WIDTH} | row_grid)))
    return _lower(base, [*passes, LowerWeightOnly(kernels=WEIGHT_ONLY_KERNELS, cold=COLD)], x)


def _lower(base: Decoder, passes: list, x: tuple) -> tuple[nn.Module, dict]:
    gm = fxcompress.compile(base, passes, example_inputs=x)
    gc.collect()
    stats = fxcompress.history(gm)[-1].stats
    return _shared_embedding(gm, base), stats


def tokens_per_second(built: dict[str, tuple[nn.Module, dict]], tokens: int, rounds: int,
                      clock: str = "thread") -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in built}
    names, now = list(built), CLOCKS[clock]
    for round_ in range(rounds + 1):  # round 0 warms every form up (kernels packed on first use)
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = now()
            generate(built[name][0], tokens)
            if round_:
                samples[name].append(tokens / (now() - start))
    return {name: statistics.median(values) for name, values in samples.items()}


GROUPS = ("int8", "int4", "int4-untied")  # "-untied": the decoder has its own LM head, quantized with the rest
# "-fp32-head": GPT-2's tied head (and its table) kept fp32 by our passes, as before they could lower it
OPTIONAL_GROUPS = ("int8-untied", "int4-fp32-head", "int8-fp32-head")


def decode_rows(tokens: int = 8, rounds: int = 3, layers: int = 12, clock: str = "thread",
                groups: tuple[str, ...] = GROUPS) -> list[dict]:
    """Tokens per second of every form, with its speed-up over fp32 of its group and the kernels chosen."""
    rows = []
    with one_thread():
        for tied in (True, False):
            chosen = [g for g in groups if g.endswith("-untied") != tied]
            if not chosen:
                continue
            torch.manual_seed(0)
            base = Decoder(layers, tied=tied).eval()
            reference = generate(base, tokens)
            for group in chosen:
                built = forms(base, group)
                rates = tokens_per_second(built, tokens, rounds, clock)
                for name, (model, stats) in built.items():
                    rows.append({"group": group, "form": name, "tokens_per_s": rates[name],
                                 "speedup": rates[name] / rates["fp32"], "kernels": _kernel_counts(stats),
                                 "same_tokens": generate(model, tokens) == reference})
                del built
                gc.collect()
            del base
            gc.collect()
    return rows


def _kernel_counts(stats: dict) -> str:
    counts = stats.get("kernels", {})
    return ", ".join(f"{k} {n}" for k, n in counts.items() if n) or "-"


def layer_rows(rounds: int = 7, clock: str = "thread") -> list[dict]:
    """Milliseconds per call of every kernel on each decoder linear shape at batch 1."""
    rows = []
    shapes = [("qkv", 768, 2304), ("attn out", 768, 768), ("mlp in", 768, 3072), ("mlp out", 3072, 768),
              ("lm head", 768, VOCAB)]
    with one_thread():
        for name, fan_in, fan_out in shapes:
            torch.manual_seed(0)
            weight, bias, x = torch.randn(fan_out, fan_in) * 0.02, torch.randn(fan_out), torch.randn(1, fan_in)
            for grid_name, grid in GRIDS.items():
                rows.append({"layer": name, "shape": f"{fan_in}->{fan_out}", "grid": grid_name,
                             **_layer_times(weight, bias, x, grid, rounds, clock)})
    return rows


def _layer_times(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, grid: dict, rounds: int,
                 clock: str) -> dict:
    quant = GridWeight(grid["bits"], "linear", grid.get("symmetric", False), axis=0,
                       group_size=grid.get("group_size"))
    module = WeightOnlyLinear.from_grouped(quant.grouped(weight), bias)
    candidates: dict[str, Callable] = {"fp32": lambda t: F.linear(t, weight, bias)}
    candidates.update({k: KERNELS[k].build(module) for k in WEIGHT_ONLY_KERNELS if KERNELS[k].refusal(module) is None})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        linear.weight.data, linear.bias.data = weight, bias
        candidates["torch.ao dynamic"] = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear), {nn.Linear})
    times = choose_kernel(candidates, (x,), baseline="fp32", repeats=rounds, clock=clock).times_ms
    chosen = choose(module, x, WEIGHT_ONLY_KERNELS, repeats=rounds)
    return {"times_ms": times, "chosen": chosen.kernel, "held_bytes": module.held_bytes(),
            "fp32_bytes": 4 * (weight.numel() + bias.numel())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--skip-layers", action="store_true", help="only the decoding table")
    parser.add_argument("--cold", action="store_true", help="our passes time kernels with cold caches")
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread",
                        help="tokens per second by the thread's CPU time or by elapsed time")
    parser.add_argument("--groups", nargs="+", choices=(*GROUPS, *OPTIONAL_GROUPS), default=list(GROUPS))
    args = parser.parse_args()
    global COLD
    COLD = args.cold
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, 1 thread\n")
    if not args.skip_layers:
        kernels = ["fp32", "torch.ao dynamic", *WEIGHT_ONLY_KERNELS]
        print("| layer | shape | grid | " + " | ".join(f"{k} ms" for k in kernels) + " | chosen | held / fp32 bytes |")
        print("|---|---|---|" + "---:|" * len(kernels) + "---|---:|")
        for row in layer_rows(max(args.rounds, 5), args.clock):
            times = [f"{row['times_ms'][k]:.3f}" if k in row["times_ms"] else "-" for k in kernels]
            print(f"| {row['layer']} | {row['shape']} | {row['grid']} | " + " | ".join(times)
                  + f" | {row['chosen']} | {row['held_bytes'] / row['fp32_bytes']:.3f} |", flush=True)
        print()
    print(f"decoder: width {WIDTH}, {args.layers} layers, {args.tokens} tokens, batch 1, median of {args.rounds}, "
          f"kernels chosen with {'cold' if COLD else 'warm'} caches, tokens/s by {args.clock} clock\n")
    print("| group | form | tokens/s | vs fp32 | kernels chosen (layers) | same tokens as fp32 |")
    print("|---|---|---:|---:|---|---|")
    for row in decode_rows(args.tokens, args.rounds, args.layers, args.clock, tuple(args.groups)):
        print(f"| {row['group']} | {row['form']} | {row['tokens_per_s']:.2f} | {row['speedup']:.2f}x | "
              f"{row['kernels']} | {row['same_tokens']} |", flush=True)


if __name__ == "__main__":
    main()
