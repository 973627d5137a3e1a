"""Six Hugging Face transformers through fxcompress: small configs, random init, nothing downloaded.

Every model goes through the torch.export front end, and on transformers 4.x also through Hugging
Face's own fx tracer (T5EncoderModel excepted: that tracer refuses it). Checked on each: the channel
graph gives a reason for every frozen group; PruneChannels (default, attention="heads",
prune_normalized=True) compiles, verifies and shrinks the parameters to a measured bound; removing
zeroed channels leaves the outputs equal where the pass claims exactness (the default and "heads"
modes); masks + k-means + encoding + save, then load in a fresh process, reproduce the fake-quant
outputs bit for bit.
"""
from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap
from collections.abc import Mapping

import pytest
import torch

if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers (the transformers extra) is not installed", allow_module_level=True)

import fxcompress  # noqa: E402
from fxcompress.channels import ChannelGraph  # noqa: E402
from fxcompress.fileformat.container import from_bytes, to_bytes  # noqa: E402
from fxcompress.inspection import channel_graph  # noqa: E402
from fxcompress.pass_base import PassContext  # noqa: E402
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded, PruneChannels  # noqa: E402
from fxcompress.zoo import hf_model  # noqa: E402
from zeroing import pick_half, zero_classes  # noqa: E402


# transformers 5 removed its fx tracer (transformers.utils.fx); 4.46 still has it. The installed
# version, read without importing the package
HF_MAJOR = int(importlib.metadata.version("transformers").split(".")[0])
HF_FX = HF_MAJOR < 5
VOCAB, BATCH, LENGTH = 100, 2, 8
# The front end warns, per model, of each aten op it leaves unspelled; what that does to pruning is
# checked here through the frozen groups' reasons, so the long notices are not repeated in the log.
pytestmark = pytest.mark.filterwarnings("ignore:fxcompress. aten ops with no torch-level spelling:UserWarning")


def _tokens():
    return torch.randint(0, VOCAB, (BATCH, LENGTH))


TINY = {"hidden": 32, "layers": 2, "heads": 4, "ffn": 64, "vocab": VOCAB, "labels": 3}
# name -> (model builder, input builder, the forward's input names for HF's tracer). use_cache=False (hf_model):
# a DynamicCache in the output is no tensor tree torch.export can return (nor one a compressed model needs).
MODELS = {
    **{name: (functools.partial(hf_model, name, positions=16, **TINY), _tokens, ["input_ids"])
       for name in ("bert_cls", "bert", "gpt2", "llama")},
    "vit": (functools.partial(hf_model, "vit", image=16, patch=4, **TINY), lambda: torch.randn(BATCH, 3, 16, 16),
            ["pixel_values"]),
    "t5_encoder": (functools.partial(hf_model, "t5_encoder", **TINY), _tokens, ["input_ids"]),
}
FRONTENDS = ("export", "hf_fx") if HF_FX else ("export",)
MODES = {"default": {}, "heads": {"attention": "heads"}, "normalized": {"prune_normalized": True}}
EXACT_MODES = ("default", "heads")  # prune_normalized changes the norms' statistics: valid, not exact


def cases() -> list[tuple[str, str]]:
    """(model, front end) pairs; HF's fx tracer refuses T5EncoderModel ("not supported yet")."""
    return [(m, f) for m in MODELS for f in FRONTENDS if not (f == "hf_fx" and m == "t5_encoder")]


@functools.cache
def source(name: str, frontend: str):
    """(what compile takes, example inputs): an ExportedProgram, or the GraphModule of HF's tracer.
    Built once per module run; compile copies it, so every test starts from the same program."""
    make_model, make_inputs, input_names = MODELS[name]
    torch.manual_seed(0)
    model, inputs = make_model().eval(), (make_inputs(),)
    if frontend == "export":
        return torch.export.export(model, inputs, strict=False), inputs
    from transformers.utils.fx import symbolic_trace  # only on 4.x: the module is gone in 5.x
    return symbolic_trace(model, input_names=input_names).eval(), inputs


