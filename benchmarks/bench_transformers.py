"""Six Hugging Face transformers compressed by fxcompress, beside Torch-Pruning at 50% in the same run.

Models (random init from small configs, nothing downloads): BertForSequenceClassification, BertModel,
GPT2LMHeadModel, LlamaForCausalLM (grouped-query attention), ViTForImageClassification, T5EncoderModel,
at BERT-mini sizes (hidden 256, 4 layers, the real vocabularies), batch 1, 128 tokens or 224x224.
For each model and mode — PruneChannels(amount=0.5) by default, with attention="heads", with
prune_normalized=True, and Deep Compression (90% masks, 5-bit k-means, LowerToEncoded) — the table gives
parameters (for Deep Compression: the nonzero weights it stores, plus what stays float), MACs
(torch.utils.flop_counter, one forward; dense-equivalent, so 1.0 for Deep Compression) and latency (one
thread, interleaved rounds, medians; ours against the same graph unpruned, Torch-Pruning's against the
eager model) over the dense model's, the passes' time, and the saved file's bytes over the fp32
parameter bytes. Torch-Pruning (the bench extra) prunes 50% the way its Hugging Face examples do: a num_heads map
of every q / k / v projection, whole heads pruned (head_pruning_ratio=0.5), the output layers ignored,
then the attention modules' size attributes rewritten by hand; the script prints each fix-up it needed.

    python benchmarks/bench_transformers.py [--quick] [--models bert gpt2] [--frontend auto|export|hf_fx]
Needs the transformers extra; torch-pruning is optional (its columns are left out without it).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxcompress
from fxcompress.errors import MissingDependencyError
from fxcompress.passes import InsertFakeQuant, InsertMasks, LowerToEncoded, PruneChannels
from fxcompress.zoo import hf_model

MODES = {
    "default": lambda: [PruneChannels(amount=0.5)],
    "heads": lambda: [PruneChannels(amount=0.5, attention="heads")],
    "normalized": lambda: [PruneChannels(amount=0.5, prune_normalized=True)],
    "normalized + outputs": lambda: [PruneChannels(amount=0.5, prune_normalized=True, prune_outputs=True)],
    "deep compression": lambda: [InsertMasks(sparsity=0.9), InsertFakeQuant(bits=5, method="kmeans"),
                                 LowerToEncoded()],
}
# models whose output is their hidden states: only there does cutting the output width make sense
HEADLESS = {"bert", "t5_encoder"}
# the configs' sizes: BERT-mini's widths with the real vocabularies, or tiny ones for --quick
SIZES = {"full": dict(hidden=256, layers=4, heads=4, ffn=1024, tokens=128, image=224, patch=16),
         "quick": dict(hidden=64, layers=2, heads=4, ffn=128, tokens=32, image=32, patch=8, vocab=1000)}


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("this benchmark needs transformers (pip install 'fxcompress[transformers]')") from exc
    return transformers


def build(name: str, size: dict) -> tuple[nn.Module, tuple]:
    """The model in eval mode and its example inputs; vocabularies are the real ones unless --quick."""
    vocab = {"bert": 30522, "gpt2": 50257, "llama": 32000, "t5": 32128}
    v = {k: size.get("vocab", full) for k, full in vocab.items()}
    heads = size["heads"]
    torch.manual_seed(0)
    model = hf_model(name, hidden=size["hidden"], layers=size["layers"], ffn=size["ffn"],
                     vocab=v.get({"bert_cls": "bert", "t5_encoder": "t5"}.get(name, name), 0),  # ViT: none
                     heads=2 * heads if name == "llama" else heads, kv_heads=heads,
                     labels=1000 if name == "vit" else 2, image=size["image"], patch=size["patch"])
    if name == "vit":
        return model, (torch.randn(1, 3, size["image"], size["image"]),)
    return model, (torch.randint(0, min(v.values()), (1, size["tokens"])),)


def source(hf, name: str, model: nn.Module, inputs: tuple, frontend: str):
    """(what compile takes, front end used, seconds): HF's fx tracer where asked for and available (4.x,
    not T5, which it refuses), else torch.export."""
    has_fx = int(hf.__version__.split(".")[0]) < 5 and name != "t5_encoder"
    use = "hf_fx" if frontend == "hf_fx" or (frontend == "auto" and has_fx) else "export"
    start = time.perf_counter()
    if use == "hf_fx":
        from transformers.utils.fx import symbolic_trace  # only 4.x has it
        names = ["pixel_values"] if name == "vit" else ["input_ids"]
        src = symbolic_trace(model, input_names=names)
    else:
        src = torch.export.export(model, inputs, strict=False)
    return src, use, time.perf_counter() - start


def tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for key in out for t in tensors(out[key])]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors(item)]
    return []


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, inputs: tuple) -> int:
    """Multiply-accumulates of one forward (matmuls, linear layers, attention; not lookups)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def file_bytes(gm) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.fxc")
        fxcompress.save(gm, path)
        return os.path.getsize(path)


