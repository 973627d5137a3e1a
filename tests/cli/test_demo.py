"""`fxcompress demo --quick`: the Deep Compression pipeline of `make demo`, leaving its file, summary and report."""
import fxcompress
from fxcompress.datasets import load_digits
from fxcompress.training import evaluate


def test_demo_quick_writes_a_file_that_reproduces_the_printed_accuracy(cli, tmp_path):
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
    page = (tmp_path / "report.html").read_text()  # the report beside the file: pictures, sensitivity, graph
    assert page.count('src="data:image/png;base64,') == 1 + 3 + 1 and "Pruning sensitivity" in page
    assert "<svg" in page and "pass a reference model" not in page and (tmp_path / "report.md").is_file()
    assert "report:" in out