@functools.cache
def graph(name: str, frontend: str):
    """(GraphModule, example inputs): the source through compile's front end once (for an
    ExportedProgram: unlifted and respelled at torch level, about a tenth of a second), shared by every
    test that compiles the model, encode() included; compile copies a GraphModule, so each still starts
    from the same graph. The front end on its own program runs here and in the dynamic-shape test."""
    src, inputs = source(name, frontend)
    return fxcompress.compile(src, [], inputs), inputs


@functools.cache
def reference(name: str, frontend: str) -> list[torch.Tensor]:
    """The uncompressed graph's outputs on other_inputs(name), which the pruning tests compare shapes with."""
    gm, _ = graph(name, frontend)
    return run(gm, other_inputs(name))


def other_inputs(name: str) -> tuple:
    """Inputs of the example's shape (the exported graph is specialized to it) and new values."""
    torch.manual_seed(1)
    return (MODELS[name][1](),)


def tensors(out) -> list[torch.Tensor]:
    """Every tensor of a model output (a ModelOutput, dict, tuple or tensor), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in out for t in tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors(item)]
    if out is None:
        return []
    raise TypeError(f"unexpected output of type {type(out).__name__}")


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def run(gm, inputs) -> list[torch.Tensor]:
    with torch.no_grad():
        return tensors(gm.eval()(*inputs))


# ---- the channel graph ------------------------------------------------------------------------

CHANNEL_GRAPH_CASES = cases()


@pytest.mark.parametrize("attention", ["head_dims", "heads"])
@pytest.mark.parametrize("name, frontend", CHANNEL_GRAPH_CASES)
def test_channel_graph_gives_a_reason_for_every_frozen_group(name, frontend, attention):
    gm, inputs = graph(name, frontend)
    cg = channel_graph(gm, inputs, attention=attention)
    text = str(cg)
    held = [g for g in cg.groups if len(g.prunable) < len(g.classes)]
    assert held, "a transformer has frozen channels (at least the ones reaching its outputs)"
    for g in held:
        assert isinstance(g.frozen, str) and g.frozen.strip(), f"group {g.label} is frozen without a reason"
        assert f"group {g.index} [{g.label}]" in text and f"frozen: {g.frozen}" in text
    assert cg.prunable_groups(), f"nothing prunable in {name}: {text}"


# ---- PruneChannels: compile (verified), shrink to a measured bound ----------------------------

# (model, mode) -> the largest parameters after / before at amount=0.5: the ratio measured on these
# configs, on both front ends and both transformers versions, plus at most 0.01; a ratio above it is
# a regression. VERSION_BOUNDS holds the combinations measured apart, (model, front end, mode, version).
PARAM_BOUNDS = {
    ("bert_cls", "default"): 0.60, ("bert_cls", "heads"): 0.60, ("bert_cls", "normalized"): 0.31,
    ("bert", "default"): 0.63, ("bert", "heads"): 0.63, ("bert", "normalized"): 0.63,  # its output is the stream
    ("gpt2", "default"): 0.58, ("gpt2", "heads"): 0.58, ("gpt2", "normalized"): 0.30,
    ("llama", "default"): 0.64, ("llama", "heads"): 0.64, ("llama", "normalized"): 0.32,
    ("vit", "default"): 0.57, ("vit", "heads"): 0.57, ("vit", "normalized"): 0.29,
    ("t5_encoder", "default"): 0.59, ("t5_encoder", "heads"): 0.59, ("t5_encoder", "normalized"): 0.59,
}
VERSION_BOUNDS = {  # transformers 4.46's exported T5 keeps more of its channels frozen
    ("t5_encoder", "export", "default", 4): 0.70, ("t5_encoder", "export", "normalized", 4): 0.70,
}
PRUNE_CASES = [(m, f, mode) for m, f in cases() for mode in MODES]


def measured(table: dict) -> list:
    """The keys of `table` measured on this transformers major version, in the table's order."""
    return [key for key, versions in table.items() if HF_MAJOR in versions and key[1] in FRONTENDS]


