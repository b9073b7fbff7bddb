"""A sparse SDF VQ-VAE in plain PyTorch: the seed-001 model shape without a sparse-conv library.

A shape is its truncated SDF on a 64^3 grid kept only near the surface, cut into patches of
4^3 voxels; only the patches the surface passes through (a few hundred per shape) exist. The
model sees a flat list of them, ``values`` (N, 64) and ``coords`` (N, 4) = (sample, x, y, z) on
the 16^3 patch grid, the way sparse-voxel models pass ``SparseTensor(feats, coords)`` around:

    values -> Linear -> [SubmanifoldResBlock] x blocks -> Linear -> tokens (N, token_dim)
    tokens -> quantizer (K codes) -> Linear -> [SubmanifoldResBlock] x blocks -> Linear -> tanh

``SubmanifoldConv3d`` is the 3x3x3 submanifold sparse convolution of MinkowskiEngine, spconv and
TRELLIS, written with a neighbor table (a sort and ``searchsorted`` over the coordinates' keys)
and one gather + matmul: each active patch sees its active neighbors, and no patch is created.
The quantizer is vqkit's ``VectorQuantizer`` or the seed-001 drop-in ``SparseVectorQuantizer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..configurable import Configurable, to_config
from ..integrations.sparse import SampleUsage, SparseVectorQuantizer, sample_usage
from ..pretrained import (
    PretrainedMixin,
    inference_quantizer_config,
    is_training_state,
    tokenizer_digest,
)
from ..quantize.quantizer import VectorQuantizer

_OFFSETS = torch.tensor(
    [(dx, dy, dz) for dx in (-1, 0, 1) for dy in (-1, 0, 1) for dz in (-1, 0, 1)],
    dtype=torch.long,
)


def neighbor_table(coords: Tensor, grid: int) -> Tensor:
    """(N, 27) row of each active site's 3x3x3 neighbors in ``coords`` (N, 4) = (sample, x, y,
    z), -1 where a neighbor is not active (or falls off the ``grid``). Column 13 is the site
    itself. Sites must be distinct; the order of ``coords`` is free."""
    if coords.dim() != 2 or coords.shape[1] != 4:
        raise ValueError(f"coords must be (N, 4) = (sample, x, y, z), got {tuple(coords.shape)}")
    coords = coords.long()
    n = coords.shape[0]
    if n == 0:
        return torch.empty(0, 27, dtype=torch.long, device=coords.device)
    g = grid + 2  # a margin of one on each side: off-grid neighbors get keys no site has
    xyz = coords[:, 1:] + 1

    def key(b: Tensor, p: Tensor) -> Tensor:
        return ((b * g + p[..., 0]) * g + p[..., 1]) * g + p[..., 2]

    keys = key(coords[:, 0], xyz)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    offsets = _OFFSETS.to(coords.device)
    query = key(coords[:, 0, None], xyz[:, None, :] + offsets[None])  # (N, 27)
    pos = torch.searchsorted(sorted_keys, query.reshape(-1)).clamp_max(n - 1).view(n, 27)
    found = sorted_keys[pos] == query
    return torch.where(found, order[pos], torch.full_like(pos, -1))


class SubmanifoldConv3d(nn.Module):
    """3x3x3 submanifold sparse convolution: output sites = input sites.

    ``forward(feats (N, C_in), neighbors (N, 27))`` gathers each site's neighbors (zeros for
    missing ones) and applies one (27 * C_in, C_out) matmul.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.empty(27 * in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight.T, a=math.sqrt(5))

    def forward(self, feats: Tensor, neighbors: Tensor) -> Tensor:
        n = feats.shape[0]
        padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
        rows = torch.where(neighbors < 0, torch.full_like(neighbors, n), neighbors)
        out = padded[rows].reshape(n, -1) @ self.weight
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=3"


