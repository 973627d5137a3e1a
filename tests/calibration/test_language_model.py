"""The calibrated passes on a two-layer Llama from transformers, through the export front end:
blocks found from the graph, Wanda / SparseGPT masks on every decoder linear layer, GPTQ at 4 bits
in groups, and sparse + 4-bit composed, each verified by compile."""
import pytest
import torch

import fxcompress
from calibration.tiny_lm import tiny_llama, token_batches
from fxcompress.calibration import plan_blocks
from fxcompress.layers import select_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, SparseGPT

DECODER = r"model\.layers\.\d+\..*"


@pytest.fixture(scope="module")
def exported():
    model = tiny_llama()
    batches = token_batches(3)
    return fxcompress.compile(model, [], example_inputs=(batches[0],), frontend="export"), batches


def _compile(gm, passes, batches):
    return fxcompress.compile(gm, passes, example_inputs=(batches[0],), calibration_data=batches)


def _logits_error(gm, reference, batches):
    with torch.no_grad():
        expected = torch.cat([reference(b)["logits"] for b in batches])
        return float((torch.cat([gm(b)["logits"] for b in batches]) - expected).norm() / expected.norm())


def test_the_decoder_layers_are_the_blocks_and_shared_inputs_the_groups(exported):
    gm, _ = exported
    blocks = plan_blocks(gm, select_layers(gm, "test", types=("linear",)))
    for i in range(2):
        prefix = f"model.layers.{i}."
        assert [g.names for g in blocks[i]] == [
            [prefix + "self_attn.q_proj", prefix + "self_attn.k_proj", prefix + "self_attn.v_proj"],
            [prefix + "self_attn.o_proj"], [prefix + "mlp.gate_proj", prefix + "mlp.up_proj"], [prefix + "mlp.down_proj"]]
    assert [g.names for g in blocks[2]] == [["lm_head"]]


def test_wanda_prunes_every_decoder_row_to_its_sparsity(exported):
    gm, batches = exported
    pruned = _compile(gm, [InsertMasks(sparsity=0.5, importance="wanda", types=("linear",), select=DECODER)], batches)
    for layer in select_layers(pruned, "test", types=("linear",), select=DECODER):
        mask = pruned.get_buffer(f"{layer.weight}_mask")
        assert (mask.sum(1) == mask.shape[1] // 2).all(), layer.name


def test_sparsegpt_then_gptq_composes_and_keeps_the_zeros(exported):
    gm, batches = exported
    sparse = _compile(gm, [SparseGPT(sparsity=0.5, select=DECODER)], batches)
    reports = fxcompress.history(sparse)[-1].stats["layers"]
    assert len(reports) == 14 and all(r["sparsity"] == 0.5 for r in reports.values())
    assert all(r["error_updated"] < r["error_masked"] for r in reports.values())
    both = _compile(sparse, [InsertFakeQuant(method="linear", bits=4, group_size=32, rounding="gptq",
                                             types=("linear",), select=DECODER)], batches)
    for layer in select_layers(both, "test", types=("linear",), select=DECODER):
        mask = both.get_buffer(f"{layer.weight}_mask")
        with torch.no_grad():
            weight = both.get_submodule(f"{layer.weight}_quant")(both.get_parameter(layer.weight) * mask)
        assert torch.equal(weight[~mask], torch.zeros(int((~mask).sum()))), layer.name
        assert weight.ne(0).sum() <= mask.sum()


def test_gptq_keeps_the_logits_closer_than_rounding_to_nearest(exported):
    gm, batches = exported
    config = {"method": "linear", "bits": 4, "group_size": 32, "types": ("linear",)}
    nearest = _compile(gm, [InsertFakeQuant(**config)], batches)
    gptq = _compile(gm, [InsertFakeQuant(**config, rounding="gptq", act_order=True)], batches)
    reports = fxcompress.history(gptq)[-1].stats
    assert len(reports) == 15 and all(r["error_gptq"] < r["error_nearest"] for r in reports.values())
    assert _logits_error(gptq, gm, batches) < 0.85 * _logits_error(nearest, gm, batches)
