"""Train a small Llama (transformers' LlamaForCausalLM built from a config) over bytes on
Shakespeare's plays, holding whole plays out, and save it for bench_llm.py.
With `--vocab N` (N > 256) the tokens are a byte-level BPE of N tokens learned from the training plays
(`fxcompress.text.train_tokenizer`), saved as tokenizer.json beside the weights; bench_llm.py reads it.

    nice -n 10 python benchmarks/train_lm.py --minutes 25 --threads 1 > train_lm.log 2>&1 &

Writes benchmarks/.cache/llama-bytes/ (save_pretrained: config.json + model.safetensors) and
prints held-out perplexity (per token: byte or BPE token) on the held-out plays and on Debian's fortunes.
The default config has 4 layers of width 128 (2 heads of 64, MLP 384): 0.88 M parameters, every
linear layer's input width a multiple of 64 (and of 128 but for the MLP's 384) so group-wise grids
fit. Larger configs are flags away (`--hidden 256 --layers 8 --intermediate 768 --heads 4`: 6.9 M),
but on a shared 2-core machine at nice 10 they got too few steps in half an hour to learn much:
6.9 M took 14-41 s per 16 x 128-byte step, 2.7 M got through 10 steps in 18 minutes.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxcompress import text

CACHE = Path(__file__).resolve().parent / ".cache"
DEFAULT_OUT = CACHE / "llama-bytes"


ARCHITECTURES = ("llama", "gpt2")


def build_model(hidden: int = 128, layers: int = 4, heads: int = 2, intermediate: int = 384, context: int = 128,
                seed: int = 0, arch: str = "llama", vocab: int = text.VOCAB_SIZE):
    """A LlamaForCausalLM over `vocab` tokens (bytes: 256), tied embeddings, no dropout; or with arch="gpt2" a
    GPT2LMHeadModel of the same sizes (LayerNorm, learned positions, a GELU MLP of HF's Conv1D layers)."""
    import transformers   # optional and slow to import

    torch.manual_seed(seed)
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate,
            n_positions=context, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
            bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False))
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                      max_position_embeddings=context, tie_word_embeddings=True, bos_token_id=None,
                                      eos_token_id=None, pad_token_id=None, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy (nats) of a B x T batch."""
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean next-token cross entropy) over all windows, weighting every predicted token equally."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        total += float(lm_loss(model, batch)) * batch[:, 1:].numel()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def train(model, tokens: torch.Tensor, *, seconds: float, context: int = 128, batch_size: int = 8,
          lr: float = 3e-3, warmup: int = 50, log_every: int = 10, seed: int = 0, max_steps: int | None = None):
    """AdamW with linear warm-up and cosine decay, over `max_steps` steps or else over `seconds` of
    wall time (the decay follows the time spent, so a machine that slows down mid-run still ends
    the schedule on time). Random windows of the training tokens; returns the list of (step, loss)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start, history, step = time.perf_counter(), [], 0
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        progress = step / max_steps if max_steps is not None else elapsed / seconds
        if progress >= 1.0:
            break
        starts = torch.randint(0, tokens.numel() - context, (batch_size,), generator=gen)
        batch = torch.stack([tokens[s:s + context] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr(step, progress, warmup, lr)
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append((step, float(loss.detach())))
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e} {elapsed:.0f}s", flush=True)
    return history


def _lr(step: int, progress: float, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def corpora(cache: Path | None, context: int, eval_windows: int, vocab: int = text.VOCAB_SIZE, plays=None):
    """Training tokens, held-out-play windows, fortune windows and the tokenizer (None for bytes; a BPE
    of `vocab` tokens learned from the training plays only). `plays`: the texts, if already read."""
    train_plays, held = text.split_plays(plays if plays is not None else text.shakespeare(cache))
    bpe = text.train_tokenizer(train_plays.values(), vocab) if vocab != text.VOCAB_SIZE else None
    tokens = text.encode(text.join_texts(train_plays), bpe)
    held_w = text.windows(text.encode(text.join_texts(held), bpe), context, limit=eval_windows)
    fortune_w = text.windows(text.encode(text.join_texts(text.fortunes()), bpe), context, limit=eval_windows)
    return tokens, held_w, fortune_w, bpe


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=25.0)
    ap.add_argument("--threads", type=int, default=1)   # two threads waited on each other on a busy machine
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--arch", choices=ARCHITECTURES, default="llama")
    ap.add_argument("--seed", type=int, default=0, help="the initial weights' and the batches' seed")
    ap.add_argument("--vocab", type=int, default=text.VOCAB_SIZE,
                    help="256: byte tokens; more: a byte-level BPE of this many tokens from the training plays")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokens, held_w, fortune_w, bpe = corpora(CACHE, args.context, args.eval_windows, args.vocab)
    model = build_model(args.hidden, args.layers, args.heads, args.intermediate, args.context, arch=args.arch,
                        vocab=args.vocab, seed=args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters; {tokens.numel() / 1e6:.2f} M training tokens; "
          f"{len(held_w)} held-out and {len(fortune_w)} fortune windows of {args.context}", flush=True)
    t0 = time.perf_counter()
    train(model, tokens, seconds=args.minutes * 60, context=args.context, batch_size=args.batch_size, seed=args.seed)
    print(f"trained in {time.perf_counter() - t0:.0f}s", flush=True)
    model.save_pretrained(args.out)
    if bpe is not None:
        bpe.save(str(args.out / "tokenizer.json"))
    print(f"held-out plays perplexity {perplexity(model, held_w):.3f}; fortunes perplexity "
          f"{perplexity(model, fortune_w):.3f}; saved to {args.out}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
