"""Crafted files (manifest, graph and module table side): the attacker edits a valid manifest and
recomputes every checksum. Loading must refuse with a FormatError naming the part, or build a model
whose forward works on the inputs the file records (load runs the graph on meta tensors of them
first): never run code from the file, never change a class of the process, never allocate by sizes
the file only declares."""
import ast
import collections
import copy
import functools
import math
import os
import resource
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxcompress
from fxcompress.fileformat.container import MANIFEST_RATIO, MANIFEST_SLACK, from_bytes, to_bytes
from fxcompress.errors import FormatError, FxCompressError
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded
from fxcompress.zoo import ZOO

from .hostile import read_manifest, tensor_data, with_manifest, with_packed_manifest, zlib_bomb

MARKER = Path(tempfile.mkdtemp(prefix="fxc-hostile-")) / "pwned"
FLAG = "FXCOMPRESS_HOSTILE_RAN"
# Each payload, if it ever became source, would create MARKER or set FLAG.
RUN = f"__import__('os').system('touch {MARKER}')"
SET = f"__import__('os').environ.__setitem__('{FLAG}', '1')"
PAYLOADS = [RUN, SET, f"x={RUN}", f"x, y=({SET}, 1)", f'a"); {RUN}; ("', f"a')\n{RUN}\n#", f"{SET} or x"]
NAMES = ["__class__", "__class__.__base__.__init__", "_0.__class__", "__init__", "self", "ｓｅｌｆ", "a.b", "",
         "0", "x y", "output", "forward", "training", "_modules", "weight", "fc1.weight", "fc1", "T", "shape",
         "torch.nn.functional.linear", "builtins.getattr", "builtins.eval", "os.system", "operator.add",
         "torchvision.ops.stochastic_depth", "view", "__getattribute__", "lambda", "None"]
VALUES = PAYLOADS + NAMES + [None, 0, -1, 7, 2 ** 70, 40000, 1.5, True, [], {}, {"n": "nope"}, {"t": "x"},
                             {"d": [[[1], 2]]}, {"zz": 1}, {"n": "x", "t": []}, {"f": "1e999"}, {"f": "abc"},
                             {"dev": "nonsense"}, {"dt": "float128"}, {"s": [1]}, {"e": 1}, [[[[[]]]]]]
WATCHED = (torch.fx.GraphModule, torch.fx.Graph, torch.fx.Node, torch.nn.Module, torch.nn.Linear, torch.Tensor,
           object, type, FormatError)
OUTCOMES: collections.Counter = collections.Counter()
FORWARD_FAILURES: list[str] = []  # files that loaded and then failed at their first forward: what failed
PEAKS: list[tuple[int, int]] = []  # (traced peak bytes during load, file bytes)
RSS_GROWTH: list[int] = []  # KiB the process's peak RSS grew during each load (torch's allocations, untraced)
# What one hostile file may cost while it loads: the documented bound of a parsed manifest (about 350
# bytes per compressed byte, README "Guarantees") with slack; torch's own allocations are not traced,
# so the process's peak RSS may not grow by more than RSS_LIMIT_KIB during a load either.
TRACED_PER_BYTE, TRACED_SLACK, RSS_LIMIT_KIB = 400, 4 << 20, 64 << 10


def _class_state():
    return {cls: dict(vars(cls)) for cls in WATCHED}


def _assert_untouched(before):
    assert not MARKER.exists(), "a command from the file ran"
    assert FLAG not in os.environ, "code from the file ran"
    for cls, attrs in before.items():
        now = vars(cls)
        changed = [k for k in set(attrs) | set(now) if attrs.get(k, KeyError) is not now.get(k, KeyError)]
        assert not changed, f"{cls.__name__} was tampered with: {changed}"


def _assert_code_is_data_only(code):
    """The generated forward names no dunder or code runner: strings from the file are only literals."""
    for node in ast.walk(ast.parse(code)):
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        assert "__" not in name and name not in {"eval", "exec", "system", "environ", "open"}, name