def latencies(runs: dict[str, tuple[nn.Module, tuple]], rounds: int) -> dict[str, float]:
    """Median ms of each model over `rounds`, the models interleaved in a new order each round."""
    times = {key: [] for key in runs}
    order = list(runs)
    with torch.no_grad():
        for model, inputs in runs.values():
            model(*inputs)  # warm-up
        for _ in range(rounds):
            random.shuffle(order)
            for key in order:
                model, inputs = runs[key]
                start = time.perf_counter()
                model(*inputs)
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def ours(src, inputs: tuple, mode: str) -> dict:
    """Compile one mode; a refusal or failure is reported in the row, never hidden."""
    try:
        gm = fxcompress.compile(src, MODES[mode](), inputs)
    except Exception as exc:  # noqa: BLE001 - the table reports every failure by type and first line
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
    seconds = sum(record.seconds for record in fxcompress.history(gm))
    try:
        size = file_bytes(gm)
    except Exception as exc:  # noqa: BLE001
        return {"model": gm, "seconds": seconds, "file": f"save fails ({type(exc).__name__})",
                "note": f"save: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}
    return {"model": gm, "seconds": seconds, "file": size}


# ---- Torch-Pruning, as its Hugging Face examples run it ------------------------------------------

QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"))
HEAD_DIM = ("attention_head_size", "head_dim", "key_value_proj_dim")


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, tuple[nn.Linear, ...], int]]:
    """(path, module, (q, k, v), head_dim) of every attention block with q / k / v projections, as the
    examples find them by class (BertSelfAttention, ViTSelfAttention, LlamaAttention) and T5's too."""
    found = []
    for path, m in model.named_modules():
        for names in QKV:
            projections = tuple(getattr(m, n, None) for n in names)
            head_dim = next((getattr(m, a) for a in HEAD_DIM if isinstance(getattr(m, a, None), int)), None)
            if all(isinstance(p, nn.Linear) for p in projections) and head_dim:
                found.append((path, m, projections, head_dim))
    return found


def output_layers(model: nn.Module) -> list[nn.Module]:
    """The layers the examples leave alone: classifier / LM head / pooler (the outputs' widths)."""
    names = ("classifier", "lm_head", "pooler")
    return [getattr(model, n) for n in names if isinstance(getattr(model, n, None), nn.Module)]


def fix_attention(blocks, model: nn.Module) -> list[str]:
    """The examples' hand fix-up: each attention module's head count and sizes rewritten from its
    pruned projections. Returns what changed ('path.attr old -> new'), the fix-ups TP needed."""
    changed = []
    for path, m, (q, k, _), head_dim in blocks:
        heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
        values = {"num_attention_heads": heads, "num_heads": heads, "n_heads": heads, "all_head_size": q.out_features,
                  "inner_dim": q.out_features, "num_key_value_heads": kv_heads,
                  "num_key_value_groups": heads // max(kv_heads, 1)}
        for attr, value in values.items():
            old = getattr(m, attr, None)
            if isinstance(old, int) and old != value:
                setattr(m, attr, value)
                changed.append(f"{path}.{attr} {old} -> {value}")
    return changed


def _out_of_time(signum, frame):
    raise TimeoutError("did not finish in the time allowed (--tp-timeout)")


def torch_pruning_50(tp, model: nn.Module, inputs: tuple, timeout: int) -> dict:
    blocks = attention_blocks(model)
    num_heads = {p: p.out_features // hd for _, _, qkv, hd in blocks for p in qkv}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _out_of_time)  # its grouping can run for hours (Llama): bounded here
    signal.alarm(timeout)
    try:
        pruner = tp.pruner.MetaPruner(
            model, inputs[0], importance=tp.importance.MagnitudeImportance(p=2, group_reduction="mean"),
            pruning_ratio=0.5, ignored_layers=output_layers(model), num_heads=num_heads, prune_num_heads=True,
            prune_head_dims=False, head_pruning_ratio=0.5,
            output_transform=lambda out: sum(t.float().sum() for t in tensors(out) if t.is_floating_point()))
        for group in pruner.step(interactive=True):
            group.prune()
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}", "fixups": []}
    finally:
        signal.alarm(0)
    fixups = fix_attention(blocks, model)
    seconds = time.perf_counter() - start
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001
        return {"error": f"forward fails after pruning: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}",
                "fixups": fixups}
    return {"model": model, "seconds": seconds, "fixups": fixups}


# ---- one model -----------------------------------------------------------------------------------

def progress(*words) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *words, file=sys.stderr, flush=True)