def check_prunes(name: str, frontend: str, mode: str) -> None:
    gm, inputs = graph(name, frontend)
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, **MODES[mode])], inputs)  # verifies
    stats = fxcompress.history(pruned)[-1].stats
    ratio = stats["params_after"] / stats["params_before"]
    assert params(pruned) == stats["params_after"]
    bound = VERSION_BOUNDS.get((name, frontend, mode, HF_MAJOR), PARAM_BOUNDS[name, mode])
    assert ratio <= bound, f"{name} {frontend} {mode}: parameters x{ratio:.3f}, bound {bound}"
    assert all(isinstance(why, str) and why.strip() for why in stats["frozen"].values()), stats["frozen"]
    outputs = run(pruned, other_inputs(name))
    assert [t.shape for t in outputs] == [t.shape for t in reference(name, frontend)]
    assert all(torch.isfinite(t).all() for t in outputs if t.is_floating_point())


@pytest.mark.parametrize("name, frontend, mode", PRUNE_CASES)
def test_prune_channels_compiles_and_shrinks_to_the_measured_bound(name, frontend, mode):
    check_prunes(name, frontend, mode)


# Headless encoders return their residual stream: only prune_outputs lets it shrink (as Torch-Pruning
# does when its output layers are not ignored), to these measured bounds with prune_normalized.
OUTPUT_BOUNDS = {"bert": 0.31, "t5_encoder": 0.30}
OUTPUT_VERSION_BOUNDS = {("t5_encoder", 4): 0.35}  # 4.46's exported T5 keeps more frozen (see VERSION_BOUNDS)


@pytest.mark.parametrize("name, frontend", [(m, f) for m, f in cases() if m in OUTPUT_BOUNDS])
def test_prune_outputs_shrinks_a_headless_encoders_hidden_states(name, frontend):
    gm, inputs = graph(name, frontend)
    passes = [PruneChannels(amount=0.5, prune_normalized=True, prune_outputs=True)]
    pruned = fxcompress.compile(gm, passes, inputs)  # verifies everything but the output shapes
    stats = fxcompress.history(pruned)[-1].stats
    bound = OUTPUT_VERSION_BOUNDS.get((name, HF_MAJOR), OUTPUT_BOUNDS[name])
    assert stats["params_after"] / stats["params_before"] <= bound
    outputs = run(pruned, other_inputs(name))
    hidden = [(r.shape, o.shape) for r, o in zip(reference(name, frontend), outputs) if r.dim() == 3]
    assert hidden and all(o[:-1] == r[:-1] and o[-1] < r[-1] for r, o in hidden)  # only the width shrinks
    assert all(torch.isfinite(t).all() for t in outputs if t.is_floating_point())


# ---- zeroed channels: removing them leaves the outputs equal ----------------------------------

ZEROED_CASES = [(m, f, mode) for m, f in cases() for mode in EXACT_MODES]


def check_zeroed_equivalence(name: str, frontend: str, mode: str) -> None:
    """Zero a random half of every prunable unit's channels, let l1 prune: the outputs must not move,
    on the example inputs and on new ones."""
    base, inputs = graph(name, frontend)
    attention = MODES[mode].get("attention", "head_dims")
    gm = fxcompress.compile(base, [], inputs)  # a copy: the shared graph is not zeroed
    cg = PassContext(example_inputs=inputs, gm=gm).get(ChannelGraph, attention=attention)
    removed = pick_half(cg)
    assert removed.any()
    zero_classes(gm, cg, removed)
    expected = [run(gm, inputs), run(gm, other_inputs(name))]
    pruned = fxcompress.compile(gm, [PruneChannels(amount=0.5, method="l1", attention=attention)], inputs)
    assert params(pruned) < params(gm)
    for want, got in zip(expected, [run(pruned, inputs), run(pruned, other_inputs(name))]):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, frontend, mode", ZEROED_CASES)
def test_removing_zeroed_channels_leaves_the_outputs_equal(name, frontend, mode):
    check_zeroed_equivalence(name, frontend, mode)


