"""vqkit.data.shapes: procedural and mesh SDFs, patches, shape sets, the npm meshes (offline)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import stat
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from vqkit.cli.data import _data_main
from vqkit.data import shapes
from vqkit.data.shapes import (
    HELD_OUT_MESHES,
    VAL_START,
    NpmMesh,
    ShapeSet,
    fetch_mesh,
    from_patches,
    mesh_sdf,
    mesh_shape_set,
    parse_mesh_js,
    procedural_sdf,
    procedural_shape_set,
    to_patches,
    voxel_centers,
)

# --------------------------------------------------------------------------------------------
# helpers


def grid_points(R: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = voxel_centers(R).astype(np.float64)
    return np.meshgrid(c, c, c, indexing="ij")


def box_sdf(x, y, z, half: float) -> np.ndarray:
    q = np.stack([np.abs(x) - half, np.abs(y) - half, np.abs(z) - half])
    outside = np.sqrt((np.maximum(q, 0) ** 2).sum(0))
    return outside + np.minimum(q.max(0), 0)


def cube_mesh() -> tuple[np.ndarray, np.ndarray]:
    """The cube [-1, 1]^3 as 12 outward-wound triangles (the first two are its -z face)."""
    v = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=float)
    quads = [(0, 2, 6, 4), (1, 5, 7, 3), (0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6)]
    faces = []
    for a, b, c, d in quads:
        faces += [(a, b, c), (a, c, d)]
    return v, np.array(faces, dtype=np.int64)


def icosphere(levels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    t = (1 + 5**0.5) / 2
    v = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t)]
    v += [(0, -1, -t), (0, 1, -t), (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    verts = [np.array(p, dtype=float) / np.linalg.norm(p) for p in v]
    faces = [(0, 11, 5), (0, 5, 1), (0, 1, 7), (0, 7, 10), (0, 10, 11), (1, 5, 9), (5, 11, 4)]
    faces += [(11, 10, 2), (10, 7, 6), (7, 1, 8), (3, 9, 4), (3, 4, 2), (3, 2, 6), (3, 6, 8)]
    faces += [(3, 8, 9), (4, 9, 5), (2, 4, 11), (6, 2, 10), (8, 6, 7), (9, 8, 1)]

    def mid(a: int, b: int, cache: dict[tuple[int, int], int]) -> int:
        key = (min(a, b), max(a, b))
        if key not in cache:
            m = verts[a] + verts[b]
            verts.append(m / np.linalg.norm(m))
            cache[key] = len(verts) - 1
        return cache[key]

    for _ in range(levels):
        cache: dict[tuple[int, int], int] = {}
        new = []
        for a, b, c in faces:
            ab, bc, ca = mid(a, b, cache), mid(b, c, cache), mid(c, a, cache)
            new += [(a, ab, ca), (b, bc, ab), (c, ca, bc), (ab, bc, ca)]
        faces = new
    return np.array(verts), np.array(faces, dtype=np.int64)


# --------------------------------------------------------------------------------------------
# procedural shapes


def test_procedural_sdf_is_deterministic_and_seed_dependent():
    a, b = procedural_sdf(7), procedural_sdf(7)
    assert a.dtype == np.float32 and a.shape == (64, 64, 64)
    assert a.tobytes() == b.tobytes()
    assert procedural_sdf(8).tobytes() != a.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5, VAL_START])
def test_procedural_shapes_are_inside_the_box_and_not_degenerate(seed):
    sdf = procedural_sdf(seed, 48)
    x, y, z = grid_points(48)
    inside = sdf < 0
    assert 0.002 < inside.mean() < 0.9
    reach = np.abs(np.stack([x, y, z]))[:, inside].max()
    assert 0.75 < reach < 0.95  # fitted to about [-0.85, 0.85]^3
    corners = sdf[[0, -1]][:, [0, -1]][:, :, [0, -1]]
    assert (corners > 0).all()  # the cube's corners are outside
    coords, _, _ = to_patches(sdf)
    assert len(coords) > 50


def test_procedural_sdf_is_a_distance_outside():
    # unions of exact SDFs stay exact outside: |grad| ~ 1 just outside the surface
    R = 64
    sdf = procedural_sdf(3, R).astype(np.float64)
    g = np.gradient(sdf, 2 / R)
    norm = np.sqrt(sum(gi**2 for gi in g))
    band = (sdf > 0.5 * 2 / R) & (sdf < 2 * 2 / R)
    assert np.median(norm[band]) == pytest.approx(1.0, abs=0.05)
    assert np.mean(np.abs(norm[band] - 1) < 0.2) > 0.85


def test_procedural_sdf_validates_resolution():
    with pytest.raises(ValueError, match="resolution must be >= 4, got 2"):
        procedural_sdf(0, 2)


# --------------------------------------------------------------------------------------------
# patches


def test_patches_round_trip_and_inside_flags():
    R, p = 32, 4
    sdf = procedural_sdf(11, R)
    trunc = 4 / R
    coords, values, inside = to_patches(sdf, p)
    G = R // p
    assert coords.dtype == np.int16 and values.dtype == np.float32 and inside.shape == (G,) * 3
    assert values.shape == (len(coords), p**3) and np.abs(values).max() <= 1
    order = np.lexsort(coords.T[::-1])  # C order of (x, y, z)
    assert (order == np.arange(len(coords))).all()
    norm = np.clip(sdf / np.float32(trunc), -1, 1)
    for (i, j, k), v in zip(coords[:5], values[:5], strict=True):
        block = norm[i * p : (i + 1) * p, j * p : (j + 1) * p, k * p : (k + 1) * p]
        assert np.array_equal(block.reshape(-1), v)
    dense = from_patches(coords, values, inside, R, p)
    blocks = dense.reshape(G, p, G, p, G, p).transpose(0, 2, 4, 1, 3, 5).reshape(G, G, G, -1)
    truth = sdf.reshape(G, p, G, p, G, p).transpose(0, 2, 4, 1, 3, 5).reshape(G, G, G, -1)
    active = np.zeros((G, G, G), bool)
    active[tuple(coords.T.astype(int))] = True
    assert (np.abs(truth) < trunc).any(-1)[active].all()
    assert not (np.abs(truth) < trunc).any(-1)[~active].any()
    # inactive patches: -1 exactly when all their voxels are inside, else +1 (all outside)
    assert np.array_equal(inside, ~active & (truth < 0).all(-1))
    assert (truth[~active & ~inside] > 0).all()
    assert np.array_equal(blocks[inside], -np.ones_like(blocks[inside]))
    assert np.array_equal(blocks[~active & ~inside], np.ones_like(blocks[~active & ~inside]))
    assert np.array_equal(dense, norm)  # clip(+-big) is exactly +-1 where inactive


def test_patch_arguments_are_checked():
    with pytest.raises(ValueError, match=r"resolution \(30\) must be a positive multiple of"):
        to_patches(np.zeros((30, 30, 30), np.float32), 4)
    with pytest.raises(ValueError, match=r"inside must have shape \(8, 8, 8\)"):
        from_patches(np.zeros((0, 3)), np.zeros((0, 64)), np.zeros((4, 4, 4), bool), 32, 4)


# --------------------------------------------------------------------------------------------
# shape sets


def test_shape_set_is_the_same_for_any_worker_count_and_is_cached(tmp_path, monkeypatch, caplog):
    kw = {"resolution": 32, "patch": 4}
    one = procedural_shape_set(5, workers=1, cache_dir=tmp_path / "a", **kw)
    two = procedural_shape_set(5, workers=2, cache_dir=tmp_path / "b", **kw)
    assert one.fingerprint() == two.fingerprint()
    assert one.names == [f"csg-{s:07d}" for s in range(5)]
    assert one.values.dtype == np.uint8 and one.coords.dtype == np.int16
    assert one.offsets.dtype == np.int64 and one.offsets[-1] == one.tokens() == len(one.values)
    assert one.inside.shape == (5, 8**3 // 8) and one.truncation == pytest.approx(4 / 32)
    files = list((tmp_path / "a" / "shapes").glob("procedural-*.npz"))
    assert len(files) == 1 and not list((tmp_path / "a" / "shapes").glob(".*"))

    def boom(*args, **kwargs):
        raise AssertionError("a cached set must not be built again")

    monkeypatch.setattr(shapes, "_build_procedural", boom)
    again = procedural_shape_set(5, workers=1, cache_dir=tmp_path / "a", **kw)
    assert again.fingerprint() == one.fingerprint()
    with pytest.raises(AssertionError):  # another start is another key
        procedural_shape_set(5, start=VAL_START, workers=1, cache_dir=tmp_path / "a", **kw)


def test_shape_set_accessors_subset_save_load(tmp_path):
    R, p = 32, 4
    s = procedural_shape_set(3, start=VAL_START, resolution=R, workers=1, cache_dir=tmp_path)
    assert len(s) == 3 and s.names[0] == "csg-1000000"
    for i in range(3):
        sdf = procedural_sdf(VAL_START + i, R)
        coords, values, inside = to_patches(sdf, p)
        c, v = s.patches(i)
        assert np.array_equal(c, coords) and np.abs(v - values).max() <= 0.5 / 127.5 + 1e-6
        assert np.array_equal(s.inside_grid(i), inside)
        norm = np.clip(sdf / np.float32(s.truncation), -1, 1)
        assert np.abs(s.dense(i) - norm).max() <= 0.5 / 127.5 + 1e-6
        assert np.array_equal(s.dense(i, values), from_patches(coords, values, inside, R, p))
    sub = s.subset([2, 0])
    assert sub.names == [s.names[2], s.names[0]]
    for j, i in enumerate([2, 0]):
        assert all(np.array_equal(a, b) for a, b in zip(sub.patches(j), s.patches(i), strict=True))
        assert np.array_equal(sub.inside_grid(j), s.inside_grid(i))
    path = tmp_path / "set.npz"
    sub.save(path)
    back = ShapeSet.load(path)
    assert back.fingerprint() == sub.fingerprint() != s.fingerprint()
    assert (back.resolution, back.patch, back.truncation) == (R, p, sub.truncation)
    assert back.names == sub.names
    with pytest.raises(IndexError, match="shape index 5 out of range for 3 shapes"):
        s.patches(5)


# --------------------------------------------------------------------------------------------
# meshes


def test_mesh_sdf_of_an_icosphere_matches_the_sphere():
    R = 32
    v, f = icosphere(3)
    sdf = mesh_sdf(v, f, R)
    lo, hi = v.min(0), v.max(0)
    scale = 2 * 0.85 / (hi - lo).max()
    center = (lo + hi) / 2 * scale
    x, y, z = grid_points(R)
    truth = np.sqrt((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2) - scale
    voxel, trunc = 2 / R, 4 / R
    band = np.abs(truth) < trunc
    assert np.abs(sdf[band] - truth[band]).max() < 0.25 * voxel  # facets sag a little
    clear = np.abs(truth) > 0.5 * voxel
    assert np.array_equal(sdf[clear] < 0, truth[clear] < 0)
    coords, _, _ = to_patches(sdf)
    assert len(coords) > 0


def test_mesh_sdf_of_a_cube_is_exact_and_survives_flipped_faces_and_a_hole():
    R = 32
    v, f = cube_mesh()
    x, y, z = grid_points(R)
    truth = box_sdf(x, y, z, 0.85)
    voxel, trunc = 2 / R, 4 / R
    band = np.abs(truth) < 1.4 * trunc
    clear = np.abs(truth) > 0.5 * voxel
    flipped = f.copy()
    flipped[::3] = flipped[::3, ::-1]  # inconsistent winding
    for faces in (f, flipped):
        sdf = mesh_sdf(v, faces, R)
        assert np.abs(sdf[band] - truth[band]).max() < 1e-5
        assert np.array_equal(sdf[clear] < 0, truth[clear] < 0)
    open_box = mesh_sdf(v, f[2:], R)  # the -z face is missing
    assert open_box[R // 2, R // 2, R // 2] < 0 and open_box[0, 0, 0] > 0
    assert np.mean((open_box[clear] < 0) == (truth[clear] < 0)) > 0.99
    inside = truth < -0.5 * voxel
    assert (open_box[inside] < 0).mean() > 0.99  # the interior is not drained by the hole


def test_mesh_sdf_rejects_bad_input():
    v, f = cube_mesh()
    with pytest.raises(ValueError, match="no extent"):
        mesh_sdf(np.zeros((3, 3)), f[:1], 16)
    with pytest.raises(ValueError, match=r"non-empty \(F, 3\)"):
        mesh_sdf(v, np.zeros((0, 3), np.int64), 16)


def test_parse_mesh_js_reads_json_and_base64_modules():
    v, f = cube_mesh()
    js = f"exports.positions={json.dumps(v.tolist())};\nexports.cells={json.dumps(f.tolist())};"
    pv, pf = parse_mesh_js(js)
    assert np.array_equal(pv, v) and np.array_equal(pf, f) and pf.dtype == np.int64
    b64 = {
        "positions": base64.b64encode(v.astype("<f4").tobytes()).decode(),
        "cells": base64.b64encode(f.astype("<u4").tobytes()).decode(),
    }
    js = (
        f';exports.positions = require("./load")(Float32Array, "{b64["positions"]}")\n'
        f';exports.cells = require("./load")(Uint32Array, "{b64["cells"]}")\n'
    )
    pv, pf = parse_mesh_js(js)
    assert np.array_equal(pv, v) and np.array_equal(pf, f)
    with pytest.raises(ValueError, match="no exports.cells"):
        parse_mesh_js("exports.positions=[[0,0,0]]")
    with pytest.raises(ValueError, match="cells index vertices that do not exist"):
        parse_mesh_js("exports.positions=[[0,0,0]];exports.cells=[[0,1,2]]")


# --------------------------------------------------------------------------------------------
# the npm meshes, offline


def test_registry_pins_the_published_tarballs():
    assert sorted(HELD_OUT_MESHES) == ["bunny", "snowden", "teapot"]
    assert HELD_OUT_MESHES["bunny"].package == "bunny@1.0.1"
    assert HELD_OUT_MESHES["bunny"].sha256 == (
        "381e02c74b98cf18814d7bec794726ef70b9c67e037273e82054d0043f6ae303"
    )
    assert HELD_OUT_MESHES["teapot"].size == 53_090
    assert HELD_OUT_MESHES["snowden"].license == "MIT"
    for m in HELD_OUT_MESHES.values():
        assert m.file.startswith("package/") and len(m.sha256) == 64


def make_mesh_tarball(path: Path, member: str = "package/index.js") -> str:
    v, f = cube_mesh()
    js = f"exports.positions={json.dumps(v.tolist())};\nexports.cells={json.dumps(f.tolist())};"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in [("package/package.json", b'{"name": "cube"}'), (member, js.encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_cube(tmp_path, monkeypatch) -> tuple[Path, str]:
    """A 'cube' entry in the registry, published as a local tarball."""
    path = tmp_path / "cube-1.0.0.tgz"
    sha = make_mesh_tarball(path)
    spec = NpmMesh("cube", "cube@1.0.0", path.stat().st_size, sha, "package/index.js", "MIT", "")
    monkeypatch.setattr(shapes, "HELD_OUT_MESHES", {"cube": spec})
    return path, sha


def test_fetch_mesh_from_a_local_tarball_then_from_the_cache(tmp_path, fake_cube):
    path, sha = fake_cube
    cache = tmp_path / "cache"
    v, f = fetch_mesh("cube", cache, tarball=path)
    assert v.dtype == np.float64 and f.dtype == np.int64 and v.shape == (8, 3)
    assert np.array_equal(f, cube_mesh()[1])
    assert (cache / "meshes" / "cube-1.0.0.npz").is_file()
    assert not [p for p in (cache / "meshes").iterdir() if p.name.startswith(".")]
    path.unlink()  # reuse never looks at the tarball
    v2, f2 = fetch_mesh("cube", cache, tarball=path)
    assert np.array_equal(v, v2) and np.array_equal(f, f2)


def test_fetch_mesh_checks_the_checksum_and_names(tmp_path, fake_cube):
    path, sha = fake_cube
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"expected sha256 {wrong}.*got sha256 {sha}"):
        fetch_mesh("cube", tmp_path / "c", tarball=path, expected_sha256=wrong)
    assert path.exists()
    with pytest.raises(ValueError, match=r"unknown mesh 'dragon'; known: \['cube'\]"):
        fetch_mesh("dragon", tmp_path / "c")
    odd = tmp_path / "odd.tgz"
    sha_odd = make_mesh_tarball(odd, member="package/other.js")
    with pytest.raises(ValueError, match="has no member 'package/index.js'"):
        fetch_mesh("cube", tmp_path / "c", tarball=odd, expected_sha256=sha_odd)


def write_fake_npm(folder: Path, tarball: Path) -> Path:
    """An `npm` that copies ``tarball`` into --pack-destination and logs its argv."""
    folder.mkdir(exist_ok=True)
    script = folder / "npm"
    dest = "sys.argv[sys.argv.index('--pack-destination') + 1]"
    script.write_text(
        f"#!{sys.executable}\nimport json, shutil, sys\n"
        f"json.dump(sys.argv[1:], open({str(folder / 'argv.json')!r}, 'w'))\n"
        f"shutil.copy({str(tarball)!r}, {dest} + '/cube-1.0.0.tgz')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_cli_fetch_meshes_uses_npm_pack(tmp_path, fake_cube, monkeypatch, capsys):
    path, _ = fake_cube
    bin_dir = tmp_path / "bin"
    write_fake_npm(bin_dir, path)
    monkeypatch.setenv("PATH", str(bin_dir))
    cache = tmp_path / "cache"
    assert _data_main(["fetch", "meshes", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "meshes")
    assert json.loads((bin_dir / "argv.json").read_text())[:2] == ["pack", "cube@1.0.0"]
    assert (cache / "meshes" / "cube-1.0.0.npz").is_file()
    assert _data_main(["fetch", "meshes", "--tarball", str(path)]) == 1
    assert "--tarball names one package" in capsys.readouterr().err


def test_mesh_shape_set_builds_from_the_cache(tmp_path, fake_cube, monkeypatch):
    path, _ = fake_cube
    cache = tmp_path / "cache"
    fetch_mesh("cube", cache, tarball=path)
    monkeypatch.setenv("PATH", "")  # any npm call would fail
    s = mesh_shape_set(resolution=32, cache_dir=cache)
    assert s.names == ["cube"] and len(s) == 1
    x, y, z = grid_points(32)
    truth = np.clip(box_sdf(x, y, z, 0.85) / (4 / 32), -1, 1)
    assert np.abs(s.dense(0) - truth).max() <= 0.5 / 127.5 + 1e-4
    assert mesh_shape_set(["cube"], resolution=32, cache_dir=cache).fingerprint() == (
        s.fingerprint()
    )
    with pytest.raises(ValueError, match=r"unknown meshes \['bunny'\]"):
        mesh_shape_set(["bunny"], cache_dir=cache)