def _compressed_mlp():
    """A small MLP pruned, k-means quantized and lowered to encoded weights."""
    x = torch.randn(3, 24)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5)).eval()
    passes = [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans"), LowerToEncoded()]
    return fxcompress.compile(model, passes, example_inputs=(x,), verify=False), x


@functools.cache
def saved(name):
    """(file bytes, example input) of a small saved model."""
    if name == "compressed":
        gm, x = _compressed_mlp()
    else:
        make_model, make_input = ZOO[name]
        x = make_input()
        gm = torch.fx.symbolic_trace(make_model().eval())
    return to_bytes(gm, example_inputs=(x,)), x  # the file records x's shape: load runs the graph on it


def _refused(data, match=None):
    before = _class_state()
    with pytest.raises(FormatError, match=match) as info:
        from_bytes(data)
    _assert_untouched(before)
    return str(info.value)


def _edited(name, edit):
    data, _ = saved(name)
    manifest = read_manifest(data)
    edit(manifest)
    return with_manifest(data, manifest)


def test_the_detector_sees_a_payload_that_runs():
    """The payloads really are detected when they run (so their absence below means something)."""
    before = _class_state()
    try:
        eval(RUN), eval(SET)  # noqa: S307 - deliberately, to prove the detector
        with pytest.raises(AssertionError, match="ran"):
            _assert_untouched(before)
    finally:
        MARKER.unlink(missing_ok=True)
        os.environ.pop(FLAG, None)
    _assert_untouched(before)


# ---- the measured cases --------------------------------------------------------------------------

def test_placeholder_target_cannot_run_code_at_load():
    data = _edited("lenet300", lambda m: m["graph"][0].update(target=f"x={RUN}"))
    assert "graph node 'x'" in _refused(data, "placeholder target")


def test_kwargs_key_cannot_run_code_at_first_forward():
    def edit(m):  # today's reader pasted this key into forward's source: `fc1(x, <key> = 1)`
        node = next(n for n in m["graph"] if n["op"] == "call_module")
        node["kwargs"] = {"d": [[f"{SET} or x", 1]]}
    _refused(_edited("lenet300", edit), "kwargs must be a dict whose keys are plain identifiers")


def test_get_attr_cannot_walk_into_classes():
    def edit(m):
        m["graph"].insert(1, {"name": "g", "op": "get_attr", "target": "__class__.__base__.__init__",
                              "args": {"t": []}, "kwargs": {"d": []}})
    assert "graph node 'g'" in _refused(_edited("lenet300", edit), "unsafe step")


@pytest.mark.parametrize("path", ["fc1.__class__", "__class__", "fc1.forward", "fc1.training", "nope.x"])
def test_module_table_paths_stay_in_the_module_tree(path):
    def edit(m):
        m["modules"].append({"path": path, "type": "container", "config": {}, "training": False})
    _refused(_edited("lenet300", edit), f"module '{path}'")


def test_call_module_must_name_an_existing_submodule():
    def edit(m):
        next(n for n in m["graph"] if n["op"] == "call_module")["target"] = "fc9"
    _refused(_edited("lenet300", edit), "does not name a submodule")


def test_a_string_constant_cannot_receive_a_method_call():
    def edit(m):
        m["graph"].insert(-1, {"name": "s", "op": "call_method", "target": "view", "args": {"t": ["os", 1]},
                               "kwargs": {"d": []}})
    _refused(_edited("lenet300", edit), "graph node 's': the arguments of this call_method")


@pytest.mark.parametrize("change", ["drop", "twice", "not_last"])
def test_exactly_one_output_node_and_it_is_last(change):
    def edit(m):
        out = m["graph"].pop()
        if change == "twice":
            m["graph"] += [out, dict(out, name="output_1")]
        elif change == "not_last":
            m["graph"].insert(1, out)
    _refused(_edited("lenet300", edit), "must end with its one output node")


@pytest.mark.parametrize("depth, match", [(100_000, "inflates beyond"), (10_000, "nested too deeply"),
                                          (100, "nested deeper than 64 levels")])
def test_manifest_nested_100000_levels_is_refused(depth, match):
    """100,000 levels are 200 kB of text from a few hundred compressed bytes: refused by size; 10,000
    stay within the size bound and are refused for their nesting (once a RecursionError); 100 parse, and
    are refused by the depth bound."""
    data, _ = saved("lenet300")
    deep = "[" * depth + "]" * depth
    manifest = read_manifest(data)
    text = '{"graph":' + deep + "," + ",".join(f'"{k}":0' for k in manifest if k != "graph") + "}"
    assert match in _refused(with_packed_manifest(data, zlib.compress(text.encode())), "manifest: ")


def test_unknown_constructor_keys_are_refused():
    def edit(m):
        next(e for e in m["modules"] if e["type"] == "Linear")["config"]["device"] = "meta"
    _refused(_edited("lenet300", edit), "config keys .* are not exactly Linear's fields")


def test_our_modules_need_their_required_keys_and_accept_no_unknown_one():
    """A parameter with a default (GridWeight's group_size) may be absent; nothing unknown may be present."""
    x = torch.rand(4, 16)
    gm = fxcompress.compile(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                            [InsertFakeQuant(method="linear", bits=4, per_channel=True, group_size=8)],
                            example_inputs=(x,))
    data = to_bytes(gm)
    torch.testing.assert_close(from_bytes(data)(x), gm(x), rtol=0, atol=0)  # group_size kept through the file

    def grid(m):
        return next(e for e in m["modules"] if e["type"].endswith(".GridWeight"))["config"]

    manifest = read_manifest(data)
    assert grid(manifest)["group_size"] == 8
    del grid(manifest)["group_size"]  # an older file: per-channel grids, which are different weights
    assert not torch.equal(from_bytes(with_manifest(data, manifest))(x), gm(x))
    for edit, match in [(lambda c: c.update(evil=1), "accepts .*'symmetric'"), (lambda c: c.pop("bits"), "needs .*'bits'")]:
        manifest = read_manifest(data)
        edit(grid(manifest))
        _refused(with_manifest(data, manifest), match)


@pytest.mark.parametrize("change", ["duplicate", "overlap", "gap", "attribute", "kind", "shape", "negative"])
def test_tensor_table_entries_tile_the_data_and_fill_real_slots(change):
    data, _ = saved("lenet300")
    m, extra = read_manifest(data), b""
    table = m["tensors"]
    first = table[0]
    if change == "duplicate":  # the same name twice, its bytes appended so the data region stays tiled
        table.append(dict(first, offset=m["data_bytes"]))
        extra = tensor_data(data)[:first["length"]]
    elif change == "overlap":
        table[1]["offset"] -= 4
    elif change == "gap":
        extra = bytes(4)
    elif change == "attribute":
        first["name"] = first["name"].rpartition(".")[0] + ".training"
    elif change == "kind":
        first["kind"] = "buffer"
    elif change == "shape":
        first["shape"] = first["shape"][::-1]
    else:
        first["shape"] = [-1, *first["shape"]]
    m["data_bytes"] += len(extra)
    expected = {"duplicate": "used once", "overlap": "do not follow the previous tensor", "gap": "covers",
                "attribute": "would replace an attribute", "kind": "the other kind", "shape": "does not fit",
                "negative": "shape must be"}[change]
    _refused(with_manifest(data, m, tensor_data(data) + extra), f"tensor.*{expected}")


@pytest.mark.parametrize("case", ["number_as_name", "list_for_dict", "manifest_is_a_list", "string_op",
                                  "history_record", "training_flag"])
def test_wrong_json_types_are_format_errors(case):
    def edit(m):
        if case == "number_as_name":
            m["graph"][1]["name"] = 7
        elif case == "list_for_dict":
            m["modules"][1] = [m["modules"][1]]
        elif case == "string_op":
            m["graph"][1]["op"] = ["call_module"]
        elif case == "history_record":
            m["history"] = [{"name": 1, "config": [], "changed": "yes"}]
        elif case == "training_flag":
            m["modules"][1]["training"] = "no"
    data = _edited("lenet300", edit) if case != "manifest_is_a_list" else with_manifest(saved("lenet300")[0], [])
    _refused(data, "manifest")


def test_unregistered_function_names_say_to_register():
    def edit(m):
        next(n for n in m["graph"] if n["op"] == "call_function")["target"] = "os.system"
    _refused(_edited("compressed", edit), "register_function")


def test_getattr_in_a_file_reads_only_tensor_properties():
    def edit(m):
        m["graph"].insert(1, {"name": "g", "op": "call_function", "target": "builtins.getattr",
                              "args": {"t": [{"n": m["graph"][0]["name"]}, "__class__"]}, "kwargs": {"d": []}})
    _refused(_edited("lenet300", edit), "graph node 'g'")


@pytest.mark.parametrize("name", ["self", "ｓｅｌｆ", "__x", "import", "a b"])
def test_node_names_must_be_plain_identifiers(name):
    _refused(_edited("lenet300", lambda m: m["graph"][1].update(name=name)), "graph node #1|graph node")


# ---- memory -------------------------------------------------------------------------------------

def test_a_manifest_that_inflates_to_1_gib_is_refused_within_its_bound(capsys):
    data, _ = saved("lenet300")
    bomb = zlib_bomb(1024)  # 1 MiB that inflates to 1 GiB of zeros
    hostile = with_packed_manifest(data, bomb)
    tracemalloc.start()
    try:
        message = _refused(hostile, "inflates beyond")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = MANIFEST_RATIO * len(bomb) + MANIFEST_SLACK
    assert str(bound) in message
    assert peak < 1.25 * bound + (4 << 20), f"peak {peak} bytes for a {len(hostile)}-byte file"  # bytearray growth
    with capsys.disabled():
        print(f"\n1 GiB bomb: {len(bomb)} compressed bytes refused at a traced peak of {peak / 2 ** 20:.1f} MiB")


def test_a_manifest_of_too_many_json_tokens_is_refused_before_parsing():
    """Within the inflation bound, but 2.5 M tiny values (parsed, tens of bytes each): refused by count."""
    import base64
    data, _ = saved("lenet300")
    padding = base64.b64encode(os.urandom(96_000)).decode()  # incompressible: raises both bounds
    text = ('{"graph":[' + "0," * 2_500_000 + '0],"pad":"' + padding + '"}').encode()
    packed = zlib.compress(text, 6)
    tracemalloc.start()
    try:
        _refused(with_packed_manifest(data, packed), "JSON tokens exceed the bound")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.25 * len(text) + (4 << 20)  # the text itself, no parsed objects


@pytest.mark.parametrize("lists", [5_000, 20_000, 80_000, 340_000])
def test_a_small_file_of_many_tiny_json_values_costs_a_small_multiple_of_itself(lists):
    """`[[]],` repeated compresses about 1000x and parses to two lists (about 120 bytes) per 5 characters:
    before the slacks were cut, 340,000 of them (a 1.1 kB file) cost 48 MiB while parsing."""
    data, _ = saved("lenet300")
    text = '{"graph":[' + "[[]]," * lists + '[]],"modules":[],"tensors":[],"history":[],"data_bytes":0}'
    hostile = with_packed_manifest(data, zlib.compress(text.encode(), 9), b"")
    tracemalloc.start()
    try:
        _refused(hostile)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # the slack: MANIFEST_TOKEN_SLACK tokens parsed (about 1.1 MiB) beside the text
    assert peak <= TRACED_PER_BYTE * len(hostile) + (2 << 20), f"{peak} bytes for a {len(hostile)}-byte file"


@pytest.mark.parametrize("with_entry", [False, True])
def test_declared_sizes_are_not_allocated(with_entry):
    """Linear(40000, 40000) would allocate 6.4 GB at construction; the file holds none of it."""
    def edit(m):
        layer = next(e for e in m["modules"] if e["type"] == "Linear")
        layer["config"] = {"in_features": 40000, "out_features": 40000}
        entry = next(t for t in m["tensors"] if t["name"] == f"{layer['path']}.weight")
        if with_entry:
            entry.update(shape=[40000, 40000], length=4 * 40000 ** 2)
    hostile = _edited("lenet300", edit)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    _refused(hostile, "data|does not fit")
    assert time.perf_counter() - start < 2.0
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 200 * 1024, f"loading grew the peak RSS by {grown_kib} KiB"


# ---- sizes, counts and bounds the ops the channel tables follow take from the file ----------------------

class _Along(torch.nn.Module):
    """repeat, tile, tensor_split, topk, sort and narrow with small arguments; each test makes one of them hostile."""

    def forward(self, x):  # x: [2, 8]
        a, b = torch.tensor_split(x.repeat(1, 2).tile(1, 1), 2, dim=1)
        top = torch.topk(a + b, 3, 1).values
        return top.sum() + torch.sort(x, 1).values.sum() + torch.narrow(x, 1, 2, 4).sum()


@functools.cache
def _along():
    x = torch.randn(2, 8)
    gm = torch.fx.symbolic_trace(_Along())
    data = to_bytes(gm, example_inputs=(x,))
    torch.testing.assert_close(from_bytes(data)(x), gm(x))
    return data


def _along_edited(target, position, value):
    """The file of _Along with argument `position` of its call of `target` set to `value`; that call's name."""
    manifest = read_manifest(_along())
    node = next(n for n in manifest["graph"] if n["target"] == target)
    node["args"]["t"][position] = value
    return with_manifest(_along(), manifest), node["name"]


@pytest.mark.parametrize("target, factors", [
    ("repeat", [10 ** 6, 10 ** 6]), ("repeat", [1, 2 ** 40]), ("tile", [2 ** 40, 1]), ("tile", [1, 2 ** 40]),
])
def test_a_repeat_of_a_million_by_a_million_is_refused_by_name_without_allocating(target, factors):
    """x.repeat(10**6, 10**6) would make 10**12 copies of x at the first forward (and the dry run's meta tensor
    would hold that shape): refused while the graph is read, naming the node. The count is a factor on the input's
    size, refused past what the model's tensors hold plus CREATED_SLACK, as F.pad's and repeat_interleave's."""
    manifest = read_manifest(_along())
    node = next(n for n in manifest["graph"] if n["target"] == target)
    node["args"]["t"][1:3] = factors
    tracemalloc.start()
    start = time.perf_counter()
    _refused(with_manifest(_along(), manifest),
             f"graph node '{node['name']}': {target} would create {math.prod(factors)} elements from sizes the file "
             "states")
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 20 * 2 ** 20, (seconds, peak)


def test_a_tensor_split_into_more_pieces_than_a_graph_reads_is_refused():
    """tensor_split(x, 2**40) makes 2**40 tensors (empty ones past x's end) whatever x's size."""
    data, name = _along_edited("torch.tensor_split", 1, 2 ** 40)
    tracemalloc.start()
    _refused(data, f"graph node '{name}': tensor_split would make 1099511627776 tensors from a count the file states")
    assert tracemalloc.get_traced_memory()[1] < 20 * 2 ** 20
    tracemalloc.stop()


@pytest.mark.parametrize("target, position, value, match", [
    ("torch.topk", 1, 100, "k=100 is outside 0..16|k not in range"),
    ("torch.topk", 1, -1, "k=-1 is outside 0..16|Expected cond"),
    ("torch.topk", 2, 7, "Dimension out of range|dim 7"),
    ("torch.sort", 1, 2 ** 62, "dim 4611686018427387904 is outside a tensor of 2 dims"),  # meta sort takes it
    ("torch.sort", 1, -2 ** 63, "is outside a tensor of 2 dims"),
    ("torch.narrow", 2, 7, "start \\(7\\) \\+ length \\(4\\) exceeds|length 4 from start 7"),
    ("torch.narrow", 2, -9, "start out of range|start -9 is outside"),
    ("torch.narrow", 3, -1, "length must be non-negative|length -1"),
    ("torch.narrow", 1, 5, "Dimension out of range|dim 5"),
])
def test_a_k_dim_or_bounds_outside_the_recorded_input_are_refused_by_name(target, position, value, match):
    """Each loaded and failed at its first forward with a RuntimeError or IndexError if the dry run let it
    through (the meta sort kernel does: it takes any dim); load refuses it naming the node."""
    data, name = _along_edited(target, position, value)
    _refused(data, f"graph node '{name}' \\(call_function {target}\\): fails on the recorded input shapes.*({match})")


def test_values_and_indices_are_read_only_from_the_results_that_have_them():
    """`.values` is a field of topk's / sort's / max's result; of a tensor it is a method of sparse tensors, which a
    file has no use for: the getattr is refused as any other attribute."""
    manifest = read_manifest(_along())
    read = next(n for n in manifest["graph"] if n["target"] == "builtins.getattr")
    assert read["args"]["t"][1] == "values"
    read["args"]["t"][0] = {"n": manifest["graph"][0]["name"]}  # x.values
    _refused(with_manifest(_along(), manifest), f"graph node '{read['name']}': the arguments of this call_function "
                                                 "node have the wrong form")
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(getattr, (x, "values")))
    with pytest.raises(FormatError, match="getattr is stored only for .* the fields \\['indices', 'values'\\] of "
                                          "topk / sort / max / min results"):
        to_bytes(torch.fx.GraphModule(torch.nn.Module(), graph))


