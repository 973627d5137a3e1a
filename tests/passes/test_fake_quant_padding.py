"""Activation calibration on a language model's batches: dicts bound to the graph's inputs by name as the
calibration walk binds them, padded positions (attention-mask zeros) left out of every observer, and one
listing of generator data where GPTQ and the observers both read it."""
import warnings

import pytest
import torch
from torch import nn

import fxcompress
from calibration.tiny_lm import VOCAB, tiny_llama, token_batches
from fxcompress.batches import PaddingIncludedWarning
from fxcompress.errors import PreconditionError
from fxcompress.passes import ActivationConfig, InsertFakeQuant
from fxcompress.quant import ActivationQuant, calibrate

DECODER = r"model\.layers\.\d+\..*"


@pytest.fixture(scope="module")
def llama():
    """The two-layer Llama exported with its attention mask as the second graph input. The last token's embedding
    is one channel only: normalized, it is an outlier of every first-layer input, so a pad token of that id read by
    a min-max observer would widen its grid (random ids' activations are too alike for that to be sure)."""
    ids = token_batches(1)[0]
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[VOCAB - 1] = torch.nn.functional.one_hot(torch.tensor(0), 64).float()
    return fxcompress.compile(model, [], example_inputs=(ids, torch.ones_like(ids)), frontend="export"), ids


def _padded(pad_token: int) -> list[dict[str, torch.Tensor]]:
    """Two dict batches (keys not in the graph's order); the first right-padded: row 0 holds 9 real tokens, row 1
    holds 12, the rest `pad_token`."""
    first, second = token_batches(2, seed=5)
    mask = torch.ones_like(first)
    mask[0, 9:] = 0
    mask[1, 12:] = 0
    return [{"attention_mask": mask, "input_ids": first.masked_fill(mask == 0, pad_token)},
            {"attention_mask": torch.ones_like(second), "input_ids": second}]


def _grids(gm) -> dict[str, dict[str, torch.Tensor]]:
    """Every activation quantizer's observer state (range, histogram) and the grid it gives."""
    grids = {}
    for name, module in gm.named_modules():
        if isinstance(module, ActivationQuant):
            grid = module.grid()
            grids[name] = {**module.observer.state_dict(), "scale": grid.scale, "zero_point": grid.zero_point}
    return grids


def _quantize(observer: str = "minmax", **options) -> InsertFakeQuant:
    return InsertFakeQuant(method="linear", bits=8, types=("linear",), select=DECODER,
                           activations=ActivationConfig(observer=observer), **options)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile"])
def test_token_ids_at_padded_positions_do_not_change_any_activation_grid(llama, observer):
    """Only the tokens at padded positions differ between the runs. Before, a dict batch reached the graph as one
    positional input and was refused; counted in, the pad tokens' activations moved the grids."""
    gm, ids = llama
    example = (ids, torch.ones_like(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingIncludedWarning)   # every quantized input lines up with the mask
        one = _grids(fxcompress.compile(gm, [_quantize(observer)], example, calibration_data=_padded(pad_token=0)))
        other = _grids(fxcompress.compile(gm, [_quantize(observer)], example,
                                          calibration_data=_padded(pad_token=VOCAB - 1)))
    assert len(one) == 2 * 4 and one.keys() == other.keys()   # per layer: q/k/v, o, gate/up, down
    changed = [f"{name}.{key}" for name in one for key in one[name] if not torch.equal(one[name][key], other[name][key])]
    assert not changed


def test_the_mask_takes_the_padded_positions_out(llama):
    """The same token ids with a mask of ones: the pad positions are read, and every quantizer's histogram holds
    their 11 positions more (so the test above is no test of tokens that never reached an observer)."""
    gm, ids = llama
    padded = _padded(pad_token=VOCAB - 1)
    unmasked = [{**batch, "attention_mask": torch.ones_like(batch["attention_mask"])} for batch in padded]
    example = (ids, torch.ones_like(ids))
    masked = _grids(fxcompress.compile(gm, [_quantize("percentile")], example, calibration_data=padded))
    counted = _grids(fxcompress.compile(gm, [_quantize("percentile")], example, calibration_data=unmasked))
    for name, grid in masked.items():
        masked_count, counted_count = float(grid["histogram"].sum()), float(counted[name]["histogram"].sum())
        assert counted_count - masked_count == 11 * (counted_count / (2 * 2 * 16)), name   # 64 positions each


def test_dict_batches_calibrate_as_positional_batches_do(llama):
    gm, ids = llama
    compiled = fxcompress.compile(gm, [_quantize()], (ids, torch.ones_like(ids)), calibration_data=_padded(0))
    by_name = _grids(compiled)
    tuples = [(batch["input_ids"], batch["attention_mask"]) for batch in _padded(0)]
    for _, module in compiled.named_modules():
        if isinstance(module, ActivationQuant):
            module.observer.seen.fill_(False)   # min-max afresh: the first batch sets every range again
    assert calibrate(compiled, tuples) == 2
    by_position = _grids(compiled)
    assert all(torch.equal(by_name[n][k], by_position[n][k]) for n in by_name for k in by_name[n])


def test_gptq_reports_the_padded_tokens_it_left_out(llama):
    gm, ids = llama
    compiled = fxcompress.compile(gm, [_quantize(rounding="gptq", group_size=16)], (ids, torch.ones_like(ids)),
                                  calibration_data=(batch for batch in _padded(0)))   # a generator, read twice
    stats = fxcompress.history(compiled)[-1].stats
    assert stats["calibration_padded_tokens"] == 7 + 4 and stats["calibration_batches"] == 2
    assert "calibration_padding_included" not in stats


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x, attention_mask):
        return self.fc2(torch.relu(self.fc1(x * attention_mask.unsqueeze(-1))))


