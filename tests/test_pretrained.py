"""save_pretrained / from_pretrained / vqkit export: folders of config.json + model.safetensors
that rebuild the tokenizer, the quantizer and the prior bit for bit."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vqkit import (
    DeadCodeRestart,
    EMAUpdate,
    EntropyPenalty,
    KMeansInit,
    VectorQuantizer,
)
from vqkit.cli import main
from vqkit.configurable import ConfigError, build, to_config
from vqkit.models import ResNetVQModel, VQModel
from vqkit.pretrained import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PretrainedError,
    load_pretrained,
    tokenizer_digest,
)
from vqkit.prior import CodeTransformer, PretrainedPrior
from vqkit.quantize import NonFiniteError


def _model(ema: bool = True, **quantizer_kwargs) -> VQModel:  # noqa: ANN003
    torch.manual_seed(0)
    q = VectorQuantizer(
        32,
        64,
        channel_first=True,
        ema=EMAUpdate() if ema else None,
        maintenance=[KMeansInit(warmup_steps=1, reservoir_size=256), DeadCodeRestart()],
        regularizers=[EntropyPenalty(weight=0.01)],
        **quantizer_kwargs,
    )
    return ResNetVQModel(
        q,
        resolution=16,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=32,
        norm_groups=8,
    )


def _trained(model: VQModel, steps: int = 3) -> VQModel:
    """A few training forwards: k-means init, EMA and restarts fill the training state."""
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        out = model(torch.rand(4, 3, 16, 16) * 2 - 1)
        loss = out.vq_loss + (out.reconstructions**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.quantizer.quantized_steps > 0  # quantization began: the codebook is trained
    return model.eval()


def _same(a: VQModel, b: VQModel, images: torch.Tensor) -> None:
    with torch.no_grad():
        codes = a.encode(images)
        assert torch.equal(codes, b.encode(images))
        assert torch.equal(a.decode_indices(codes), b.decode_indices(codes))
        assert torch.equal(a(images).reconstructions, b(images).reconstructions)


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "gradient"])
def test_tokenizer_round_trip_is_bitwise_and_leaves_training_state_behind(tmp_path, ema):
    model = _trained(_model(ema=ema))
    folder = model.save_pretrained(tmp_path / "tok", image_size=16)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]
    loaded = VQModel.from_pretrained(folder)
    assert type(loaded) is ResNetVQModel and not loaded.training
    _same(model, loaded, torch.rand(5, 3, 16, 16) * 2 - 1)
    assert tokenizer_digest(loaded) == tokenizer_digest(model)

    saved = load_file(folder / WEIGHTS_NAME)
    assert "quantizer.codebook" in saved
    assert not [k for k in saved if k.startswith(("quantizer.reservoirs", "quantizer.ema"))]
    assert not [k for k in saved if k.startswith(("quantizer.usage", "quantizer.maintenance"))]
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["vqkit"] == {"format": 1, "version": "0.1.0", "kind": "tokenizer"}
    assert config["token_grid"] == [8, 8] and config["codebook_size"] == 64
    q = config["model"]["init_args"]["quantizer"]
    assert q["class_path"] == "vqkit.VectorQuantizer"
    assert q["init_args"]["ema"] is None and q["init_args"]["maintenance"] == []
    assert config["model"]["class_path"] == "vqkit.models.ResNetVQModel"
    # a second save over the folder is whole again, and from_pretrained reads it
    model.save_pretrained(folder, image_size=16)
    _same(model, VQModel.from_pretrained(folder), torch.rand(2, 3, 16, 16))


def test_quantizer_round_trip_with_projection_and_cosine(tmp_path):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 32, codebook_dim=4, distance="cosine", ema=None)
    q.train()
    q(torch.randn(64, 16))
    folder = q.eval().save_pretrained(tmp_path / "q")
    loaded = VectorQuantizer.from_pretrained(folder)
    x = torch.randn(100, 16)
    assert torch.equal(q.encode(x), loaded.encode(x))
    assert torch.equal(q(x).quantized, loaded(x).quantized)
    assert isinstance(load_pretrained(folder), VectorQuantizer)
    with pytest.raises(PretrainedError, match="holds a quantizer, not a tokenizer"):
        VQModel.from_pretrained(folder)


def test_init_args_survive_copy_and_pickle():
    model = _model()
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert to_config(other) == to_config(model)
    rebuilt = build(to_config(model))
    assert type(rebuilt) is ResNetVQModel
    assert [type(m) for m in rebuilt.quantizer.maintenance] == [KMeansInit, DeadCodeRestart]


def test_a_folder_that_was_tampered_with_is_refused(tmp_path):
    model = _model(ema=False)
    folder = model.save_pretrained(tmp_path / "tok", image_size=16)
    config = json.loads((folder / CONFIG_NAME).read_text())

    weights = load_file(folder / WEIGHTS_NAME)
    weights["decoder.conv_out.bias"] += 1e-3
    save_file(weights, folder / WEIGHTS_NAME)
    with pytest.raises(PretrainedError, match="do not hash to the sha256"):
        VQModel.from_pretrained(folder)
    del weights["decoder.conv_out.bias"]
    save_file(weights, folder / WEIGHTS_NAME)
    with pytest.raises(PretrainedError, match="1 tensors missing"):
        VQModel.from_pretrained(folder)
    (folder / WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(PretrainedError, match="not a readable safetensors file"):
        VQModel.from_pretrained(folder)

    evil = copy.deepcopy(config)
    evil["model"] = {"class_path": "os.system", "init_args": {"command": "touch pwned"}}
    (folder / CONFIG_NAME).write_text(json.dumps(evil))
    with pytest.raises(PretrainedError, match="not a vqkit class"):
        VQModel.from_pretrained(folder)
    assert not Path("pwned").exists()
    newer = copy.deepcopy(config)
    newer["vqkit"]["format"] = 99
    (folder / CONFIG_NAME).write_text(json.dumps(newer))
    with pytest.raises(PretrainedError, match="upgrade vqkit"):
        VQModel.from_pretrained(folder)
    (folder / CONFIG_NAME).write_text("{")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        VQModel.from_pretrained(folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(PretrainedError, match="no config.json"):
        VQModel.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="no folder"):
        VQModel.from_pretrained(tmp_path / "nowhere")


def test_config_refuses_what_it_cannot_record_or_rebuild():
    with pytest.raises(ConfigError, match="value.x is a object"):
        to_config({"x": object()})
    with pytest.raises(ConfigError, match="does not take these arguments"):
        build({"class_path": "vqkit.VectorQuantizer", "init_args": {"dim": 4, "bogus": 1}})
    with pytest.raises(ConfigError, match="not a vqkit module class"):
        build({"class_path": "vqkit.pretrained.load_pretrained"})


# --------------------------------------------------------------------- the Hugging Face Hub
def test_hub_ids_go_through_huggingface_hub(tmp_path, monkeypatch):
    """No network here: huggingface_hub's calls are replaced by fakes that record what vqkit
    asks for (the real library is what users run; its own tests cover the transfer)."""
    import huggingface_hub

    model = _model(ema=False)
    calls: dict[str, object] = {}

    class FakeApi:
        def __init__(self, token=None):  # noqa: ANN001
            calls["token"] = token

        def create_repo(self, repo_id, private=None, exist_ok=False):  # noqa: ANN001
            calls["created"] = (repo_id, private, exist_ok)

        def upload_folder(self, repo_id, folder_path, commit_message):  # noqa: ANN001
            calls["uploaded"] = sorted(p.name for p in Path(folder_path).iterdir())
            # keep a copy to download from below
            import shutil

            shutil.copytree(folder_path, tmp_path / "hub" / repo_id)
            return types.SimpleNamespace(commit_url=f"https://hf.co/{repo_id}/commit/1")

    def fake_snapshot_download(repo_id, **kwargs):  # noqa: ANN001, ANN003
        calls["download"] = (repo_id, kwargs["local_files_only"], kwargs["allow_patterns"])
        return str(tmp_path / "hub" / repo_id)

    monkeypatch.delenv("VQKIT_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    url = model.push_to_hub("someone/tok", private=True, token="t", image_size=16)
    assert url == "https://hf.co/someone/tok/commit/1"
    assert calls["created"] == ("someone/tok", True, True)
    assert calls["uploaded"] == ["README.md", CONFIG_NAME, WEIGHTS_NAME]

    loaded = VQModel.from_pretrained("someone/tok")
    assert calls["download"][:2] == ("someone/tok", False)
    _same(model.eval(), loaded, torch.rand(2, 3, 16, 16))
    monkeypatch.setenv("VQKIT_OFFLINE", "1")
    VQModel.from_pretrained("someone/tok")
    assert calls["download"][1] is True  # offline: the Hub cache only

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(PretrainedError, match=r"install huggingface_hub \(pip install"):
        VQModel.from_pretrained("someone/other")


def test_encode_and_decode_export_as_torch_programs_with_a_dynamic_batch():
    """torch.export traces encode / decode_indices (the quantizer's data checks are left out of
    the trace, and only there); the programs give the module's codes and images bitwise."""
    from torch.export import Dim

    model = _model(ema=True).eval()

    class Call(torch.nn.Module):
        def __init__(self, fn):  # noqa: ANN001
            super().__init__()
            self.model, self.fn = model, fn

        def forward(self, x):  # noqa: ANN001, ANN201
            return getattr(self.model, self.fn)(x)

    images = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    dynamic = {"x": {0: Dim("batch", min=2, max=32)}}
    with torch.no_grad():
        enc = torch.export.export(Call("encode"), (images,), dynamic_shapes=dynamic)
        dec = torch.export.export(Call("decode_indices"), (codes,), dynamic_shapes=dynamic)
    for n in (2, 5, 32):
        x = torch.rand(n, 3, 16, 16) * 2 - 1
        c = model.encode(x)
        assert torch.equal(enc.module()(x), c)
        assert torch.equal(dec.module()(c), model.decode_indices(c))
    # eager calls still check their input
    with pytest.raises(ValueError, match="indices must be in"):
        model.decode_indices(codes + 10_000)
    with pytest.raises(NonFiniteError):
        model.encode(torch.full_like(images, float("nan")))


