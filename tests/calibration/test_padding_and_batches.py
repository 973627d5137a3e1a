"""Calibration batches as a language-model user gives them: dicts of tensors bound to the graph's inputs by
name, padded positions (zeros of the attention mask) left out of every statistic, generators listed once
where a pass walks the data twice, and data no statistic can be taken from refused by name."""
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from calibration.tiny_lm import VOCAB, tiny_llama, token_batches
from fxcompress.calibration import InputStats, walk
from fxcompress.batches import PaddingIncludedWarning
from fxcompress.errors import PreconditionError
from fxcompress.layers import select_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, ScaleChannels, SparseGPT
from fxcompress.pruning.owl import OWL

DECODER = r"model\.layers\.\d+\..*"
PASSES = {
    "SparseGPT": lambda: SparseGPT(sparsity=0.5, select=DECODER),
    "SparseGPT 2:4": lambda: SparseGPT(granularity="2:4", select=DECODER),
    "Wanda": lambda: InsertMasks(sparsity=0.5, importance="wanda", types=("linear",), select=DECODER),
    "GPTQ": lambda: InsertFakeQuant(method="linear", bits=4, group_size=16, act_order=True, rounding="gptq",
                                    types=("linear",), select=DECODER),
    "AWQ": lambda: ScaleChannels(bits=4, group_size=16, select=DECODER),
}


@pytest.fixture(scope="module")
def llama():
    """The two-layer Llama exported with its attention mask as the second graph input."""
    ids = token_batches(1)[0]
    return fxcompress.compile(tiny_llama(), [], example_inputs=(ids, torch.ones_like(ids)), frontend="export"), ids


