"""The streaming global selection equals a full ranking of all scores, ties and -inf included, and
keeps memory to one layer's scores."""
import copy
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError, PreconditionError
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.passes import insert_masks as insert_masks_module
from fxcompress.pruning.importance import group_dims, masked_scores
from fxcompress.pruning import selection as selection_module
from fxcompress.pruning.selection import LowestN, order_keys


def reference_pruned(scores, n):
    """The first n of a stable sort of all scores, as one bool per score (True: pruned)."""
    flat = torch.cat([s.flatten() for s in scores])
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.sort(flat, stable=True).indices[:n]] = True
    return pruned


def streamed_pruned(scores, n):
    selection = LowestN.find(lambda: ((f"layer{i}", s) for i, s in enumerate(scores)), n)
    return torch.cat([~selection.keep(s, f"layer{i}").flatten() for i, s in enumerate(scores)])


def tied_scores(seed):
    """Layers of scores with many exact ties, -inf (already pruned), zeros, -0.0 and negatives."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
        shape = tuple(int(d) for d in torch.randint(1, 40, (2,), generator=g))
        values = torch.randint(-3, 8, shape, generator=g).float() / 4  # few distinct values: ties everywhere
        values[torch.rand(shape, generator=g) < 0.1] = float("-inf")
        values[torch.rand(shape, generator=g) < 0.05] = -0.0
        layers.append(values)
    return layers


@pytest.fixture(params=["ranked", "streamed"])
def ranking(request, monkeypatch):
    """Both ways LowestN.find takes: a few scores ranked at once, or (no scores counting as few) the histograms."""
    if request.param == "streamed":
        monkeypatch.setattr(selection_module, "_SMALL", 0)
    return request.param


@pytest.mark.parametrize("seed", range(12))
def test_streaming_selection_equals_a_stable_sort_of_all_scores(seed, ranking, monkeypatch):
    if seed % 2:  # layers cut into many chunks of keys (every odd seed's layers: 1 to 34 borders), ties spanning them
        monkeypatch.setattr(selection_module, "_CHUNK", 31)
    scores = tied_scores(seed)
    total = sum(s.numel() for s in scores)
    for n in {0, 1, total // 3, total // 2, total - 1, total}:
        assert torch.equal(streamed_pruned(scores, n), reference_pruned(scores, n)), n


def test_threshold_is_the_nth_lowest_score_as_kthvalue_finds_it(ranking):
    torch.manual_seed(0)
    scores = [torch.randn(300, 70), torch.randn(5000).abs(), torch.rand(64, 3, 3) * 1e-30, -torch.rand(7)]
    flat = torch.cat([s.flatten() for s in scores])
    for n in (1, 3, 17, 4000, flat.numel()):
        selection = LowestN.find(lambda: (("x", s) for s in scores), n)
        magnitude = torch.tensor([abs(selection.key)], dtype=torch.int32).view(torch.float32).item()
        assert (magnitude if selection.key >= 0 else -magnitude) == torch.kthvalue(flat, n).values.item()
        assert torch.equal(streamed_pruned(scores, n), reference_pruned(scores, n))


def test_order_keys_order_as_the_floats():
    x = torch.tensor([float("-inf"), -3.5, -1e-40, -0.0, 0.0, 1e-45, 2.0, float("inf")])
    keys = order_keys(x)
    assert torch.all(keys[1:] >= keys[:-1])
    assert keys[3] == keys[4]  # -0.0 == +0.0
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(x, stable=True))


def test_nan_scores_are_refused_naming_the_layer():
    with pytest.raises(PreconditionError, match="fc2 has 1 NaN"):
        LowestN.find(lambda: iter([("fc1", torch.ones(3)), ("fc2", torch.tensor([1.0, float("nan")]))]), 2)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(40, 64), nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def full_ranking_masks(model, sparsity, granularity="element"):
    """InsertMasks(scope='global') the straightforward way: every layer's scores at once, one stable sort."""
    layers = [model.fc1, model.fc2, model.fc3]
    dims = [group_dims(granularity, "linear", 2) for _ in layers]
    masks = [getattr(m, "weight_mask", None) for m in layers]
    scores = [masked_scores(m.weight, mask, d, "abs") for m, mask, d in zip(layers, masks, dims)]
    pruned = reference_pruned(scores, round(sparsity * sum(s.numel() for s in scores)))
    keeps = torch.split(~pruned, [s.numel() for s in scores])
    return [k.view(s.shape).expand(m.weight.shape) & (mask.bool() if mask is not None else True)
            for k, s, m, mask in zip(keeps, scores, layers, masks)]


