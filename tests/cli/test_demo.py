"""`fxcompress demo --quick`: the Deep Compression pipeline of `make demo`, leaving its file, summary and report."""
import fxcompress
from fxcompress.cli import demo as demo_module
from fxcompress.datasets import load_digits
from fxcompress.report import layer_weights, write_report
from fxcompress.training import evaluate


def test_demo_quick_writes_a_file_that_reproduces_the_printed_accuracy(cli, tmp_path, monkeypatch):
    given = []  # the report is written without its pictures, and what the demo gives it is checked

    def write(model, path, **options):
        given.append((model, options))
        return write_report(model, path, pictures=False, **options)
    monkeypatch.setattr(demo_module, "write_report", write)
    status, out, err = cli("demo", "--quick", "--threads", "1", "--out", tmp_path)
    assert status == 0, err
    data = load_digits()
    gm = fxcompress.load(tmp_path / "lenet300.fxc")
    printed = float(out.split("-> compressed ")[1].split()[0])
    assert round(evaluate(gm, data.test_x, data.test_y), 4) == printed
    assert printed > 0.8
    assert "loaded model outputs identical to the fake-quant model: True" in out
    ratio = float(out.split("bytes; ")[1].split("x smaller")[0].split()[-1])
    assert ratio > 10
    assert "LowerToEncoded" in (tmp_path / "summary.md").read_text()
    page = (tmp_path / "report.html").read_text()  # the report beside the file: sensitivity, graph
    assert "Pruning sensitivity" in page and "<svg" in page and (tmp_path / "report.md").is_file()
    assert "report:" in out
    # what its pictures draw (write_report draws them for such a model and table: the page test of
    # tests/report counts the bars, a histogram per layer and the curves): the encoded model, every layer's
    # weights before k-means from the fake-quant model, the dense model's sensitivity curves
    [(encoded, options)] = given
    assert round(evaluate(encoded, data.test_x, data.test_y), 4) == printed
    shown = layer_weights(encoded, options["reference"])
    assert [w.name for w in shown] == ["fc1", "fc2", "fc3"] and all(w.before is not None for w in shown)
    table = options["sensitivity"]
    assert table.layers == ("fc1", "fc2", "fc3") and table.sparsities == demo_module.SENSITIVITY
