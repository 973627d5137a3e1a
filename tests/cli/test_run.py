"""`fxcompress run`: steps run in order with their fine-tuning, a checkpoint after each, and a rerun
resumes: finished steps are loaded, not recomputed, and the result equals an uninterrupted run's."""
import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

import fxcompress
from fxcompress.cli import run as run_module
from fxcompress.cli.run import run_recipe
from fxcompress.layers import find_layers, effective_weight
from fxcompress.report import ReportFiles, write_report
from fxcompress.sensitivity import SensitivityTable
from fxcompress.training import OptimizerConfig

BASE = """
model: zoo:lenet300
data: digits
seed: 3
threads: 1
train: {epochs: 2, lr: 2e-3}
quick: {epochs: 1, train_samples: 400, test_samples: 200}
steps:
  - pass: InsertMasks
    config: {sparsity: 0.7, scope: global}
    finetune: {epochs: 1, lr: 5e-4}
  - pass: InsertFakeQuant
    config: {bits: 4}
"""
# the schedule tests read only the masks' step: no fake-quant step after it
MASKS_ONLY = BASE[:BASE.index("  - pass: InsertFakeQuant")]
ENCODE = """
  - pass: LowerToEncoded
"""


# fine-tuning with SGD, Nesterov momentum, weight decay and a cosine schedule: each fine-tuning starts
# its optimizer afresh, so the checkpoint after a step is all a resumed run needs
SGD = BASE.replace("finetune: {epochs: 1, lr: 5e-4}", "finetune: {epochs: 1, lr: 0.02, optimizer: sgd, momentum: 0.9, "
                                                       "nesterov: true, weight_decay: 1e-4, schedule: cosine}")


def _outputs(path, x):
    with torch.no_grad():
        return fxcompress.load(path).eval()(x)


def _recipe(folder, text, name):
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _record_reports(patch, calls):
    """Runs whose report no test reads record where they would write it instead of drawing it (its
    pictures cost a run about 1.5 s of CPU). The report a run draws is read by
    test_a_rerun_skips_finished_steps_and_ends_where_a_fresh_run_ends (the encoded model's, with the
    fake-quant step as reference); test_the_recipe_asks_for_sensitivity_curves_of_the_dense_model reads its
    page's tables (_report_without_pictures); the tests that record it check that the run reached it."""
    patch.setattr(run_module, "write_report", lambda gm, path, **options: calls.append(Path(path))
                  or ReportFiles(Path(path), None, 0))


def _report_without_pictures(patch, calls):
    """The run's report written with its tables and graph but not its pictures, and its options recorded:
    what the pictures draw from them is write_report's own (tests/report), and a run's drawn report is
    read by test_a_rerun_skips_finished_steps_and_ends_where_a_fresh_run_ends."""
    def write(gm, path, **options):
        calls.append(options)
        return write_report(gm, path, pictures=False, **options)
    patch.setattr(run_module, "write_report", write)