class Transposed(Small):
    """fc2 reads fc1's output as (sequence, batch, channels): its rows are no (batch, sequence) position."""

    def forward(self, x, attention_mask):
        return self.fc2(self.fc1(x * attention_mask.unsqueeze(-1)).transpose(0, 1))


def _small(model: type[nn.Module], config: InsertFakeQuant, data):
    torch.manual_seed(0)   # the same weights on every call
    x, mask = torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long)
    return fxcompress.compile(model().eval(), [config], example_inputs=(x, mask), calibration_data=data)


def _small_batches(padded: bool = True) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 5, dtype=torch.long)
    if padded:
        mask[0, 3:] = 0
    return [{"x": torch.randn(2, 5, 8, generator=generator), "attention_mask": mask} for _ in range(2)]


def test_an_activation_that_does_not_line_up_keeps_the_padding_and_says_so():
    config = InsertFakeQuant(method="linear", activations=ActivationConfig())
    with pytest.warns(PaddingIncludedWarning, match=r"calibrate: .*attention_mask marks padding, but the activations "
                                                    r"of fc2\.input_quant do not line up"):
        _small(Transposed, config, _small_batches())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PaddingIncludedWarning)   # no padding: nothing to warn about
        _small(Transposed, config, _small_batches(padded=False))


def test_dict_batches_are_refused_as_the_calibration_walk_refuses_them():
    config = InsertFakeQuant(method="linear", activations=ActivationConfig())
    batch = _small_batches()[0]
    with pytest.raises(PreconditionError, match=r"calibration batch 1: the graph has no input named 'mask'; its "
                                                r"inputs are \['x', 'attention_mask'\]"):
        _small(Small, config, [batch, {"x": batch["x"], "mask": batch["attention_mask"]}])
    with pytest.raises(PreconditionError, match=r"calibration batch 0: no value for the graph input 'attention_mask'"):
        _small(Small, config, [{"x": batch["x"]}])
    with pytest.raises(PreconditionError, match=r"calibrate: calibration_data is one dict; pass a list of batches"):
        _small(Small, config, batch)


def test_gptq_with_activations_reads_generator_data_twice_as_a_list():
    """GPTQ's walk used the generator up, and activation calibration then refused: no batches."""
    config = InsertFakeQuant(method="linear", bits=4, rounding="gptq", activations=ActivationConfig())
    listed = _small(Small, config, _small_batches())
    generated = _small(Small, config, (batch for batch in _small_batches()))
    assert fxcompress.history(generated)[-1].stats == fxcompress.history(listed)[-1].stats
    assert fxcompress.history(listed)[-1].stats["calibration_padded_tokens"] == 2 * 2
    for name, buffer in listed.named_buffers():
        assert torch.equal(buffer, generated.get_buffer(name)), name
