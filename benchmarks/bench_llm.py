"""Language-model compression arms on the small Llama that benchmarks/train_lm.py trains.

    nice -n 10 python benchmarks/bench_llm.py [--cal 32] [--eval 32] [--arms dense awq4 ...] [--json out.json]
        [--files [--keep DIR]] [--relower DIR]

Every arm compiles the same exported graph (torch.export of the checkpoint, shapes fixed to
batches of 8 x 128 tokens) with its passes, calibrated on the same windows of the training plays,
and reports perplexity per token on the held-out plays and on Debian's fortunes, bytes on disk
(the compressed-tensors checkpoint: pack-quantized when the weights are on a linear grid, dense
otherwise; the Deep Compression arm's fxcompress file), the passes' seconds and the peak resident
memory above the loaded model while they ran. Only the decoder blocks' linear layers are
compressed (the tied embedding / LM head stays float, as llm-compressor's recipes leave lm_head).
An arm whose pass is not in this checkout prints "not available: <why>".

With `--files`, every quantized arm is also lowered to its fxcompress file (LowerToEncoded, save), the file
is loaded back and its perplexities measured, and a second line says where its bytes go (block weights' bits
per weight by part, the tied embedding, float tensors, manifest); the ratio is against the fp32 parameters.
The file arms (`file_arms`) are the ones for the 12x file: float16 group steps, 2:4 masks (the pattern
layout), the tied embedding on an 8- or 6-bit grid. `--keep DIR` leaves each arm's fake-quant model there,
and `--relower DIR` measures their files again with this checkout's encoder, without recalibrating.

Beside them, when torchao is importable: its plain rounding at 4 and 3 bits, group 64; and with
`--llmc-python PYTHON` (an environment with llmcompressor; it must import this checkout too), the
same recipes through llm-compressor's `oneshot` on the same windows, run by this file as a worker
in that environment (`--llmc-worker`), each arm on a freshly loaded model.

Tokens are bytes, or the checkpoint's byte-level BPE where train_lm.py --vocab left a tokenizer.json
beside it; perplexity, KL and the orderings' differences are then per BPE token.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fxcompress
from fxcompress import passes, text
from fxcompress.compressed_tensors import to_compressed_tensors

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / ".cache" / "llama-bytes"
BLOCKS = r"(model\.layers|transformer\.h)\..*"   # the decoder blocks: Llama's, GPT-2's (train_lm.py --arch)
BATCH, LENGTH = 8, 128


def q(bits: int, group_size: int = 64, **kw):
    return passes.InsertFakeQuant(method="linear", bits=bits, group_size=group_size, select=BLOCKS, **kw)


EMBEDDING = r"model\.embed_tokens|transformer\.wte"   # the tied embedding / LM head: one tensor, stored once


def file_arms(sgpt, masks) -> dict[str, callable]:
    """The arms for the 12x file (50% sparse + 4-bit): half-precision group steps, 2:4 masks coded as one
    pattern symbol per group of 4, and the tied embedding on an 8-bit per-tensor grid (file arms: --files)."""
    fp16 = {"rounding": "gptq", "scale_dtype": "float16"}
    emb = lambda bits=8: passes.InsertFakeQuant(method="linear", bits=bits, select=EMBEDDING)  # noqa: E731
    return {
        "50% sparsegpt + w4 g128 gptq fp16": lambda: [sgpt(), q(4, 128, **fp16)],
        "50% sparsegpt + w4 g128 gptq fp16 + emb8": lambda: [sgpt(), q(4, 128, **fp16), emb()],
        "2:4 sparsegpt + w4 g128 gptq fp16 + emb8": lambda: [sgpt(granularity="2:4"), q(4, 128, **fp16), emb()],
        "4:8 sparsegpt + w4 g128 gptq fp16 + emb8": lambda: [sgpt(granularity="4:8"), q(4, 128, **fp16), emb()],
        "50% sparsegpt + w3 g128 gptq fp16 + emb8": lambda: [sgpt(), q(3, 128, **fp16), emb()],
        "2:4 sparsegpt + w4 g256 gptq fp16 + emb8": lambda: [sgpt(granularity="2:4"), q(4, 256, **fp16), emb()],
        "2:4 sparsegpt + w4 g256 gptq fp16 + emb6": lambda: [sgpt(granularity="2:4"), q(4, 256, **fp16), emb(6)],
    }


def arms() -> dict[str, callable]:
    """name -> a function returning the pass list (built lazily: a missing pass is an arm's error)."""
    masks = lambda **kw: passes.InsertMasks(select=BLOCKS, **kw)  # noqa: E731
    sgpt = lambda **kw: passes.SparseGPT(select=BLOCKS, **kw)  # noqa: E731
    w8a8 = lambda: passes.InsertFakeQuant(method="linear", bits=8, per_channel=True, symmetric=True,  # noqa: E731
                                          select=BLOCKS, activations=passes.ActivationConfig(bits=8))
    table = {"dense": lambda: []}
    for name, g in (("50%", {}), ("4:8", {"granularity": "4:8"}), ("2:4", {"granularity": "2:4"})):
        table[f"magnitude {name}"] = lambda g=g: [masks(**g)]   # InsertMasks' default sparsity is 0.5
        table[f"wanda {name}"] = lambda g=g: [masks(importance="wanda", **g)]
        table[f"sparsegpt {name}"] = lambda g=g: [sgpt(**g)]
        table[f"wanda+update {name}"] = lambda g=g: [sgpt(importance="wanda", **g)]
    for bits in (4, 3):
        table[f"w{bits} g64 rtn"] = lambda b=bits: [q(b)]
        table[f"w{bits} g64 gptq"] = lambda b=bits: [q(b, rounding="gptq")]
        # every group's grid from the weights before the sweep (GPTQ's static_groups), what ours did before
        table[f"w{bits} g64 gptq static"] = lambda b=bits: [q(b, rounding="gptq", static_groups=True)]
        # columns by decreasing Hessian diagonal, grids from the float weights (llm-compressor's default, "static")
        table[f"w{bits} g64 gptq act-order"] = lambda b=bits: [q(b, rounding="gptq", act_order=True)]
        table[f"w{bits} g64 awq"] = lambda b=bits: [passes.ScaleChannels(bits=b, group_size=64, select=BLOCKS), q(b)]
        # the groups no producer takes (a GELU MLP's output layer) scaled by a product of their own
        table[f"w{bits} g64 awq insert"] = lambda b=bits: [passes.ScaleChannels(bits=b, group_size=64, select=BLOCKS,
                                                                                 insert_scales=True), q(b)]
        # AWQ's scale search alone (AutoAWQ's apply_clip=False; llm-compressor's AWQModifier has no clip step)
        table[f"w{bits} g64 awq noclip"] = lambda b=bits: [passes.ScaleChannels(bits=b, group_size=64, select=BLOCKS,
                                                                                clip=False), q(b)]
        # a measurement of where the clip pays: only the layers whose output is the block's (o_proj, down_proj),
        # where a layer's output error is the block's; gate / up / v errors pass a float projection first
        table[f"w{bits} g64 awq clip o/down"] = lambda b=bits: [
            passes.ScaleChannels(bits=b, group_size=64, select=BLOCKS, clip=r".*\.(o_proj|down_proj)"), q(b)]
        # AWQ's options, one arm per combination measured: what the alpha search and the clip's keep-or-drop
        # compare (each layer's own output error, or its block's output), and duo scaling (x_mean^a / w_mean^(1-a))
        for search, duo, clip in (("layer", False, "layer"), ("block", False, "layer"), ("block", False, "block"),
                                  ("block", True, "block"), ("block", True, "layer")):
            table[f"w{bits} g64 awq {search}{' duo' if duo else ''} clip-{clip}"] = \
                lambda b=bits, o=search, d=duo, c=clip: [passes.ScaleChannels(
                    bits=b, group_size=64, select=BLOCKS, objective=o, duo_scaling=d, clip_objective=c), q(b)]
    table["w8a8"] = lambda: [w8a8()]
    table["w8a8 smoothquant"] = lambda: [passes.ScaleChannels(method="smoothquant", select=BLOCKS), w8a8()]
    table["50% sparsegpt + w4 g64"] = lambda: [sgpt(), q(4)]
    table["50% sparsegpt + w4 g64 gptq"] = lambda: [sgpt(), q(4, rounding="gptq")]
    return table | file_arms(sgpt, masks)


def load(checkpoint: Path):
    from transformers import AutoModelForCausalLM   # optional and slow to import

    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.config.use_cache = False   # a DynamicCache output is no tensor tree torch.export can return
    return model.eval()


def tokenizer(checkpoint: Path):
    """The checkpoint's BPE (its tokenizer.json), or None: byte tokens."""
    path = checkpoint / "tokenizer.json"
    return text.load_tokenizer(path) if path.exists() else None


def data(n_cal: int, n_eval: int, seed: int = 0, bpe=None):
    """Calibration batches (random windows of the training plays) and held-out / fortune batches, in
    bytes or in the tokens of `bpe`."""
    train_plays, held = text.split_plays(text.shakespeare(HERE / ".cache"))
    tokens = text.encode(text.join_texts(train_plays), bpe)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - LENGTH, (n_cal,), generator=gen).tolist()
    cal = torch.stack([tokens[s:s + LENGTH] for s in starts])
    held_w = text.windows(text.encode(text.join_texts(held), bpe), LENGTH, limit=n_eval)
    fortune_w = text.windows(text.encode(text.join_texts(text.fortunes()), bpe), LENGTH, limit=n_eval)
    split = lambda w: [(w[i:i + BATCH],) for i in range(0, len(w) - BATCH + 1, BATCH)]  # noqa: E731
    return split(cal), split(held_w), split(fortune_w)


