"""The op tables: every entry is a rule function of the rule modules, called as rule(walk, node)."""
import inspect
from functools import partial

import torch
from torch import nn

from fxcompress.channels.graph import layer_rules, ops, tensor_rules
from fxcompress.channels.surgery import _FIXERS
from fxcompress.layers import KINDS
from fxcompress.tracing import trace

RULE_MODULES = (tensor_rules, layer_rules)
TABLES = {"FUNCTION_RULES": ops.FUNCTION_RULES, "METHOD_RULES": ops.METHOD_RULES,
          "MODULE_RULES": ops.MODULE_RULES, "OPTIONAL_FUNCTION_RULES": ops.OPTIONAL_FUNCTION_RULES}


def _function(rule):
    """The rule function behind a table entry (a rule itself, or a partial binding its options)."""
    return rule.func if isinstance(rule, partial) else rule


def _entries():
    return [(f"{table}[{key!r}]", rule) for table, entries in TABLES.items() for key, rule in entries.items()]


def test_every_table_entry_is_a_rule_called_with_the_walk_and_the_node():
    bad = []
    for where, rule in _entries():
        function = _function(rule)
        if not callable(rule) or getattr(function, "__module__", None) not in {m.__name__ for m in RULE_MODULES}:
            bad.append(f"{where}: {rule!r} is no rule of the rule modules")
            continue
        try:
            inspect.signature(rule).bind("walk", "node")  # every option bound, nothing else needed
        except TypeError as error:
            bad.append(f"{where}: {rule!r} cannot be called as rule(walk, node): {error}")
        if list(inspect.signature(function).parameters)[:2] != ["w", "node"]:
            bad.append(f"{where}: {function.__name__} does not take (w, node) first")
    assert not bad, "\n".join(bad)
    assert len(_entries()) > 200  # the tables were really read


def test_every_rule_is_used_by_some_table_entry():
    defined = {value for module in RULE_MODULES for name, value in vars(module).items()
               if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")}
    used = {_function(rule) for _, rule in _entries()}
    assert {f.__name__ for f in defined - used} == set()
    assert used <= defined


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)

    def forward(self, x):
        return torch.relu(self.pool(self.conv(x))).flatten(1).sum(1)


def test_rule_of_dispatches_on_the_function_the_module_type_and_the_method_name():
    gm = trace(Mixed())
    found = {n.name: ops.rule_of(gm, n) for n in gm.graph.nodes if n.op.startswith("call_")}
    assert found["conv"][0] is layer_rules.conv
    assert found["pool"][0] is ops.MODULE_RULES[nn.MaxPool2d] and found["pool"][0].keywords == {"count": 2}
    assert found["relu"][0] is tensor_rules.same
    assert found["flatten"][0] is tensor_rules.reshape and found["flatten"][1] == "method .flatten()"
    assert found["sum_1"][0] is tensor_rules.reduce


def test_an_op_missing_from_the_tables_has_no_rule_and_is_named():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax2d()))
    rule, what = ops.rule_of(gm, next(n for n in gm.graph.nodes if n.target == "1"))
    assert rule is None and what == "module Softmax2d '1'"


def test_layers_are_the_kinds_of_the_layer_vocabulary_in_both_forms():
    named = {"linear": layer_rules.linear, "embedding": layer_rules.embedding, "addmm": layer_rules.addmm}
    for kind in KINDS.values():
        expected = named.get(kind.name) or (layer_rules.conv_transpose if kind.is_transposed else layer_rules.conv)
        assert ops.FUNCTION_RULES[kind.function] is expected, kind.name
        if kind.module is not None:  # addmm (HF's Conv1D) is a function inside a user module
            assert ops.MODULE_RULES[kind.module] is expected, kind.name
            assert kind.module in _FIXERS, kind.name  # pruning it fixes the module's width attributes


def test_the_export_front_ends_input_checks_are_known_and_leave_channels_prunable():
    """compile's export front end puts a check of the input's sizes after each input; channel pruning
    named it an op it does not know (in its warning) though it only reads sizes."""
    import fxcompress
    from fxcompress.frontends.guards import check_input_shape
    from fxcompress.passes import PruneChannels

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(4, 6)
    gm = fxcompress.compile(model, [], (x,), frontend="export")
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][:1] == [check_input_shape]
    assert PruneChannels(amount=0.5).unknown_ops(gm) == []
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5)], (x,))
    assert [p.shape for p in pruned.parameters()][:2] == [torch.Size([4, 6]), torch.Size([4])]
