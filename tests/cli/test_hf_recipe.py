"""The shipped recipe hf_vit_digits (a Hugging Face ViT from its config) runs with --quick end to end, its
report is given the final model and the fake-quant step as reference, and a recipe may name the model's config
as a JSON file beside it."""
import json

import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.cli import run as run_module
from fxcompress.cli.models import computes_with, export_free_batch
from fxcompress.cli.recipe import load_recipe
from fxcompress.cli.run import data_shape, load_data, run_recipe
from fxcompress.encoded.module import EncodedWeight
from fxcompress.layers import effective_weight, find_layers
from fxcompress.report import layer_weights, write_report
from fxcompress.training import evaluate


@pytest.fixture(scope="module", autouse=True)
def transformers():
    """Every test here needs transformers; imported when they run, not when the suite is collected."""
    return pytest.importorskip("transformers")


def test_hf_vit_digits_runs_quick_and_its_file_is_the_final_model(tmp_path, monkeypatch):
    exports, reports = [], []  # (model, program) of each export the run made; (model, options, files) of its report

    def export(model, example):
        exports.append((model, export_free_batch(model, example)))
        return exports[-1][1]

    def report(gm, path, **options):
        # written without its pictures (about a quarter of this run's CPU): what the run gives write_report
        # is checked below; a run's drawn report is read by tests/cli/test_run.py, each kind of layer's
        # pictures by tests/report
        reports.append((gm, options, write_report(gm, path, pictures=False, **options)))
        return reports[-1][2]

    monkeypatch.setattr(run_module, "export_free_batch", export)
    monkeypatch.setattr(run_module, "write_report", report)
    lines = []
    result = run_recipe("hf_vit_digits", tmp_path, quick=True, log=lines.append)
    final = result["model"]
    assert (tmp_path / "model.fxc").stat().st_size == result["file_bytes"] > 0
    assert any(f"accuracy dense {result['dense_accuracy']:.4f} -> {result['accuracies'][-1]:.4f}" in line
               for line in lines)
    assert json.loads((tmp_path / "state.json").read_text())["steps"][-1]["accuracy"] == result["accuracies"][-1]
    loaded = fxcompress.load(tmp_path / "model.fxc")
    recipe = load_recipe("hf_vit_digits", quick=True)
    data = load_data(recipe, data_shape(recipe))
    batch = data.test_x[:50]  # another batch size than the example's two images
    assert torch.equal(loaded(batch), final(batch))
    assert evaluate(loaded, data.test_x, data.test_y) == result["accuracies"][-1]
    assert any(isinstance(m, EncodedWeight) for m in loaded.modules())
    layers = find_layers(loaded)
    weights = torch.cat([effective_weight(loaded, layer).flatten() for layer in layers])
    assert (weights == 0).float().mean().item() == pytest.approx(0.8, abs=1e-3)  # global 80%, as asked
    for layer in layers:  # 5-bit k-means: at most 32 distinct nonzero values per layer
        weight = effective_weight(loaded, layer)
        assert torch.unique(weight[weight != 0]).numel() <= 32, layer.name
    assert result["accuracies"][-1] > 0.4 and result["dense_accuracy"] > 0.4  # ten classes: chance is 0.1
    [(reported, options, files)] = reports  # the report is of the final model, its histograms' data complete
    assert reported is final and files.html == tmp_path / "report.html" and files.markdown == tmp_path / "report.md"
    page = files.html.read_text()
    assert "hf_vit_digits.yaml: transformers:ViTForImageClassification" in page and "<svg" in page
    assert f"{result['accuracies'][-1]:.4f}" in page
    drawn = layer_weights(reported, options["reference"])  # the encoded layers; before k-means from the fake-quant step
    assert [w.name for w in drawn] == [layer.name for layer in layers]
    assert all(w.before is not None and 1 < w.centroids.numel() <= 32 for w in drawn)
    # one export, the dry run's, of the model itself: the program holds the model's own tensors, which the
    # dense training wrote in place, so step 1 compiled what an export of the trained model gives
    [(dense, program)] = exports
    assert computes_with(program, dense) and evaluate(dense, data.test_x, data.test_y) == result["dense_accuracy"]
    with torch.no_grad():
        assert torch.equal(program.module()(batch), dense(batch))
    dense.model.classifier.weight = nn.Parameter(dense.model.classifier.weight.detach().clone())
    assert not computes_with(program, dense)  # a weight assigned anew, not in place: the run exports again


def test_a_config_file_beside_the_recipe(tmp_path, write_recipe, transformers):
    transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           patch_size=4, image_size=8, num_channels=1).to_json_file(str(tmp_path / "vit.json"))
    recipe = write_recipe("""
        model: transformers:ViTForImageClassification
        model_args: {config: vit.json}      # beside the recipe; num_labels comes from the data set
        data: digits
        steps:
          - pass: InsertMasks
            config: {sparsity: 0.5}
        """)
    lines = []
    assert run_recipe(recipe, None, quick=True, log=lines.append, check_only=True) == {"checked": "recipe.yaml"}
    assert "valid; every step compiles on transformers:ViTForImageClassification" in lines[-1]
    assert load_recipe(recipe).model_args == {"config": str(tmp_path / "vit.json")}
    changed = load_recipe(recipe).fingerprint
    (tmp_path / "vit.json").write_text((tmp_path / "vit.json").read_text().replace('"hidden_size": 16',
                                                                                   '"hidden_size": 8'))
    assert load_recipe(recipe).fingerprint != changed  # a changed config file trains the dense model again


def test_a_hub_id_is_refused_at_its_recipe_line(cli, write_recipe, tmp_path):
    recipe = write_recipe("""
        model: transformers:ViTForImageClassification
        model_args: {config: google/vit-base-patch16-224}
        data: digits
        steps:
          - pass: LowerToEncoded
        """)
    status, out, err = cli("run", recipe, "--out", tmp_path / "out")
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "recipe.yaml:2: model 'transformers:ViTForImageClassification': config 'google/vit-base-patch16-224' " \
           "is not a local file; nothing is downloaded" in err
    assert not (tmp_path / "out").exists()