# --------------------------------------------------------------- vqkit export of real runs
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.test_training import fit_tiny_checkpoint

    return fit_tiny_checkpoint(tmp_path_factory.mktemp("export_tok"))


def test_export_of_a_fit_checkpoint_gives_the_same_tokens(tokenizer, tmp_path, capsys):
    from vqkit.data.images import ImageFolderDataset
    from vqkit.training import load_model

    ckpt, images = tokenizer
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    assert f"wrote {out / WEIGHTS_NAME}" in capsys.readouterr().out
    original = load_model(ckpt)
    exported = VQModel.from_pretrained(out)
    batch = torch.stack([ImageFolderDataset(images, 32)[i] for i in range(8)])
    _same(original, exported, batch)

    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["image_size"] == 32 and config["sha256"] == tokenizer_digest(original)
    trained = config["trained_with"]
    assert trained["global_step"] == 6 and trained["data"]["image_size"] == 32
    maintenance = trained["model"]["init_args"]["quantizer"]["init_args"]["maintenance"]
    assert maintenance[0]["class_path"] == "vqkit.KMeansInit"  # what it was trained with
    card = (out / "README.md").read_text()
    assert "library_name: vqkit" in card and "| optimizer steps | 6 |" in card
    assert f"vqkit export --ckpt {ckpt}" in card
    # the checkpoint's own training state is not in the folder, and is 5x bigger with it
    assert (out / WEIGHTS_NAME).stat().st_size < ckpt.stat().st_size


