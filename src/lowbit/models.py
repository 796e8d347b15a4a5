"""Reference models built in code (nothing is downloaded).

- ``DigitsCNN``: the classic workflow's CNN, Conv2D(32, 3x3, relu) -> MaxPool(2)
  -> Flatten -> Dense(10), for 8x8 single-channel digits.
- ``VGGStyleCNN``: 3x3 conv stacks on 32x32x3 input (the INT8 speed benchmark).
- ``MLP``: fully connected layers with ReLU (e.g. 1024-2048-2048-10).
- ``tiny_gpt`` / ``tiny_bert_encoder``: a GPT-style decoder and a BERT-style encoder.
"""

from __future__ import annotations

from typing import Any


def _nn() -> Any:
    import torch.nn as nn

    return nn


def digits_cnn(side: int = 8) -> Any:
    """Conv2D(32, 3x3, relu) -> MaxPool(2) -> Flatten -> Dense(10) on (N, 1, side, side)
    (the classic tutorial's model at side 28)."""
    nn = _nn()
    pooled = (side - 2) // 2
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3),  # (N, 32, side-2, side-2)
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 32, pooled, pooled)
        nn.Flatten(),  # (N, 32 * pooled^2)
        nn.Linear(32 * pooled * pooled, 10),
    )


def vgg_style_cnn(num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128),
                  batchnorm: bool = True) -> Any:
    """VGG-style: per stage two 3x3 convs (+BN) + ReLU, then MaxPool(2); input (N, 3, 32, 32)."""
    nn = _nn()
    layers: list[Any] = []
    in_ch = 3
    for width in widths:
        for _ in range(2):
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=1))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())
            in_ch = width
        layers.append(nn.MaxPool2d(2))
    side = 32 // (2 ** len(widths))
    layers += [nn.Flatten(), nn.Linear(in_ch * side * side, 256), nn.ReLU(),
               nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


def mlp(sizes: tuple[int, ...] = (1024, 2048, 2048, 10)) -> Any:
    """Linear layers of the given sizes with ReLU between them."""
    nn = _nn()
    layers: list[Any] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def lenet_300_100(input_size: int = 64, num_classes: int = 10) -> Any:
    """LeNet-300-100 (LeCun et al. 1998): input -> 300 -> 100 -> classes, ReLU.

    The original takes 28x28 = 784 inputs (266k weights); ``input_size`` adapts it
    (64 for the bundled 8x8 digits).
    """
    return mlp((input_size, 300, 100, num_classes))


def lenet5(side: int = 8, num_classes: int = 10) -> Any:
    """LeNet-5 as in Deep Compression's Caffe model: conv 5x5x20 -> pool -> conv 5x5x50 ->
    pool -> fc 500 -> fc classes. For 28x28 input the convs are unpadded (431k weights);
    for small inputs (8x8 digits) they are padded by 2 so the feature maps stay valid."""
    nn = _nn()
    pad = 0 if side >= 28 else 2
    after1 = (side + 2 * pad - 4) // 2
    after2 = (after1 + 2 * pad - 4) // 2
    return nn.Sequential(
        nn.Conv2d(1, 20, kernel_size=5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(50 * after2 * after2, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def tiny_gpt(vocab: int = 256, d_model: int = 128, heads: int = 4, layers: int = 2,
             max_len: int = 128) -> Any:
    """A GPT-style decoder (pre-LayerNorm blocks, causal self-attention, GELU MLP, tied-free
    LM head) that maps token ids (batch, seq) to logits (batch, seq, vocab)."""
    import torch

    nn = _nn()

    class Block(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

        def forward(self, x: Any) -> Any:
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / float(c // heads) ** 0.5  # (b, h, t, t)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).reshape(b, t, c)
            x = x + self.proj(y)
            return x + self.down(torch.nn.functional.gelu(self.up(self.ln2(x))))

    class TinyGPT(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln_f, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)

        def forward(self, ids: Any) -> Any:
            t = ids.shape[1]
            x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))[None]
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x))

    return TinyGPT()


def tiny_bert_encoder(vocab: int = 256, d_model: int = 128, heads: int = 4, layers: int = 2,
                      max_len: int = 128, num_classes: int = 2, *, pre_norm: bool = False,
                      pool: str = "first") -> Any:
    """A BERT-style encoder for sequence classification: token + position embeddings,
    bidirectional self-attention blocks (post-LayerNorm as in BERT, with a LayerNorm on
    the embeddings; or ``pre_norm`` blocks and a final LayerNorm), a GELU (erf) MLP, and a
    head on the first token through a tanh pooler (``pool="first"``) or on the mean of
    the unpadded tokens (``pool="mean"``).

    Inputs: ``input_ids`` (batch, seq) int64 and ``attention_mask`` (batch, seq) of 0/1,
    0 marking padding, which no token attends to (an additive large-negative mask on the
    attention scores). Output: logits (batch, num_classes)."""
    import torch

    nn = _nn()
    if pool not in ("first", "mean"):
        raise ValueError(f"pool must be 'first' or 'mean', not {pool!r}")

    class Block(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.up, self.down = nn.Linear(d_model, 4 * d_model), nn.Linear(4 * d_model, d_model)

        def attend(self, x: Any, mask_bias: Any) -> Any:
            b, t, c = x.shape
            q, k, v = self.qkv(x).split(c, dim=2)
            q, k, v = (z.reshape(b, t, heads, c // heads).transpose(1, 2) for z in (q, k, v))
            att = (q @ k.transpose(-2, -1)) / float(c // heads) ** 0.5 + mask_bias
            return self.proj((att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, c))

        def mlp(self, x: Any) -> Any:
            return self.down(torch.nn.functional.gelu(self.up(x)))

        def forward(self, x: Any, mask_bias: Any) -> Any:
            if pre_norm:
                x = x + self.attend(self.ln1(x), mask_bias)
                return x + self.mlp(self.ln2(x))
            x = self.ln1(x + self.attend(x, mask_bias))
            return self.ln2(x + self.mlp(x))

    class TinyBertEncoder(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(max_len, d_model)
            self.ln = nn.LayerNorm(d_model)  # on the embeddings (post-norm) or the output
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.pooler = nn.Linear(d_model, d_model)
            self.head = nn.Linear(d_model, num_classes)

        def forward(self, ids: Any, attention_mask: Any) -> Any:
            b, t = ids.shape
            x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))[None]
            if not pre_norm:
                x = self.ln(x)
            keys = attention_mask[:, None, None, :].expand(b, 1, t, t).to(x.dtype)
            mask_bias = (1.0 - keys) * torch.finfo(x.dtype).min  # 0 where kept
            for block in self.blocks:
                x = block(x, mask_bias)
            if pre_norm:
                x = self.ln(x)
            if pool == "first":
                return self.head(torch.tanh(self.pooler(x[:, 0])))
            padding = (attention_mask == 0)[:, :, None]
            count = attention_mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
            return self.head(self.pooler(x.masked_fill(padding, 0.0).sum(dim=1) / count))

    return TinyBertEncoder()
