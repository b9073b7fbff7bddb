"""Meshes, metrics and pictures for the sparse 3D SDF example: marching cubes of a dense SDF
grid, Chamfer distance and occupancy IoU between shapes, and shaded renderings laid out as a
labelled PNG (originals beside their reconstructions).

Conventions. A dense SDF grid is an (R, R, R) float array indexed ``[x, y, z]`` whose voxel
centers lie in the world cube [-1, 1]^3 at ``-1 + (i + 0.5) * 2 / R``; negative is inside, and
level 0 is the surface whether the grid holds distances or ``sdf / truncation`` clipped to
[-1, 1]. A mesh is a tuple ``(vertices (V, 3) float32 world coordinates, faces (F, 3) int64)``.
Pictures look at the world cube with ``y`` up.

Needs numpy and Pillow; marching cubes (scikit-image) and nearest-point queries (scipy) are
imported when first used: ``pip install 'vqkit[sparse3d]'``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import atomic_write_bytes
from .visual import _INK, _MARGIN, MIN_TILE, _font, _text_size

Mesh = tuple[np.ndarray, np.ndarray]

_INSTALL = "pip install 'vqkit[sparse3d]'"
# Flat Lambert shading: a light fixed to the camera (above, left, in front) plus ambient, so
# every visible face gets some light and faces at different angles get different shades.
_LIGHT = np.array([-0.45, 0.65, 1.0]) / np.linalg.norm([-0.45, 0.65, 1.0])
_AMBIENT = 0.3
_DIFFUSE = 0.7
# Pictures are rasterized at this many times their size, then averaged down: smooth edges.
_SUPERSAMPLE = 2
# Candidate (triangle, pixel) pairs held at once while rasterizing: bounds the memory.
_CHUNK = 1 << 21


def _numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """An array from a numpy array, a list or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=dtype)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed for vqkit's 3D shape tools: {_INSTALL}") from e


def _mesh(vertices: Any, faces: Any) -> Mesh:
    v = _numpy(vertices, np.float64)
    f = _numpy(faces, np.int64)
    if v.size == 0:
        v = v.reshape(0, 3)
    if f.size == 0:
        f = f.reshape(0, 3)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {f.shape}")
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError(f"faces index vertices 0..{len(v) - 1}, got indices {f.min()}..{f.max()}")
    return v, f


def _sdf_grid(sdf: Any, name: str = "sdf") -> np.ndarray:
    grid = _numpy(sdf, np.float64)
    if grid.ndim != 3 or len(set(grid.shape)) != 1:
        raise ValueError(f"{name} must be a cubic grid (R, R, R), got shape {grid.shape}")
    return grid


