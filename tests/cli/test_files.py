"""`fxcompress inspect | report | decode | export` on a saved compressed model (the report's sensitivity
curves read from a saved table or swept on the file's weights), and their error lines."""
import json

import numpy as np
import pytest
import torch

import fxcompress
from fxcompress.cli import files as files_module
from fxcompress.datasets import load_digits
from fxcompress.encoded.decode import decode
from fxcompress.layers import effective_weight, find_layers
from fxcompress.report import layer_weights, write_report
from fxcompress.sensitivity import SensitivityTable, sensitivity
from fxcompress.training import evaluate


def test_inspect_prints_summary_bytes_and_history(cli, encoded_file):
    path, gm, _ = encoded_file
    status, out, err = cli("inspect", path)
    assert status == 0 and err == ""
    rows = fxcompress.summary(fxcompress.load(path)).rows
    assert f"{path}: {path.stat().st_size} bytes on disk" in out
    assert "per-layer bytes:" in out and "positions" in out and "indices" in out and "codebook" in out
    for row in rows:  # each layer's exact stream bytes, as summary counts them
        line = next(line for line in out.split("per-layer bytes:")[1].splitlines() if line.startswith(row["layer"]))
        assert line.split()[1:3] == [str(row["dense_bytes"]), str(row["compressed_bytes"])]
    assert "InsertMasks" in out and "InsertFakeQuant" in out and "LowerToEncoded" in out
    status, out, _ = cli("inspect", path, "--input-shape", "1,1,8,8")
    macs = fxcompress.summary(fxcompress.load(path), torch.zeros(1, 1, 8, 8)).totals["macs"]
    assert status == 0 and macs == 64 * 300 + 300 * 100 + 100 * 10 and str(macs) in out


