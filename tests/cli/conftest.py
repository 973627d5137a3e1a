"""Helpers of the command-line tests: run `main(argv)` in-process, write recipes, save small models."""
import textwrap

import pytest
import torch

import fxcompress
from fxcompress.cli import main
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import LeNet300100


@pytest.fixture
def cli(capsys):
    """cli(*argv) -> (status, stdout, stderr) of one in-process run of the command."""
    def run(*argv):
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err
    return run


@pytest.fixture
def write_recipe(tmp_path):
    """write_recipe(text) -> path of a recipe file holding the dedented text."""
    def write(text, name="recipe.yaml"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(text).lstrip("\n"))
        return path
    return write


@pytest.fixture
def encoded_file(tmp_path):
    """A LeNet-300-100 for 8x8 inputs, 80% pruned, 4-bit k-means, lowered and saved; (path, fake-quant gm, x)."""
    x = torch.rand(4, 1, 8, 8)
    gm = fxcompress.compile(LeNet300100(in_features=64).eval(),
                            [InsertMasks(sparsity=0.8, scope="global"), InsertFakeQuant(bits=4)], example_inputs=(x,))
    encoded = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    path = tmp_path / "lenet.fxc"
    fxcompress.save(encoded, path)
    return path, gm, x
