"""Pictures of a ``UsageReport`` (matplotlib, Agg backend; no sklearn, no torchvision)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .analyze import UsageReport

PLOT_FILES = (
    "rank_frequency.png",
    "usage_histogram.png",
    "distinct_codes_per_position.png",
    "codebook_pca.png",
    "examples.png",
)


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    import io

    from ..fileio import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, dpi=100, format=Path(path).suffix.lstrip(".") or "png")
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def pca_2d(x: Tensor) -> Tensor:
    """(K, D) rows -> (K, 2) coordinates on the first two principal axes (SVD of the centred
    rows; a 1-D code space gets a zero second axis)."""
    x = x.double() - x.double().mean(0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:
        coords = torch.cat([coords, coords.new_zeros(coords.shape[0], 2 - coords.shape[1])], 1)
    return coords.float()


def plot_rank_frequency(report: UsageReport, path: Path) -> Path:
    plt = _plt()
    c = torch.sort(report.counts.double(), descending=True).values
    used = int((c > 0).sum())
    fig, ax = plt.subplots(figsize=(5.5, 4))
    if used:
        ax.loglog(range(1, used + 1), c[:used].numpy(), marker=".", markersize=3)
    uniform = report.tokens / report.codebook_size
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform use")
    ax.set_xlabel("code rank")
    ax.set_ylabel("tokens")
    ax.set_title(f"rank-frequency: {used}/{report.codebook_size} codes used")
    ax.legend()
    return _save(fig, path)


def plot_usage_histogram(report: UsageReport, path: Path) -> Path:
    plt = _plt()
    c = report.counts.numpy()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.hist(c, bins=min(50, max(int(c.max()) + 1, 1)), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("tokens assigned to a code")
    ax.set_ylabel("codes")
    dead = report.whole_set.dead_codes
    ax.set_title(f"usage histogram ({dead} dead of {report.codebook_size})")
    return _save(fig, path)


def plot_distinct_per_position(report: UsageReport, path: Path) -> Path:
    plt = _plt()
    m = report.distinct_codes_per_position
    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(m.numpy(), cmap="viridis")
    if m.numel() <= 256:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, label="distinct codes")
    ax.set_title("distinct codes per token position")
    ax.set_xlabel("token column")
    ax.set_ylabel("token row")
    return _save(fig, path)


def plot_codebook_pca(report: UsageReport, path: Path) -> Path:
    plt = _plt()
    xy = pca_2d(report.codebook).numpy()
    c = report.counts.numpy()
    used = c > 0
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    sc = ax.scatter(xy[used, 0], xy[used, 1], c=c[used], cmap="viridis", s=14, norm="log")
    # drawn last, so dead codes in the middle of the cloud stay visible
    n_dead = int((~used).sum())
    ax.scatter(
        xy[~used, 0], xy[~used, 1], c="crimson", marker="x", s=18, label=f"unused ({n_dead})"
    )
    if used.any():
        fig.colorbar(sc, ax=ax, label="tokens (log)")
    ax.set_title("codebook, first two principal axes")
    ax.legend(loc="best")
    return _save(fig, path)


def plot_examples(report: UsageReport, path: Path) -> Path:
    """Each kept image (top), its token map coloured by code index (middle) and its
    reconstruction (bottom)."""
    plt = _plt()
    ex = report.examples
    if not ex:
        raise ValueError("the report kept no examples (analyze(..., num_examples=0))")
    n = ex["images"].shape[0]
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)

    def rgb(t: Tensor):  # noqa: ANN202
        return ((t.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()

    for i in range(n):
        axes[0, i].imshow(rgb(ex["images"][i]))
        # index mod 20 in a 20-colour map: neighbouring tokens with different codes differ.
        axes[1, i].imshow((ex["indices"][i] % 20).numpy(), cmap="tab20", vmin=0, vmax=19)
        axes[2, i].imshow(rgb(ex["reconstructions"][i]))
        for r in range(3):
            axes[r, i].set_xticks([])
            axes[r, i].set_yticks([])
    for r, label in enumerate(("image", "tokens", "reconstruction")):
        axes[r, 0].set_ylabel(label)
    return _save(fig, path)


def save_report_plots(report: UsageReport, output_dir: str | Path) -> list[Path]:
    """Write every picture of ``PLOT_FILES`` into ``output_dir``; returns their paths."""
    out = Path(output_dir)
    fns = (
        plot_rank_frequency,
        plot_usage_histogram,
        plot_distinct_per_position,
        plot_codebook_pca,
        plot_examples,
    )
    return [fn(report, out / name) for fn, name in zip(fns, PLOT_FILES, strict=True)]