@pytest.mark.parametrize("granularity", ["element", "filter", "channel"])
def test_insert_masks_global_equals_the_full_ranking_with_ties_and_a_second_stage(granularity, ranking):
    torch.manual_seed(1)
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.round(p * 40) / 40)  # a few hundred distinct values: ties at every threshold
    x = torch.randn(2, 40)
    expected = full_ranking_masks(model, 0.6, granularity)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.6, scope="global", granularity=granularity)],
                            example_inputs=(x,))
    for layer, mask in zip(("fc1", "fc2", "fc3"), expected):
        assert torch.equal(getattr(gm, layer).weight_mask, mask), layer
    expected = full_ranking_masks(gm, 0.8, granularity)  # advancing existing masks: pruned groups rank -inf
    gm = fxcompress.compile(gm, [InsertMasks(sparsity=0.8, scope="global", granularity=granularity)],
                            example_inputs=(x,))
    for layer, mask in zip(("fc1", "fc2", "fc3"), expected):
        assert torch.equal(getattr(gm, layer).weight_mask, mask), layer


class TopkSelection:
    """The selection as it was before streaming: all scores concatenated, torch.topk's lowest n."""

    def __init__(self, gm, targets):
        scores = [insert_masks_module._scores(gm, t) for t in targets]
        flat = torch.cat([s.flatten() for s in scores])
        n = round(targets[0].sparsity * flat.numel())
        ordered = torch.sort(flat).values
        assert ordered[n - 1] < ordered[n]  # no tie at the threshold, so topk's choice is the only one
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.topk(flat, n, largest=False).indices] = False
        parts = torch.split(keep, [s.numel() for s in scores])
        self.keeps = iter([part.view(s.shape) for part, s in zip(parts, scores)])

    def keep(self, scores, name, out=None):
        keep = next(self.keeps)
        return keep if out is None else out.copy_(keep)


def pipeline_bytes(model, x, tmp_path, name):
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.9, scope="global")], example_inputs=(x,))
    gm = fxcompress.compile(gm, [InsertFakeQuant(bits=4, method="kmeans"), LowerToEncoded()], example_inputs=(x,))
    fxcompress.save(gm, tmp_path / name)
    return (tmp_path / name).read_bytes()


def test_file_bytes_equal_those_of_the_topk_ranking(tmp_path, monkeypatch):
    torch.manual_seed(3)
    model, x = MLP(), torch.randn(2, 40)
    streamed = pipeline_bytes(copy.deepcopy(model), x, tmp_path, "streamed.fxc")
    monkeypatch.setattr(insert_masks_module, "_global_selection", lambda gm, targets, each: TopkSelection(gm, targets))
    ranked = pipeline_bytes(copy.deepcopy(model), x, tmp_path, "ranked.fxc")
    assert len(streamed) > 1000 and streamed == ranked


