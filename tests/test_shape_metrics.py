"""The sparse 3D example's shape tools against shapes whose answers are known: spheres (radius,
area, volume, distance between concentric ones) and boxes (hidden behind one another)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.evaluation.shapes import (
    chamfer_distance,
    mesh_comparison_picture,
    occupancy_iou,
    render_mesh,
    sample_surface,
    surface_mesh,
)

WHITE = (255, 255, 255)


def _centers(resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = -1 + (np.arange(resolution) + 0.5) * 2 / resolution
    return np.meshgrid(c, c, c, indexing="ij")


def sphere_sdf(resolution: int, radius: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    x, y, z = _centers(resolution)
    cx, cy, cz = center
    return np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) - radius


def box_sdf(resolution: int, half: float, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    x, y, z = _centers(resolution)
    d = [np.abs(p - c) - half for p, c in zip((x, y, z), center, strict=True)]
    return np.maximum(np.maximum(d[0], d[1]), d[2])


def merged(*meshes):
    vertices, faces, offset = [], [], 0
    for v, f in meshes:
        vertices.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(vertices), np.concatenate(faces)


@pytest.fixture(scope="module")
def sphere():
    return surface_mesh(sphere_sdf(64, 0.6))


def _object_mask(image: np.ndarray) -> np.ndarray:
    return (image != 255).any(axis=-1)


# --- surface_mesh -----------------------------------------------------------------------------


def test_sphere_mesh_lies_on_the_sphere_with_its_area(sphere):
    vertices, faces = sphere
    assert vertices.dtype == np.float32 and faces.dtype == np.int64
    assert vertices.shape[1] == 3 and faces.shape[1] == 3 and len(faces) > 1000
    voxel = 2 / 64
    assert np.abs(np.linalg.norm(vertices, axis=1) - 0.6).max() < 0.05 * voxel
    tri = vertices[faces].astype(np.float64)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    area = 0.5 * np.linalg.norm(cross, axis=1).sum()
    assert area == pytest.approx(4 * math.pi * 0.6**2, rel=0.02)
    # faces are wound with outward normals
    assert (np.einsum("ij,ij->i", cross, tri.mean(axis=1)) > 0).all()


def test_mesh_is_placed_in_world_coordinates():
    # an off-center sphere on a coarse grid: the mesh is centered where the sphere is
    vertices, _ = surface_mesh(sphere_sdf(32, 0.3, center=(0.4, -0.2, 0.1)))
    assert vertices.mean(axis=0) == pytest.approx([0.4, -0.2, 0.1], abs=0.01)


def test_normalized_grid_gives_the_same_surface(sphere):
    truncation = 3 * 2 / 64
    normalized = np.clip(sphere_sdf(64, 0.6) / truncation, -1, 1)
    vertices, faces = surface_mesh(normalized)
    assert np.array_equal(faces, sphere[1])
    np.testing.assert_allclose(vertices, sphere[0], atol=1e-5)


def test_surface_mesh_takes_tensors(sphere):
    vertices, faces = surface_mesh(torch.from_numpy(sphere_sdf(64, 0.6)))
    assert np.array_equal(vertices, sphere[0]) and np.array_equal(faces, sphere[1])


@pytest.mark.parametrize("value", [1.0, -1.0])
def test_grid_that_never_crosses_the_level_gives_an_empty_mesh(value):
    vertices, faces = surface_mesh(np.full((16, 16, 16), value))
    assert vertices.shape == (0, 3) and faces.shape == (0, 3)


def test_surface_mesh_rejects_non_cubic_grids():
    with pytest.raises(ValueError, match=r"\(R, R, R\).*\(8, 8, 4\)"):
        surface_mesh(np.zeros((8, 8, 4)))


# --- sample_surface ---------------------------------------------------------------------------


def test_samples_are_uniform_over_the_area(sphere):
    points = sample_surface(*sphere, 60_000, seed=3)
    assert points.shape == (60_000, 3)
    assert np.abs(np.linalg.norm(points, axis=1) - 0.6).max() < 0.05 * 2 / 64
    # Archimedes: on a sphere, area is uniform in height, so each slab holds 1/6 of the points
    # (marching-cubes triangles differ a lot in size: sampling triangles evenly would fail)
    counts = np.histogram(points[:, 2], bins=6, range=(-0.6, 0.6))[0] / len(points)
    assert counts == pytest.approx(np.full(6, 1 / 6), abs=0.01)


def test_samples_are_deterministic_for_a_seed(sphere):
    a = sample_surface(*sphere, 100, seed=7)
    assert np.array_equal(a, sample_surface(*sphere, 100, seed=7))
    assert not np.allclose(a, sample_surface(*sphere, 100, seed=8))


def test_empty_mesh_has_no_samples():
    assert sample_surface(np.zeros((0, 3)), np.zeros((0, 3), np.int64), 10).shape == (0, 3)


# --- chamfer_distance -------------------------------------------------------------------------


def test_chamfer_of_a_mesh_with_itself_is_zero(sphere):
    assert chamfer_distance(sphere, sphere) == 0.0


def test_chamfer_of_two_triangulations_of_one_sphere_is_the_sampling_floor(sphere):
    # different grids, one surface: only the sample spacing remains, ~0.5 * sqrt(area / n)
    coarse = surface_mesh(sphere_sdf(32, 0.6))
    floor = 0.5 * math.sqrt(4 * math.pi * 0.6**2 / 10_000)
    assert chamfer_distance(sphere, coarse) < 1.5 * floor


@pytest.mark.parametrize("gap", [0.1, 0.2])
def test_chamfer_of_concentric_spheres_is_their_gap(sphere, gap):
    outer = surface_mesh(sphere_sdf(64, 0.6 + gap))
    assert chamfer_distance(sphere, outer) == pytest.approx(gap, rel=0.1)
    assert chamfer_distance(outer, sphere) == pytest.approx(chamfer_distance(sphere, outer))


def test_chamfer_with_empty_meshes(sphere):
    empty = (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64))
    assert chamfer_distance(sphere, empty) == float("inf")
    assert chamfer_distance(empty, sphere) == float("inf")
    assert chamfer_distance(empty, empty) == 0.0


# --- occupancy_iou ----------------------------------------------------------------------------


def test_iou_of_concentric_spheres_is_their_volume_ratio():
    inner, outer = sphere_sdf(64, 0.5), sphere_sdf(64, 0.6)
    assert occupancy_iou(inner, outer) == pytest.approx((0.5 / 0.6) ** 3, rel=0.03)
    assert occupancy_iou(inner, inner) == 1.0
    # half the grid holds half of each sphere: the same ratio
    x = _centers(64)[0]
    assert occupancy_iou(inner, outer, mask=x > 0) == pytest.approx((0.5 / 0.6) ** 3, rel=0.03)


def test_iou_of_empty_occupancy():
    outside = np.ones((8, 8, 8))
    assert occupancy_iou(outside, outside) == 1.0
    assert occupancy_iou(outside, -outside) == 0.0
    # a mask that leaves out every occupied voxel
    nowhere = np.zeros((16, 16, 16), bool)
    assert occupancy_iou(sphere_sdf(16, 0.3), sphere_sdf(16, 0.4), mask=nowhere) == 1.0


def test_iou_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        occupancy_iou(np.ones((8, 8, 8)), np.ones((4, 4, 4)))


# --- render_mesh ------------------------------------------------------------------------------


def test_sphere_picture_is_centered_shaded_and_deterministic(sphere):
    image = render_mesh(*sphere)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    mask = _object_mask(image)
    ys, xs = np.nonzero(mask)
    assert (ys.mean(), xs.mean()) == pytest.approx((127.5, 127.5), abs=1.0)
    assert np.array_equal(image, render_mesh(*sphere))
    # shaded: many tones, lighter towards the light (upper left) than away from it
    gray = image.astype(np.float64).mean(axis=-1)
    assert len(np.unique(image[mask], axis=0)) > 50
    assert gray[mask].std() > 15
    upper_left = mask & (np.arange(256)[:, None] < 128) & (np.arange(256)[None, :] < 128)
    lower_right = mask & (np.arange(256)[:, None] >= 128) & (np.arange(256)[None, :] >= 128)
    assert gray[upper_left].mean() > gray[lower_right].mean() + 20


def test_meshes_of_one_grid_are_drawn_at_one_scale(sphere):
    # the view is the world cube's, not fitted to the mesh: half the radius, a quarter the area
    small = surface_mesh(sphere_sdf(64, 0.3))
    big_area = _object_mask(render_mesh(*sphere)).sum()
    assert _object_mask(render_mesh(*small)).sum() == pytest.approx(big_area / 4, rel=0.05)


def test_faces_behind_others_are_hidden():
    # at elevation 0 and azimuth 0 the camera looks down the z axis from +z
    view = {"elevation": 0.0, "azimuth": 0.0}
    big = surface_mesh(box_sdf(48, 0.5))
    behind = surface_mesh(sphere_sdf(48, 0.2, center=(0.0, 0.0, -0.75)))
    in_front = surface_mesh(sphere_sdf(48, 0.2, center=(0.0, 0.0, 0.75)))
    alone = render_mesh(*big, **view)
    for order in [(big, behind), (behind, big)]:
        assert np.array_equal(render_mesh(*merged(*order), **view), alone)
    for order in [(big, in_front), (in_front, big)]:
        changed = (render_mesh(*merged(*order), **view) != alone).any(axis=-1).sum()
        # about the sphere's disk: radius 0.2 of the 2.04 wide view over 256 pixels
        assert changed == pytest.approx(math.pi * (0.2 * 256 / 2.04) ** 2, rel=0.1)


def test_empty_mesh_renders_the_background():
    image = render_mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64), size=128)
    assert image.shape == (128, 128, 3)
    assert (image == 255).all(axis=-1).mean() > 0.95  # at most a faint "(empty)"
    assert image.min() > 150


# --- mesh_comparison_picture ------------------------------------------------------------------


def _frames(picture: np.ndarray, tile: int) -> tuple[list[int], list[int]]:
    """The rows and columns of the faint frames drawn around the tiles."""
    frame = (picture == 215).all(axis=-1)
    return list(np.flatnonzero(frame.sum(1) >= tile)), list(np.flatnonzero(frame.sum(0) >= tile))


def test_comparison_picture_sets_renderings_side_by_side(tmp_path, sphere):
    small = surface_mesh(sphere_sdf(32, 0.3))
    rows = [("sphere", sphere, small), ("small sphere", small, sphere)]
    notes = ["Chamfer 0.300, IoU 0.13", "Chamfer 0.300, IoU 0.13"]
    path = mesh_comparison_picture(
        rows, tmp_path / "shapes.png", title="held-out shapes", tile=128, notes=notes
    )
    assert path == tmp_path / "shapes.png"
    assert [p.name for p in tmp_path.iterdir()] == ["shapes.png"]  # no temporary left
    picture = np.asarray(Image.open(path).convert("RGB"))
    frame_rows, frame_columns = _frames(picture, 128)
    assert len(frame_rows) == 4 and len(frame_columns) == 4  # 2 rows x 2 columns of tiles
    tops, lefts = frame_rows[::2], frame_columns[::2]
    assert np.diff(frame_rows)[::2].tolist() == [127, 127]
    for r, (_, original, reconstruction) in enumerate(rows):
        for c, mesh in enumerate((original, reconstruction)):
            tile = picture[tops[r] : tops[r] + 128, lefts[c] : lefts[c] + 128]
            assert np.array_equal(tile[1:-1, 1:-1], render_mesh(*mesh, size=128)[1:-1, 1:-1])
    ink = picture.max(axis=-1) < 100
    assert ink[: tops[0]].any()  # title and column names
    for top in tops:  # each row's name and note, left of its tiles
        assert ink[top : top + 128, : lefts[0]].sum() > 50


def test_comparison_picture_grows_by_one_tile_a_row(tmp_path, sphere):
    one = mesh_comparison_picture([("a", sphere, sphere)], tmp_path / "1.png", title="t")
    two = mesh_comparison_picture(
        [("a", sphere, sphere), ("a", sphere, sphere)], tmp_path / "2.png", title="t"
    )
    w1, h1 = Image.open(one).size
    w2, h2 = Image.open(two).size
    assert w1 == w2 and w1 > 2 * 192 and h2 - h1 == 192 + 2


def test_comparison_picture_rejects_bad_arguments(tmp_path, sphere):
    rows = [("a", sphere, sphere)]
    with pytest.raises(ValueError, match="tile must be >= 128 pixels, got 64"):
        mesh_comparison_picture(rows, tmp_path / "x.png", title="t", tile=64)
    with pytest.raises(ValueError, match="2 notes for 1 rows"):
        mesh_comparison_picture(rows, tmp_path / "x.png", title="t", notes=["a", "b"])
    assert not (tmp_path / "x.png").exists()


def test_missing_optional_dependencies_name_the_extra(monkeypatch, sphere):
    monkeypatch.setitem(sys.modules, "skimage.measure", None)
    monkeypatch.setitem(sys.modules, "scipy.spatial", None)
    with pytest.raises(ImportError, match=r"pip install 'vqkit\[sparse3d\]'"):
        surface_mesh(sphere_sdf(16, 0.5))
    with pytest.raises(ImportError, match=r"pip install 'vqkit\[sparse3d\]'"):
        chamfer_distance(sphere, sphere)