# ---- generated hostile files ------------------------------------------------------------------------

def _pick(data, items, label):
    return items[data.draw(st.integers(0, len(items) - 1), label=label)] if items else None


def _value(data):
    deep = data.draw(st.integers(1, 3), label="depth") ** 5  # up to 243 levels of nesting
    return data.draw(st.sampled_from(VALUES + [functools.reduce(lambda v, _: [v], range(deep), 0)]), label="value")


def _mutate_node(m, data):
    node = _pick(data, m["graph"], "node")
    field = data.draw(st.sampled_from(["name", "op", "target", "args", "kwargs", "kwargs_key", "arg"]))
    if field == "kwargs_key":
        node["kwargs"] = {"d": [[data.draw(st.sampled_from(PAYLOADS + NAMES)), 1]]}
    elif field == "arg":
        node["args"] = {"t": [{"n": m["graph"][0]["name"]}, _value(data)]}
    else:
        node[field] = _value(data)


def _mutate_order(m, data):
    graph = m["graph"]
    i, j = (data.draw(st.integers(0, len(graph) - 1)) for _ in range(2))
    action = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
    if action == "delete":
        del graph[i]
    elif action == "duplicate":
        graph.insert(j, copy.deepcopy(graph[i]))
    else:
        graph[i], graph[j] = graph[j], graph[i]