def surface_mesh(sdf: np.ndarray, level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The ``level`` surface of an (R, R, R) SDF grid by marching cubes, in world coordinates
    (spacing 2 / R, the first voxel center at -1 + 1 / R): ``(vertices (V, 3) float32,
    faces (F, 3) int64)``, faces wound so that their normals point outward (to positive SDF),
    degenerate triangles dropped. A grid that never crosses the level (all inside, all outside,
    or not finite anywhere it would) gives an empty mesh, shapes (0, 3) and (0, 3)."""
    grid = _sdf_grid(sdf)
    empty = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    finite = grid[np.isfinite(grid)]
    if finite.size == 0 or not (finite.min() < level < finite.max()):
        return empty
    measure = _require("skimage.measure")
    r = grid.shape[0]
    h = 2.0 / r
    # Non-finite values (a missing region) count as far outside.
    grid = np.where(np.isfinite(grid), grid, finite.max())
    vertices, faces, _, _ = measure.marching_cubes(
        grid, level=level, spacing=(h, h, h), allow_degenerate=False
    )
    vertices = (vertices + (-1.0 + h / 2)).astype(np.float32)
    return vertices, faces.astype(np.int64)


def _face_areas(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    tri = v[f]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def sample_surface(vertices: Any, faces: Any, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points (n, 3) float64 drawn uniformly from the surface of a mesh: triangles
    chosen in proportion to their area, points uniform within them. The same mesh and seed
    give the same points; an empty mesh gives (0, 3)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    v, f = _mesh(vertices, faces)
    if len(f) == 0:
        return np.zeros((0, 3))
    rng = np.random.default_rng(seed)
    areas = _face_areas(v, f)
    cdf = np.cumsum(areas if areas.sum() > 0 else np.ones_like(areas))
    picked = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(0, len(f) - 1)
    u, w = rng.random((2, n))
    # (u, w) uniform on the unit square, folded onto the triangle u + w <= 1
    fold = u + w > 1
    u[fold], w[fold] = 1 - u[fold], 1 - w[fold]
    tri = v[f[picked]]
    return tri[:, 0] + u[:, None] * (tri[:, 1] - tri[:, 0]) + w[:, None] * (tri[:, 2] - tri[:, 0])


def chamfer_distance(a: Mesh, b: Mesh, n_points: int = 10_000, seed: int = 0) -> float:
    """Symmetric Chamfer distance between two meshes, in world units:
    ``0.5 * (mean_a->b + mean_b->a)``, where ``mean_a->b`` is the mean Euclidean distance
    (not squared: an L1-style mean, comparable to the voxel size) from each of ``n_points``
    samples of ``a``'s surface to the nearest of ``n_points`` samples of ``b``'s.

    Both meshes are sampled with the same ``seed``, so a mesh against itself gives exactly 0.
    Two different triangulations of one surface give a small floor from the sampling, about
    ``0.5 * sqrt(area / n_points)`` (0.009 for a sphere of radius 0.5 at 10,000 points);
    surfaces ``d`` apart give about ``d`` above that. One empty mesh and one not: ``inf``;
    both empty: 0.0."""
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    pa = sample_surface(*a, n_points, seed=seed)
    pb = sample_surface(*b, n_points, seed=seed)
    if len(pa) == 0 or len(pb) == 0:
        return 0.0 if len(pa) == len(pb) else float("inf")
    spatial = _require("scipy.spatial")
    a_to_b = spatial.cKDTree(pb).query(pa, workers=-1)[0].mean()
    b_to_a = spatial.cKDTree(pa).query(pb, workers=-1)[0].mean()
    return float(0.5 * (a_to_b + b_to_a))


def occupancy_iou(sdf_a: np.ndarray, sdf_b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Intersection over union of the occupied voxels (``sdf < 0``) of two grids of one
    shape, counting only the voxels where ``mask`` is true (all when None). 1.0 when neither
    grid occupies any counted voxel."""
    a, b = _numpy(sdf_a), _numpy(sdf_b)
    if a.shape != b.shape:
        raise ValueError(f"the grids must have one shape, got {a.shape} and {b.shape}")
    inside_a, inside_b = a < 0, b < 0
    if mask is not None:
        m = _numpy(mask, bool)
        if m.shape != a.shape:
            raise ValueError(f"mask must have the grids' shape {a.shape}, got {m.shape}")
        inside_a, inside_b = inside_a & m, inside_b & m
    union = int(np.count_nonzero(inside_a | inside_b))
    if union == 0:
        return 1.0
    return float(np.count_nonzero(inside_a & inside_b) / union)


def _camera(elevation: float, azimuth: float) -> tuple[np.ndarray, float]:
    """Rows (right, up, toward the viewer) of the view rotation, and the half-width of the
    picture in world units: the projected world cube's, whatever the mesh, so every mesh seen
    from one angle is drawn at the same scale and place. Azimuth turns the camera about the
    y axis from +z towards +x, elevation raises it above the x-z plane (degrees)."""
    e, a = math.radians(elevation), math.radians(azimuth)
    toward = np.array([math.sin(a) * math.cos(e), math.sin(e), math.cos(a) * math.cos(e)])
    right = np.array([math.cos(a), 0.0, -math.sin(a)])
    up = np.cross(toward, right)
    rotation = np.stack([right, up, toward])
    corners = np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
    half = 1.02 * np.abs(corners @ rotation[:2].T).max()
    return rotation, float(half)


def _rasterize(screen: np.ndarray, depth: np.ndarray, size: int) -> np.ndarray:
    """Which triangle covers each pixel center of a ``size`` x ``size`` picture (flattened,
    -1 where none): a z-buffer over triangles (F, 3, 2) in pixel coordinates (x right, y down)
    with per-vertex ``depth`` (F, 3), larger nearer. Ties go to the lower triangle index."""
    x, y = screen[..., 0], screen[..., 1]
    x0, x1, x2 = x.T
    y0, y1, y2 = y.T
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
    keep = np.flatnonzero(np.abs(area) > 1e-12)
    # barycentric weights of vertices 0 and 1, and the depth, as linear functions of (px, py)
    inv = np.zeros_like(area)
    inv[keep] = 1.0 / area[keep]
    a0, b0 = -(y2 - y1) * inv, (x2 - x1) * inv
    c0 = -(a0 * x1 + b0 * y1)
    a1, b1 = -(y0 - y2) * inv, (x0 - x2) * inv
    c1 = -(a1 * x2 + b1 * y2)
    z0, z1, z2 = depth.T
    az, bz = a0 * (z0 - z2) + a1 * (z1 - z2), b0 * (z0 - z2) + b1 * (z1 - z2)
    cz = c0 * (z0 - z2) + c1 * (z1 - z2) + z2
    # pixel centers (i + 0.5) inside each triangle's bounding box
    xmin = np.ceil(x.min(1) - 0.5).clip(0, size).astype(np.int64)
    xmax = np.floor(x.max(1) - 0.5).clip(-1, size - 1).astype(np.int64)
    ymin = np.ceil(y.min(1) - 0.5).clip(0, size).astype(np.int64)
    ymax = np.floor(y.max(1) - 0.5).clip(-1, size - 1).astype(np.int64)
    width = (xmax - xmin + 1).clip(0)
    counts = width * (ymax - ymin + 1).clip(0)
    keep = keep[counts[keep] > 0]

    zbuf = np.full(size * size, -np.inf)
    ids = np.full(size * size, -1, np.int64)
    eps = 1e-9
    cum = np.cumsum(counts[keep])
    start = 0
    while start < len(keep):
        limit = (cum[start - 1] if start else 0) + _CHUNK
        stop = max(start + 1, int(np.searchsorted(cum, limit, side="right")))
        tris = keep[start:stop]
        start = stop
        c = counts[tris]
        tri = np.repeat(tris, c)
        offset = np.arange(len(tri)) - np.repeat(np.cumsum(c) - c, c)
        px = xmin[tri] + offset % width[tri]
        py = ymin[tri] + offset // width[tri]
        fx, fy = px + 0.5, py + 0.5
        w0 = a0[tri] * fx + b0[tri] * fy + c0[tri]
        w1 = a1[tri] * fx + b1[tri] * fy + c1[tri]
        inside = (w0 >= -eps) & (w1 >= -eps) & (w0 + w1 <= 1 + eps)
        tri, fx, fy = tri[inside], fx[inside], fy[inside]
        pix = (py[inside] * size + px[inside]).astype(np.int64)
        z = az[tri] * fx + bz[tri] * fy + cz[tri]
        # nearest first within each pixel; lexsort is stable, so equal depths keep index order
        order = np.lexsort((-z, pix))
        pix, z, tri = pix[order], z[order], tri[order]
        first = np.ones(len(pix), bool)
        first[1:] = pix[1:] != pix[:-1]
        pix, z, tri = pix[first], z[first], tri[first]
        nearer = z > zbuf[pix]
        zbuf[pix[nearer]] = z[nearer]
        ids[pix[nearer]] = tri[nearer]
    return ids


def render_mesh(
    vertices: Any,
    faces: Any,
    size: int = 256,
    *,
    elevation: float = 25.0,
    azimuth: float = 35.0,
    color: Sequence[float] = (0.55, 0.7, 0.9),
    background: Sequence[float] = (1, 1, 1),
) -> np.ndarray:
    """A (size, size, 3) uint8 picture of a mesh: an orthographic view of the world cube
    [-1, 1]^3 (``y`` up; see ``_camera`` for the angles, in degrees), so meshes of one grid
    are drawn at one scale and place. Flat Lambert shading of each face (both sides lit) by a
    light fixed to the camera plus ambient light, hidden faces removed by a z-buffer, edges
    smoothed by rendering at twice the size; the same input gives the same bytes. ``color``
    and ``background`` are RGB in [0, 1]. An empty mesh gives the background with a faint
    "(empty)"."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    v, f = _mesh(vertices, faces)
    fg = np.asarray(color, np.float64).reshape(3)
    bg = np.asarray(background, np.float64).reshape(3)
    if len(f) == 0:
        return _empty_picture(size, bg)
    rotation, half = _camera(elevation, azimuth)
    cam = v @ rotation.T
    tri = cam[f]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, length, out=np.zeros_like(normals), where=length > 0)
    normals *= np.where(normals[:, 2:] < 0, -1.0, 1.0)  # light the side facing the camera
    shade = _AMBIENT + _DIFFUSE * np.clip(normals @ _LIGHT, 0, None)
    colors = np.clip(shade[:, None] * fg, 0, 1)

    big = size * _SUPERSAMPLE
    scale = big / (2 * half)
    screen = np.stack([(tri[..., 0] + half) * scale, (half - tri[..., 1]) * scale], axis=-1)
    ids = _rasterize(screen, tri[..., 2], big)
    pixels = np.where(ids[:, None] >= 0, colors[ids.clip(0)], bg)
    pixels = pixels.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(pixels * 255).clip(0, 255).astype(np.uint8)


def _empty_picture(size: int, background: np.ndarray) -> np.ndarray:
    from PIL import Image, ImageDraw

    bg = tuple(int(c) for c in np.round(background.clip(0, 1) * 255))
    image = Image.new("RGB", (size, size), bg)
    font = _font(max(10, size // 12))
    text = "(empty)"
    w, h = _text_size(font, text)
    if w < size and h < size:
        # a faint mark: a third of the way from the background to gray
        ink = tuple(round(c + (128 - c) / 3) for c in bg)
        left, top, _, _ = font.getbbox(text)
        ImageDraw.Draw(image).text(
            ((size - w) // 2 - left, (size - h) // 2 - top), text, fill=ink, font=font
        )
    return np.asarray(image).copy()


def mesh_comparison_picture(
    rows: list[tuple[str, Mesh, Mesh]],
    path: str | Path,
    *,
    title: str,
    tile: int = 192,
    columns: tuple[str, str] = ("original", "reconstruction"),
    notes: list[str] | None = None,
) -> Path:
    """Write :func:`mesh_comparison_image` as a PNG, whole or not at all; returns the path."""
    image = mesh_comparison_image(rows, title=title, tile=tile, columns=columns, notes=notes)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def mesh_comparison_image(
    rows: list[tuple[str, Mesh, Mesh]],
    *,
    title: str,
    tile: int = 192,
    columns: tuple[str, str] = ("original", "reconstruction"),
    notes: list[str] | None = None,
) -> np.ndarray:
    """A picture (H, W, 3) uint8 that sets each shape beside its reconstruction: one row per
    ``(name, mesh, reconstruction)`` labelled on the left with its name and, in smaller
    letters under it, ``notes[i]`` (e.g. "Chamfer 0.012, IoU 0.93"); two columns of
    ``render_mesh`` pictures of ``tile`` pixels a side, headed by ``columns``; ``title`` on
    top."""
    if not rows:
        raise ValueError("mesh_comparison_picture needs at least one row")
    if notes is not None and len(notes) != len(rows):
        raise ValueError(f"got {len(notes)} notes for {len(rows)} rows")
    if tile < MIN_TILE:
        raise ValueError(f"tile must be >= {MIN_TILE} pixels, got {tile}")
    if len(columns) != 2:
        raise ValueError(f"columns must name the two columns, got {columns!r}")
    from PIL import Image, ImageDraw

    pad = 2
    size = max(12, min(24, tile // 8))
    font, small = _font(size), _font(max(10, round(size * 0.75)))
    line = max(_text_size(font, "Ag|")[1], size)
    small_line = max(_text_size(small, "Ag|")[1], round(size * 0.75))
    note_lines = [(notes[i] if notes else "").splitlines() for i in range(len(rows))]
    label_width = max(
        max(_text_size(font, name)[0] for name, _, _ in rows),
        max((_text_size(small, s)[0] for lines in note_lines for s in lines), default=0),
    )
    label_width += 2 * _MARGIN
    title_height = line + 2 * _MARGIN
    header_height = line + _MARGIN
    width = max(label_width + pad + 2 * (tile + pad), _text_size(font, title)[0] + 2 * _MARGIN)
    height = title_height + header_height + pad + len(rows) * (tile + pad)

    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    def text(s: str, x: int, y_mid: int, f: Any = font, centered: bool = False) -> None:
        # placed by bounding boxes, not an anchor: Pillow's bitmap fallback font has none.
        # Vertically by a line's box, not the text's, so side-by-side texts share a baseline.
        left, _, right, _ = f.getbbox(s)
        _, top, _, bottom = f.getbbox("Ag|")
        if centered:
            x -= (right - left) // 2
        draw.text((x - left, y_mid - (top + bottom) // 2), s, fill=_INK, font=f)

    text(title, _MARGIN, title_height // 2)
    for c, name in enumerate(columns):
        x = label_width + pad + c * (tile + pad) + tile // 2
        text(name, x, title_height + header_height // 2, centered=True)
    for r, (name, original, reconstruction) in enumerate(rows):
        y = title_height + header_height + pad + r * (tile + pad)
        lines = note_lines[r]
        block = line + len(lines) * (small_line + _MARGIN // 2)
        top = y + (tile - block) // 2
        text(name, _MARGIN, top + line // 2)
        for i, s in enumerate(lines):
            text(
                s,
                _MARGIN,
                top + line + _MARGIN // 2 + i * (small_line + _MARGIN // 2) + small_line // 2,
                small,
            )
        for c, mesh in enumerate((original, reconstruction)):
            x = label_width + pad + c * (tile + pad)
            image.paste(Image.fromarray(render_mesh(*mesh, size=tile)), (x, y))
            # a faint frame: the renderings' white background would melt into the page
            draw.rectangle((x, y, x + tile - 1, y + tile - 1), outline=(215, 215, 215))
    return np.asarray(image.convert("RGB")).copy()