@torch.no_grad()
def batch_nll(forward, batches) -> list[float]:
    """Each batch's mean next-token negative log-likelihood, nats per token (every batch holds as many tokens)."""
    means = []
    for (batch,) in batches:
        logits = _logits(forward(batch))
        means.append(float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))))
    return means


def perplexity(forward, batches) -> float:
    return from_nll(batch_nll(forward, batches))


def from_nll(means: list[float]) -> float:
    return math.exp(sum(means) / len(means))


def _logits(out) -> torch.Tensor:
    return (out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)).float()


@torch.no_grad()
def kl_to_dense(dense, forward, batches) -> float:
    """Mean KL(dense || compressed) of the next-token distributions, nats per token: how far an arm moved the
    model, which perplexity (a model may gain on some text by chance) measures only through the text."""
    total, count = 0.0, 0
    for (batch,) in batches:
        p = _dense_log_probs(dense, batch)
        q = F.log_softmax(_logits(forward(batch)), dim=-1)
        total += float((p.exp() * (p - q)).sum())
        count += batch.numel()
    return total / count


_DENSE_LOG_PROBS: dict[tuple[int, int], torch.Tensor] = {}


def _dense_log_probs(dense, batch: torch.Tensor) -> torch.Tensor:
    """The dense model's next-token log-probabilities on `batch`, computed once a run (every arm compares
    against them: a third of the evaluation time otherwise)."""
    key = (id(dense), id(batch))
    if key not in _DENSE_LOG_PROBS:
        _DENSE_LOG_PROBS[key] = F.log_softmax(_logits(dense(batch)), dim=-1)
    return _DENSE_LOG_PROBS[key]


