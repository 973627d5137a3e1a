"""Sequential calibration: blocks from repeated module paths, one set of statistics per shared
input, each group calibrated on what the already-compressed groups before it produce, graph
rewrites during the walk, and memory bounded to one block boundary plus one Hessian."""
import copy

import pytest
import torch
from torch import nn
from torch.fx import Interpreter

import fxcompress
from fxcompress.calibration import plan_blocks, walk
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.layers import input_arg, layer_node, select_layers
from fxcompress.pruning.masks import set_mask, stored_weight


class Block(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.out = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + self.out(torch.relu(self.q(x)) * self.k(x))


class Stack(nn.Module):
    def __init__(self, blocks: int = 3, width: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(width) for _ in range(blocks))
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _compiled(model, width=16):
    return fxcompress.compile(model, [], example_inputs=(torch.randn(2, 5, width),))


def _layer_inputs(gm, layers, batches):
    """Each layer's input rows over `batches`, read from the graph as it is now (torch.fx Interpreter)."""
    wanted = {}
    for layer in layers:
        wanted.setdefault(input_arg(layer_node(gm, layer)), []).append(layer.name)
    seen = {layer.name: [] for layer in layers}

    class Capture(Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            for name in wanted.get(node, ()):
                seen[name].append(value.detach().reshape(-1, value.shape[-1]).double())
            return value

    with torch.no_grad():
        for batch in batches:
            Capture(gm).run(batch)
    return {name: torch.cat(rows) for name, rows in seen.items()}


def test_blocks_come_from_repeated_paths_and_groups_from_shared_inputs():
    gm = _compiled(Stack())
    blocks = plan_blocks(gm, select_layers(gm, "test"))
    assert [[g.names for g in block] for block in blocks] == [
        *[[[f"layers.{i}.q", f"layers.{i}.k"], [f"layers.{i}.out"]] for i in range(3)], [["head"]]]


def test_each_group_sees_the_inputs_the_compressed_groups_before_it_produce():
    model = Stack().eval()
    gm = _compiled(copy.deepcopy(model))
    dense = _compiled(model)
    batches = [torch.randn(3, 5, 16) for _ in range(4)]
    layers = select_layers(gm, "test")
    recorded, shared = {}, {}

    def prune_half(group, stats):  # a real compression that also rewrites the graph (functional layers, mask nodes)
        shared[tuple(group.names)] = stats
        for layer in group.layers:
            recorded[layer.name] = stats.hessian.clone()
            weight = stored_weight(gm, layer)
            set_mask(gm, layer, weight.abs() >= weight.abs().median())
        return {name: stats.rows for name in group.names}

    report = walk(gm, layers, batches, prune_half, owner="test")
    assert set(report.layers.values()) == {60} and report.batches == 4
    assert len(shared) == 7  # q and k of a block share one set of statistics
    final, before = _layer_inputs(gm, layers, batches), _layer_inputs(dense, layers, batches)
    for name, hessian in recorded.items():
        x = final[name]  # a layer's input depends only on the layers before it, all pruned by the end
        _assert_float32_close(hessian, x.T @ x / x.shape[0])
    x = before["layers.0.q"]
    _assert_float32_close(recorded["layers.0.q"], x.T @ x / x.shape[0])
    x = before["head"]  # the unpruned model's statistics are not what the head was calibrated on
    assert float((recorded["head"] - x.T @ x / x.shape[0]).abs().max()) > 1e-2 * float(recorded["head"].abs().max())


def _assert_float32_close(hessian: torch.Tensor, exact: torch.Tensor) -> None:
    """Equal up to the float32 products the statistics take (a millionth of the largest entry)."""
    torch.testing.assert_close(hessian, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))


def _peak_rss_growth(run) -> int:
    """Bytes the process's peak resident set grows by while `run()` runs (Linux /proc; the peak is reset
    first). tracemalloc would not do: torch's CPU allocator does not report to it."""
    def read(key):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    start = read("VmRSS:")
    run()
    return read("VmHWM:") - start


def test_memory_is_one_block_boundary_plus_one_hessian_not_every_blocks_activations():
    # 16 blocks: holding every block's inputs (64 MiB) stands well apart from one boundary (4 MiB) even in a
    # test worker whose heap earlier tests left fragmented (8 blocks once measured 17 MiB against a 16 MiB bound)
    depth, width, rows, count = 16, 128, 1024, 8
    model = nn.Sequential(*[layer for _ in range(depth) for layer in (nn.Linear(width, width), nn.ReLU())]).eval()
    gm = fxcompress.compile(model, [], example_inputs=(torch.randn(2, width),))
    batches = [torch.randn(rows, width) for _ in range(count)]
    boundary = count * rows * width * 4  # one block's activations over the calibration data: 4 MiB
    every_block = depth * boundary       # what holding every layer's inputs would take: 64 MiB
    reports = []
    walk(gm, select_layers(gm, "test"), batches[:1], lambda g, s: {}, owner="test")  # one-time allocations first
    growth = _peak_rss_growth(lambda: reports.append(walk(gm, select_layers(gm, "test"), batches,
                                                          lambda g, s: {}, owner="test")))
    hessian = width * width * 8
    # and four per-channel float64 vectors: norms, mean |x|, max |x| and the products' offset
    assert reports[0].peak_held_bytes <= boundary + hessian + 4 * width * 8
    assert growth < every_block / 2, f"peak grew by {growth / 2**20:.1f} MiB; every block's inputs are {every_block / 2**20:.0f} MiB"


def test_calibration_refusals_name_what_is_missing():
    gm = _compiled(Stack())
    layers = select_layers(gm, "test")
    with pytest.raises(PreconditionError, match="needs calibration data"):
        walk(gm, layers, None, lambda g, s: {}, owner="SparseGPT")
    with pytest.raises(PreconditionError, match="yielded no batch.*generator"):
        walk(gm, layers, [], lambda g, s: {}, owner="SparseGPT")
    with pytest.raises(PreconditionError, match=r"batch 1: the input of layers\.0\.q, layers\.0\.k is \(2, 5, 9\)"):
        walk(gm, layers, [torch.randn(2, 5, 16), torch.randn(2, 5, 9)], lambda g, s: {}, owner="SparseGPT")
    with pytest.raises(PreconditionError, match=r"batch 0 fails at node .*module 'layers\.0\.q' \(Linear\)"):
        walk(gm, layers, [torch.randn(2, 5, 16, dtype=torch.float64)], lambda g, s: {}, owner="SparseGPT")
    conv = fxcompress.compile(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)), [],
                              example_inputs=(torch.randn(1, 3, 4, 4),))
    with pytest.raises(ConfigError, match=r"linear layers only.*0 \(conv2d\)"):
        walk(conv, select_layers(conv, "test"), [torch.randn(1, 3, 4, 4)], lambda g, s: {}, owner="SparseGPT")
