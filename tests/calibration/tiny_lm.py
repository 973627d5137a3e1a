"""Small models and calibration batches shared by the calibration-based tests.

A two-layer Llama (transformers' config, hidden size 64) for the language-model path through the
export front end, and a linear layer whose inputs are strongly correlated (a few latent factors
plus noise), the situation in which second-order updates pay: magnitude alone ignores that
dropping one input can be made up for by its correlated neighbours.
"""
import pytest
import torch

VOCAB, LENGTH = 128, 16


def tiny_llama() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def token_batches(count: int, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, LENGTH), generator=generator) for _ in range(count)]


def correlated_batches(count: int = 8, rows: int = 128, width: int = 256, factors: int = 32,
                       seed: int = 2) -> list[torch.Tensor]:
    """Inputs driven by `factors` latent variables (plus 10% noise): channels are strongly correlated."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(factors, width, generator=generator)
    return [torch.randn(rows, factors, generator=generator) @ mixing + 0.1 * torch.randn(rows, width, generator=generator)
            for _ in range(count)]


def relative_error(model: torch.nn.Module, reference: torch.nn.Module, inputs: torch.Tensor) -> float:
    """||f(x) - f_ref(x)|| / ||f_ref(x)|| over `inputs`."""
    with torch.no_grad():
        expected = reference(inputs)
        return float((model(inputs) - expected).norm() / expected.norm())