class PeakRSS:
    """The largest resident set size seen (sampled every 20 ms) while the block runs, in bytes."""

    def __enter__(self):
        self.peak, self.running = _rss(), True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def run_arm(name: str, build, graph, example, cal, held, fortunes, config: dict) -> dict:
    try:
        pass_list = build()
    except (AttributeError, TypeError, ValueError) as exc:   # a pass or option this checkout lacks
        return {"arm": name, "status": f"not available: {exc}"}
    base = _rss()
    start, cpu = time.perf_counter(), time.process_time()
    try:
        with PeakRSS() as peak:
            gm = fxcompress.compile(graph, pass_list, example, calibration_data=cal)
    except fxcompress.errors.FxCompressError as exc:   # a refusal is this arm's result; the other arms still run
        return {"arm": name, "status": f"failed: {type(exc).__name__}: {exc}"[:300]}
    # CPU seconds too: on a loaded machine the wall time says little
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    size, fmt = checkpoint_bytes(gm, pass_list, config)
    held_nll, fortunes_nll = batch_nll(gm, held), batch_nll(gm, fortunes)   # per batch: orderings pair them
    return {"arm": name, "status": "ok", "held_ppl": from_nll(held_nll), "fortunes_ppl": from_nll(fortunes_nll),
            "held_nll": held_nll, "fortunes_nll": fortunes_nll, "bytes": size, "format": fmt, "pass_s": seconds,
            "pass_cpu_s": cpu_seconds, "peak_mb": (peak.peak - base) / 2**20, "gm": gm,
            "held_kl": kl_to_dense(graph, gm, held), "fortunes_kl": kl_to_dense(graph, gm, fortunes),
            "cal_kl": kl_to_dense(graph, gm, cal),   # what options are chosen by: never the evaluation text
            **scale_layers(gm)}


def checkpoint_bytes(gm, pass_list, config: dict) -> tuple[int, str]:
    """The arm's bytes on disk and their format: pack-quantized where its grids allow, else a dense
    compressed-tensors checkpoint, else (a graph no such checkpoint holds: inserted scales) our file."""
    quantized = any(isinstance(p, passes.InsertFakeQuant) for p in pass_list)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in ("pack-quantized", "dense") if quantized else ("dense",):
            try:
                return to_compressed_tensors(gm, tmp, format=fmt, config=config)["bytes"], fmt
            except fxcompress.errors.FxCompressError:
                continue
        return fxcompress.save(gm, Path(tmp) / "model.fxc"), "fxcompress"