def _insert_node(m, data):
    op = data.draw(st.sampled_from(["get_attr", "call_module", "call_method", "call_function", "placeholder"]))
    target = data.draw(st.sampled_from(PAYLOADS + NAMES))
    args = data.draw(st.sampled_from([{"t": []}, {"t": [{"n": m["graph"][0]["name"]}, _value(data)]}]))
    m["graph"].insert(data.draw(st.integers(0, len(m["graph"]))),
                      {"name": data.draw(st.sampled_from(["h", "x", "self", "_h1"] + PAYLOADS[:2])), "op": op,
                       "target": target, "args": args, "kwargs": {"d": []}})


def _mutate_module(m, data):
    entry = _pick(data, m["modules"], "module")
    field = data.draw(st.sampled_from(["path", "type", "config", "training", "config_key", "config_value"]))
    if field == "config_key":
        entry["config"] = dict(entry["config"], **{data.draw(st.sampled_from(["device", "dtype", "bias"])): "meta"})
    elif field == "config_value" and entry["config"]:
        entry["config"][_pick(data, sorted(entry["config"]), "key")] = _value(data)
    else:
        entry[field if field != "config_value" else "config"] = _value(data)


def _mutate_tensor(m, data):
    entry = _pick(data, m["tensors"], "tensor")
    field = data.draw(st.sampled_from(sorted(entry) + ["duplicate"]))
    if field == "duplicate":
        m["tensors"].append(dict(entry))
    elif field in ("shape", "offset", "length"):
        entry[field] = data.draw(st.sampled_from([[], [0], [2 ** 40, 2 ** 40], [-1], [True], 0, 1, 2 ** 62, -4,
                                                  entry[field], "8"]))
    else:
        entry[field] = _value(data)


