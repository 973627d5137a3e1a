"""Data-parallel calibration and fine-tuning of compressed models: two gloo ranks in forked CPU processes.

Each test runs a worker on two ranks joined through a file store in tmp_path (no ports), under a
process-group timeout and an overall deadline, so a hang fails the test instead of blocking CI.
"""
import datetime
import importlib
import runpy
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.errors import ConfigError, PreconditionError, VerificationError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks
from fxcompress.quant import ActivationQuant, KMeansWeight
from fxcompress.quant.observers import OBSERVERS, distributed
from fxcompress.training import check_replicas, shard
from fxcompress.zoo import LeNet300100

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ddp_finetune.py"
WORLD = 2
DEADLINE_S = 60.0  # far above the few seconds a run takes; only a hang reaches it


@pytest.fixture(scope="module", autouse=True)
def _loaded_before_forking():
    """Modules torch imports lazily on first use (ShapeProp: sympy; DistributedDataParallel: dynamo),
    seconds each: loaded once, before the ranks fork, rather than again in every rank; and here, not
    at collection, where every test process would pay for them."""
    importlib.import_module("torch._dynamo")
    importlib.import_module("torch.fx.experimental.symbolic_shapes")


def _rank_main(rank, folder, work, args):
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=30))
    try:
        torch.set_num_threads(1)
        torch.save(work(rank, *args), f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, work, *args):
    """work(rank, *args) on WORLD forked ranks of one process group; their return values, by rank."""
    # fork: the children inherit the imported modules (spawn would import torch again, seconds each)
    context = mp.start_processes(_rank_main, args=(str(tmp_path), work, args), nprocs=WORLD, join=False,
                                 start_method="fork")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1.0):  # raises with the child's traceback if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers still running after {DEADLINE_S} s")
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def same_bits(a, b):
    return torch.equal(bits(a), bits(b))


# --- calibration: two ranks on halves == one process on everything ---------------------------------