def scale_layers(gm) -> dict:
    """ScaleChannels' per-layer record (alpha, calibration output errors before / after the scales and the
    clip, groups clipped), kept in the JSON rows to say where AWQ wins or loses; {} for other arms."""
    record = next((r for r in fxcompress.history(gm) if r.name == "ScaleChannels"), None)
    if record is None:
        return {}
    keep = ("objective", "inspected", "alpha", "error_plain", "error", "skipped")
    clip_keep = ("groups", "groups_clipped", "error_before", "error_after", "block_error_clipped",
                 "block_error_unclipped", "kept", "skipped")
    return {"scale_layers": {name: {**{k: v for k, v in r.items() if k in keep},
                                    **({"clip": {k: v for k, v in r["clip"].items() if k in clip_keep}}
                                       if "clip" in r else {})}
                             for name, r in record.stats["layers"].items()}}


def deep_compression_file(gm, example) -> dict:
    """The Deep Compression file of an arm: weights entropy-coded by LowerToEncoded, fxcompress.save."""
    start = time.perf_counter()
    lowered = fxcompress.compile(gm, [passes.LowerToEncoded()], example)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.fxc"
        fxcompress.save(lowered, path)
        size = path.stat().st_size
    return {"bytes": size, "pass_s": time.perf_counter() - start, "gm": lowered}


def file_row(r: dict, example, held, fortunes, fp32: int, keep: Path | None) -> dict:
    """An arm's Deep Compression file, measured from the file: LowerToEncoded, save, load back, perplexity of
    the loaded model; bytes on disk against the fp32 parameters' bytes. With `keep`, the arm's fake-quant model
    and its file are left there (to re-lower with another encoder without recalibrating)."""
    name = f"{r['arm']} -> file"
    start = time.perf_counter()
    lowered = fxcompress.compile(r["gm"], [passes.LowerToEncoded()], example)
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        stem = r["arm"].replace(" ", "_").replace("%", "pct").replace(":", "of").replace("+", "and")
        if keep is not None:
            fxcompress.save(r["gm"], folder / f"{stem}.fake_quant.fxc")
        path = folder / f"{stem}.fxc"
        size = fxcompress.save(lowered, path)
        seconds = time.perf_counter() - start
        loaded = fxcompress.load(path)
        return {"arm": name, "status": "ok", "bytes": size, "format": "fxcompress", "pass_s": seconds,
                "held_ppl": perplexity(loaded, held), "fortunes_ppl": perplexity(loaded, fortunes),
                "x_fp32": fp32 / size, "encoded": encoded_parts(lowered)}


def relower(folder: Path, example, held, fortunes, fp32: int) -> None:
    """The files of the fake-quant models an earlier --files --keep run left (no recalibration): each
    lowered with this checkout's encoder, saved, loaded back and measured."""
    for path in sorted(folder.glob("*.fake_quant.fxc")):
        gm = fxcompress.load(path)
        arm = path.name.removesuffix(".fake_quant.fxc")
        r = {"arm": arm, "held_ppl": perplexity(gm, held), "fortunes_ppl": perplexity(gm, fortunes)}
        with tempfile.TemporaryDirectory() as tmp:
            f = file_row({"arm": arm, "gm": gm}, example, held, fortunes, fp32, Path(tmp))
        print(f"| {arm} | fake-quant {r['held_ppl']:.3f} / {r['fortunes_ppl']:.3f} | file {f['held_ppl']:.3f} / "
              f"{f['fortunes_ppl']:.3f} | {f['bytes']:,} | {f['x_fp32']:.2f}x |\n{describe_file(f)}", flush=True)


def encoded_parts(lowered) -> dict:
    """Where a file's bytes go: the block weights' encoded bytes by part (and their elements), the other
    encoded weights' payloads (the tied embedding), the tensors left float (norms), and the layouts /
    codebooks used; the file's rest is its manifest (graph, headers, history) and container."""
    from fxcompress.encoded.module import EncodedWeight
    parts, kinds, numel, other = {}, {}, 0, 0
    for path, module in lowered.named_modules():
        if isinstance(module, EncodedWeight):
            encoded = module.encoded()
            if not path.startswith("model.layers."):
                other += encoded.nbytes - encoded.storage_bytes()["header"]
                continue
            numel += encoded.numel
            for key, value in encoded.storage_bytes().items():
                parts[key] = parts.get(key, 0) + value
            kind = f"{encoded.layout}/{encoded.codebook}"
            kinds[kind] = kinds.get(kind, 0) + 1
    # a tied tensor (the embedding and the LM head) is in the state dict twice and in the file once
    stored = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t.numel() * t.element_size()
              for name, t in lowered.state_dict().items()
              if not name.endswith("_encoded.payload")}
    floats = sum(stored.values())
    return {"parts": parts, "kinds": kinds, "block_numel": numel, "other_encoded": other, "float_tensors": floats}


