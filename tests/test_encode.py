"""`vqkit encode` / `vqkit decode` and the token folders between them: the codes are
``model.encode``'s bit for bit, the PNGs ``decode_indices``'s, a rerun encodes only what is
missing, another tokenizer or image list is refused, two gloo processes write what one does,
and `vqkit prior fit --data.tokens` trains on the shards without encoding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.dist_utils import free_port
from tests.test_training import make_folder, tiny_fit_args
from vqkit import tokens as T
from vqkit.cli import main
from vqkit.data.images import load_image
from vqkit.tokens import TokensError, decode_tokens, encode_folder, read_tokens
from vqkit.training.export import load_any_tokenizer

REPO = Path(__file__).resolve().parents[1]
PRIOR_QUICKSTART = REPO / "configs" / "prior" / "quickstart.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 5-step tiny tokenizer (past its k-means init at step 4: varied codes; 64 codes, 32 px
    -> 8x8 grids) trained on 16 images, 12 train and 4 val, and that folder."""
    root = tmp_path_factory.mktemp("encode_tok")
    folder = make_folder(root / "images", n=16)
    quick = ["--trainer.val_check_interval=5", "--trainer.limit_val_batches=1"]
    assert main(tiny_fit_args(folder, root / "run", 5, *quick)) == 0
    return next((root / "run").rglob("last.ckpt")), folder


@pytest.fixture(scope="module")
def tok(trained):
    return load_any_tokenizer(trained[0])


def _nudged(ckpt: Path, out: Path) -> Path:
    """Another tokenizer: ``ckpt`` with one decoder weight changed."""
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["model.decoder.conv_out.weight"] += 1e-3
    torch.save(state, out)
    return out


def _reference(model, paths: list[Path], shard_size: int, batch_size: int, flip=False):
    """``model.encode`` of the images in the batches an encode uses (each shard's batches start
    at its first row)."""
    out = []
    for start in range(0, len(paths), shard_size):
        stop = min(start + shard_size, len(paths))
        for b in range(start, stop, batch_size):
            x = torch.stack([load_image(p, 32) for p in paths[b : min(b + batch_size, stop)]])
            out.append(model.encode(x.flip(-1) if flip else x))
    return torch.cat(out)


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """``vqkit argv`` in this process: (exit status, stdout, stderr)."""
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith(f"vqkit {command}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------- the library
def test_codes_are_model_encode_bit_for_bit_with_their_manifest(trained, tok, tmp_path):
    _, folder = trained
    out = tmp_path / "tokens"
    result = encode_folder(
        tok.model, folder, out, image_size=32, batch_size=4, shard_size=6, flip=True
    )
    assert (result.count, result.shards, result.shards_encoded, result.images_encoded) == (
        16,
        3,
        3,
        16,
    )
    paths = sorted(folder.glob("*.png"))
    read = read_tokens(out)
    with torch.no_grad():
        expected = _reference(tok.model, paths, 6, 4)
        mirrored = _reference(tok.model, paths, 6, 4, flip=True)
    assert read.codes.dtype == torch.int16 and read.codes.shape == (16, 8, 8)
    assert torch.equal(read.codes.long(), expected)
    assert torch.equal(read.flipped.long(), mirrored)
    assert not torch.equal(read.flipped, read.codes)  # encoded, not the codes mirrored
    assert len(read.codes.unique()) > 8  # a codebook past its k-means init: varied codes
    assert read.names == [p.name for p in paths]
    assert (out / "images.txt").read_text() == "".join(f"{p.name}\n" for p in paths)
    m = read.manifest
    assert m["complete"] and m["vqkit"]["kind"] == "tokens" and m["vqkit"]["format"] == 1
    assert m["tokenizer"]["sha256"] == tok.sha256
    assert (m["image_size"], m["square"], m["token_grid"]) == (32, "crop", [8, 8])
    assert (m["codebook_size"], m["dtype"], m["count"], m["flip"]) == (64, "int16", 16, True)
    assert [s["count"] for s in m["shards"]] == [6, 6, 4]
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"flipped-0000{i}.npy" for i in range(3)),
        "images.txt",
        "manifest.json",
        *(f"tokens-0000{i}.npy" for i in range(3)),
    ]
    shard = np.load(out / "tokens-00001.npy")
    assert shard.dtype == np.int16 and np.array_equal(shard, expected[6:12].numpy())
    assert T.code_dtype(2**15) == np.int16 and T.code_dtype(2**15 + 1) == np.int32
    # the prior's in-memory path, in one batch of all 16, gives the same codes
    from vqkit.data.images import ImageFolderDataset
    from vqkit.prior.data import encode_dataset

    reference = encode_dataset(tok.model, ImageFolderDataset(folder, 32), batch_size=64)
    assert torch.equal(reference, read.codes)