def calibration_batches(count=4, size=64):
    """Batches whose two halves differ in range and carry outliers, so rank-local grids would differ."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(count):
        x = torch.randn(size, 32, generator=g)
        x[: size // 2] *= 0.5
        x[size // 2:] *= 2.0 + i
        x[size // 2, i] = 40.0 + 8 * i  # an outlier per batch, in the second half: the percentile range doubles
        batches.append(x)
    return batches


def half(batches, rank):
    return [b.chunk(WORLD)[rank] for b in batches]


OBSERVER_OPTIONS = {"minmax": {}, "moving_average": {"momentum": 0.3}, "percentile": {"percentile": 99.0, "bins": 64}}


def calibrated_grids(data):
    """Per observer kind, the (scale, zero_point) an ActivationQuant calibrated on `data` ends with."""
    grids = {}
    for kind in OBSERVERS:
        quant = ActivationQuant(bits=8, observer=kind, options=OBSERVER_OPTIONS[kind])
        quant.calibrating = True
        for x in data:
            quant(x)
        grids[kind] = (quant.grid().scale, quant.grid().zero_point)
    return grids


def calibrate_half(rank):
    assert distributed()
    return calibrated_grids(half(calibration_batches(), rank))


def test_ranks_calibrating_on_halves_get_the_grids_of_one_process_on_all_data(tmp_path):
    ranks = run_ranks(tmp_path, calibrate_half)
    assert not distributed()
    union = calibrated_grids(calibration_batches())
    alone = calibrated_grids(half(calibration_batches(), 0))
    for kind, (scale, zero_point) in union.items():
        for grids in ranks:
            assert same_bits(grids[kind][0], scale) and same_bits(grids[kind][1], zero_point), kind
        # rank 0's half alone gives another grid: the reduction is what made the ranks agree with the union
        assert not same_bits(alone[kind][0], scale), kind


# --- fine-tuning under DistributedDataParallel ---------------------------------------------------------

QUANT_RULES = [("fc[12]\\.weight", "kmeans", 4), ("fc3\\.weight", "linear", 6)]
LAYERS = ("fc1", "fc2", "fc3")


def compressed_lenet(calibration):
    torch.manual_seed(0)  # every rank builds the same model
    x = calibration[0]
    return fxcompress.compile(LeNet300100(), [
        InsertMasks(sparsity=0.9, scope="global"),
        InsertFakeQuant(rules=QUANT_RULES, activations=ActivationConfig(observer="moving_average", freeze=False)),
    ], example_inputs=(x,), calibration_data=calibration)


def finetune(rank, steps):
    g = torch.Generator().manual_seed(7)
    count = WORLD * 8 * steps  # batches of 8 on each rank
    my_x, my_y = shard((torch.randn(count, 1, 28, 28, generator=g), torch.randint(0, 10, (count,), generator=g)))
    gm = compressed_lenet(list(my_x.split(8)))
    before = {name: m.codebook.detach().clone() for name, m in gm.named_modules() if isinstance(m, KMeansWeight)}
    # no buffer broadcast before each forward: the observers' own reduction keeps their statistics equal
    model = DistributedDataParallel(gm, forward_sync_buffers=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    for x, y in zip(my_x.split(8), my_y.split(8)):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    compared = check_replicas(model)
    weights = {layer.name: effective_weight(gm, layer) for layer in find_layers(gm)}  # mask, then fake-quant
    result = {"compared": compared, "before": before,
              "codebooks": {name: m.codebook.detach().clone() for name, m in gm.named_modules()
                            if isinstance(m, KMeansWeight)},
              "masks": {layer: gm.get_submodule(layer).weight_mask.clone() for layer in LAYERS},
              "pruned_values": {layer: weights[layer][gm.get_submodule(layer).weight_mask == 0] for layer in LAYERS}}
    with torch.no_grad():  # one rank's centroid drifts: check_replicas must name it
        if rank == 1:
            gm.fc2.weight_quant.codebook[0, 0] += 1e-6
    try:
        check_replicas(model)
    except VerificationError as error:
        result["drift"] = str(error)
    if rank == 1:  # one rank's model has a tensor the other lacks: every rank must refuse, none may hang
        gm.register_buffer("extra", torch.zeros(1))
    try:
        check_replicas(model)
    except VerificationError as error:
        result["layout"] = str(error)
    return result


def test_ddp_finetunes_a_masked_kmeans_model_with_exact_masks_and_equal_centroids(tmp_path):
    ranks = run_ranks(tmp_path, finetune, 3)
    first = ranks[0]
    assert first["compared"] > 10  # parameters and buffers: weights, codebooks, codes, masks, observers
    for result in ranks:
        for name, codebook in result["codebooks"].items():
            assert same_bits(codebook, first["codebooks"][name]), name
            assert not torch.equal(codebook, result["before"][name]), name  # the centroids did train
        for layer, mask in result["masks"].items():
            assert torch.equal(mask, first["masks"][layer])
            assert 0 < int((mask == 0).sum()) and bool((result["pruned_values"][layer] == 0).all()), layer
    assert "fc2.weight_quant.codebook" in ranks[0]["drift"] and "ranks [1]" in ranks[0]["drift"]
    assert all("module.extra" in result["layout"] for result in ranks)


def test_shard_gives_each_rank_an_equal_disjoint_part():
    x, y = torch.arange(11).float(), torch.arange(11)
    parts = [shard((x, y), rank, 3) for rank in range(3)]
    assert [len(px) for px, _ in parts] == [3, 3, 3]  # 11 = 3 x 3 + 2: the tail is dropped on every rank
    assert sorted(torch.cat([py for _, py in parts]).tolist()) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert torch.equal(shard((x, y))[0], x)  # not distributed: everything
    with pytest.raises(ConfigError, match="shard.rank"):
        shard((x, y), 3, 3)


def test_check_replicas_needs_a_process_group():
    with pytest.raises(PreconditionError, match="init_process_group"):
        check_replicas(LeNet300100())


def run_example(rank):
    return runpy.run_path(str(EXAMPLE))["main"](["--dense-epochs", "3", "--epochs", "1"])


def test_torchrun_example_finetunes_in_step_on_two_ranks(tmp_path):
    load_dataset("digits")  # reads the digits file here, once (kept per process), rather than in each rank
    ranks = run_ranks(tmp_path, run_example)
    assert ranks[0] == ranks[1]  # the same accuracies: one model, held by both ranks
    result = ranks[0]
    assert result["pruned_zero"] and result["centroids_moved"] and result["replica_tensors"] > 10
    assert result["dense"] > 0.8 and result["finetuned"] > max(result["quantized"], result["dense"] - 0.1)
