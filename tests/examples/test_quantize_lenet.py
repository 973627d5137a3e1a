import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quantize_lenet.py"


def test_quantization_example_runs_on_digits(capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    results = main(["--dataset", "digits", "--model", "lenet300", "--quick", "--tune-epochs", "1"])
    out = capsys.readouterr().out
    assert "| kmeans (linear init) | 6 |" in out and "float reference" in out
    rows = {r["method"]: r for r in results["lenet300"]["rows"]}
    reference, kmeans = rows["float reference (same fine-tuning)"], rows["kmeans (linear init)"]
    assert reference["quantized"] == pytest.approx(results["lenet300"]["pruned"]["pruned"])  # nothing quantized
    assert abs(kmeans["tuned"] - reference["tuned"]) < 5.0  # 6-bit weight sharing costs little