def _swap_existing(m, data):
    """Plausible damage: one node takes another's target, args or kwargs, all strings from the file itself."""
    a, b = _pick(data, m["graph"], "node a"), _pick(data, m["graph"], "node b")
    field = data.draw(st.sampled_from(["target", "args", "kwargs", "op"]))
    a[field] = copy.deepcopy(b[field])


def _mutate_section(m, data):
    key = data.draw(st.sampled_from(sorted(m)))
    if data.draw(st.booleans()):
        del m[key]
    else:
        m[key] = _value(data)


def _mutable(m):
    """Whether the mutations above can still find their way around `m` (an earlier one may have broken it)."""
    sections = [m.get(k) if isinstance(m, dict) else None for k in ("graph", "modules", "tensors")]
    return (all(isinstance(items, list) and items and all(isinstance(i, dict) for i in items) for items in sections)
            and all(isinstance(e.get("config"), dict) for e in sections[1]))


MUTATIONS = [_mutate_node, _mutate_order, _insert_node, _mutate_module, _mutate_tensor, _mutate_section,
             _swap_existing]
FORWARD_ERRORS = (FxCompressError, RuntimeError, TypeError, ValueError, IndexError)


@settings()  # the profile's example count (tests/conftest.py): 40 in CI, 2000 with FXCOMPRESS_LONG=1
@given(name=st.sampled_from(["lenet300", "transformer", "senet", "compressed"]), data=st.data())
def test_generated_hostile_manifests_never_run_code_or_escape_format_errors(name, data):
    original, x = saved(name)
    manifest = read_manifest(original)
    for _ in range(data.draw(st.integers(1, 2), label="mutations")):
        if _mutable(manifest):
            data.draw(st.sampled_from(MUTATIONS), label="mutation")(manifest, data)
    hostile = with_manifest(original, manifest, tensor_data(original))
    before = _class_state()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        gm = from_bytes(hostile)
    except FormatError:
        OUTCOMES["load: FormatError"] += 1
        gm = None
    finally:
        PEAKS.append((tracemalloc.get_traced_memory()[1], len(hostile)))
        tracemalloc.stop()
        RSS_GROWTH.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before)
    assert PEAKS[-1][0] <= TRACED_PER_BYTE * len(hostile) + TRACED_SLACK, PEAKS[-1]
    assert RSS_GROWTH[-1] <= RSS_LIMIT_KIB, f"the peak RSS grew by {RSS_GROWTH[-1]} KiB during one load"
    if gm is not None:
        _assert_code_is_data_only(gm.code)
        try:
            with torch.no_grad():
                gm(x)
            OUTCOMES["load ok, forward ok"] += 1
        except FORWARD_ERRORS as exc:  # load's dry run on the recorded input shapes should have refused it
            OUTCOMES[f"load ok, forward {type(exc).__name__}"] += 1
            FORWARD_FAILURES.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            raise AssertionError(f"the file loaded, then its first forward failed: {FORWARD_FAILURES[-1]}") from exc
    _assert_untouched(before)