def describe_file(r: dict) -> str:
    """One line: bits per block weight by part, and the rest of the file in bytes."""
    e = r["encoded"]
    n, p = e["block_numel"], {k: v for k, v in e["parts"].items() if k != "header"}
    bits = ", ".join(f"{k} {8 * v / n:.3f}" for k, v in p.items())
    rest = r["bytes"] - sum(p.values()) - e["other_encoded"] - e["float_tensors"]
    return (f"    block weights {8 * sum(p.values()) / n:.3f} bits/weight ({bits}; {e['kinds']}); other encoded "
            f"weights {e['other_encoded']:,} B, float tensors {e['float_tensors']:,} B, the rest (manifest with "
            f"every header, zlib-compressed; container) {rest:,} B")


def torchao_rtn(model, held, fortunes, bits: int) -> dict:
    """torchao's plain rounding (IntxWeightOnlyConfig: asymmetric, group 64; its Int4WeightOnlyConfig
    kernels need a GPU library) on the decoder blocks' linear layers."""
    name = f"torchao w{bits} g64 rtn"
    try:
        from torchao.quantization import IntxWeightOnlyConfig, MappingType, quantize_
        from torchao.quantization.granularity import PerGroup
    except ImportError as exc:
        return {"arm": name, "status": f"not available: {exc}"}
    import copy
    quantized = copy.deepcopy(model)
    start = time.perf_counter()
    try:
        config = IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{bits}"), granularity=PerGroup(64),
                                      mapping_type=MappingType.ASYMMETRIC)
        quantize_(quantized, config,
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn.startswith("model.layers."))
        seconds = time.perf_counter() - start
        forward = lambda x: quantized(input_ids=x)  # noqa: E731
        return {"arm": name, "status": "ok", "held_ppl": perplexity(forward, held),
                "fortunes_ppl": perplexity(forward, fortunes), "pass_s": seconds}
    except Exception as exc:   # noqa: BLE001 - a peer's failure is a result to report, not a crash
        return {"arm": name, "status": f"failed: {type(exc).__name__}: {exc}"[:300]}


