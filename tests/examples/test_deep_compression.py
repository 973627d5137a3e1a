import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deep_compression.py"


def test_demo_pipeline_runs_on_digits(capsys, tmp_path):
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--data", "digits", "--epochs", "4", "--retrain-epochs", "1", "--threads", "1",
                   "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "compression ratio" in out and "InsertMasks" in out and "LowerToEncoded" in out
    assert {"lenet300.fxc", "report.html", "report.md"} <= {p.name for p in tmp_path.iterdir()}
    assert "<img" in (tmp_path / "report.html").read_text()
    assert result["exact"] is True  # the file decodes to exactly the fake-quant model
    assert result["ratio"] > 10
    assert result["dense_accuracy"] > 0.8
    assert result["accuracy"] >= result["dense_accuracy"] - 0.1
    assert "PruneChannels" in out and "LowerToInteger" in out
    assert result["channels_reconstructed"] >= result["channels_plain"] - 0.02
    assert abs(result["integer_8bit"] - result["fake_quant_8bit"]) <= 0.02
