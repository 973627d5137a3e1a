"""N:M sparse weights as one pattern symbol per block, and half-precision group steps: decoded bit for
bit, and smaller than relative indices / float32 steps by the measured amounts."""
import itertools

import numpy as np
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.encoded import patterns
from fxcompress.encoded.module import EncodedWeight
from fxcompress.encoded.tensor import decode_tensor, encode_tensor
from fxcompress.errors import PreconditionError
from fxcompress.layers import effective_weight, find_layers
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.quant.modules import GridWeight


@pytest.mark.parametrize("n, m", [(1, 4), (2, 4), (2, 8), (4, 8)])
def test_every_pattern_round_trips(n, m):
    combos = list(itertools.combinations(range(m), n))
    blocks = np.zeros((len(combos), m), np.float32)
    for i, kept in enumerate(combos):
        blocks[i, list(kept)] = np.arange(1, n + 1)
    symbols, where = patterns.encode_pattern(blocks.reshape(-1), n, m)
    assert symbols.tolist() == list(range(len(combos)))  # lexicographic order, one symbol each
    assert np.array_equal(patterns.positions_from_patterns(symbols, n, m), where)
    assert np.array_equal(np.flatnonzero(blocks.reshape(-1)), where)


def test_a_block_with_fewer_nonzeros_stores_its_first_zeros():
    flat = np.array([0, 0, 0, 5, 0, 0, 0, 0, 1, 2, 0, 0], np.float32)
    symbols, where = patterns.encode_pattern(flat, 2, 4)
    assert where.tolist() == [0, 3, 4, 5, 8, 9]
    w = torch.from_numpy(flat).reshape(3, 4)
    encoded = encode_tensor(w, layouts=("pattern",))
    assert encoded.pattern == (2, 4) and torch.equal(decode_tensor(encoded), w)


def _two_of_four(scale_dtype: str = "float16", group_size: int = 64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    x = torch.randn(4, 256)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5, granularity="2:4"),
                                    InsertFakeQuant(bits=4, method="linear", group_size=group_size,
                                                    scale_dtype=scale_dtype)], example_inputs=(x,))
    fake = {layer.weight: effective_weight(gm, layer).clone() for layer in find_layers(gm)}
    return gm, fake, x


def test_two_of_four_with_half_steps_lowers_bit_identically_and_smaller(tmp_path):
    gm, fake, x = _two_of_four()
    lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    fxcompress.save(lowered, tmp_path / "m.fxc")
    loaded = fxcompress.load(tmp_path / "m.fxc")
    for path, module in loaded.named_modules():
        if not isinstance(module, EncodedWeight):
            continue
        weight = fake[path.removesuffix("_encoded")]
        encoded = module.encoded()
        assert (encoded.layout, encoded.pattern, encoded.codebook) == ("pattern", (2, 4), "group_grid")
        assert encoded.codebook_data.size == 2 * weight.numel() // 64  # one float16 step per group
        assert module().view(torch.int32).equal(weight.view(torch.int32)), path
        relative = encode_tensor(weight, layouts=("relative",), groups=None)
        positions = 8 * encoded.storage_bytes()["positions"] / weight.numel()
        assert positions < 0.70 < 0.85 < 8 * relative.storage_bytes()["positions"] / weight.numel()
        assert encoded.nbytes < relative.nbytes
    assert torch.equal(loaded(x), gm(x))


def test_layout_pattern_refuses_a_layer_that_is_not_n_of_m():
    torch.manual_seed(0)
    x = torch.randn(4, 256)
    model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5)], example_inputs=(x,))
    with pytest.raises(PreconditionError, match=r"layout='pattern': layer 0 \(0.weight, shape \[128, 256\]\) is "
                                                 r"not N:M sparse"):
        fxcompress.compile(gm, [LowerToEncoded(layout="pattern")], example_inputs=(x,))


def test_half_precision_scales_are_float16_values_and_cost_little_error():
    torch.manual_seed(1)
    w = torch.randn(64, 256) * 0.02
    half, full = GridWeight(4, group_size=64, axis=0, scale_dtype="float16"), GridWeight(4, group_size=64, axis=0)
    scale = half.grid(w).scale
    assert torch.equal(scale, scale.half().float()) and not torch.equal(scale, full.grid(w).scale)
    step = full.grid(w).scale.repeat_interleave(64, dim=1)
    assert ((half(w) - w).abs() <= 0.5 * step * (1 + 2 ** -10) + 1e-9).all()  # still within half a step
    assert half.config()["scale_dtype"] == "float16" and "scale_dtype" not in full.config()


def test_half_precision_scales_are_never_zero_and_refuse_overflow():
    tiny = torch.full((2, 64), 1e-9)
    scale = GridWeight(4, group_size=64, axis=0, scale_dtype="float16").grid(tiny).scale
    assert (scale > 0).all() and torch.equal(scale, scale.half().float())
    with pytest.raises(PreconditionError, match="beyond float16's largest value"):
        GridWeight(4, group_size=64, axis=0, scale_dtype="float16").grid(torch.full((2, 64), 1e7))


def test_half_steps_halve_the_step_bytes_of_the_file():
    sizes = {}
    for scale_dtype in ("float32", "float16"):
        gm, fake, x = _two_of_four(scale_dtype, group_size=128)
        lowered = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
        sizes[scale_dtype] = sum(m.encoded().codebook_data.size for m in lowered.modules()
                                 if isinstance(m, EncodedWeight))
    assert sizes == {"float32": 4 * (128 * 256 + 64 * 128) // 128, "float16": 2 * (128 * 256 + 64 * 128) // 128}


def test_half_scales_survive_save_and_load_and_a_bad_one_in_a_file_is_refused(tmp_path):
    gm, fake, x = _two_of_four()
    fxcompress.save(gm, tmp_path / "fq.fxc")
    loaded = fxcompress.load(tmp_path / "fq.fxc")
    assert loaded.get_submodule("0.weight_quant").scale_dtype == "float16"
    assert torch.equal(loaded(x), gm(x))
    with pytest.raises(fxcompress.errors.ConfigError, match="scale_dtype='bfloat16' needs method='linear'"):
        GridWeight(4, group_size=64, axis=0, scale_dtype="bfloat16")
    with pytest.raises(fxcompress.errors.ConfigError, match="scale_dtype='float16' needs method='linear'"):
        GridWeight(4, method="fixed_point", scale_dtype="float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_layer_lowers_to_the_pattern_layout(dtype):
    """pattern_applies handed a bfloat16 tensor to numpy, which has no bfloat16: a bare TypeError."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, dtype=dtype)
    gm = fxcompress.compile(nn.Sequential(nn.Linear(64, 8)).eval().to(dtype),
                            [InsertMasks(sparsity=0.5, scope="global")], example_inputs=(x,))
    gm.get_buffer("0.weight_mask").copy_(torch.tensor([1, 0, 1, 0] * 16, dtype=dtype).expand(8, 64))  # 2:4
    lowered = fxcompress.compile(gm, [LowerToEncoded(layout="pattern")], example_inputs=(x,))
    assert fxcompress.history(lowered)[-1].stats["0"]["layout"] == "pattern"
    assert torch.equal(lowered(x), gm(x))