# ---- Deep Compression: masks, k-means, encoding, file, fresh process ---------------------------

# (model, front end) -> the transformers major versions on which encoding (embedding tables included),
# and the file loaded in a fresh process, are measured to work
ENCODED = {case: (4, 5) for case in cases()}
# every file in one fresh process (each start imports torch anew): argv holds (file, inputs, outputs) triples.
# It imports with the cyclic collector off, then freezes what the imports made (it lives until the process
# exits), so the collections while it loads and runs do not walk torch's heap again; they run, at their
# defaults, on everything made after.
LOAD_AND_RUN = textwrap.dedent("""
    import gc
    import sys
    gc.disable()
    import torch
    import fxcompress
    gc.enable()
    gc.freeze()
    torch.set_num_threads(1)  # as the test process runs it
    triples = list(zip(*[iter(sys.argv[1:])] * 3))
    models = []
    for file, _, _ in triples:  # load's dry run needs no compiler: say which file's load imported one
        models.append(fxcompress.load(file).eval())
        print(file, "loaded; torch._dynamo imported:", "torch._dynamo" in sys.modules)
    for model, (_, inputs, outputs) in zip(models, triples):
        with torch.no_grad():
            torch.save(model(*torch.load(inputs)), outputs)
""")


@functools.cache  # three tests read the same encoded model; none changes it
def encode(name: str, frontend: str):
    """(encoded GraphModule, its inputs, the fake-quant model's outputs): 80% masks, 4-bit k-means on
    every layer (embeddings included), then LowerToEncoded, whose outputs must equal the fake-quant
    model's bit for bit."""
    dense, inputs = graph(name, frontend)
    gm = fxcompress.compile(dense, [InsertMasks(sparsity=0.8), InsertFakeQuant(bits=4, method="kmeans")], inputs)
    fake_quant = run(gm, inputs)
    gm = fxcompress.compile(gm, [LowerToEncoded()], inputs)
    encoded = run(gm, inputs)
    assert len(encoded) == len(fake_quant) and all(torch.equal(a, b) for a, b in zip(encoded, fake_quant))
    rows = [r for r in fxcompress.summary(gm).rows if r["weight_shape"]]
    assert any(r["op"] == "embedding" for r in rows) or name == "vit", [r["layer"] for r in rows]  # ViT: no token table
    for row in rows:
        assert row["exact"] == "yes" and row["bits"] == 4 and row["sparsity"] >= 0.79, row
    return gm, inputs, fake_quant


@pytest.mark.parametrize("name, frontend", measured(ENCODED))
def test_masks_kmeans_and_encoding_compress_every_layer_and_keep_the_outputs(name, frontend):
    encode(name, frontend)