def llmc_recipes() -> dict[str, callable]:
    """llm-compressor's modifiers for the arms it has, configured as ours are (asymmetric group-64
    weights, decoder blocks only, static per-tensor 8-bit activations)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier, SmoothQuantModifier

    def wq(bits):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=64)
        return {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}

    w8a8 = {"group_0": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="tensor"))}
    skip = {"ignore": ["lm_head"]}
    # its pruning modifiers name each targeted Linear "<path>." (the module's own, empty, name appended), so
    # "lm_head" does not match and the tied LM head / embedding was pruned too; its docs' regex does match
    skip_pruning = {"ignore": ["re:.*lm_head"]}
    table = {}
    for name, structure in (("50%", "0:0"), ("2:4", "2:4"), ("4:8", "4:8")):
        table[f"wanda {name}"] = lambda s=structure: [WandaPruningModifier(sparsity=0.5, mask_structure=s,
                                                                           **skip_pruning)]
        table[f"sparsegpt {name}"] = lambda s=structure: [SparseGPTModifier(sparsity=0.5, mask_structure=s,
                                                                            **skip_pruning)]
    for bits in (4, 3):
        table[f"w{bits} g64 rtn"] = lambda b=bits: [QuantizationModifier(config_groups=wq(b), **skip)]
        # its default order is actorder="static", our act_order=True; None is the natural order, as our "gptq"
        table[f"w{bits} g64 gptq"] = lambda b=bits: [GPTQModifier(config_groups=wq(b), actorder=None, **skip)]
        table[f"w{bits} g64 gptq act-order"] = lambda b=bits: [GPTQModifier(config_groups=wq(b), actorder="static",
                                                                            **skip)]
    table["w8a8"] = lambda: [QuantizationModifier(config_groups=w8a8, **skip)]
    table["w8a8 smoothquant"] = lambda: [SmoothQuantModifier(smoothing_strength=0.5),
                                         QuantizationModifier(config_groups=w8a8, **skip)]
    for bits in (4, 3):   # last: on this CPU its smoothing pass was the slowest to finish
        table[f"w{bits} g64 awq"] = lambda b=bits: [AWQModifier(), QuantizationModifier(config_groups=wq(b), **skip)]
    return table


def skip_pinning_without_accelerator() -> list[int]:
    """llm-compressor 0.14's AWQModifier pins its cached layer inputs before each mapping's grid search
    (`_apply_smoothing` calls `IntermediatesCache.pin_memory` unconditionally, "for faster onloading"), and
    `Tensor.pin_memory()` raises "Cannot access accelerator device when none is available" on a torch with
    no accelerator; no modifier option, offload device or pipeline avoids the call. Pinning only speeds
    host-to-device copies and changes no value, so without an accelerator it is made a no-op, as its own
    calibration DataLoader already does (`pin_memory = torch.accelerator.is_available() and ...`). Returns
    a one-item list counting the skipped calls, so a row can say whether the patch was used."""
    skipped = [0]
    if torch.accelerator.is_available():
        return skipped
    from llmcompressor.pipelines.cache import IntermediatesCache

    def pin_memory(self, batch_index, input_names=None):
        skipped[0] += 1

    IntermediatesCache.pin_memory = pin_memory
    return skipped


def llmc_worker(data_path: str, checkpoint: str, out_path: str, arms: list[str] | None) -> None:
    """Run every llm-compressor recipe on a fresh model; write the rows as JSON (after each arm, failed
    ones included, whose traceback goes to stderr)."""
    import traceback

    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    tensors = torch.load(data_path)
    ids = tensors["cal"]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    # oneshot insists on a processor; the windows are token ids already, so for bytes any tokenizer will do
    bpe = tokenizer(Path(checkpoint))
    if bpe is None:
        bpe = Tokenizer(WordLevel(vocab={str(i): i for i in range(256)}, unk_token="0"))
    processor = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    held = [(b,) for b in tensors["held"].split(BATCH)]
    fortunes = [(b,) for b in tensors["fortunes"].split(BATCH)]
    cal = [(b,) for b in ids.split(BATCH)]
    dense = load(Path(checkpoint))   # for each arm's KL to dense, as our rows have
    dense_forward = lambda x: dense(input_ids=x)  # noqa: E731
    rows = []
    recipes = llmc_recipes()
    skipped_pins = skip_pinning_without_accelerator()
    for name in [a for a in arms if a in recipes] if arms else list(recipes):   # in the order asked for
        recipe = recipes[name]
        model = load(Path(checkpoint))
        outside = _outside_blocks(model)
        base, start, cpu, pins = _rss(), time.perf_counter(), time.process_time(), skipped_pins[0]
        try:
            with PeakRSS() as peak:
                oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe(),
                        num_calibration_samples=len(ids), max_seq_length=LENGTH)
        except Exception as exc:   # noqa: BLE001 - a peer's failure is a result to report
            traceback.print_exc()
            rows.append({"arm": f"llmc {name}", "status": f"failed: {type(exc).__name__}: {exc}"[:300]})
            Path(out_path).write_text(json.dumps(rows))
            continue
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        status = "ok" if skipped_pins[0] == pins else \
            f"ok, patched: {skipped_pins[0] - pins} IntermediatesCache.pin_memory calls skipped (no accelerator)"
        changed = [name for name, value in _outside_blocks(model).items() if not torch.equal(value, outside[name])]
        if changed:   # ours compress the decoder blocks only: a row that also changed these is not like for like
            status += f", but changed {', '.join(changed)} outside the decoder blocks"
        forward = lambda x, m=model: m(input_ids=x)  # noqa: E731
        rows.append({"arm": f"llmc {name}", "status": status, "pass_s": seconds, "pass_cpu_s": cpu_seconds,
                     "peak_mb": (peak.peak - base) / 2**20, "held_ppl": perplexity(forward, held),
                     "fortunes_ppl": perplexity(forward, fortunes),
                     **{f"{k}_kl": kl_to_dense(dense_forward, forward, b)
                        for k, b in (("held", held), ("fortunes", fortunes), ("cal", cal))}})
        Path(out_path).write_text(json.dumps(rows))


def _outside_blocks(model) -> dict[str, torch.Tensor]:
    """Copies of the parameters outside the decoder blocks (embedding, tied LM head, final norm)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not re.match(BLOCKS, name)}


