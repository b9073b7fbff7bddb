"""A GPT over a tokenizer's code grid (seed 004, phase 3): an autoregressive prior that
predicts each code of the raster-ordered (h, w) grid from the codes before it.

Decoder-only, pre-LayerNorm blocks (GPT-2 / taming's ``GPT``), a learned start token and learned
positions, ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels on a GPU).
Sampling keeps a key/value cache, so a grid of L codes costs L single-token steps instead of L
forwards over the growing sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..configurable import Configurable

KVCache = list[tuple[Tensor, Tensor]]


class _Attention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None):  # noqa: ANN201
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, c // self.n_head).permute(2, 0, 3, 1, 4)
        # Without a cache queries and keys are the same positions: causal. With one (sampling),
        # x is the one newest position, which attends to every cached key and itself.
        if cache is not None:
            if t != 1:
                raise ValueError(f"a cached step takes one position, got {t}")
            k = torch.cat([cache[0], k], dim=2)
            v = torch.cat([cache[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=cache is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, c)))
        return y, (k, v)


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = _Attention(n_embd, n_head, dropout)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, cache: tuple[Tensor, Tensor] | None = None):  # noqa: ANN201
        a, kv = self.attn(self.ln1(x), cache)
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


class CodeTransformer(Configurable, nn.Module):
    """Autoregressive prior over (h, w) grids of codes in [0, codebook_size).

    Args:
        codebook_size: K, the tokenizer's codebook size (the vocabulary; one more embedding
            row is the start token).
        grid: (h, w) of the token grid (16x16 for seed 004's 256 px tokenizer).
        n_layer, n_head, n_embd: depth, heads and width (n_embd divisible by n_head).
        dropout: on attention weights, residual branches and embeddings during training.
    """

    def __init__(
        self,
        codebook_size: int,
        grid: tuple[int, int] | list[int],
        n_layer: int = 8,
        n_head: int = 8,
        n_embd: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        grid = tuple(int(g) for g in grid)
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be two positive sizes (h, w), got {grid}")
        if n_layer < 1 or n_head < 1 or n_embd < 1 or n_embd % n_head:
            raise ValueError(
                f"need n_layer, n_head >= 1 and n_embd divisible by n_head, got n_layer "
                f"{n_layer}, n_head {n_head}, n_embd {n_embd}"
            )
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.codebook_size = codebook_size
        self.grid = grid
        # the constructor arguments: a prior checkpoint rebuilds this module from them alone
        self.config = {
            "codebook_size": codebook_size,
            "grid": list(grid),
            "n_layer": n_layer,
            "n_head": n_head,
            "n_embd": n_embd,
            "dropout": dropout,
        }
        self.block_size = grid[0] * grid[1]
        self.tok_emb = nn.Embedding(codebook_size + 1, n_embd)  # row K: the start token
        self.pos_emb = nn.Parameter(torch.zeros(1, self.block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, codebook_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: scaled init of the residual outputs
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
        nn.init.normal_(self.pos_emb, std=0.02)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------ forward
    def _flat(self, tokens: Tensor) -> Tensor:
        if tokens.dim() == 3:
            if tuple(tokens.shape[1:]) != self.grid:
                raise ValueError(f"code grids must be {self.grid}, got {tuple(tokens.shape[1:])}")
            tokens = tokens.flatten(1)
        if tokens.dim() != 2 or tokens.shape[1] > self.block_size:
            raise ValueError(
                f"tokens must be (B, h, w) grids or (B, L <= {self.block_size}) sequences, got "
                f"shape {tuple(tokens.shape)}"
            )
        return tokens.long()

    def _run(self, inp: Tensor, start: int, cache: KVCache | None) -> tuple[Tensor, KVCache]:
        t = inp.shape[1]
        h = self.drop(self.tok_emb(inp) + self.pos_emb[:, start : start + t])
        new_cache: KVCache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, cache[i] if cache is not None else None)
            new_cache.append(kv)
        return self.head(self.ln_f(h)), new_cache

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits (B, L, K) of every position given the codes before it (teacher forcing):
        position i sees the start token and codes 0..i-1 of ``tokens`` ((B, h, w) or (B, L))."""
        x = self._flat(tokens)
        start = torch.full_like(x[:, :1], self.codebook_size)
        return self._run(torch.cat([start, x[:, :-1]], dim=1), 0, None)[0]

    def nll(self, tokens: Tensor) -> Tensor:
        """Mean negative log-likelihood per code, in nats (the training loss)."""
        x = self._flat(tokens)
        if int(x.min()) < 0 or int(x.max()) >= self.codebook_size:
            raise ValueError(
                f"codes must be in [0, {self.codebook_size}), got [{int(x.min())}, {int(x.max())}]"
            )
        logits = self.forward(x)
        return F.cross_entropy(logits.float().flatten(0, 1), x.flatten())

    # ----------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        num: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        prefix: Tensor | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """(num, h, w) code grids sampled position by position.

        ``prefix``: (num, P) codes that every grid starts with (raster order; e.g. the top rows
        of real images' codes, completed by the prior). ``temperature`` divides the logits;
        ``top_k`` keeps the k likeliest codes (all of them when k >= K), ``top_p`` the
        smallest set whose probability reaches p. ``generator`` must live on the model's
        device. ``use_cache=False``
        recomputes the whole prefix at every step (nanoGPT's ``generate``): same
        distribution, for checking and benchmarks.
        """
        if num < 1:
            raise ValueError(f"num must be >= 1, got {num}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")  # above K: no filtering
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        device = self.pos_emb.device
        seq = torch.full((num, 1), self.codebook_size, dtype=torch.long, device=device)
        if prefix is not None:
            prefix = prefix.to(device, torch.long).reshape(num, -1)
            if prefix.shape[1] > self.block_size:
                raise ValueError(f"prefix has {prefix.shape[1]} codes, the grid {self.block_size}")
            seq = torch.cat([seq, prefix], dim=1)
        was_training = self.training
        self.eval()
        cache: KVCache | None = None
        try:
            while seq.shape[1] <= self.block_size:
                if use_cache:
                    if cache is None:
                        logits, cache = self._run(seq, 0, None)
                    else:
                        logits, cache = self._run(seq[:, -1:], seq.shape[1] - 1, cache)
                else:
                    logits = self._run(seq, 0, None)[0]
                nxt = sample_logits(
                    logits[:, -1].float(), temperature, top_k, top_p, generator=generator
                )
                seq = torch.cat([seq, nxt[:, None]], dim=1)
        finally:
            self.train(was_training)
        return seq[:, 1:].view(num, *self.grid)


def sample_logits(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One draw per row of (B, K) logits after temperature, top-k and nucleus (top-p)
    filtering."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a code when the codes before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