def bench_model(hf, tp, name: str, size: dict, frontend: str, rounds: int, tp_timeout: int) -> dict:
    model, inputs = build(name, size)
    src, used, front_seconds = source(hf, name, model, inputs, frontend)
    results = {}
    for mode in MODES:
        if mode.endswith("outputs") and name not in HEADLESS:
            continue
        progress(name, mode)
        results[mode] = ours(src, inputs, mode)
    if tp is not None:
        progress(name, "Torch-Pruning")
        results["Torch-Pruning"] = torch_pruning_50(tp, copy.deepcopy(model), inputs, tp_timeout)
    progress(name, "latency")
    graph = fxcompress.compile(src, [], inputs)  # ours are timed against the same graph unpruned
    dense = {"params": params(model), "macs": macs(model, inputs)}
    runs = {"dense": (model, inputs), "dense graph": (graph, inputs)}
    runs.update({key: (r["model"], inputs) for key, r in results.items() if "model" in r})
    ms = latencies(runs, rounds)
    for key, r in results.items():
        if "model" in r:
            reference = ms["dense"] if key == "Torch-Pruning" else ms["dense graph"]
            r.update(params=kept_weights(r["model"], key == "deep compression") / dense["params"], macs=macs(r["model"], inputs) / dense["macs"],
                     latency=ms[key] / reference)
    return {"name": name, "frontend": used, "front_seconds": front_seconds, "dense": dense,
            "dense_ms": ms["dense"], "graph_ms": ms["dense graph"], "results": results}


def kept_weights(model: nn.Module, encoded: bool) -> int:
    """Parameters; for an encoded model (its weights are code buffers) the nonzero weights it stores."""
    if not encoded:
        return params(model)
    rows = fxcompress.summary(model).rows
    return sum(r["nonzeros"] or 0 for r in rows) + params(model)  # + what stays float (biases, norms)


def rows(report: dict, notes: list[str]) -> list[str]:
    lines = []
    for mode, r in report["results"].items():
        head = f"| {report['name']} | {mode if mode in MODES else 'Torch-Pruning 50%'} |"
        if "error" in r:
            notes.append(f"{report['name']} {mode}: {r['error']}")
            lines.append(f"{head} fails ({r['error'].split(':')[0]}, note {len(notes)}) | | | | |")
            continue
        if "note" in r:
            notes.append(f"{report['name']} {mode}: {r['note']}")
        size, fp32 = r.get("file"), 4 * report["dense"]["params"]
        ratio = f"{size / fp32:.4f} ({fp32 / size:.1f}x smaller)" if isinstance(size, int) else \
            (f"{size}, note {len(notes)}" if size else "-")
        lines.append(f"{head} {r['params']:.3f} | {r['macs']:.3f} | {r['latency']:.2f} | {r['seconds']:.2f} | {ratio} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bert_cls", "bert", "gpt2", "llama", "vit", "t5_encoder"])
    parser.add_argument("--frontend", choices=("auto", "export", "hf_fx"), default="auto")
    parser.add_argument("--quick", action="store_true", help="tiny configs, 3 latency rounds, 30 s for Torch-Pruning")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tp-timeout", type=int, default=120, help="seconds allowed to Torch-Pruning per model")
    args = parser.parse_args()
    hf = _transformers()
    try:
        import torch_pruning as tp
    except ImportError:
        tp = None
    torch.set_num_threads(1)
    random.seed(0)
    size = SIZES["quick" if args.quick else "full"]
    rounds = 3 if args.quick else args.rounds
    tp_timeout = min(args.tp_timeout, 30) if args.quick else args.tp_timeout
    print(f"torch {torch.__version__}, transformers {hf.__version__}, "
          f"torch-pruning {tp.__version__ if tp else 'not installed'}; 1 thread, batch 1, {size}")
    reports = [bench_model(hf, tp, name, size, args.frontend, rounds, tp_timeout) for name in args.models]
    print("\n| model | mode | params / dense | MACs / dense | latency / dense | pass s | file / fp32 bytes |")
    print("|---|---|---|---|---|---|---|")
    notes = []
    for report in reports:
        print("\n".join(rows(report, notes)))
    print("\n".join(f"{i}. {note}" for i, note in enumerate(notes, 1)))
    print()
    for report in reports:
        d = report["dense"]
        print(f"{report['name']}: front end {report['frontend']} ({report['front_seconds']:.1f} s), dense "
              f"{d['params'] / 1e6:.2f} M parameters, {d['macs'] / 1e6:.1f} M MACs, {report['dense_ms']:.1f} ms "
              f"eager / {report['graph_ms']:.1f} ms as the unpruned graph")
        if "Torch-Pruning" in report["results"]:
            fixups = report["results"]["Torch-Pruning"]["fixups"]
            print(f"  Torch-Pruning fix-ups ({len(fixups)}): {'; '.join(fixups) if fixups else 'none'}")


if __name__ == "__main__":
    main()