# Run in a fresh process (the test below): a process-wide peak needs a process that did nothing else, and
# glibc reads the allocator setting at start-up. The script imports only what it measures (neither pytest
# nor this module: about 0.4 s of CPU less).
_MEMORY_SCRIPT = '''
import gc
gc.disable()  # while importing: the collector would scan the heap torch's import grows hundreds of times (0.7 s)
import resource, torch
from torch import nn
import fxcompress
from fxcompress.passes import InsertMasks
torch.set_num_threads(1)
gc.enable()
# what the imports made lives as long as the process: each gc.collect below then scans only what came after
# (about 0.25 s of CPU each in a process holding torch); the garbage of the warm-up compile is still freed
gc.freeze()


def _status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _peak_growth_of_global_masks(inplace):
    """Peak resident growth of compile(InsertMasks(0.9, global)) over the built model, in model bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(32)])  # 34 MB of fp32 weights
    x = torch.randn(2, 512)
    fp32 = sum(p.numel() for p in model.parameters()) * 4
    fxcompress.compile(nn.Linear(8, 8), [InsertMasks(sparsity=0.5, scope="global")],
                       example_inputs=(torch.randn(1, 8),))
    gc.collect()
    try:  # Linux: "5" sets the peak back to the current resident size
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        peak_kb = lambda: _status_kb("VmHWM")  # noqa: E731
    except OSError:  # no reset: the process-wide peak counts, so only a fresh process measures this
        peak_kb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    before = _status_kb("VmRSS")
    fxcompress.compile(model, [InsertMasks(sparsity=0.9, scope="global")], example_inputs=(x,), inplace=inplace)
    return (peak_kb() - before) * 1024 / fp32


print(_peak_growth_of_global_masks(True), _peak_growth_of_global_masks(False))
'''


def test_global_masks_hold_one_layer_of_scores_not_all_of_them():
    """Ranking all scores at once took about 9x the model's bytes (scores, their concatenation, topk's
    values and int64 indices); streamed, the pass holds the masks (a byte a weight) and one layer's
    scores. With inplace=False compile adds its one copy of the model."""
    # freed tensors go back to the system at once (no heap kept by glibc), so the peak is what was held
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True, env=env)
    inplace, copied = map(float, out.stdout.split()[-2:])
    assert inplace < 0.8, inplace  # measured 0.37x; ranking all scores at once: 8.9x
    assert copied < 1.8, copied    # measured 1.35x; ranking all scores at once: 9.9x


class _Terminal(io.StringIO):
    def isatty(self):  # tqdm draws only on a terminal
        return True


def test_progress_names_each_layer_of_both_score_passes_and_the_masks(ranking, monkeypatch):
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    fxcompress.compile(MLP(), [InsertMasks(sparsity=0.5, scope="global")], example_inputs=(torch.randn(2, 40),),
                       progress=True)
    drawn = screen.getvalue()
    visits = ("global scores (1/2)", "global scores (2/2)") if ranking == "streamed" else ("global scores",)
    for what in (*visits, "masks", "fc1", "fc2", "fc3"):
        assert what in drawn, what
    assert ranking == "streamed" or "(1/2)" not in drawn  # one visit is not called the first of two


def test_keep_into_a_mask_allocated_before_the_scores_is_the_same_mask():
    scores = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
    scores[3, :7] = scores[0, 0]  # ties at the threshold: the earliest pruned, in both forms
    n = int((scores < scores[0, 0]).sum()) + 4
    expected = LowestN.find(lambda: [("fc", scores)], n).keep(scores, "fc")
    out = torch.zeros(scores.shape, dtype=torch.bool)  # all False: every True below is written by keep
    got = LowestN.find(lambda: [("fc", scores)], n).keep(scores, "fc", out=out)
    assert got.data_ptr() == out.data_ptr() and torch.equal(got, expected)
    assert int((~got).sum()) == n
    for bad in (torch.zeros(64, 48), torch.zeros(48, 64, dtype=torch.bool), torch.zeros(48, 64, dtype=torch.bool).t()):
        with pytest.raises(ConfigError, match="LowestN.keep: layer 'fc'"):
            LowestN.find(lambda: [("fc", scores)], n).keep(scores, "fc", out=bad)