class SubmanifoldResBlock(nn.Module):
    """LayerNorm -> SiLU -> conv -> LayerNorm -> SiLU -> conv, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.conv1 = SubmanifoldConv3d(channels, channels)
        self.conv2 = SubmanifoldConv3d(channels, channels)
        self.act = nn.SiLU()

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)), neighbors)
        h = self.conv2(self.act(self.norm2(h)), neighbors)
        return x + h


class _Stack(nn.Module):
    def __init__(self, in_features: int, hidden: int, out_features: int, blocks: int) -> None:
        super().__init__()
        self.proj_in = nn.Linear(in_features, hidden)
        self.blocks = nn.ModuleList(SubmanifoldResBlock(hidden) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(hidden)
        self.proj_out = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            h = block(h, neighbors)
        return self.proj_out(torch.nn.functional.silu(self.norm_out(h)))


@dataclass
class SparseSDFOutput:
    """What ``SparseSDFVQVAE.forward`` returns (rows follow the input's).

    ``reconstructions`` are normalized SDF values in [-1, 1]. ``used_codes`` / ``perplexity``
    describe the batch (all processes in training under DDP), ``per_sample`` each sample of this
    process's batch. ``passthrough`` is True on a k-means warm-up step.
    """

    reconstructions: Tensor
    indices: Tensor
    vq_loss: Tensor
    vq_losses: dict[str, Tensor]
    used_codes: Tensor | None
    perplexity: Tensor | None
    per_sample: SampleUsage
    passthrough: bool


class SparseSDFVQVAE(Configurable, PretrainedMixin, nn.Module):
    """Encoder, quantizer and decoder over the active patches of truncated SDF grids.

    ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (``vqkit.pretrained``) write and
    read it as ``config.json`` + ``model.safetensors`` (kind ``"sdf_tokenizer"``), as an image
    tokenizer: the weights and the codebook, no EMA, maintenance or usage state; a model built
    on the seed-001 drop-in is saved with the plain ``VectorQuantizer`` inside it (the same
    codes).

    Args:
        quantizer: a ``VectorQuantizer`` with ``channel_first=False`` and ``dim == token_dim``,
            or a ``SparseVectorQuantizer`` (seed 001's argument names).
        patch: voxels per patch side (values per patch: ``patch ** 3``).
        grid: patches per grid side (64^3 voxels in patches of 4: 16).
        hidden: width of the sparse convolutions.
        blocks: residual blocks in the encoder and in the decoder (each block sees one more
            ring of neighbors: 2 blocks = 4 convolutions, a 9^3-patch receptive field).
        token_dim: width of the tokens the quantizer sees.
    """

    def __init__(
        self,
        quantizer: VectorQuantizer | SparseVectorQuantizer,
        *,
        patch: int = 4,
        grid: int = 16,
        hidden: int = 64,
        blocks: int = 2,
        token_dim: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (("patch", patch), ("grid", grid), ("hidden", hidden)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if blocks < 0:
            raise ValueError(f"blocks must be >= 0, got {blocks}")
        inner = quantizer.quantizer if isinstance(quantizer, SparseVectorQuantizer) else quantizer
        if getattr(inner, "channel_first", False):
            raise ValueError("the quantizer of a token list needs channel_first=False")
        if inner.dim != token_dim:
            raise ValueError(
                f"the quantizer's dim ({inner.dim}) must equal token_dim ({token_dim})"
            )
        self.patch, self.grid, self.token_dim = patch, grid, token_dim
        values = patch**3
        self.encoder = _Stack(values, hidden, token_dim, blocks)
        self.decoder = _Stack(token_dim, hidden, values, blocks)
        self.vq = quantizer

    @property
    def quantizer(self) -> VectorQuantizer:
        """The ``VectorQuantizer`` (inside a ``SparseVectorQuantizer`` when given one)."""
        vq = self.vq
        return vq.quantizer if isinstance(vq, SparseVectorQuantizer) else vq

    # ------------------------------------------------------------------------- pretrained
    pretrained_kind = "sdf_tokenizer"
    pretrained_quantizer_prefix = "vq."

    def pretrained_config(self) -> dict:
        """This model's config with the inner ``VectorQuantizer``'s, less what only training
        uses, as its quantizer."""
        config = to_config(self, type(self).__name__)
        quantizer = to_config(self.quantizer, "quantizer")
        config["init_args"]["quantizer"] = inference_quantizer_config(quantizer)
        return config

    def pretrained_state_dict(self) -> dict[str, Tensor]:
        inner = "vq.quantizer." if isinstance(self.vq, SparseVectorQuantizer) else "vq."
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith(inner):
                key = "vq." + key[len(inner) :]
                if is_training_state(key, "vq."):
                    continue
            elif key.startswith("vq."):
                continue  # the drop-in's own bookkeeping
            out[key] = value
        return out

    def pretrained_facts(self, **facts: Any) -> dict:
        """Patch and grid sizes, codebook shape and the sha256 of the saved weights."""
        out = {
            "patch": self.patch,
            "grid": self.grid,
            "token_dim": self.token_dim,
            "codebook_size": self.quantizer.codebook_size,
            "sha256": tokenizer_digest(self.pretrained_state_dict()),
        }
        out.update({k: v for k, v in facts.items() if v is not None})
        return out

    def neighbors(self, coords: Tensor) -> Tensor:
        return neighbor_table(coords, self.grid)

    def encode(self, values: Tensor, coords: Tensor, neighbors: Tensor | None = None) -> Tensor:
        """The continuous tokens (N, token_dim) of the patches."""
        self._check(values, coords)
        nb = self.neighbors(coords) if neighbors is None else neighbors
        return self.encoder(values, nb)

    def decode(self, tokens: Tensor, coords: Tensor, neighbors: Tensor | None = None) -> Tensor:
        """Normalized SDF values (N, patch^3) in [-1, 1] from (quantized) tokens."""
        nb = self.neighbors(coords) if neighbors is None else neighbors
        return torch.tanh(self.decoder(tokens, nb))

    def decode_indices(self, indices: Tensor, coords: Tensor) -> Tensor:
        """Normalized SDF values of the patches at ``coords`` from their code indices (N,)."""
        return self.decode(self.quantizer.decode(indices), coords)

    @torch.no_grad()
    def tokenize(self, values: Tensor, coords: Tensor) -> Tensor:
        """Code indices (N,) of the patches (the quantizer in eval mode: no maintenance)."""
        return self.quantizer.encode(self.encode(values, coords))

    def forward(
        self, values: Tensor, coords: Tensor, batch_size: int | None = None
    ) -> SparseSDFOutput:
        """Reconstruct the patches ``values`` (N, patch^3) at ``coords`` (N, 4)."""
        nb = self.neighbors(coords)
        z = self.encode(values, coords, nb)
        batch_index = coords[:, 0].long()
        if isinstance(self.vq, SparseVectorQuantizer):
            q = self.vq(z, batch_index, batch_size=batch_size)
            quantized, per_sample = q.quantized, q.per_sample
            used, perplexity = q.batch.used_codes, q.batch.perplexity
            out_losses, indices, loss, passthrough = q.losses, q.indices, q.loss, q.passthrough
        else:
            q = self.vq(z)
            quantized, used, perplexity = q.quantized, q.used_codes, q.perplexity
            out_losses, indices, loss, passthrough = q.losses, q.indices, q.loss, q.passthrough
            per_sample = sample_usage(
                indices, batch_index, self.quantizer.codebook_size, batch_size
            )
        return SparseSDFOutput(
            reconstructions=self.decode(quantized, coords, nb),
            indices=indices,
            vq_loss=loss,
            vq_losses=out_losses,
            used_codes=used,
            perplexity=perplexity,
            per_sample=per_sample,
            passthrough=passthrough,
        )

    def _check(self, values: Tensor, coords: Tensor) -> None:
        n = self.patch**3
        if values.dim() != 2 or values.shape[1] != n:
            raise ValueError(
                f"values must be (N, {n}) for patches of {self.patch}^3 voxels, got "
                f"{tuple(values.shape)}"
            )
        if coords.shape != (values.shape[0], 4):
            raise ValueError(
                f"coords must be ({values.shape[0]}, 4) = (sample, x, y, z), one per patch, "
                f"got {tuple(coords.shape)}"
            )