def test_export_of_a_prior_carries_its_tokenizer(tokenizer, tmp_path):
    from tests.test_prior import _prior_args
    from vqkit.prior import load_prior

    ckpt, _ = tokenizer
    assert main(["prior", *_prior_args(ckpt, tmp_path / "run", tmp_path / "cache")]) == 0
    prior_ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    out = tmp_path / "prior"
    assert main(["export", "--ckpt", str(prior_ckpt), "--out", str(out)]) == 0
    assert (out / "tokenizer" / WEIGHTS_NAME).is_file()

    prior = load_pretrained(out)
    assert isinstance(prior, PretrainedPrior) and isinstance(prior.transformer, CodeTransformer)
    module = load_prior(prior_ckpt)
    assert tokenizer_digest(prior.tokenizer) == module.tokenizer_sha256
    codes, images = prior.sample(3, seed=0)
    expected = module.transformer.generate(3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, expected) and images.shape == (3, 3, 32, 32)

    # another tokenizer in tokenizer/: refused, naming both
    other = _model(ema=False)
    other.save_pretrained(out / "tokenizer", image_size=16)
    with pytest.raises(PretrainedError, match="not the tokenizer the prior"):
        PretrainedPrior.from_pretrained(out)


def test_export_errors_are_one_line(tokenizer, tmp_path, capsys):
    ckpt, _ = tokenizer
    assert main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"vqkit export: error: checkpoint not found: {tmp_path / 'none.ckpt'}"
    )
    (tmp_path / "file").write_text("x")
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "file")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_analyze_evaluate_and_sample_take_an_export_folder_or_hub_id(
    tokenizer, tmp_path, capsys, monkeypatch
):
    """One reader for every command: the figures of an export folder (and of the same folder
    as a Hub id) are the checkpoint's; what a folder does not keep is said, not invented."""
    import huggingface_hub

    ckpt, images = tokenizer
    folder = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(folder)]) == 0
    hub = tmp_path / "hub"
    (hub / "someone").mkdir(parents=True)
    shutil.copytree(folder, hub / "someone" / "tok")
    monkeypatch.delenv("VQKIT_OFFLINE")
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(hub / repo_id)
    )
    sources = {"ckpt": str(ckpt), "folder": str(folder), "hub": "someone/tok"}
    analyses, metrics = {}, {}
    for name, source in sources.items():
        out = tmp_path / f"analyze_{name}"
        argv = ["analyze", "--ckpt", source, "--data", str(images), "--output-dir", str(out)]
        assert main(argv) == 0
        analyses[name] = json.loads((out / "summary.json").read_text())
        out = tmp_path / f"evaluate_{name}"
        argv = ["evaluate", "--ckpt", source, "--data", str(images), "--output-dir", str(out)]
        assert main([*argv, "--metrics", "psnr,usage", "--no-progress"]) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert analyses["ckpt"]["images"] == len(list(images.iterdir())) > 0
    for name in ("folder", "hub"):
        assert analyses[name]["whole_set"] == analyses["ckpt"]["whole_set"]
        assert metrics[name]["metrics"] == metrics["ckpt"]["metrics"]
    assert metrics["hub"]["checkpoint"] == "someone/tok"
    assert metrics["folder"]["checkpoint"] == str(folder.resolve())
    # the checkpoint carries its training usage history; a folder keeps none, and says so
    assert analyses["ckpt"]["ema_counts"] is not None
    assert analyses["folder"]["ema_counts"] is None

    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(folder), "--output-dir", str(out), "--num", "2"]
    assert main([*argv, "--source", "uniform"]) == 0
    assert np.load(out / "samples_codes.npy").shape == (2, 8, 8)
    assert main([*argv, "--source", "usage"]) == 1
    err = capsys.readouterr().err
    assert "vqkit export folder" in err and "--source uniform" in err
    # a checkpoint that is not there is named as such, never looked up on the Hub
    assert main(["analyze", "--ckpt", "runs/none.ckpt", "--output-dir", str(tmp_path)]) == 1
    assert "checkpoint not found: runs/none.ckpt" in capsys.readouterr().err