def test_report_writes_html_with_the_markdown_beside_it(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file
    # the sensitivity curves read from a saved table (the page without them: the --reference and --markdown tests)
    table = SensitivityTable(("fc1", "fc2", "fc3"), (0.5, 0.9), ((0.9, 0.5), (0.9, 0.8), (0.9, 0.85)), 0.9, "element")
    saved = table.save(tmp_path / "sens.json")
    status, out, err = cli("report", path, "--sensitivity", saved)
    assert status == 0, err
    page, text = path.with_suffix(".html").read_text(), path.with_suffix(".md").read_text()
    assert str(path.with_suffix(".html")) in out and str(path.with_suffix(".md")) in out
    assert fxcompress.summary(fxcompress.load(path)).to_markdown() in text and "LowerToEncoded(" in text
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "LowerToEncoded" in page
    assert page.count('src="data:image/png;base64,') >= 1 + 3 + 1  # the bars, one histogram per layer, the curves
    # the encoded file alone holds no weights before quantization: the page says a reference would show them
    assert "pass a reference model" in page
    assert 'alt="sensitivity curves"' in page and "<td>0.8500</td>" in page
    assert table.to_markdown() in text


def test_report_markdown_only(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file
    out = tmp_path / "only.md"
    status, printed, _ = cli("report", path, "--markdown", "--out", out)
    assert status == 0 and str(out) in printed and "HTML" not in printed
    assert "LowerToEncoded(" in out.read_text() and not out.with_suffix(".html").exists()
    status, _, err = cli("report", path, "--markdown", "--out", tmp_path / "page.html")
    assert status == 1 and "--out must end in .md" in _one_line(err)


def test_report_takes_the_weights_before_quantization_from_a_reference(cli, encoded_file, tmp_path, monkeypatch):
    path, gm, _ = encoded_file
    fake_quant = tmp_path / "fake_quant.fxc"
    fxcompress.save(gm, fake_quant)
    given = []  # the page is written without its pictures; what they would draw is checked here

    def write(model, out, **options):
        given.append((model, options))
        return write_report(model, out, pictures=False, **options)
    monkeypatch.setattr(files_module, "write_report", write)
    # without --reference the page asks for one: test_report_writes_html_with_the_markdown_beside_it; with one it
    # does not: tests/report/test_report.py::test_html_page_holds_tables_pictures_and_graph
    status, _, err = cli("report", path, "--reference", fake_quant, "--out", tmp_path / "r2.html")
    assert status == 0 and (tmp_path / "r2.html").is_file(), err
    [(model, options)] = given
    shown = layer_weights(model, options["reference"])  # the histograms' weights before quantization
    assert [w.name for w in shown] == ["fc1", "fc2", "fc3"]
    assert all(torch.equal(w.before, fake.before) for w, fake in zip(shown, layer_weights(gm)))


def test_report_sensitivity_swept_on_the_files_own_weights(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file
    out = tmp_path / "swept.md"
    status, _, err = cli("report", path, "--markdown", "--out", out, "--sensitivity", "--sparsities", "0.5,0.95")
    assert status == 0, err
    data = load_digits()
    expected = sensitivity(decode(fxcompress.load(path)), lambda m: evaluate(m, data.test_x, data.test_y),
                           [0.5, 0.95])
    assert expected.to_markdown() in out.read_text()  # the same numbers, from the decoded file on digits
    assert expected.layers == ("fc1", "fc2", "fc3") and expected.sparsities == (0.5, 0.95)


def test_report_sensitivity_read_from_a_bad_table_is_one_error_line(cli, encoded_file, tmp_path):
    # a good table's curves on the page: test_report_writes_html_with_the_markdown_beside_it
    path, _, _ = encoded_file
    table = SensitivityTable(("fc1", "fc2", "fc3"), (0.5, 0.9), ((0.9, 0.5), (0.9, 0.8), (0.9, 0.85)), 0.9, "element")
    saved = table.save(tmp_path / "sens.json")
    saved.write_text(saved.read_text().replace('"baseline": 0.9', '"baseline": "x"'))
    status, _, err = cli("report", path, "--out", tmp_path / "r.html", "--sensitivity", saved)
    assert status == 1 and "sens.json: 'baseline' must be a number" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r.html").exists()  # refused before any drawing


def test_sensitivity_out_json_is_what_report_reads(cli, tmp_path):
    out = tmp_path / "sens.json"
    status, printed, err = cli("sensitivity", "--model", "zoo:lenet300", "--quick", "--epochs", "0",
                               "--sparsities", "0.5,0.9", "--layers", "fc3", "--out", out)
    assert status == 0, err
    table = SensitivityTable.load(out)
    assert table.layers == ("fc3",) and table.sparsities == (0.5, 0.9) and table.to_text() in printed


@pytest.mark.parametrize("suffix", [".fxc", ".pt"])
def test_decode_writes_the_dense_weights(cli, encoded_file, tmp_path, suffix):
    path, gm, x = encoded_file
    out = tmp_path / f"dense{suffix}"
    status, text, _ = cli("decode", path, out)
    assert status == 0 and str(out) in text
    expected = {layer.name: effective_weight(gm, layer) for layer in find_layers(gm)}
    if suffix == ".pt":
        state = torch.load(out, weights_only=True)
        assert all(torch.equal(state[f"{name}.weight"], w) for name, w in expected.items())
    else:
        dense = fxcompress.load(out)
        assert not any("encoded" in name for name, _ in dense.named_modules())
        with torch.no_grad():
            assert torch.equal(dense(x), gm(x))


def test_export_json_csr_coo(cli, encoded_file, tmp_path):
    path, gm, _ = encoded_file
    weights = {layer.name: effective_weight(gm, layer).reshape(effective_weight(gm, layer).shape[0], -1).numpy()
               for layer in find_layers(gm)}
    assert cli("export", path, "--format", "json", "--out", tmp_path / "w.json")[0] == 0
    data = json.loads((tmp_path / "w.json").read_text())
    assert np.array_equal(np.array(data["fc1"]["weight"], dtype=np.float32), weights["fc1"].reshape(-1))
    assert cli("export", path, "--format", "csr")[0] == 0  # default name: beside the file
    csr = np.load(path.with_suffix(".csr.npz"))
    for name, w in weights.items():
        rebuilt = np.zeros_like(w)
        for row in range(w.shape[0]):
            span = slice(csr[f"{name}.indptr"][row], csr[f"{name}.indptr"][row + 1])
            rebuilt[row, csr[f"{name}.indices"][span]] = csr[f"{name}.values"][span]
        assert np.array_equal(rebuilt, w)
    assert cli("export", path, "--format", "coo", "--out", tmp_path / "w.npz")[0] == 0
    coo = np.load(tmp_path / "w.npz")
    assert np.array_equal(coo["fc2.values"], weights["fc2"][coo["fc2.rows"], coo["fc2.cols"]])
    assert (coo["fc2.values"] != 0).all() and len(coo["fc2.values"]) == np.count_nonzero(weights["fc2"])


def _one_line(err):
    assert err.startswith("fxcompress") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", [["inspect"], ["report"], ["decode", "{out}"], ["export", "--format", "json"]])
def test_a_bad_file_is_one_error_line(cli, tmp_path, command):
    bad = tmp_path / "bad.fxc"
    bad.write_bytes(b"not an fxcompress file at all")
    argv = [command[0], bad, *[a.replace("{out}", str(tmp_path / "o.pt")) for a in command[1:]]]
    status, out, err = cli(*argv)
    assert status == 1 and out == ""
    assert f"{bad}: header: not an fxcompress file (bad magic bytes)" in _one_line(err)
    status, _, err = cli(command[0], tmp_path / "absent.fxc", *argv[2:])
    assert status == 1 and f"No such file or directory: {tmp_path / 'absent.fxc'}" in _one_line(err)


def test_export_onnx_without_onnx_or_shape_is_one_error_line(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file
    unrecorded = tmp_path / "unrecorded.fxc"
    fxcompress.save(torch.fx.symbolic_trace(torch.nn.Linear(4, 2)), unrecorded)  # traced only: no input shapes
    status, _, err = cli("export", unrecorded, "--format", "onnx")
    assert status == 1 and f"{unrecorded} records no input shapes" in _one_line(err) and "--input-shape" in err
    try:
        import onnx  # noqa: F401
    except ImportError:
        status, _, err = cli("export", path, "--format", "onnx", "--input-shape", "1,1,8,8")
        assert status == 1 and "pip install 'fxcompress[onnx]'" in _one_line(err)
    else:
        status, out, _ = cli("export", path, "--format", "onnx", "--input-shape", "1,1,8,8")
        assert status == 0 and path.with_suffix(".onnx").stat().st_size > 0


def test_export_onnx_takes_the_inputs_the_file_records(cli, tmp_path):
    """A language model's file records integer token ids: without --input-shape the export traces with them (a
    float input of a given shape could not index the embedding)."""
    onnx = pytest.importorskip("onnx")
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    tokens = torch.randint(0, 10, (2, 3))
    path = tmp_path / "tokens.fxc"
    fxcompress.save(fxcompress.compile(model, [], example_inputs=(tokens,)), path)
    status, _, err = cli("export", path, "--format", "onnx")
    assert status == 0, err
    (graph_input,) = onnx.load(path.with_suffix(".onnx")).graph.input
    assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3]


class _PerToken(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_export_onnx_with_a_dynamic_length(cli, tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "tokens.fxc"
    fxcompress.save(fxcompress.compile(_PerToken().eval(), [], example_inputs=(torch.randint(0, 10, (2, 3)),)), path)
    status, _, err = cli("export", path, "--format", "onnx", "--dynamic-axis", "ids:1:length")
    assert status == 0, err
    graph = onnx.load(path.with_suffix(".onnx")).graph
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
    assert dims == [["batch", "length"], ["batch", "length", 2]]
    for bad in ("ids:one:length", "ids:1", ":1:length"):
        status, _, err = cli("export", path, "--format", "onnx", "--dynamic-axis", bad)
        assert status == 1 and f"--dynamic-axis {bad!r}: give INPUT:AXIS:NAME" in _one_line(err)
    status, _, err = cli("export", path, "--format", "onnx", "--dynamic-axis", "tokens:1:length")
    assert status == 1 and "names 'tokens', which is no input of the model" in _one_line(err)


@pytest.mark.parametrize("command", [["inspect"], ["report"], ["export", "--format", "onnx"]])
def test_an_input_shape_the_model_cannot_take_is_one_error_line(cli, encoded_file, command):
    path, _, _ = encoded_file  # a LeNet-300-100 for 8x8 images: 81 inputs do not fit fc1's 64
    before = set(path.parent.iterdir())
    status, out, err = cli(command[0], path, *command[1:], "--input-shape", "1,1,9,9")
    assert status == 1 and out == ""
    assert (f"--input-shape 1,1,9,9: {path} cannot run on an input of shape (1, 1, 9, 9) at node fc1_1 (linear): "
            f"mat1 and mat2 shapes cannot be multiplied (1x81 and 64x300)") in _one_line(err)
    assert set(path.parent.iterdir()) == before  # no report, no export


def test_decode_and_export_refuse_to_overwrite_their_input(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file
    original = path.read_bytes()
    linked = tmp_path / "linked.fxc"
    linked.symlink_to(path)
    for argv in (["decode", path, path], ["decode", path, linked], ["export", path, "--format", "json", "--out", path]):
        status, _, err = cli(*argv)
        assert status == 1 and f"{argv[-1]} is the input file {path}: it would be overwritten" in _one_line(err)
    dense = tmp_path / "dense.fxc"  # a file the sweep takes: its table would have replaced it
    assert cli("decode", path, dense)[0] == 0
    decoded = dense.read_bytes()
    status, _, err = cli("sensitivity", "--file", dense, "--out", dense, "--quick", "--sparsities", "0.5")
    assert status == 1 and f"sensitivity --out {dense} is the input file" in _one_line(err)
    assert dense.read_bytes() == decoded
    # the format's default name beside the input is the input itself
    named = tmp_path / "weights.json"
    named.write_bytes(original)
    status, _, err = cli("export", named, "--format", "json")
    assert status == 1 and f"export --out {named} is the input file" in _one_line(err)
    # the report's Markdown, written beside the page, would replace an input of that name
    status, _, err = cli("report", named.rename(tmp_path / "weights.md"), "--markdown")
    assert status == 1 and "is the input file" in _one_line(err)
    assert path.read_bytes() == original and (tmp_path / "weights.md").read_bytes() == original


def test_decode_refuses_a_suffix_that_names_no_format(cli, encoded_file, tmp_path):
    path, _, _ = encoded_file  # .fxc and .pt: test_decode_writes_the_dense_weights
    status, out, err = cli("decode", path, tmp_path / "dense.npz")
    assert status == 1 and out == "" and not (tmp_path / "dense.npz").exists()
    assert "decode OUT must end in .fxc (a dense fxcompress file) or .pt / .pth (a state dict), got 'dense.npz'" \
        in _one_line(err)
    assert cli("decode", path, tmp_path / "dense.PTH")[0] == 0  # the suffix's case does not matter
    assert torch.load(tmp_path / "dense.PTH", weights_only=True).keys() >= {"fc1.weight", "fc3.bias"}


@pytest.mark.parametrize("fmt, option", [("csr", ["--integer"]), ("onnx", ["--integer"]),
                                         ("json", ["--input-shape", "1,1,8,8"]), ("coo", ["--dynamic-axis", "x:1:n"])])
def test_export_refuses_an_option_its_format_ignores(cli, encoded_file, tmp_path, fmt, option):
    path, _, _ = encoded_file
    out = tmp_path / "out.bin"
    status, _, err = cli("export", path, "--format", fmt, "--out", out, *option)
    assert status == 1 and not out.exists()
    assert f"export {option[0]} applies to --format" in _one_line(err) and f"--format {fmt} would ignore it" in err