@pytest.fixture
def reports(monkeypatch):
    """The report paths this test's runs asked for, recorded, not drawn (see _record_reports)."""
    calls = []
    _record_reports(monkeypatch, calls)
    return calls


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """An uninterrupted run of the whole recipe (masks, fake-quant, encoding), once for the module; the
    optimizer each train call was given is recorded. (result, its folder, the optimizers)"""
    folder = tmp_path_factory.mktemp("fresh")
    optimizers = []
    real_train = run_module.train
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "train", lambda *a, **k: optimizers.append(k["optimizer"]) or real_train(*a, **k))
        result = run_recipe(_recipe(folder, SGD + ENCODE, "full.yaml"), folder / "out", quick=True,
                            log=lambda line: None)
    return result, folder / "out", optimizers


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A run of the recipe's first two steps only (a run stopped before the encoding); (result, its folder).
    Tests resume from copies of its folder."""
    folder = tmp_path_factory.mktemp("short")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        _record_reports(patch, calls)
        result = run_recipe(_recipe(folder, SGD, "short.yaml"), folder / "out", quick=True, log=lambda line: None)
    assert calls == [folder / "out" / "report.html"]
    return result, folder / "out"


def test_a_rerun_skips_finished_steps_and_ends_where_a_fresh_run_ends(write_recipe, tmp_path, monkeypatch, fresh,
                                                                      short, reports):
    fresh, fresh_out, optimizers = fresh
    assert optimizers == [OptimizerConfig(), OptimizerConfig(optimizer="sgd", momentum=0.9, nesterov=True,
                                                             weight_decay=1e-4, schedule="cosine")]
    first, short_out = short
    assert first["accuracies"] == fresh["accuracies"][:2]  # seeded: the same steps give the same models
    shutil.copytree(short_out, tmp_path / "resumed")

    calls = []
    real_train = run_module.train
    monkeypatch.setattr(run_module, "train", lambda *a, **k: calls.append(a) or real_train(*a, **k))
    lines = []
    resumed = run_recipe(write_recipe(SGD + ENCODE, "full.yaml"), tmp_path / "resumed", quick=True, log=lines.append)
    assert calls == []  # neither the dense training nor the masks' fine-tuning ran again
    assert sum("done before" in line for line in lines) == 3  # dense, masks, fake-quant loaded
    assert resumed["accuracies"] == fresh["accuracies"] and reports == [tmp_path / "resumed" / "report.html"]
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(_outputs(tmp_path / "resumed" / "model.fxc", x), _outputs(fresh_out / "model.fxc", x))
    state = json.loads((tmp_path / "resumed" / "state.json").read_text())
    assert [s["file"] for s in state["steps"]] == ["step-01.fxc", "step-02.fxc", "step-03.fxc"]
    page = (fresh_out / "report.html").read_text()  # the report, from the encoded model
    assert "LowerToEncoded" in page and "<svg" in page and (fresh_out / "report.md").is_file()
    assert "pass a reference model" not in page  # the weights before quantization: from the fake-quant step


def test_a_changed_step_reruns_from_that_step(write_recipe, tmp_path, short, reports):
    shutil.copytree(short[1], tmp_path / "out")  # a finished run of SGD
    lines = []
    run_recipe(write_recipe(SGD.replace("bits: 4", "bits: 3"), "changed.yaml"), tmp_path / "out", quick=True,
               log=lines.append)
    assert [line.split(":")[0] for line in lines[:3]] == ["dense training", "dense", "step 1-InsertMasks"]
    assert "done before" in lines[2] and "done before" not in lines[3]
    gm = fxcompress.load(tmp_path / "out" / "model.fxc")
    assert all(torch.unique(effective_weight(gm, layer)).numel() <= 2 ** 3 for layer in find_layers(gm))
    assert reports == [tmp_path / "out" / "report.html"]


def test_gradual_pruning_and_distillation_during_fine_tuning(write_recipe, tmp_path, reports):
    recipe = MASKS_ONLY.replace("config: {sparsity: 0.7, scope: global}",
                                "config: {sparsity: 0.7, scope: global, schedule: {end: 6, every: 2}}")
    recipe = recipe.replace("finetune: {epochs: 1, lr: 5e-4}",
                            "finetune: {epochs: 1, lr: 5e-4, batch_size: 50, distill: {alpha: 0.5}}")
    lines = []
    run_recipe(write_recipe(recipe), tmp_path / "out", quick=True, log=lines.append)
    masked = fxcompress.load(tmp_path / "out" / "step-01.fxc")
    weights = torch.cat([effective_weight(masked, layer).flatten() for layer in find_layers(masked)])
    assert (weights == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)  # AGP reached its target
    assert not any("schedule ends" in line for line in lines)  # 8 optimizer steps ran past end=6
    assert reports == [tmp_path / "out" / "report.html"]


def test_a_schedule_longer_than_the_fine_tuning_still_ends_at_its_target(write_recipe, tmp_path, reports):
    recipe = MASKS_ONLY.replace("config: {sparsity: 0.7, scope: global}",
                                "config: {sparsity: 0.7, scope: global, schedule: {end: 1000, every: 10}}")
    lines = []
    run_recipe(write_recipe(recipe), tmp_path / "out", quick=True, log=lines.append)
    assert any("the schedule ends at step 1000, fine-tuning stopped at 7" in line for line in lines)
    masked = fxcompress.load(tmp_path / "out" / "step-01.fxc")
    weights = torch.cat([effective_weight(masked, layer).flatten() for layer in find_layers(masked)])
    assert (weights == 0).float().mean().item() == pytest.approx(0.7, abs=0.01)
    assert reports == [tmp_path / "out" / "report.html"]


def test_a_pass_that_cannot_run_fails_before_any_training(write_recipe, tmp_path, monkeypatch):
    recipe = BASE.replace("config: {bits: 4}", "config: {bits: 4}\n  - pass: LowerToInteger")
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(fxcompress.FxCompressError, match=r"recipe.yaml:13: steps\[2\] \(3-LowerToInteger\) "
                                                         r"cannot run: .*k-means"):
        run_recipe(write_recipe(recipe), tmp_path / "out", quick=True, log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_a_model_that_does_not_fit_the_data_fails_at_the_model_line(write_recipe, tmp_path, monkeypatch):
    recipe = BASE.replace("model: zoo:lenet300", "model: zoo:lenet300\nmodel_args: {in_features: 100}")
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    with pytest.raises(fxcompress.ConfigError, match=r"recipe.yaml:1: model zoo:lenet300 cannot run on the digits "
                                                     r"images \(2, 1, 8, 8\): .*100"):
        run_recipe(write_recipe(recipe), tmp_path / "out", quick=True, log=lambda line: None)


def test_a_model_the_file_format_cannot_hold_fails_before_training(write_recipe, tmp_path, monkeypatch):
    (tmp_path / "wrapped_models.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def twice(x):\n    return 2 * x\n"
        "torch.fx.wrap('twice')  # a leaf function: it stays a call in the graph, unknown to the file format\n"
        "class Net(nn.Module):\n"
        "    def __init__(self, in_features, num_classes):\n"
        "        super().__init__()\n        self.fc = nn.Linear(in_features, num_classes)\n"
        "    def forward(self, x):\n        return twice(self.fc(x.flatten(1)))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    recipe = BASE.replace("zoo:lenet300", "wrapped_models:Net")
    with pytest.raises(fxcompress.FxCompressError, match=r"recipe.yaml:8: steps\[0\] \(1-InsertMasks\) cannot run: "
                                                         r".*twice"):
        run_recipe(write_recipe(recipe), tmp_path / "out", quick=True, log=lambda line: None)


def test_the_recipe_asks_for_sensitivity_curves_of_the_dense_model(write_recipe, tmp_path, monkeypatch, short):
    # sensitivity: is outside the fingerprints of the dense model and the steps, so the two-step run's folder
    # has them all: the first run here sweeps the loaded dense model and loads the rest
    shutil.copytree(short[1], tmp_path / "out")
    recipe = write_recipe(SGD.replace("steps:", "sensitivity: {sparsities: [0.5, 0.9], layers: 'fc[12]'}\nsteps:"))
    lines, drawn = [], []
    _report_without_pictures(monkeypatch, drawn)
    run_recipe(recipe, tmp_path / "out", quick=True, log=lines.append)
    assert "dense training: done before, loaded dense.pt" in lines and not any("sensitivity: done" in x for x in lines)
    table = SensitivityTable.load(tmp_path / "out" / "sensitivity.json")
    assert [options["sensitivity"] for options in drawn] == [table]  # the curves the report draws
    assert table.layers == ("fc1", "fc2") and table.sparsities == (0.5, 0.9)
    dense = run_module.build("zoo:lenet300", {}, (1, 8, 10))  # (channels, side, classes) of digits
    dense.load_state_dict(torch.load(tmp_path / "out" / "dense.pt", weights_only=True))
    data = run_module.load_data(run_module.load_recipe(recipe, quick=True), (1, 8, 10))
    assert table.baseline == run_module.evaluate(dense, data.test_x, data.test_y)  # the trained dense model's
    page = (tmp_path / "out" / "report.html").read_text()
    assert "Pruning sensitivity" in page and f"baseline {table.baseline:.4f}" in page
    monkeypatch.setattr(run_module, "sensitivity", lambda *a, **k: pytest.fail("swept again"))
    lines.clear()
    calls = []  # the rerun's report: the same page as the first run's, read above
    _record_reports(monkeypatch, calls)
    run_recipe(recipe, tmp_path / "out", quick=True, log=lines.append)
    assert "sensitivity: done before, loaded sensitivity.json" in lines and calls == [tmp_path / "out" / "report.html"]


def test_check_validates_and_compiles_every_step_without_training(cli, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("--check trained"))
    monkeypatch.chdir(tmp_path)
    status, out, err = cli("run", "deep_compression_lenet5", "--check")  # a shipped recipe, by name
    assert status == 0, err
    assert "deep_compression_lenet5.yaml: valid; every step compiles on zoo:lenet5 with digits images" in out
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output folder
    bad = write_recipe(BASE.replace("config: {bits: 4}", "config: {bits: 4}\n  - pass: LowerToInteger"), "bad.yaml")
    status, _, err = cli("run", bad, "--check")
    assert status == 1 and "bad.yaml:13: steps[2] (3-LowerToInteger) cannot run" in err


def test_a_calibration_larger_than_the_data_set_fails_the_check_at_its_line(cli, write_recipe, monkeypatch):
    # digits holds 1437 training images: 8 batches of 256 would end in empty ones (observers then failed
    # after the training, channel reconstruction ran on fewer images than asked)
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    recipe = write_recipe(BASE.replace("threads: 1", "threads: 1\ncalibration: {batches: 8, batch_size: 256}"))
    for quick in ([], ["--quick"]):
        status, out, err = cli("run", recipe, "--check", *quick)
        assert status == 1 and out == ""
        assert err == ("fxcompress: error: recipe.yaml:5: calibration: 8 batches of 256 need 2048 training images; "
                       "data digits holds 1437\n")


def test_calibration_batches_are_whole_batches_of_the_data_sets_training_images(write_recipe):
    # the quick run keeps 400 training images: its 4 batches of 128 still are the first 512 of the data set
    recipe = run_module.load_recipe(write_recipe(BASE.replace("threads: 1", "threads: 1\ncalibration: "
                                                                            "{batches: 4, batch_size: 128}")), quick=True)
    whole = run_module.load_data(run_module.load_recipe(write_recipe(BASE, "whole.yaml")), (1, 8, 10))
    batches = run_module.calibration_batches(recipe, whole)
    assert [len(b) for b in batches] == [128] * 4 and torch.equal(torch.cat(batches), whole.train_x[:512])
    # a recipe that names no calibration takes the default's images where the data set holds them, none empty
    small = type(whole)("small", whole.train_x[:300], whole.train_y[:300], whole.test_x, whole.test_y,
                        channels=1, image_size=8, num_classes=10)
    default = run_module.load_recipe(write_recipe(BASE, "default.yaml"))
    assert [len(b) for b in run_module.calibration_batches(default, small)] == [128, 128, 44]


def test_sensitivity_layers_matching_no_layer_fail_the_check_at_their_line(cli, write_recipe, monkeypatch):
    monkeypatch.setattr(run_module, "train", lambda *a, **k: pytest.fail("trained before validating"))
    recipe = write_recipe(BASE.replace("steps:", "sensitivity:\n  sparsities: [0.5]\n  layers: 'conv.*'\nsteps:"))
    status, _, err = cli("run", recipe, "--check")
    assert status == 1
    assert err == "fxcompress: error: recipe.yaml:9: sensitivity: no linear / conv layer matches layers='conv.*'\n"


@pytest.mark.parametrize("damage", [
    lambda state: state["steps"].__setitem__(0, "1-InsertMasks"),        # an entry that is not a mapping
    lambda state: state["steps"][0].pop("accuracy"),                     # a key missing
    lambda state: state["steps"][0].__setitem__("accuracy", "0.9"),      # a value of the wrong kind
])
def test_a_damaged_state_file_means_nothing_is_finished(tmp_path, short, damage):
    shutil.copytree(short[1], tmp_path / "out")  # a finished run of SGD's two steps
    recipe = run_module.load_recipe(_recipe(tmp_path, SGD, "short.yaml"), quick=True)
    lines = []
    intact = run_module.Run(recipe, tmp_path / "out", log=lines.append)
    assert [intact.finished(step) for step in recipe.steps] == [tmp_path / "out" / "step-01.fxc",
                                                                tmp_path / "out" / "step-02.fxc"] and lines == []
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    damage(state)
    (tmp_path / "out" / "state.json").write_text(json.dumps(state))
    run = run_module.Run(recipe, tmp_path / "out", log=lines.append)
    assert run.state == {"dense": None, "steps": []}
    assert [run.finished(step) for step in recipe.steps] == [None, None]  # every step runs again
    assert lines == [f"warning: {tmp_path / 'out' / 'state.json'} is damaged; it is ignored and every step runs again"]
