"""Small models covering the op families the passes must handle: the models `fxcompress demo` and the
shipped recipes (`zoo:NAME`) build, and the ones tests, examples and benchmarks share.

Every entry of ZOO maps a name to (constructor, example-input maker). All are fx-traceable. The zoo is
part of the installed package so that `fxcompress demo` and the shipped recipes run from a wheel.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["BasicBlock", "Conv1D", "DenseLayer", "DenseNetSmall", "GPT2Attention", "GPT2Block", "GPTBlock",
           "InvertedResidual", "LeNet300100", "LeNet5", "MobileNetV2Small", "ResNetSmall", "SENet", "SelfAttention",
           "SqueezeExcite", "TransformerBlock", "VGGBN", "ZOO", "HF_MODELS", "gpt2_tokens", "hf_model"]


class LeNet300100(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998; Han et al. 2015): a 784-300-100-10 MLP."""

    def __init__(self, in_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """The Caffe LeNet-5 of Deep Compression: conv20-pool-conv50-pool-fc500-fc10 (431K parameters at 28x28)."""

    def __init__(self, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> None:
        super().__init__()
        pad = 0 if image_size >= 28 else 2  # small images (8x8 digits) keep their size through the convs
        self.conv1 = nn.Conv2d(in_channels, 20, 5, padding=pad)
        self.conv2 = nn.Conv2d(20, 50, 5, padding=pad)
        side = ((image_size + 2 * pad - 4) // 2 + 2 * pad - 4) // 2
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class VGGBN(nn.Module):
    """A VGG-style CNN with BatchNorm, max pooling and a two-layer classifier."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c * 4 * 4, 64), nn.ReLU(),
                                        nn.Dropout(0.5), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # strided 1x1 downsample shortcut
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """A ResNet-style net: residual adds, identity and strided downsample shortcuts."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat([x, self.conv(F.relu(self.bn(x)))], 1)


class DenseNetSmall(nn.Module):
    """A DenseNet-style net: channel concatenation, transition with 1x1 conv and pooling."""

    def __init__(self, growth: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        c = 16
        block1 = []
        for _ in range(3):
            block1.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*block1)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                        nn.AvgPool2d(2))
        c //= 2
        self.block2 = nn.Sequential(DenseLayer(c, growth), DenseLayer(c + growth, growth))
        c += 2 * growth
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.block(x)
        return x + out if self.use_residual else out


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style net: depthwise convs and inverted residuals."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 4),
                                    InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4))
        self.head = nn.Sequential(nn.Conv2d(32, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return x * scale  # broadcast multiply couples the channels of x and scale


class SENet(nn.Module):
    """A CNN with squeeze-and-excitation blocks (broadcast channel scaling)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.se1 = SqueezeExcite(32)
        self.conv2 = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.se2 = SqueezeExcite(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.se1(F.relu(self.bn1(self.conv1(x))))
        x = self.se2(F.relu(self.bn2(self.conv2(x))))
        return self.fc(torch.mean(x, dim=(2, 3)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer encoder block: nn.MultiheadAttention, residuals, a GELU MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class SelfAttention(nn.Module):
    """Hand-written attention: q/k/v projections, head split by view/transpose, matmul, softmax."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.size(0), x.size(1), x.size(2)  # fx cannot unpack a traced shape
        q = self.q(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """A GPT-style block with hand-written attention and a transformer MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.ln1(x))
        x = x + self.proj(F.gelu(self.fc(self.ln2(x))))
        return self.head(x[:, -1])


class Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2), written as transformers writes it: a linear layer whose weight
    is stored [in, out] and applied by addmm on the flattened input."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Attention(nn.Module):
    """GPT-2's causal self-attention as transformers writes it: c_attn / c_proj Conv1Ds, a causal mask
    built in the forward, the masked value from torch.finfo and torch.full, heads split with computed sizes."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dim = heads, dim // heads, dim
        self.c_attn = Conv1D(3 * dim, dim)
        self.c_proj = Conv1D(dim, dim)

    def _split_heads(self, tensor):
        return tensor.view(tensor.size()[:-1] + (self.heads, self.head_dim)).permute(0, 2, 1, 3)

    def _merge_heads(self, tensor):
        tensor = tensor.permute(0, 2, 1, 3).contiguous()
        return tensor.view(tensor.size()[:-2] + (self.heads * self.head_dim,))

    def forward(self, x):
        query, key, value = self.c_attn(x).split(self.dim, dim=2)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        weights = torch.matmul(query, key.transpose(-1, -2))
        weights = weights / torch.full([], value.size(-1) ** 0.5, dtype=weights.dtype, device=weights.device)
        length = query.size(-2)  # the causal mask is built in the forward (fx cannot slice a buffer by sizes)
        causal_mask = torch.tril(weights.new_ones(length, length)).bool()
        mask_value = torch.full([], torch.finfo(torch.float32).min, dtype=weights.dtype, device=weights.device)
        weights = torch.where(causal_mask, weights.to(weights.dtype), mask_value)
        weights = nn.functional.softmax(weights, dim=-1).type(value.dtype)
        return self.c_proj(self._merge_heads(torch.matmul(weights, value)))


class GPT2Block(nn.Module):
    """A small GPT-2 language model as transformers writes it: token and position embeddings, one
    pre-norm block of Conv1D attention and MLP (c_attn / c_proj / c_fc), and an LM head tied to the
    token embedding (one Parameter used by nn.Embedding and by F.linear)."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, positions: int = 16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.wpe = nn.Embedding(positions, dim)
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = GPT2Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.c_fc = Conv1D(4 * dim, dim)
        self.c_proj = Conv1D(dim, 4 * dim)
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, input_ids):
        positions = torch.arange(0, input_ids.size(-1), dtype=torch.long, device=input_ids.device).unsqueeze(0)
        x = self.wte(input_ids) + self.wpe(positions)
        x = x + self.attn(self.ln_1(x))
        x = x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))
        return self.lm_head(self.ln_f(x))


def gpt2_tokens() -> torch.Tensor:
    """Example input of GPT2Block: a batch of 2 sequences of 8 token ids."""
    return torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))


# Hugging Face architectures `hf_model` builds from their configs (random weights: nothing is downloaded)
HF_MODELS = ("bert_cls", "bert", "gpt2", "llama", "vit", "t5_encoder")


def hf_model(name: str, *, hidden: int, layers: int, heads: int, ffn: int, vocab: int, kv_heads: int | None = None,
             positions: int | None = None, labels: int = 2, image: int = 224, patch: int = 16) -> nn.Module:
    """A transformers model of HF_MODELS from its config, in eval mode (seed torch first for its weights): `heads`
    attention heads (Llama: `kv_heads` key / value heads, half of them when None), `positions` the longest
    sequence (the config's own default when None; T5 and ViT have none), `labels` the classes of BERT's and
    ViT's classifiers, `image` / `patch` ViT's sides. The tests' and bench_transformers.py's models."""
    import transformers as hf  # an optional dependency: imported when a model is built
    if name not in HF_MODELS:
        raise ConfigError(f"hf_model: no model named {name!r}; models: {HF_MODELS}")
    longest = lambda key: {} if positions is None else {key: positions}  # noqa: E731
    if name in ("bert", "bert_cls"):
        config = hf.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=ffn, num_labels=labels, **longest("max_position_embeddings"))
        model = hf.BertForSequenceClassification(config) if name == "bert_cls" else hf.BertModel(config)
    elif name == "gpt2":  # GPT-2's own special tokens are its vocabulary's last id: a smaller one uses 0
        tokens = {} if vocab > 50256 else {"bos_token_id": 0, "eos_token_id": 0}
        model = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                                                 use_cache=False, **tokens, **longest("n_positions")))
    elif name == "llama":
        model = hf.LlamaForCausalLM(hf.LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads or heads // 2, intermediate_size=ffn, use_cache=False,
            **longest("max_position_embeddings")))
    elif name == "vit":
        model = hf.ViTForImageClassification(hf.ViTConfig(
            image_size=image, patch_size=patch, hidden_size=hidden, num_hidden_layers=layers,
            num_attention_heads=heads, intermediate_size=ffn, num_labels=labels))
    else:
        model = hf.T5EncoderModel(hf.T5Config(vocab_size=vocab, d_model=hidden, d_kv=hidden // heads, d_ff=ffn,
                                              num_layers=layers, num_heads=heads, use_cache=False))
    return model.eval()


def _images(channels: int, side: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, channels, side, side)


ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "lenet300": (LeNet300100, _images(1, 28)),
    "lenet5": (LeNet5, _images(1, 28)),
    "vgg_bn": (VGGBN, _images(3, 32)),
    "resnet": (ResNetSmall, _images(3, 32)),
    "densenet": (DenseNetSmall, _images(3, 32)),
    "mobilenetv2": (MobileNetV2Small, _images(3, 32)),
    "senet": (SENet, _images(3, 32)),
    "transformer": (TransformerBlock, lambda: torch.randn(2, 8, 16)),
    "gpt_block": (GPTBlock, lambda: torch.randn(2, 8, 16)),
}
