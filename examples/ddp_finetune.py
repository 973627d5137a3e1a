"""Data-parallel fine-tuning of a pruned, k-means-shared LeNet-300-100 with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/ddp_finetune.py                 # two CPU processes, gloo
    torchrun --nproc_per_node=2 examples/ddp_finetune.py --epochs 10 --bits 4

Each rank trains on its own shard of scikit-learn's digits (offline):
    1. dense training in DDP;
    2. compile: global magnitude pruning (InsertMasks), k-means weight sharing for fc1 / fc2 and
       a linear grid for fc3 (InsertFakeQuant), 8-bit activations calibrated on each rank's shard;
       the observers reduce their statistics across ranks, so every rank gets the grids one
       calibration over all shards would give;
    3. fine-tuning in DDP (no find_unused_parameters): centroids and fc3's float weights train,
       pruned weights stay exactly zero, the activation observers keep following the data in step;
    4. `check_replicas` proves every rank holds bitwise the same centroids, masks and observer
       state; rank 0 prints accuracies and the summary.

Run without torchrun it trains in one process. `main(argv)` returns rank 0's figures.
"""
from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fxcompress
from fxcompress.datasets import load_dataset
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import ActivationConfig, InsertFakeQuant, InsertMasks
from fxcompress.quant import KMeansWeight
from fxcompress.training import check_replicas, evaluate, shard, train
from fxcompress.zoo import LeNet300100

QUANT_RULES = [("fc[12]\\.weight", "kmeans", 5), ("fc3\\.weight", "linear", 8)]


def parallel(model: torch.nn.Module) -> torch.nn.Module:
    """The model wrapped for data-parallel training when several ranks run, else itself."""
    return DistributedDataParallel(model) if dist.is_initialized() and dist.get_world_size() > 1 else model


def pruned_weights_are_zero(gm: torch.fx.GraphModule) -> bool:
    """Whether every layer's effective weight (after its mask and fake-quant) is exactly 0 where pruned."""
    return all(bool((effective_weight(gm, layer)[gm.get_buffer(f"{layer.name}.weight_mask") == 0] == 0).all())
               for layer in find_layers(gm))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs of the compressed model")
    parser.add_argument("--sparsity", type=float, default=0.8, help="global weight sparsity (one shot)")
    parser.add_argument("--bits", type=int, default=5, help="k-means bits of fc1 and fc2")
    args = parser.parse_args(argv)
    if not dist.is_initialized() and "RANK" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the same initial model on every rank

    data = load_dataset("digits")
    mine = shard(data)
    model = LeNet300100(in_features=data.channels * data.image_size ** 2, num_classes=data.num_classes)
    train(parallel(model), mine, epochs=args.dense_epochs, lr=1e-3, batch_size=32)
    dense = evaluate(model, data.test_x, data.test_y)

    rules = [(pattern, method, args.bits if method == "kmeans" else bits) for pattern, method, bits in QUANT_RULES]
    calibration = list(mine[0][:256].split(64))  # this rank's shard; the observers see every rank's
    gm = fxcompress.compile(model, [InsertMasks(sparsity=args.sparsity, scope="global"),
                                    InsertFakeQuant(rules=rules, activations=ActivationConfig(bits=8, freeze=False))],
                            example_inputs=(data.test_x[:1],), calibration_data=calibration)
    quantized = evaluate(gm, data.test_x, data.test_y)
    codebooks = [m.codebook for m in gm.modules() if isinstance(m, KMeansWeight)]
    centroids = [codebook.detach().clone() for codebook in codebooks]

    train(parallel(gm), mine, epochs=args.epochs, lr=1e-3, batch_size=32, seed=1)
    tensors = check_replicas(gm) if dist.is_initialized() else 0
    moved = any(not torch.equal(codebook, before) for codebook, before in zip(codebooks, centroids))
    result = {"dense": dense, "quantized": quantized, "finetuned": evaluate(gm, data.test_x, data.test_y),
              "pruned_zero": pruned_weights_are_zero(gm), "centroids_moved": moved, "replica_tensors": tensors}
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"{world} rank(s), {len(mine[0])} training images each")
        print(f"dense {dense:.4f}, pruned to {args.sparsity:.0%} and quantized {quantized:.4f}, "
              f"fine-tuned {result['finetuned']:.4f}")
        print(f"pruned weights exactly zero: {result['pruned_zero']}; centroids trained: {moved}; "
              f"{tensors} tensors bitwise identical on every rank")
        print(fxcompress.summary(gm).to_text(with_history=False))
    return result


if __name__ == "__main__":
    try:
        main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
