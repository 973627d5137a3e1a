"""One MLP block of a trained byte-level Llama, with real calibration and held-out inputs.

The layer-level ordering tests need what real language models have and random layers lack:
trained weights and the activations they produce (a few large channels after the gated MLP's
SiLU product, a common component across channels after RMSNorm). `data/llama_bytes_mlp.pt` holds
block 1's MLP of the 0.89 M-parameter checkpoint benchmarks/train_lm.py trains (width 128, MLP
384), in float16 (under 500 KB): the RMSNorm weight, gate / up / down weights, and the residual stream
entering the norm on 512 calibration bytes of the training plays and 256 of the held-out plays.

    python tests/calibration/llama_mlp.py CHECKPOINT_DIR   # rewrites the data file
"""
import sys
from pathlib import Path

import torch
from torch import nn

DATA = Path(__file__).resolve().parent / "data" / "llama_bytes_mlp.pt"
BLOCK = 1


class MLP(nn.Module):
    """post_attention_layernorm -> silu(gate) * up -> down, as transformers' Llama computes it."""

    def __init__(self, hidden: int, intermediate: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(hidden, eps=eps)
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


class ResidualMLP(nn.Module):
    """x + mlp(x), as the MLP sits in its block: the value added back is AWQ's block output."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


def load() -> tuple[MLP, torch.Tensor, torch.Tensor]:
    """(the block in float32, eval mode; calibration inputs (512, 128); held-out inputs (256, 128))."""
    data = torch.load(DATA, weights_only=True)
    mlp = MLP(data["gate"].shape[1], data["gate"].shape[0], eps=float(data["eps"]))
    with torch.no_grad():
        for name in ("norm", "gate", "up", "down"):
            getattr(mlp, name).weight.copy_(data[name].float())
    return mlp.eval(), data["calibration"].float(), data["held_out"].float()


def capture(checkpoint: str) -> None:
    from transformers import LlamaForCausalLM   # only to rewrite the file
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_llm

    model = LlamaForCausalLM.from_pretrained(checkpoint).eval()
    cal, held, _ = bench_llm.data(8, 8)
    layer = model.model.layers[BLOCK]
    seen = []
    hook = layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=cal[0][0])
        model(input_ids=held[0][0])
    hook.remove()
    generator = torch.Generator().manual_seed(0)
    pick = lambda x, n: x[torch.randperm(x.shape[0], generator=generator)[:n]]  # noqa: E731 - spread over windows
    mlp = layer.mlp
    DATA.parent.mkdir(exist_ok=True)
    torch.save({"norm": layer.post_attention_layernorm.weight.detach().half(), "gate": mlp.gate_proj.weight.detach().half(),
                "up": mlp.up_proj.weight.detach().half(), "down": mlp.down_proj.weight.detach().half(),
                "eps": torch.tensor(layer.post_attention_layernorm.variance_epsilon),
                "calibration": pick(seen[0], 512).half(), "held_out": pick(seen[1], 256).half()}, DATA)


if __name__ == "__main__":
    capture(sys.argv[1])