def test_decode_writes_the_pngs_decode_indices_gives(trained, tok, tmp_path, capsys):
    from vqkit.training.export import export_checkpoint

    ckpt, folder = trained
    data = tmp_path / "data"
    for sub in ("a", "b"):  # nested folders: the PNGs keep the relative paths
        (data / sub).mkdir(parents=True)
        for p in sorted(folder.glob("*.png"))[:3]:
            shutil.copy(p, data / sub / p.name)
    tokens = tmp_path / "tokens"
    code, out, _ = run(capsys, ["encode", "--tokenizer", str(ckpt), "--data", str(data),
                                "--out", str(tokens), "--batch-size", "4"])  # fmt: skip
    assert code == 0 and "6 images -> " in out and "images/s" in out
    # an exported folder is the same tokenizer (same sha256): it decodes these codes
    exported = export_checkpoint(ckpt, tmp_path / "exported")
    pngs = tmp_path / "pngs"
    argv = ["decode", "--tokenizer", str(exported), "--tokens", str(tokens), "--out", str(pngs)]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    names = read_tokens(tokens).names
    assert names == [f"{s}/{p.name}" for s in "ab" for p in sorted(folder.glob("*.png"))[:3]]
    assert f"wrote {pngs / names[0]} ... {pngs / names[-1]} (6 PNG(s))" in out
    codes = read_tokens(tokens).codes.long()
    with torch.no_grad():
        images = tok.model.decode_indices(codes)
    expected = (((images + 1) / 2).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for name, want in zip(names, expected, strict=True):
        got = np.asarray(Image.open(pngs / name))
        assert np.array_equal(got, want), name
    # --max-images: the first rows only; the library call writes the same files
    result = decode_tokens(tok.model, tokens, tmp_path / "two", max_images=2)
    assert [p.relative_to(tmp_path / "two").as_posix() for p in result.files] == names[:2]
    assert np.array_equal(np.asarray(Image.open(result.files[1])), expected[1])
    # two images that would share a PNG name keep their own suffix
    assert T.png_names(["x.jpg", "x.webp", "y.png"]) == ["x.jpg.png", "x.webp.png", "y.png"]
    with pytest.raises(TokensError, match="points outside the output folder"):
        T.png_names(["../escape.png"])


def test_a_rerun_encodes_only_the_missing_shards(trained, tok, tmp_path, monkeypatch):
    _, folder = trained
    out = tmp_path / "tokens"
    kw = {"image_size": 32, "batch_size": 4, "shard_size": 4}
    first = encode_folder(tok.model, folder, out, **kw)
    assert (first.shards, first.shards_encoded) == (4, 4)
    codes = read_tokens(out).codes
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("tokens-*.npy")}
    (out / "tokens-00002.npy").unlink()
    with pytest.raises(TokensError, match=r"tokens-00002.npy is missing .* rerun the same"):
        read_tokens(out)
    again = encode_folder(tok.model, folder, out, **kw)
    assert (again.shards_encoded, again.shards_kept, again.images_encoded) == (1, 3, 4)
    for name, stamp in stamps.items():  # the whole shards were not written again
        assert (out / name).stat().st_mtime_ns == stamp or name == "tokens-00002.npy"
    assert torch.equal(read_tokens(out).codes, codes)
    # a shard that is not the planned shape (damaged, of another encode) is encoded again
    np.save(out / "tokens-00003.npy", np.zeros((3, 8, 8), np.int16))
    assert encode_folder(tok.model, folder, out, **kw).shards_encoded == 1
    assert torch.equal(read_tokens(out).codes, codes)

    # an encode killed after its first shard: unfinished, then finished by a rerun
    fresh = tmp_path / "killed"
    writes = []

    def dies_after_one(path, array):  # noqa: ANN001, ANN202
        if writes:
            raise KeyboardInterrupt("killed")
        writes.append(path)
        return real(path, array)

    real = T.atomic_save_npy
    monkeypatch.setattr(T, "atomic_save_npy", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        encode_folder(tok.model, folder, fresh, **kw)
    monkeypatch.setattr(T, "atomic_save_npy", real)
    assert [p.name for p in fresh.glob("tokens-*.npy")] == ["tokens-00000.npy"]
    assert not json.loads((fresh / "manifest.json").read_text())["complete"]
    with pytest.raises(TokensError, match="unfinished encode: rerun the same"):
        read_tokens(fresh)
    finished = encode_folder(tok.model, folder, fresh, **kw)
    assert (finished.shards_encoded, finished.shards_kept) == (3, 1)
    assert torch.equal(read_tokens(fresh).codes, codes)


def test_another_tokenizer_or_image_list_is_refused_in_one_line(trained, tmp_path, capsys):
    ckpt, folder = trained
    other = _nudged(ckpt, tmp_path / "other.ckpt")
    tokens = tmp_path / "tokens"
    encode = ["encode", "--data", str(folder), "--out", str(tokens)]
    assert run(capsys, [*encode, "--tokenizer", str(ckpt)])[0] == 0
    sha = json.loads((tokens / "manifest.json").read_text())["tokenizer"]["sha256"]
    code, _, err = run(capsys, [*encode, "--tokenizer", str(other)])
    line = one_line_error(err, "encode")
    assert code == 1 and "a tokenizer with other weights" in line and "--overwrite" in line
    code, _, err = run(capsys, [*encode, "--tokenizer", str(ckpt), "--max-images", "8"])
    assert code == 1 and "another image list" in one_line_error(err, "encode")
    # decoding with another tokenizer: refused, naming both
    decode = ["decode", "--tokens", str(tokens), "--out", str(tmp_path / "png")]
    code, _, err = run(capsys, [*decode, "--tokenizer", str(other)])
    line = one_line_error(err, "decode")
    assert code == 1 and str(other) in line and str(ckpt) in line and sha[:12] in line
    assert not (tmp_path / "png").exists() or not list((tmp_path / "png").iterdir())
    # --overwrite replaces them
    assert run(capsys, [*encode, "--tokenizer", str(other), "--overwrite"])[0] == 0
    assert json.loads((tokens / "manifest.json").read_text())["tokenizer"]["sha256"] != sha
    assert run(capsys, [*decode, "--tokenizer", str(other)])[0] == 0


def test_command_line_errors_are_one_line(trained, tmp_path, capsys):
    ckpt, folder = trained
    encode = ["encode", "--tokenizer", str(ckpt), "--out", str(tmp_path / "t")]
    cases = [
        ([*encode, "--data", str(tmp_path / "nope")], "encode", "does not exist"),
        ([*encode, "--device", "tpu"], "encode", "unknown device 'tpu'"),
        ([*encode, "--batch-size", "0"], "encode", "--batch-size must be >= 1, got 0"),
        ([*encode, "--shard-size", "0"], "encode", "--shard-size must be >= 1, got 0"),
        (["encode", "--tokenizer", str(tmp_path / "x.ckpt"), "--out", str(tmp_path)],
         "encode", "x.ckpt"),
        (["decode", "--tokenizer", str(ckpt), "--tokens", str(tmp_path / "none"), "--out",
          str(tmp_path / "p")], "decode", "none has no manifest.json"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append(([*encode, "--device", "cuda"], "encode", "CUDA is not available"))
    for argv, command, words in cases:
        code, _, err = run(capsys, argv)
        assert code == 1 and words in one_line_error(err, command), (argv, err)
    # a `vqkit encode` output of a split: decode names the folders to pick from
    split = tmp_path / "split"
    (split / "train").mkdir(parents=True)
    argv = ["decode", "--tokenizer", str(ckpt), "--tokens", str(split), "--out", str(tmp_path)]
    code, _, err = run(capsys, argv)
    assert code == 1 and "train/ and val/: use one of them" in one_line_error(err, "decode")
    # shards of an unknown encode are not taken over silently
    stray = tmp_path / "stray"
    stray.mkdir()
    np.save(stray / "tokens-00000.npy", np.zeros((16, 8, 8), np.int16))
    argv = ["encode", "--tokenizer", str(ckpt), "--data", str(folder), "--out", str(stray)]
    code, _, err = run(capsys, argv)
    assert code == 1 and "no manifest.json" in one_line_error(err, "encode")


# ------------------------------------------------------------------------ two processes
@pytest.mark.distributed
def test_two_gloo_processes_write_what_one_does(trained, tok, tmp_path):
    ckpt, folder = trained
    out = tmp_path / "two"
    port = str(free_port())
    argv = [sys.executable, "-m", "vqkit.cli", "encode", "--tokenizer", str(ckpt),
            "--data", str(folder), "--out", str(out), "--shard-size", "3", "--batch-size", "2",
            "--flip", "--device", "cpu"]  # fmt: skip
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))  # fmt: skip
        procs.append(
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    try:
        done = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:  # a hung collective fails the test instead of leaving a process
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, stderr) in zip(procs, done, strict=True):
        assert p.returncode == 0, stderr.decode()[-3000:]
    outs = [stdout.decode() for stdout, _ in done]
    assert "2 process(es) on cpu" in outs[0] and "(6 shard(s): 6 encoded now" in outs[0]
    assert "encoded 16 images in " in outs[0]  # each image by one process only
    assert outs[1] == ""  # only the first process speaks
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes ran
    try:
        one = encode_folder(
            tok.model, folder, tmp_path / "one", image_size=32, batch_size=2, shard_size=3,
            flip=True,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert one.shards == 6
    a, b = read_tokens(out), read_tokens(tmp_path / "one")
    assert torch.equal(a.codes, b.codes) and torch.equal(a.flipped, b.flipped)
    for shard in range(6):
        for stem in ("tokens", "flipped"):
            name = f"{stem}-{shard:05d}.npy"
            assert (out / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert a.names == b.names and a.manifest["images_sha256"] == b.manifest["images_sha256"]


# ----------------------------------------------------------------------------- the prior
def test_prior_fit_reads_the_shards_and_encodes_nothing(trained, tmp_path, capsys, monkeypatch):
    from vqkit.cli import build_prior_cli
    from vqkit.prior import data as prior_data

    ckpt, _ = trained
    tokens = tmp_path / "tokens"
    code, out, err = run(capsys, ["encode", "--tokenizer", str(ckpt), "--out", str(tokens),
                                  "--flip"])  # fmt: skip
    assert code == 0, err
    assert "train: 12 images" in out and "val: 4 images" in out
    assert (tokens / "train" / "flipped-00000.npy").is_file()
    assert not (tokens / "val" / "flipped-00000.npy").exists()  # validated on the originals
    monkeypatch.setattr(prior_data, "encode_dataset", lambda *a, **k: pytest.fail("encoded"))
    cache = tmp_path / "cache"
    args = [
        "--config", str(PRIOR_QUICKSTART), f"--model.tokenizer={ckpt}",
        "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=16",
        "--data.batch_size=4", f"--data.cache_dir={cache}", f"--data.tokens={tokens}",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'run'}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'run'}", "--trainer.fast_dev_run=2",
    ]  # fmt: skip
    cli = build_prior_cli(args, run=False)
    assert cli.datamodule.tokens == str(tokens) and cli.datamodule.tokenizer == str(ckpt)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    dm = cli.datamodule
    train, val = read_tokens(tokens / "train"), read_tokens(tokens / "val")
    assert torch.equal(dm.train_codes, torch.cat([train.codes, train.flipped]))
    assert torch.equal(dm.val_codes, val.codes)
    assert not cache.exists() or not list(cache.iterdir())  # no token cache written
    # tokens of another tokenizer: `vqkit prior fit` stops in one line
    forged = tmp_path / "forged"
    shutil.copytree(tokens, forged)
    manifest = json.loads((forged / "train" / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (forged / "train" / "manifest.json").write_text(json.dumps(manifest))
    args = [a.replace(str(tokens), str(forged)) for a in args]
    code, _, err = run(capsys, ["prior", "fit", *args])
    line = [ln for ln in err.splitlines() if "error:" in ln]
    assert code == 1 and len(line) == 1 and "Traceback" not in err, err[-2000:]
    assert line[0].startswith("vqkit prior: error: --data.tokens: the tokens in ")
    assert "another tokenizer (sha256 000000000000" in line[0] and str(ckpt) in line[0]


def test_one_token_folder_trains_without_validation(trained, tok, tmp_path, caplog):
    from vqkit.prior import TokenDataModule
    from vqkit.training.checkpoint import CheckpointError

    ckpt, folder = trained
    encode_folder(tok.model, folder, tmp_path / "tokens", image_size=32)  # no --flip
    dm = TokenDataModule(tokenizer=str(ckpt), tokens=str(tmp_path / "tokens"), batch_size=4)
    dm.prepare_data()  # nothing to fetch
    with caplog.at_level("WARNING", logger="vqkit"):
        dm.setup("fit")
    assert "holds no mirrored codes (encode with --flip)" in caplog.text
    assert torch.equal(dm.train_codes, read_tokens(tmp_path / "tokens").codes)
    assert dm.val_codes is None and dm.val_dataloader() == []
    assert next(iter(dm.train_dataloader()))[0].shape == (4, 8, 8)
    # outside a trainer the tokenizer checkpoint is the reference: another one is refused
    other = _nudged(ckpt, tmp_path / "other.ckpt")
    refused = TokenDataModule(tokenizer=str(other), tokens=str(tmp_path / "tokens"))
    with pytest.raises(CheckpointError, match="encoded by another tokenizer"):
        refused.setup("fit")
    with pytest.raises(CheckpointError, match="not a `vqkit encode` output"):
        TokenDataModule(tokenizer=str(ckpt), tokens=str(tmp_path)).setup("fit")
