import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deep_compression.py"


def test_demo_pipeline_runs_on_digits(capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--data", "digits", "--epochs", "3", "--threads", "1"])
    out = capsys.readouterr().out
    assert "compression ratio" in out and "fc1" in out
    assert result["dense_accuracy"] > 0.8
    assert result["accuracy"] >= result["dense_accuracy"] - 0.05