def start_llmc(python: str, checkpoint: Path, cal, held, fortunes, arms: list[str] | None, threads: int = 1):
    """Start the llm-compressor worker in the other environment (beside our arms, or after them with
    --llmc-after), with as many torch threads as ours."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-llmc-"))
    torch.save({"cal": torch.cat([b for (b,) in cal]), "held": torch.cat([b for (b,) in held]),
                "fortunes": torch.cat([b for (b,) in fortunes])}, tmp / "data.pt")
    cmd = [python, __file__, "--llmc-worker", str(tmp / "data.pt"), str(checkpoint), str(tmp / "rows.json"),
           "--threads", str(threads), *(["--arms", *arms] if arms else [])]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "stderr.txt", "w")), tmp, time.time()


def finish_llmc(process, tmp: Path, started: float, timeout: int) -> list[dict]:
    """The worker's rows (those it finished within `timeout` s of its start), or why there are none."""
    try:
        process.wait(timeout=max(1.0, started + timeout - time.time()))
        why = ((tmp / "stderr.txt").read_text().strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        why = f"timed out after {timeout} s"
    rows = json.loads((tmp / "rows.json").read_text()) if (tmp / "rows.json").exists() else []
    if process.returncode != 0 or not rows:
        rows.append({"arm": "llm-compressor oneshot (rest)", "status": f"stopped: {why}"[:300]})
    return rows


HEADER = ("| arm | held-out ppl | fortunes ppl | bytes (format) | vs fp32 | pass s | peak MB | "
          "KL to dense, 1e-3 nats/token: held-out / fortunes / calibration |\n|---|---:|---:|---|---:|---:|---:|---:|")

# the published orderings: (better, worse) arm pairs, each arm named as in arms()
ORDERINGS = [*((f"sparsegpt {p}", f"wanda {p}") for p in ("50%", "4:8", "2:4")),
             *((f"wanda {p}", f"magnitude {p}") for p in ("50%", "4:8", "2:4")),
             *((f"wanda+update {p}", f"wanda {p}") for p in ("50%", "4:8", "2:4")),
             *((f"w{b} g64 {m}", f"w{b} g64 rtn") for b in (4, 3) for m in ("gptq", "awq")),
             ("w8a8 smoothquant", "w8a8"),
             # AWQ's ablation (the paper, AutoAWQ's apply_clip): the weight clip after the scales helps
             *((f"w{b} g64 awq", f"w{b} g64 awq noclip") for b in (4, 3))]


def orderings(results: list[dict]) -> list[str]:
    """One line per published ordering both of whose arms ran: the perplexities and whether it holds
    (SparseGPT <= Wanda is met when within 0.5%, the others must be strictly lower)."""
    ppl = {r["arm"]: r for r in results if r.get("status") == "ok"}
    lines = []
    for better, worse in ORDERINGS:
        if better in ppl and worse in ppl:
            slack = 1.005 if better.startswith("sparsegpt") else 1.0
            verdict = lambda key: "holds" if ppl[better][key] < slack * ppl[worse][key] else "FAILS"  # noqa: E731
            lines.append(f"{better} {'<=' if slack > 1 else '<'} {worse}: held-out {ppl[better]['held_ppl']:.3f} vs {ppl[worse]['held_ppl']:.3f} "
                         f"{verdict('held_ppl')}{paired(ppl[better], ppl[worse], 'held')}; fortunes "
                         f"{ppl[better]['fortunes_ppl']:.3f} vs {ppl[worse]['fortunes_ppl']:.3f} {verdict('fortunes_ppl')}"
                         f"{paired(ppl[better], ppl[worse], 'fortunes')}")
    return lines


def paired(better: dict, worse: dict, text: str) -> str:
    """The mean difference of the two arms' per-batch log-likelihoods on the same batches, with its standard
    error: whether the evaluation text resolves the ordering (empty where a row has no per-batch values)."""
    a, b = better.get(f"{text}_nll"), worse.get(f"{text}_nll")
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return ""
    diffs = [x - y for x, y in zip(a, b)]
    error = statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f" (difference {1e3 * statistics.fmean(diffs):+.3f} ± {1e3 * error:.3f} millinats/token)"


def row(r: dict, dense_bytes: int | None) -> str:
    if not str(r.get("status")).startswith("ok"):
        return f"| {r['arm']} | {r['status']} | | | | | | |"
    ratio = f"{dense_bytes / r['bytes']:.1f}x" if dense_bytes and r.get("bytes") else ""
    kl = f"{1e3 * r['held_kl']:.2f} / {1e3 * r['fortunes_kl']:.2f}" if "held_kl" in r else ""
    kl += f" / {1e3 * r['cal_kl']:.2f}" if "cal_kl" in r else ""
    note = "" if r["status"] == "ok" else f" ({r['status'].removeprefix('ok, ')})"   # e.g. a patched peer
    return (f"| {r['arm']}{note} | {r['held_ppl']:.3f} | {r['fortunes_ppl']:.3f} | {r.get('bytes', '')} "
            f"({r.get('format', '')}) | {ratio} | {r['pass_s']:.1f} | {r.get('peak_mb', float('nan')):.0f} | {kl} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    ap.add_argument("--cal", type=int, default=32, help="calibration windows of 128 tokens")
    ap.add_argument("--eval", type=int, default=32, help="held-out and fortune windows of 128 tokens")
    ap.add_argument("--arms", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--files", action="store_true",
                    help="also lower every quantized arm to its file, load it back and measure it (bytes vs fp32)")
    ap.add_argument("--keep", type=Path, default=None, help="with --files: leave fake-quant models and files here")
    ap.add_argument("--relower", type=Path, default=None,
                    help="only re-lower the fake-quant models --keep left in this folder and measure their files")
    ap.add_argument("--llmc-python", default=None, help="a python with llmcompressor installed")
    ap.add_argument("--llmc-timeout", type=int, default=1800, help="seconds from its start the worker may run")
    ap.add_argument("--llmc-after", action="store_true",
                    help="start llm-compressor's worker after our arms, not beside them (one process at a time)")
    ap.add_argument("--llmc-arms", nargs="*", default=None,
                    help="llm-compressor's arms, run in this order (default: --arms, or all)")
    ap.add_argument("--llmc-worker", nargs=3, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--from-json", nargs="+", type=Path, default=None,
                    help="print one table and the orderings over rows saved by earlier runs (--json)")
    args = ap.parse_args(argv)
    if args.llmc_worker:
        torch.set_num_threads(args.threads)
        return llmc_worker(*args.llmc_worker, args.arms)
    if args.from_json:
        return print_saved(args.from_json)
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint)
    cal, held, fortunes = data(args.cal, args.eval, bpe=tokenizer(args.checkpoint))
    example = cal[0]
    if args.relower:
        return relower(args.relower, example, held, fortunes, 4 * sum(p.numel() for p in model.parameters()))
    graph = fxcompress.compile(torch.export.export(model, example, strict=False), [], example)
    config = model.config.to_dict()
    table = arms()
    chosen = args.arms or list(table)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; {len(cal) * BATCH} calibration, "
          f"{len(held) * BATCH} held-out and {len(fortunes) * BATCH} fortune windows of {LENGTH} tokens", flush=True)
    print(HEADER)
    llmc_arms = args.llmc_arms if args.llmc_arms is not None else args.arms
    start_worker = lambda: start_llmc(args.llmc_python, args.checkpoint, cal, held, fortunes, llmc_arms,  # noqa: E731
                                      args.threads) if args.llmc_python else None
    llmc = None if args.llmc_after else start_worker()
    results = []
    for name in chosen:
        r = run_arm(name, table[name], graph, example, cal, held, fortunes, config)
        results.append(r)
        print(row(r, dense_bytes(results)), flush=True)
        if args.files and r.get("status") == "ok" and any(isinstance(p, passes.InsertFakeQuant) for p in table[name]()):
            results.append(file_row(r, example, held, fortunes, 4 * sum(p.numel() for p in model.parameters()),
                                    args.keep))
            print(row(results[-1], None) + f" {results[-1]['x_fp32']:.2f}x fp32\n" + describe_file(results[-1]),
                  flush=True)
        save(args.json, results)   # each row as it comes: a run stopped for time keeps what it finished
    results += extras(results, model, example, held, fortunes, dense_bytes(results))
    if args.llmc_after:
        llmc = start_worker()
    if llmc is not None:
        for r in finish_llmc(*llmc, args.llmc_timeout):
            results.append(r)
            print(row(r, None), flush=True)
    print("\n".join(orderings(results)), flush=True)
    save(args.json, results)


