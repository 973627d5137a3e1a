"""`main(argv)`: --help on every command, and each command's error paths as one line on stderr with a
non-zero status (bad recipe key with its line, unknown model, missing optional dependency, bad input)."""
import pytest

from fxcompress.cli import main, parser, yamldoc
from fxcompress.cli import sweep as sweep_module

COMMANDS = ["demo", "run", "inspect", "report", "decode", "export", "sensitivity"]


def _one_line(err):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def test_every_command_has_help(cli):
    status, out, _ = cli("--help")
    assert status == 0 and all(command in out for command in COMMANDS)
    for command in COMMANDS:
        status, out, _ = cli(command, "--help")
        assert status == 0 and out.startswith(f"usage: fxcompress {command}"), command
    assert set(parser()._subparsers._group_actions[0].choices) == set(COMMANDS)  # none without a test above


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: COMMAND"),
    (["compress"], "invalid choice: 'compress'"),
    (["run"], "fxcompress run: error: the following arguments are required: recipe"),
    (["export", "x.fxc", "--format", "xml"], "invalid choice: 'xml'"),
    (["demo", "--data", "imagenet"], "invalid choice: 'imagenet'"),
    # a count torch would refuse with a bare RuntimeError (threads) or a training loop with a ConfigError later
    (["sensitivity", "--model", "zoo:lenet300", "--threads", "0"], "argument --threads: must be an integer >= 1, "
                                                                   "got '0'"),
    (["sensitivity", "--model", "zoo:lenet300", "--epochs", "-1"], "argument --epochs: must be an integer >= 0"),
    (["demo", "--threads", "two"], "argument --threads: must be an integer >= 1, got 'two'"),
    (["report", "x.fxc", "--sensitivity", "--image-size", "2"], "argument --image-size: must be an integer >= 4"),
])
def test_usage_errors_are_one_line_with_status_2(cli, argv, words):
    status, out, err = cli(*argv)
    assert status == 2 and out == "" and words in _one_line(err)


RECIPE = """
model: {model}
data: digits
steps:
  - pass: InsertMasks
    config: {{sparsity: 0.5, scop: global}}
"""


@pytest.mark.parametrize("model, words", [
    ("zoo:lenet300", "recipe.yaml:5: unknown key steps[0].config.scop; InsertMasks takes sparsity,"),
    ("zoo:alexnet", "unknown zoo model 'alexnet'; the zoo has densenet, gpt_block, lenet300"),
    ("no_such_package.models:make", "cannot import 'no_such_package.models'"),
    ("resnet-18", "model 'resnet-18' is not zoo:NAME, torchvision:NAME or package.module:factory"),
])
def test_run_errors_are_one_line(cli, write_recipe, tmp_path, model, words):
    text = RECIPE.format(model=model)
    if model != "zoo:lenet300":
        text = text.replace("scop:", "scope:")
    status, out, err = cli("run", write_recipe(text), "--out", tmp_path / "out")
    assert status == 1 and words in _one_line(err)
    assert not (tmp_path / "out").exists()  # nothing was done


def test_a_missing_optional_dependency_is_one_line(cli, write_recipe, tmp_path, monkeypatch):
    try:
        import torchvision  # noqa: F401
    except ImportError:
        status, _, err = cli("run", write_recipe(RECIPE.format(model="torchvision:resnet18").replace("scop", "scope")))
        assert status == 1 and "needs torchvision: pip install 'fxcompress[vision]'" in _one_line(err)
    monkeypatch.setattr(yamldoc, "yaml", None)  # as without the yaml extra
    status, _, err = cli("run", write_recipe(RECIPE.format(model="zoo:lenet300")))
    assert status == 1 and "recipes are YAML and need PyYAML: pip install 'fxcompress[yaml]'" in _one_line(err)


def test_a_missing_data_set_is_one_line(cli, monkeypatch, tmp_path):
    monkeypatch.setattr("fxcompress.datasets.DEBIAN_FASHION_MNIST", tmp_path)
    status, _, err = cli("demo", "--data", "fashion-mnist", "--out", tmp_path / "demo")
    assert status == 1 and "Fashion-MNIST files not found" in _one_line(err)


def test_sensitivity_sweeps_each_layer(cli, tmp_path):
    out = tmp_path / "sens.md"
    status, text, err = cli("sensitivity", "--model", "zoo:lenet300", "--quick", "--sparsities", "0.5,0.99",
                            "--out", out)
    assert status == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith("fc")}
    assert set(rows) == {"fc1", "fc2", "fc3"} and all(len(v) == 2 for v in rows.values())
    assert "| fc1 |" in out.read_text()


@pytest.mark.parametrize("argv, words", [
    (["--model", "zoo:lenet300", "--sparsities", "half"], "--sparsities must be numbers"),
    (["--sparsities", "0.5"], "needs exactly one of --model SPEC and --file FILE.fxc"),
    (["--model", "zoo:lenet300", "--data", "cifar-10"], "--data cifar-10 needs --root"),
    (["--model", "zoo:lenet300", "--quick", "--layers", "conv.*"], "no linear / conv layer matches"),
    (["--model", "zoo:nope"], "unknown zoo model 'nope'"),
])
def test_sensitivity_errors_are_one_line(cli, argv, words):
    status, _, err = cli("sensitivity", *argv)
    assert status == 1 and words in _one_line(err)


@pytest.mark.parametrize("argv, words", [
    (["--layers", "fc(("], "--layers: 'fc((' is not a valid regular expression (missing ), unterminated subpattern"),
    (["--layers", "conv.*"], "--layers 'conv.*': sensitivity: no linear / conv layer matches layers='conv.*'"),
    # digits images stay 8x8: the model would be built for 16x16 images the data set never gives
    (["--image-size", "16"], "--image-size 16: digits images are 8x8 and are not resized (only image-folder "
                             "takes an image size)"),
])
def test_sensitivity_options_are_checked_before_training(cli, monkeypatch, argv, words):
    monkeypatch.setattr(sweep_module, "train", lambda *a, **k: pytest.fail("trained before the check"))
    status, _, err = cli("sensitivity", "--model", "zoo:lenet300", "--quick", *argv)
    assert status == 1 and words in _one_line(err)


def test_main_returns_the_status_instead_of_exiting():
    assert main(["inspect", "/nonexistent/x.fxc"]) == 1
    assert main(["--help"]) == 0