def check_embeddings_encoded(name: str, frontend: str) -> None:
    """Deep Compression compresses the embedding tables too: none survives as a float parameter beside
    its encoded weight (a table tied to another layer, as GPT-2's LM head or T5's shared table, is one
    tensor encoded once under every name)."""
    gm, _, _ = encode(name, frontend)
    torch.manual_seed(0)
    model = MODELS[name][0]()
    tables = {f"{path}.weight" for path, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    left = sorted(tables & {n for n, _ in gm.named_parameters(remove_duplicate=False)})
    assert not left, f"{name} {frontend}: float embedding tables left beside the encoded weights: {left}"


@pytest.mark.parametrize("name, frontend", measured(ENCODED))
def test_deep_compression_leaves_no_float_embedding_table(name, frontend):
    check_embeddings_encoded(name, frontend)


@pytest.fixture(scope="module")
def loaded_in_fresh_process(tmp_path_factory) -> dict[tuple[str, str], list[torch.Tensor]]:
    """Every measured model's file, saved here and loaded and run in one fresh process: its outputs."""
    root = tmp_path_factory.mktemp("files")
    args, cases = [], sorted(measured(ENCODED), key=lambda case: case[1] != "export")  # export files load first
    for name, frontend in cases:
        gm, inputs, _ = encode(name, frontend)
        stem = root / f"{name}-{frontend}"
        fxcompress.save(gm, f"{stem}.fxc")
        torch.save(list(inputs), f"{stem}.inputs.pt")
        args += [f"{stem}.fxc", f"{stem}.inputs.pt", f"{stem}.outputs.pt"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # what this process imports
    done = subprocess.run([sys.executable, "-c", LOAD_AND_RUN, *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # load's dry run tables every op of the export front end's graphs on transformers 5 (4.46's graphs and
    # HF's own fx tracer spell some it does not: torch runs those on meta tensors, which imports its compiler)
    slow = [line for line in done.stdout.splitlines() if "-export.fxc" in line and line.endswith("True")]
    assert HF_MAJOR < 5 or not slow, done.stdout
    return {case: tensors(torch.load(root / f"{case[0]}-{case[1]}.outputs.pt")) for case in cases}


@pytest.mark.parametrize("name, frontend", measured(ENCODED))
def test_the_file_loaded_in_a_fresh_process_reproduces_the_fake_quant_outputs(name, frontend,
                                                                              loaded_in_fresh_process):
    _, _, fake_quant = encode(name, frontend)
    loaded = loaded_in_fresh_process[name, frontend]
    assert len(loaded) == len(fake_quant)
    for a, b in zip(loaded, fake_quant):
        assert torch.equal(a, b), f"{name} {frontend}: largest difference {(a - b).abs().max().item()}"


# ---- torch.export.Dim: dynamic batch and sequence length through the passes and the file ---------

@pytest.mark.parametrize("name", ["llama"])  # rotary tables, GQA repeats, causal mask: all sized by the length
def test_dynamic_batch_and_length_survive_masks_pruning_and_the_file(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name][0]().eval(), (_tokens(),)
    dims = {0: torch.export.Dim("batch", min=1, max=8), 1: torch.export.Dim("length", min=2, max=16)}
    program = torch.export.export(model, inputs, dynamic_shapes=(dims,), strict=False)
    other = (torch.randint(0, VOCAB, (3, 5)),)  # another batch size and length
    dense = fxcompress.compile(program, [], inputs)
    for a, b in zip(run(dense, other), run(model, other)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # from the front end's graph of the program (compile copies it): the program is unlifted and
    # respelled once, as the static tests share theirs; the front end's output was checked just above
    gm = fxcompress.compile(dense, [InsertMasks(sparsity=0.5), PruneChannels(amount=0.5, prune_normalized=True)],
                            inputs)
    stats = fxcompress.history(gm)[-1].stats
    assert stats["params_after"] / stats["params_before"] <= PARAM_BOUNDS[name, "normalized"]
    outputs = run(gm, other)
    assert [t.shape for t in outputs] == [t.shape for t in run(model, other)]
    first = run(gm, (other[0][:1],))  # each sequence is computed on its own, whatever the batch
    torch.testing.assert_close(first[0], outputs[0][:1], rtol=1e-5, atol=1e-5)
    loaded = from_bytes(to_bytes(gm))
    assert all(torch.equal(a, b) for a, b in zip(run(loaded, other), outputs))


@pytest.mark.parametrize("name", [name for name in MODELS if MODELS[name][1] is _tokens])
def test_compile_exports_token_ids_with_a_free_length(name):
    """compile's own export keeps the length of (batch, length) token ids free, as the batch: the graph runs any
    length the model runs, to its position table (16 here), giving its logits bit for bit; before, the example's
    length was written into the heads' views and another length failed deep in the graph."""
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    front = fxcompress.compile(model, [], (_tokens(),), frontend="export")
    masked = fxcompress.compile(front, [InsertMasks(sparsity=0.5)], (_tokens(),))
    loaded = from_bytes(to_bytes(masked))
    for shape in [(3, 5), (1, 16), (2, 1)]:
        other = (torch.randint(0, VOCAB, shape),)
        for a, b in zip(run(front, other), run(model, other), strict=True):
            assert torch.equal(a, b), f"{name} at {shape}: {(a - b).abs().max().item()}"
        for a, b in zip(run(loaded, other), run(masked, other), strict=True):
            assert a.shape[0] == shape[0] and torch.equal(a, b)


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_exports_a_batch_of_one_with_a_free_batch(name):
    """compile's own export of the model (not a program) from a batch-of-one example: the graph runs another
    batch as the model does (exported at the example's batch, the heads' views would hold a batch of 1)."""
    torch.manual_seed(0)
    model, example = MODELS[name][0]().eval(), MODELS[name][1]()[:1]
    gm = fxcompress.compile(model, [], (example,), frontend="export")
    torch.manual_seed(2)
    other = (torch.cat([MODELS[name][1](), MODELS[name][1]()[:1]]),)  # a batch of 3
    for a, b in zip(run(gm, other), run(model, other), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ---- the model's own output class --------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_cls", "bert"])
def test_the_compiled_model_returns_the_models_output_class(name):
    """The export front end's graph holds a ModelOutput as a plain dict (torch.fx stores every dict so); the
    compiled forward returns the model's own class with its fields, which user code reads (`out.logits`,
    `out[0]`, `to_tuple()`), and keeps it through a pass, whose verification compares the output structure.
    A file stores the graph alone: the loaded model returns the same tensors under the same keys."""
    torch.manual_seed(0)
    model, ids = MODELS[name][0]().eval(), _tokens()
    with torch.no_grad():
        expected = model(ids)
        gm = fxcompress.compile(model, [], (ids,), frontend="export")
        out = gm(ids)
    assert type(out) is type(expected) and list(out.keys()) == list(expected.keys())
    if "logits" in expected:
        assert torch.equal(out.logits, expected.logits)
    assert torch.equal(out[0], expected[0])
    assert len(out.to_tuple()) == len(expected.to_tuple())
    assert all(torch.equal(a, b) for a, b in zip(out.to_tuple(), expected.to_tuple(), strict=True))
    # the Interpreter (shape propagation, the passes' runs) unpacks the graph's outputs as the forward does
    assert type(torch.fx.Interpreter(gm).run(ids)) is type(expected)
    auto = fxcompress.compile(model, [], (ids,))  # the default front end: fx cannot trace these, export does
    assert auto.meta["frontend"] == "export" and type(auto(ids)) is type(expected)

    masked = fxcompress.compile(gm, [InsertMasks(sparsity=0.5)], (ids,))
    assert fxcompress.history(masked)[-1].name == "InsertMasks" and fxcompress.history(masked)[-1].changed
    with torch.no_grad():
        masked_out = masked(ids)
        assert type(masked_out) is type(expected) and list(masked_out.keys()) == list(expected.keys())
        assert torch.equal(masked_out[0], masked_out.to_tuple()[0])
        loaded = from_bytes(to_bytes(masked))(ids)
    assert list(loaded.keys()) == list(expected.keys())
    assert all(torch.equal(loaded[key], masked_out[key]) for key in expected.keys())


def test_the_fx_front_end_returns_a_model_output_class():
    """A module torch.fx traces whose forward returns a ModelOutput: torch.fx writes it as a plain dict in the
    output node, the compiled forward (and an Interpreter run) returns the class, with attribute, index and
    to_tuple() access."""
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class Out(ModelOutput):
        logits: torch.Tensor | None = None
        hidden_states: torch.Tensor | None = None

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            hidden = torch.relu(x)
            return Out(logits=self.fc(hidden), hidden_states=hidden)

    model, x = Head().eval(), torch.randn(2, 4)
    expected = model(x)
    gm = fxcompress.compile(model, [], (x,), frontend="fx")
    with torch.no_grad():
        out, run = gm(x), torch.fx.Interpreter(gm).run(x)
    for got in (out, run):
        assert type(got) is Out and list(got.keys()) == ["logits", "hidden_states"]
        assert torch.equal(got[1], expected.hidden_states) and torch.equal(got.hidden_states, got.to_tuple()[1])
        assert torch.equal(got.logits, expected.logits) and torch.equal(got[0], expected.logits)