def dense_bytes(results: list[dict]) -> int | None:
    """The dense arm's bytes (the ratios' base), None where this run has no dense arm."""
    return next((r.get("bytes") for r in results if r["arm"] == "dense" and r.get("status") == "ok"), None)


def save(path: Path | None, results: list[dict]) -> None:
    if path is not None:
        path.write_text(json.dumps([{k: v for k, v in r.items() if k != "gm"} for r in results], indent=1))


def print_saved(paths: list[Path]) -> None:
    """The rows of several runs (the arms split over runs to fit a time budget) as one table."""
    results = [r for path in paths for r in json.loads(path.read_text())]
    dense = dense_bytes(results)
    print(HEADER)
    for r in results:
        print(row(r, None if r["arm"].startswith("llmc") else dense))
    print("\n".join(orderings(results)))


def extras(results, model, example, held, fortunes, dense_bytes) -> list[dict]:
    """The Deep Compression file of the best sparse + 4-bit arm (lowest held-out perplexity), and
    torchao beside ours."""
    out = []
    combined = [r for r in results if r["arm"].startswith("50% sparsegpt + w4") and r.get("status") == "ok"]
    best = min(combined, key=lambda r: r["held_ppl"], default=None)
    if best is not None:
        try:
            dc = deep_compression_file(best["gm"], example)
            out.append({"arm": f"{best['arm']} -> LowerToEncoded file", "status": "ok", "bytes": dc["bytes"],
                        "format": "fxcompress", "pass_s": dc["pass_s"], "held_ppl": perplexity(dc["gm"], held),
                        "fortunes_ppl": perplexity(dc["gm"], fortunes)})
        except fxcompress.errors.FxCompressError as exc:
            out.append({"arm": "Deep Compression file", "status": f"not available: {exc}"[:300]})
    out += [torchao_rtn(model, held, fortunes, bits) for bits in (4, 3)]
    for r in out:
        print(row(r, dense_bytes), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