# ------------------------------------------------------- inference without the training stack
_TRAINING_STACK = (
    "lightning",
    "pytorch_lightning",
    "jsonargparse",
    "matplotlib",
    "PIL",
    "rich",
    "tensorboard",
    "torchmetrics",
    "huggingface_hub",
    "yaml",
)


def _core_closure() -> list:
    """The installed distributions of vqkit's core dependencies (pyproject.toml's
    ``project.dependencies``) and everything they require, extras left out."""
    import importlib.metadata as md

    import tomllib
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    todo = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    seen: dict[str, md.Distribution] = {}
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in seen:
            continue
        seen[name] = md.distribution(req.name)
        todo += [Requirement(r) for r in seen[name].requires or []]
    return list(seen.values())


def _core_venv(root: Path) -> Path:
    """A venv holding vqkit and its core dependencies' closure only, as `pip install vqkit`
    would (the installed files are linked from this environment: no download, no copy)."""
    import subprocess
    import sysconfig

    venv = root / "core-venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    site = Path(purelib)
    here = Path(sysconfig.get_path("purelib"))
    linked: set[str] = set()
    for dist in _core_closure():
        for f in dist.files or []:
            top = f.parts[0]
            if top == ".." or top in linked or top.endswith(".pth"):
                continue
            source = here / top
            if source.exists():
                (site / top).symlink_to(source)
                linked.add(top)
    (site / "vqkit-src.pth").write_text(str(Path(__file__).parents[1] / "src") + "\n")
    return python


