"""Smoke test of examples/sensitivity_lenet.py on digits: sweep, plot, rules from the sweep, pruning."""
import runpy
from pathlib import Path

import pytest

from fxcompress.pruning import get_mask, masked_layers

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sensitivity_lenet.py"


def test_sensitivity_drives_per_layer_rules(tmp_path, capsys):
    main = runpy.run_path(str(EXAMPLE))["main"]
    result = main(["--dataset", "digits", "--epochs", "4", "--tolerance", "0.02", "--plot", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert "| layer | 0.5 | 0.7 | 0.8 | 0.9 | 0.95 |" in capsys.readouterr().out
    chosen, gm = result["chosen"], result["gm"]
    for layer in masked_layers(gm):
        mask = get_mask(gm, layer)
        assert 1 - mask.count_nonzero().item() / mask.numel() == pytest.approx(chosen[layer.name], abs=1e-3)
    assert {layer.name for layer in masked_layers(gm)} == {name for name, s in chosen.items() if s > 0}
    assert result["retrained"] >= result["table"].baseline - 0.1