def _padded(pad_token: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two batches; the first right-padded: row 0 holds 9 real tokens, row 1 holds 12, the rest `pad_token`."""
    first, second = token_batches(2, seed=5)
    mask = torch.ones_like(first)
    mask[0, 9:] = 0
    mask[1, 12:] = 0
    return [(first.masked_fill(mask == 0, pad_token), mask), (second, torch.ones_like(second))]


def _state(gm) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("make", PASSES.values(), ids=PASSES.keys())
def test_padded_positions_do_not_change_what_a_pass_computes(llama, make):
    """The tokens at padded positions differ between the two runs; everything else is the same. With the padded
    positions in the statistics (as before), every pass here gave different weights."""
    gm, ids = llama
    example = (ids, torch.ones_like(ids))
    one = _state(fxcompress.compile(gm, [make()], example, calibration_data=_padded(pad_token=0)))
    other = _state(fxcompress.compile(gm, [make()], example, calibration_data=_padded(pad_token=VOCAB - 1)))
    assert one.keys() == other.keys()
    changed = [k for k in one if not torch.equal(one[k], other[k])]
    assert not changed


@pytest.mark.parametrize("name", ["SparseGPT", "Wanda"])
def test_the_mask_passes_report_the_padded_tokens_they_left_out(llama, name):
    gm, ids = llama
    compiled = fxcompress.compile(gm, [PASSES[name]()], (ids, torch.ones_like(ids)),
                                  calibration_data=_padded(pad_token=0))
    stats = fxcompress.history(compiled)[-1].stats  # the walk counted them; the passes did not say so
    assert stats["calibration_padded_tokens"] == 7 + 4 and stats["calibration_batches"] == 2
    assert "calibration_padding_included" not in stats


def test_the_statistics_count_exactly_the_unpadded_tokens(llama):
    gm, _ = llama
    layers = select_layers(gm, "test", types=("linear",), select=DECODER)
    rows = {}

    def record(group, stats: InputStats):
        rows[group.names[0]] = stats.rows
        return {}

    report = walk(gm, layers, _padded(pad_token=0), record, owner="test")
    assert report.padded_tokens == 7 + 4 and report.padding_included == ()
    assert set(rows.values()) == {2 * 16 * 2 - 11}   # 64 positions, 11 of them padding


def test_dict_batches_bind_to_the_inputs_by_name(llama):
    gm, ids = llama
    example = (ids, torch.ones_like(ids))
    tuples = _padded(pad_token=0)
    dicts = [{"attention_mask": mask, "input_ids": tokens} for tokens, mask in tuples]   # order of keys is free
    by_position = fxcompress.compile(gm, [PASSES["SparseGPT"]()], example, calibration_data=tuples)
    by_name = fxcompress.compile(gm, [PASSES["SparseGPT"]()], example, calibration_data=dicts)
    assert all(torch.equal(a, b) for a, b in zip(_state(by_position).values(), _state(by_name).values()))


def test_dict_batches_with_a_key_the_graph_lacks_are_refused_by_name(llama):
    """A model traced without its attention mask cannot leave padding out: the key is refused, not dropped."""
    _, ids = llama
    plain = fxcompress.compile(tiny_llama(), [], example_inputs=(ids,), frontend="export")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(PreconditionError, match=r"batch 0: the graph has no input named 'attention_mask'; its "
                                                r"inputs are \['input_ids'\]; to leave padding out"):
        fxcompress.compile(plain, [PASSES["SparseGPT"]()], (ids,), calibration_data=[batch])
    with pytest.raises(PreconditionError, match="calibration_data is one dict; pass a list of batches"):
        fxcompress.compile(plain, [PASSES["SparseGPT"]()], (ids,), calibration_data={"input_ids": ids})


class Transposed(nn.Module):
    """fc2 reads fc1's output as (sequence, batch, channels): its rows are no (batch, sequence) position."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, attention_mask):
        return self.fc2(self.fc1(x * attention_mask.unsqueeze(-1)).transpose(0, 1))


def test_rows_that_do_not_line_up_with_the_mask_keep_the_padding_and_say_so():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    gm = fxcompress.compile(Transposed().eval(), [], example_inputs=(x, mask))
    padded = mask.clone()
    padded[0, 3:] = 0
    rows = {}

    def record(group, stats):
        rows[group.names[0]] = stats.rows
        return {}

    with pytest.warns(PaddingIncludedWarning, match=r"test: .*the input rows of fc2 do not line up"):
        report = walk(gm, select_layers(gm, "test"), [(x, padded)], record, owner="test")
    assert rows == {"fc1": 8, "fc2": 10} and report.padding_included == ("fc2",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no padding: nothing to warn about
        walk(gm, select_layers(gm, "test"), [(x, mask)], record, owner="test")


def test_owl_walks_generator_data_twice_as_a_list():
    """OWL measures outliers in one walk and prunes in a second: a generator gave the second walk nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    batches = [torch.randn(16, 32) for _ in range(3)]
    config = InsertMasks(sparsity=0.5, importance="wanda", profile=OWL(threshold=2.0))
    listed = fxcompress.compile(model, [config], (batches[0],), calibration_data=batches)
    generated = fxcompress.compile(model, [config], (batches[0],), calibration_data=(b for b in batches))
    assert fxcompress.history(generated)[-1].stats == fxcompress.history(listed)[-1].stats
    for name, buffer in listed.named_buffers():
        assert torch.equal(buffer, generated.get_buffer(name)), name


def test_a_generator_used_up_by_an_earlier_pass_is_named():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(8, 16)
    with pytest.raises(PreconditionError, match=r"InsertFakeQuant: calibration_data yielded no batch \(a generator "
                                                r"is used up after one pass: pass a list\)"):
        fxcompress.compile(model, [SparseGPT(sparsity=0.5), InsertFakeQuant(bits=4, rounding="gptq")], (x,),
                           calibration_data=(b for b in [x, x]))


@pytest.mark.parametrize("make", [lambda: SparseGPT(sparsity=0.5), lambda: InsertFakeQuant(bits=4, rounding="gptq"),
                                  lambda: InsertMasks(sparsity=0.5, importance="wanda")],
                         ids=["SparseGPT", "GPTQ", "Wanda"])
def test_inputs_zero_in_every_channel_are_refused_by_name(make):
    """Every channel dead: SparseGPT and GPTQ zeroed the whole layer (a dead channel's weights are set to 0) and
    Wanda's scores all tied."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    config = make()
    with pytest.raises(PreconditionError, match=rf"{type(config).__name__}: the input of layer '0' is zero in every "
                                                r"channel on all 8 calibration tokens"):
        fxcompress.compile(model, [config], (torch.randn(8, 16),), calibration_data=[torch.zeros(8, 16)])


def test_large_finite_inputs_give_a_finite_hessian():
    """Values of 1e25 square beyond float32's range: the chunk's product overflowed to Inf and the layer was
    refused as though its inputs were not finite."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=generator, dtype=torch.float64) * 1e25
    stats = InputStats(8)
    stats.update(x)
    stats.check("test", ["layer"])
    expected = x.T @ x / x.shape[0]
    assert torch.isfinite(stats.hessian).all()
    torch.testing.assert_close(stats.hessian, expected, rtol=1e-9, atol=0)