def test_an_export_loads_in_a_venv_with_the_core_dependencies_only(tokenizer, tmp_path):
    import subprocess

    from vqkit.training import load_model

    ckpt, _ = tokenizer
    out = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    original = load_model(ckpt)
    torch.manual_seed(0)
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    torch.save(images, tmp_path / "images.pt")
    transformer = CodeTransformer(64, (8, 8), n_layer=1, n_head=2, n_embd=16)
    PretrainedPrior(transformer, original, 32).save_pretrained(tmp_path / "prior")

    python = _core_venv(tmp_path)
    script = f"""
import importlib.util, sys
import torch
blocked = [m for m in {_TRAINING_STACK!r} if importlib.util.find_spec(m) is not None]
assert not blocked, f"the core venv has {{blocked}}"
from vqkit.models import VQModel
from vqkit.pretrained import load_pretrained
model = VQModel.from_pretrained({str(out)!r})
images = torch.load({str(tmp_path / "images.pt")!r})
codes = model.encode(images)
prior = load_pretrained({str(tmp_path / "prior")!r})
drawn, pictures = prior.sample(2, seed=0)
torch.save({{"codes": codes, "recon": model.decode_indices(codes), "drawn": drawn}},
           {str(tmp_path / "core.pt")!r})
print(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in {_TRAINING_STACK!r}))
from vqkit.cli import main
assert main(["--help"]) == 1  # the commands say what to install
"""
    run = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "[]"  # nothing of the training stack was imported
    assert "pip install 'vqkit[train]'" in run.stderr
    core = torch.load(tmp_path / "core.pt")
    with torch.no_grad():
        codes = original.encode(images)
        assert torch.equal(core["codes"], codes)
        assert torch.equal(core["recon"], original.decode_indices(codes))
    expected = transformer.eval().generate(2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(core["drawn"], expected)


def test_a_prior_trains_on_an_exported_tokenizer(tokenizer, tmp_path):
    """`--model.tokenizer` takes a `vqkit export` folder: same split, same codes, and the prior
    records the same sha256 as one trained on the checkpoint."""
    from tests.test_prior import _prior_args
    from vqkit.prior import load_prior

    ckpt, _ = tokenizer
    folder = tmp_path / "exported"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(folder)]) == 0
    args = _prior_args(folder, tmp_path / "run", tmp_path / "cache")
    assert main(["prior", *args]) == 0
    prior_ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    module = load_prior(prior_ckpt)
    assert module.tokenizer_sha256 == tokenizer_digest(VQModel.from_pretrained(folder))
    from vqkit.training import load_model

    assert module.tokenizer_sha256 == tokenizer_digest(load_model(ckpt))
    # the codes it trained on are the checkpoint's: the token cache is keyed by the weights,
    # so a prior on the checkpoint finds this one's cache and encodes nothing new
    cached = sorted((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1
    assert main(["prior", *_prior_args(ckpt, tmp_path / "run2", tmp_path / "cache")]) == 0
    assert sorted((tmp_path / "cache").glob("*.pt")) == cached
