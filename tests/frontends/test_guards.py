"""frontends.guards: an exported graph checks the input shapes torch.export traced it for, where the graph would
otherwise compute the traced branch for any input."""
import pytest
import torch
from torch import nn

import fxcompress
from fxcompress.errors import ConfigError
from fxcompress.fileformat.container import from_bytes, to_bytes
from fxcompress.frontends.guards import check_input_shape, input_checks, traced_shapes
from fxcompress.passes import InsertMasks, PruneChannels
from fxcompress.rewire import drop_unread


class WideBatchBranch(nn.Module):
    """A forward that computes otherwise for batches of more than four."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return self.out(h * 2 if x.shape[0] > 4 else h)


def test_a_batch_outside_the_traced_range_is_refused_where_the_graph_computed_the_other_branch():
    torch.manual_seed(0)
    model = WideBatchBranch().eval()
    gm = fxcompress.compile(model, [], (torch.randn(3, 4),))  # fx cannot trace the branch: torch.export does
    assert gm.meta["frontend"] == "export"
    for batch in (1, 2, 4):
        x = torch.randn(batch, 4)
        assert torch.equal(gm(x), model(x))
    x = torch.randn(5, 4)
    without_checks = fxcompress.compile(gm, [], (torch.randn(3, 4),))
    for check in input_checks(without_checks.graph):
        without_checks.graph.erase_node(check)
    without_checks.recompile()
    assert not torch.allclose(without_checks(x), model(x))  # what the graph computed there before, silently
    with pytest.raises(ConfigError, match=r"input 'x' has size 5 along axis 0 \(shape \(5, 4\)\).*sizes 1 to 4"):
        gm(x)


def test_the_check_survives_passes_dead_code_elimination_and_the_file():
    torch.manual_seed(0)
    model, x = WideBatchBranch().eval(), torch.randn(3, 4)
    gm = fxcompress.compile(model, [InsertMasks(sparsity=0.5), PruneChannels(amount=0.25)], (x,),
                            calibration_data=[x, torch.randn(4, 4)])
    gm.graph.eliminate_dead_code()  # fx's own, as a user may run it: the check is an effect, as torch._assert is
    drop_unread(gm)
    assert len(input_checks(gm.graph)) == 1
    loaded = from_bytes(to_bytes(gm, example_inputs=(x,)))
    assert [n.target for n in loaded.graph.nodes].count(check_input_shape) == 1
    assert torch.equal(loaded(x), gm(x))
    for graph in (gm, loaded):
        with pytest.raises(ConfigError, match="input 'x' has size 7 along axis 0"):
            graph(torch.randn(7, 4))


def test_a_program_exported_at_fixed_shapes_takes_only_them_as_its_module_does():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))  # no dynamic shapes: the flatten holds the batch of 2
    with pytest.raises(Exception):
        program.module()(torch.randn(3, 3, 8, 8))
    gm = fxcompress.compile(program, [], (x,))
    assert torch.equal(gm(x), model(x))
    with pytest.raises(ConfigError, match=r"input 'input' has size 3 along axis 0 .*for size 2 there"):
        gm(torch.randn(3, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"input 'input' has 3 axes \(3, 8, 8\); this graph was traced for 4"):
        gm(torch.randn(3, 8, 8))


def test_a_users_dynamic_range_is_kept_and_a_free_batch_of_one_runs():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    x = torch.randn(3, 4)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=16)},))
    assert traced_shapes(program) == [((0, 16), (4, 4))]
    assert traced_shapes(program.module()) == traced_shapes(program)
    gm = fxcompress.compile(program, [], (x,))
    for batch in (1, 16):
        other = torch.randn(batch, 4)
        assert torch.equal(gm(other), model(other))
    with pytest.raises(ConfigError, match="has size 17 along axis 0 .*sizes 0 to 16"):
        gm(torch.randn(17, 4))
    with pytest.raises(ConfigError, match="has size 5 along axis 1 .*for size 4 there"):
        gm(torch.randn(3, 5))
    free = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    assert traced_shapes(free) == [((1, None), (4, 4))]  # traced at 2 or more, taking one as torch's check does


def test_models_fx_traces_get_no_checks():
    gm = fxcompress.compile(nn.Linear(4, 2), [], (torch.randn(3, 4),))
    assert gm.meta.get("frontend") != "export" and not input_checks(gm.graph)
    assert gm(torch.randn(9, 4)).shape == (9, 2)


class Scan(nn.Module):
    """A recurrence over the positions in a Python loop (Mamba's slow path): export unrolls it at the example's
    length and keeps that length as a size fixed to a number."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(20, 4), nn.Linear(4, 3)

    def forward(self, ids):
        h = self.embed(ids)
        state, states = torch.zeros_like(h[:, 0]), []
        for i in range(ids.shape[1]):
            state = 0.5 * state + h[:, i]
            states.append(state)
        return self.fc(torch.stack(states, 1))


def test_a_length_export_unrolled_is_checked_as_fixed():
    torch.manual_seed(0)
    model, ids = Scan().eval(), torch.randint(0, 20, (2, 6))
    gm = fxcompress.compile(model, [], (ids,), frontend="export")
    assert [check.args[2] for check in input_checks(gm.graph)] == [((1, None), (6, 6))]
    other = torch.randint(0, 20, (3, 6))
    assert torch.equal(gm(other), model(other))
    longer = torch.randint(0, 20, (2, 9))
    unchecked = fxcompress.compile(gm, [], (ids,))
    for check in input_checks(unchecked.graph):
        unchecked.graph.erase_node(check)
    unchecked.recompile()
    assert unchecked(longer).shape == (2, 6, 3) != model(longer).shape  # six of the nine positions, silently
    with pytest.raises(ConfigError, match=r"input 'ids' has size 9 along axis 1 .*for size 6 there"):
        gm(longer)
