"""Helpers of the command-line tests: run `main(argv)` in-process, write recipes, save small models."""
import shutil
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


@pytest.fixture(scope="module")
def _encoded_model(tmp_path_factory):
    """The compiled models and saved file behind `encoded_file`, built once per test module (the compiles
    dominate its cost); each test gets its own copy of the file."""
    x = torch.rand(4, 1, 8, 8)
    gm = fxcompress.compile(LeNet300100(in_features=64).eval(),
                            [InsertMasks(sparsity=0.8, scope="global"), InsertFakeQuant(bits=4)], example_inputs=(x,))
    encoded = fxcompress.compile(gm, [LowerToEncoded()], example_inputs=(x,))
    path = tmp_path_factory.mktemp("encoded") / "lenet.fxc"
    fxcompress.save(encoded, path)
    return path, gm, x


@pytest.fixture
def encoded_file(_encoded_model, tmp_path):
    """A LeNet-300-100 for 8x8 inputs, 80% pruned, 4-bit k-means, lowered and saved; (path, fake-quant gm, x).
    The path is this test's own copy, so what a command writes beside it is this test's alone."""
    built, gm, x = _encoded_model
    path = tmp_path / built.name
    shutil.copyfile(built, path)
    return path, gm, x