def test_report_of_generated_files(capsys):
    """Prints what the generated files did (the counts and peaks are the figures quoted in reports)."""
    tried = sum(OUTCOMES.values())
    assert tried >= settings().max_examples  # every generated file got an outcome above
    worst = max(PEAKS, key=lambda p: p[0] / p[1])
    with capsys.disabled():
        print(f"\nhostile files tried: {tried}; outcomes: {dict(OUTCOMES)}; traced peak during load: "
              f"max {max(p for p, _ in PEAKS) / 2 ** 20:.2f} MiB, worst ratio {worst[0] / worst[1]:.1f}x "
              f"the file ({worst[0]} bytes for {worst[1]}); file sizes {min(n for _, n in PEAKS)}-"
              f"{max(n for _, n in PEAKS)} bytes; peak RSS growth during one load: max {max(RSS_GROWTH)} KiB")
        for failure in FORWARD_FAILURES[:20]:
            print(f"  loaded, then the forward failed: {failure}")


@pytest.mark.parametrize("alias, match", [
    (lambda first: {"path": f"{first}.loop", "config": {"same_as": first}}, "would make the module tree a cycle"),
    (lambda first: {"path": "later", "config": {"same_as": "later_still"}}, "an alias's config is exactly"),
    (lambda first: {"path": "itself", "config": {"same_as": "itself"}}, "an alias's config is exactly"),
    (lambda first: {"path": "extra", "config": {"same_as": first, "code": "1"}}, "an alias's config is exactly"),
])
def test_a_module_alias_names_a_module_listed_before_it_and_never_makes_a_cycle(alias, match):
    def edit(m):
        first = m["modules"][1]["path"]
        m["modules"].append({"type": "alias", "training": False, **alias(first)})
    _refused(_edited("lenet300", edit), match)
