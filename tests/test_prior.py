"""The transformer prior over code grids: causality, cached sampling, filtering, learning a toy
distribution, the token data module and its cache, `vqkit prior fit` / `vqkit sample --prior`
end to end on a tiny tokenizer, and the tokenizer a prior checkpoint carries."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vqkit.cli import main
from vqkit.prior import (
    CodeTransformer,
    TokenDataModule,
    load_prior,
    load_prior_transformer,
    sample_logits,
    tokenizer_digest,
)
from vqkit.training.checkpoint import CheckpointError

PRIOR_QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "prior" / "quickstart.yaml"


def _tiny(k: int = 16, grid=(3, 4), **kw) -> CodeTransformer:
    torch.manual_seed(0)
    return CodeTransformer(k, grid, n_layer=2, n_head=2, n_embd=16, **kw)


def test_each_position_sees_only_the_codes_before_it():
    m = _tiny().eval()
    x = torch.randint(16, (2, 3, 4))
    y = x.clone()
    y[:, 2, 1] = (y[:, 2, 1] + 1) % 16  # raster position 9
    a, b = m(x), m(y)
    assert a.shape == (2, 12, 16)
    torch.testing.assert_close(a[:, :10], b[:, :10])  # positions 0..9 do not see code 9
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-6
    # nll is the mean cross-entropy of those logits against the codes
    ref = torch.nn.functional.cross_entropy(a.flatten(0, 1), x.flatten())
    torch.testing.assert_close(m.nll(x), ref)
    with pytest.raises(ValueError, match=r"code grids must be \(3, 4\)"):
        m(torch.zeros(1, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must be in \[0, 16\)"):
        m.nll(torch.full((1, 3, 4), 16))


def test_cached_sampling_draws_what_recomputing_draws():
    m = _tiny()
    m.train()  # generate switches to eval and back
    greedy = m.generate(3, top_k=1)
    assert torch.equal(greedy, m.generate(3, top_k=1, use_cache=False)) and m.training
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = m.generate(6, generator=ga, temperature=1.3)
    b = m.generate(6, generator=gb, temperature=1.3, use_cache=False)
    assert a.shape == (6, 3, 4) and torch.equal(a, b)
    prefix = torch.randint(16, (6, 5))
    c = m.generate(6, prefix=prefix, generator=torch.Generator().manual_seed(1))
    assert torch.equal(c.flatten(1)[:, :5], prefix)
    # a cached step takes exactly the one newest position
    kv = (torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match="a cached step takes one position, got 2"):
        m.blocks[0].attn(torch.zeros(1, 2, 16), kv)
    # a full prefix is returned as it is
    full = torch.randint(16, (2, 12))
    assert torch.equal(m.generate(2, prefix=full).flatten(1), full)


def test_top_k_and_top_p_keep_only_the_likeliest_codes():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.06, 0.04]])).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_logits(logits, top_k=2, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.5, generator=g).tolist()) == {0}
    assert set(sample_logits(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample_logits(logits, top_p=0.95, generator=g).tolist()) == {0, 1, 2}
    share = (sample_logits(logits, generator=g) == 0).double().mean()
    assert abs(float(share) - 0.6) < 0.05
    # a low temperature concentrates on the mode
    assert (sample_logits(logits, temperature=0.05, generator=g) == 0).all()


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="n_embd divisible by n_head"):
        CodeTransformer(16, (2, 2), n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="grid must be two positive sizes"):
        CodeTransformer(16, (0, 2))
    m = _tiny()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        m.generate(1, temperature=0)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        m.generate(1, top_k=0)
    # above the codebook size: no filtering (the same draws as without top_k)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(m.generate(2, top_k=17, generator=g1), m.generate(2, generator=g2))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        m.generate(1, top_p=0)


def test_learns_a_toy_distribution_of_four_grids():
    """Four fixed 3x4 grids, equally likely: the first code decides the grid, so the best
    possible loss is ln(4) / 12 = 0.116 nats per code, and samples are those four grids."""
    torch.manual_seed(0)
    patterns = torch.stack([torch.randperm(16)[:12].view(3, 4) for _ in range(4)])
    patterns[:, 0, 0] = torch.arange(4)  # distinct first codes
    m = _tiny()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(600):
        batch = patterns[torch.randint(4, (32,))]
        loss = m.nll(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.nll(patterns).item() < 0.15  # the floor is 0.116; uniform is 2.77
    samples = m.generate(64, generator=torch.Generator().manual_seed(0))
    hits = (samples[:, None] == patterns[None]).flatten(2).all(-1).any(-1)
    assert hits.double().mean() > 0.85
    assert {int(s[0, 0]) for s in samples[hits]} == {0, 1, 2, 3}  # all four grids appear


# ---------------------------------------------------------------------- data and the commands
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.test_training import fit_tiny_checkpoint

    return fit_tiny_checkpoint(tmp_path_factory.mktemp("prior_tok"))


def test_token_data_encodes_the_tokenizers_split_and_caches_it(tokenizer, tmp_path, monkeypatch):
    from vqkit.data.images import load_image
    from vqkit.prior import data as prior_data
    from vqkit.training import load_model

    ckpt, folder = tokenizer
    dm = TokenDataModule(tokenizer=str(ckpt), batch_size=4, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    # 16 images, val_fraction 0.25: 12 train (+ 12 mirrored), 4 val; 32 px -> 8x8 codes
    assert dm.train_codes.shape == (24, 8, 8) and dm.val_codes.shape == (4, 8, 8)
    assert dm.train_codes.dtype == torch.int16
    model = load_model(ckpt)
    images = sorted(folder.glob("*.png"))
    all_codes = {tuple(model.encode(load_image(p, 32)[None]).flatten().tolist()): p for p in images}
    assert all(tuple(c.flatten().tolist()) in all_codes for c in dm.val_codes.long())
    assert len(list(tmp_path.glob("*.pt"))) == 1
    # a second data module reads the cache instead of encoding
    encode = prior_data.encode_dataset
    monkeypatch.setattr(prior_data, "encode_dataset", lambda *a, **k: pytest.fail("encoded"))
    again = TokenDataModule(tokenizer=str(ckpt), batch_size=4, cache_dir=str(tmp_path))
    again.setup("fit")
    assert torch.equal(again.train_codes, dm.train_codes)
    batch = next(iter(again.train_dataloader()))[0]
    assert batch.shape == (4, 8, 8)
    # The cache is keyed by the tokenizer's weights, not its file: a moved copy reads it...
    moved = tmp_path / "moved" / "tokenizer.ckpt"
    moved.parent.mkdir()
    shutil.copy(ckpt, moved)
    kw = {"batch_size": 4, "cache_dir": str(tmp_path)}
    relocated = TokenDataModule(tokenizer=str(moved), **kw)
    relocated.setup("fit")
    assert torch.equal(relocated.train_codes, dm.train_codes)
    # ...and other weights written over that file, with its size and time stamp (all the old
    # key saw), are encoded afresh
    state = torch.load(moved, weights_only=True)
    torch.save(state, moved)  # as torch.save writes it, so the other weights take the same size
    st = moved.stat()
    state["state_dict"]["model.encoder.conv_in.weight"] += 0.5
    torch.save(state, moved)
    os.utime(moved, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (moved.stat().st_size, moved.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    calls = []
    monkeypatch.setattr(
        prior_data, "encode_dataset", lambda *a, **k: calls.append(1) or encode(*a, **k)
    )
    TokenDataModule(tokenizer=str(moved), **kw).setup("fit")
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2  # train + val, a new file


def _prior_args(tok: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(PRIOR_QUICKSTART),
        f"--model.tokenizer={tok}",
        "--model.n_layer=1",
        "--model.n_head=2",
        "--model.n_embd=16",
        "--model.warmup_steps=1",
        "--model.num_log_samples=4",
        "--data.batch_size=4",
        f"--data.cache_dir={cache}",
        "--trainer.accelerator=cpu",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *extra,
    ]


def test_prior_fit_then_sample_and_complete(tokenizer, tmp_path, capsys):
    from vqkit.cli import build_prior_cli

    ckpt, folder = tokenizer
    cli = build_prior_cli(_prior_args(ckpt, tmp_path / "run", tmp_path / "cache")[1:], run=False)
    assert cli.datamodule.tokenizer == str(ckpt)  # linked from --model.tokenizer
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert 0 < float(logged["val/nll"]) < 10
    torch.testing.assert_close(
        float(logged["val/bits_per_code"]), float(logged["val/nll"]) / np.log(2), rtol=1e-5, atol=0
    )
    assert 0 < float(logged["val/unigram_bits"]) <= 6  # K = 64 codes: at most 6 bits
    prior_ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    state = torch.load(prior_ckpt, weights_only=False)
    assert all(k.startswith("transformer.") for k in state["state_dict"])  # tokenizer not trained
    assert state["hyper_parameters"]["tokenizer"] == str(ckpt.resolve())
    prior = load_prior(prior_ckpt)
    assert prior.transformer.grid == (8, 8) and prior.transformer.codebook_size == 64
    # vqkit sample --prior: samples from the prior, and the completion row in the edits
    images = sorted(folder.glob("*.png"))[:2]
    out = tmp_path / "samples"
    argv = ["sample", "--ckpt", str(ckpt), "--prior", str(prior_ckpt), "--output-dir", str(out)]
    assert main([*argv, "--num", "3", "--top-k", "8", "--images", *map(str, images)]) == 0
    printed = capsys.readouterr().out
    assert "codes drawn from the prior last.ckpt" in printed
    assert "bottom half completed by the prior" in printed
    edits = np.load(out / "edits_codes.npz")
    np.testing.assert_array_equal(edits["completed"][:, :4], edits["codes"][:, :4])
    samples = np.load(out / "samples_codes.npy")
    assert samples.shape == (3, 8, 8) and samples.min() >= 0 and samples.max() < 64
    # the same seed, the same samples
    out2 = tmp_path / "samples2"
    argv2 = ["sample", "--ckpt", str(ckpt), "--prior", str(prior_ckpt), "--output-dir", str(out2)]
    assert main([*argv2, "--num", "3", "--top-k", "8"]) == 0
    np.testing.assert_array_equal(np.load(out2 / "samples_codes.npy"), samples)

    # Sampling needs only the transformer: it loads with the recorded tokenizer gone, and a
    # tokenizer without validation counts samples from the prior (which needs none).
    moved = torch.load(prior_ckpt, weights_only=False)
    moved["hyper_parameters"]["tokenizer"] = str(tmp_path / "moved_away.ckpt")
    torch.save(moved, tmp_path / "prior_moved.ckpt")
    transformer = load_prior_transformer(tmp_path / "prior_moved.ckpt")
    for k, v in prior.transformer.state_dict().items():
        torch.testing.assert_close(transformer.state_dict()[k], v, rtol=0, atol=0)
    blank = torch.load(ckpt, weights_only=False)
    blank["state_dict"]["model.quantizer.usage.eval_counts"].zero_()
    torch.save(blank, tmp_path / "tok_no_counts.ckpt")
    out3 = tmp_path / "samples3"
    argv3 = ["sample", "--ckpt", str(tmp_path / "tok_no_counts.ckpt"), "--output-dir", str(out3)]
    assert main([*argv3, "--prior", str(tmp_path / "prior_moved.ckpt"), "--num", "3"]) == 0
    drawn = np.load(out3 / "samples_codes.npy")
    assert drawn.shape == (3, 8, 8) and drawn.min() >= 0 and drawn.max() < 64
    capsys.readouterr()
    assert main([*argv3, "--num", "3"]) == 1  # independent draws do need the counts
    assert "no validation code counts" in capsys.readouterr().err


def test_sampling_options_without_a_prior_and_bad_priors_fail(tokenizer, tmp_path, capsys):
    ckpt, _ = tokenizer
    argv = ["sample", "--ckpt", str(ckpt), "--output-dir", str(tmp_path)]
    assert main([*argv, "--top-k", "5"]) == 1
    assert "--temperature, --top-k and --top-p need --prior" in capsys.readouterr().err
    assert main([*argv, "--prior", str(ckpt)]) == 1  # a tokenizer is not a prior
    assert "is not a vqkit prior checkpoint" in capsys.readouterr().err


def test_prior_fit_without_a_usable_tokenizer_fails_naming_it(tmp_path, capsys):
    args = ["prior", "fit", "--config", str(PRIOR_QUICKSTART), "--trainer.accelerator=cpu"]
    assert main([*args, f"--model.tokenizer={tmp_path / 'nope.ckpt'}"]) == 1
    assert f"vqkit prior: error: checkpoint not found: {tmp_path / 'nope.ckpt'}" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):  # none at all: a parse-time error naming the key
        main(args)
    assert "model.tokenizer" in capsys.readouterr().err
    from vqkit.prior import PriorModule

    with pytest.raises(ValueError, match="PriorModule needs tokenizer="):
        PriorModule(tokenizer=None)


@pytest.mark.parametrize(
    "config", sorted(PRIOR_QUICKSTART.parent.glob("*.yaml")), ids=lambda p: p.stem
)
def test_fast_dev_run_of_every_prior_config(config, tokenizer, tmp_path):
    from vqkit.cli import build_prior_cli

    ckpt, _ = tokenizer
    args = [
        "--config",
        str(config),
        f"--model.tokenizer={ckpt}",
        "--model.n_layer=1",
        "--model.n_embd=16",
        "--model.n_head=2",
        "--data.batch_size=4",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.accelerator=cpu",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.fast_dev_run=2",
    ]
    cli = build_prior_cli(args, run=False)
    assert cli.model.transformer.grid == (8, 8)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2


# ------------------------------------------------------------ the tokenizer a prior carries
@pytest.fixture(scope="module")
def trained_prior(tokenizer, tmp_path_factory):
    """A 4-step prior trained on a copy of the tiny tokenizer (tests move that copy about and
    put it back), and that copy."""
    ckpt, _ = tokenizer
    root = tmp_path_factory.mktemp("prior_carries")
    tok = root / "tokenizer.ckpt"
    shutil.copy(ckpt, tok)
    assert main(["prior", *_prior_args(tok, root / "run", root / "cache")]) == 0
    return next((root / "run").rglob("last.ckpt")), tok


def _nudged(tok: Path, out: Path, key: str = "model.decoder.conv_out.weight") -> Path:
    """Another tokenizer: ``tok`` with one weight changed."""
    state = torch.load(tok, weights_only=True)
    state["state_dict"][key] += 1e-3
    torch.save(state, out)
    return out


def test_a_prior_checkpoint_carries_its_tokenizer_and_samples_without_the_file(
    trained_prior, tmp_path
):
    from vqkit.evaluation.sampling import decode_codes
    from vqkit.training import load_model

    prior_ckpt, tok = trained_prior
    # a safe load reads it: plain containers of tensors, strings and numbers only
    state = torch.load(prior_ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["tokenizer"] == str(tok.resolve())
    carried, original = state["tokenizer"], load_model(tok)
    assert carried["state_dict"].keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        assert torch.equal(carried["state_dict"][k], v), k
    assert carried["sha256"] == tokenizer_digest(original) and carried["image_size"] == 32
    assert all(k.startswith("transformer.") for k in state["state_dict"])

    def draw(prior):  # noqa: ANN001, ANN202
        g = torch.Generator().manual_seed(0)
        codes = prior.transformer.generate(4, top_k=8, generator=g)
        return codes, decode_codes(prior.tokenizer_model, codes)

    codes, images = draw(load_prior(prior_ckpt))
    assert torch.equal(images, decode_codes(original, codes))  # as the file decodes them
    away = tmp_path / "elsewhere.ckpt"
    tok.rename(away)
    try:
        assert not tok.exists()  # the path the prior recorded
        prior = load_prior(prior_ckpt)
        assert prior.tokenizer_sha256 == carried["sha256"]
        again, pictures = draw(prior)
        assert torch.equal(again, codes) and torch.equal(pictures, images)
        # a cast of the prior leaves the tokenizer's weights (and so its digest) as they were
        assert tokenizer_digest(prior.double().tokenizer_model) == carried["sha256"]
        # given explicitly at its new place: the same weights, accepted
        assert load_prior(prior_ckpt, tokenizer=away).tokenizer_sha256 == carried["sha256"]
        out = tmp_path / "samples"
        argv = ["sample", "--ckpt", str(away), "--prior", str(prior_ckpt), "--output-dir", str(out)]
        assert main([*argv, "--num", "3", "--top-k", "8"]) == 0
        assert np.load(out / "samples_codes.npy").shape == (3, 8, 8)
    finally:
        away.rename(tok)


def test_a_swapped_tokenizer_is_refused_naming_both_files(trained_prior, tmp_path, capsys):
    from vqkit.training import load_model

    prior_ckpt, tok = trained_prior
    other = _nudged(tok, tmp_path / "other.ckpt")  # one decoder weight: the pictures change
    # recomputed usage counts do not make another tokenizer
    counts = torch.load(tok, weights_only=True)
    counts["state_dict"]["model.quantizer.usage.eval_counts"].zero_()
    torch.save(counts, tmp_path / "recounted.ckpt")
    digest = tokenizer_digest(load_model(tok))
    assert tokenizer_digest(load_model(tmp_path / "recounted.ckpt")) == digest
    assert tokenizer_digest(load_model(other)) != digest
    assert load_prior(prior_ckpt, tokenizer=tmp_path / "recounted.ckpt").tokenizer_sha256 == digest

    def refused(call) -> str:  # noqa: ANN001
        with pytest.raises(CheckpointError, match="the prior was trained on other codes") as e:
            call()
        message = str(e.value)
        assert str(other) in message and str(prior_ckpt) in message and "\n" not in message
        return message

    refused(lambda: load_prior(prior_ckpt, tokenizer=other))
    refused(lambda: load_prior_transformer(prior_ckpt, tokenizer=other))
    refused(
        lambda: load_prior_transformer(
            prior_ckpt, tokenizer=load_model(other), tokenizer_file=other
        )
    )
    # vqkit sample: the same codebook size and grid, but not the tokenizer the prior learned
    argv = [
        "sample",
        "--ckpt",
        str(other),
        "--prior",
        str(prior_ckpt),
        "--output-dir",
        str(tmp_path / "s"),
    ]
    assert main([*argv, "--num", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vqkit sample: error: ") and len(err.strip().splitlines()) == 1
    assert "trained on other codes" in err and str(other) in err and str(prior_ckpt) in err
    assert not (tmp_path / "s" / "samples.png").exists()
    # written over the file the prior records: load_prior does not read that file
    backup = tmp_path / "backup.ckpt"
    shutil.copy2(tok, backup)
    shutil.copyfile(other, tok)
    try:
        assert tokenizer_digest(load_model(tok)) != digest
        assert load_prior(prior_ckpt).tokenizer_sha256 == digest
    finally:
        shutil.copyfile(backup, tok)


def test_resuming_a_prior_checks_its_tokenizer(trained_prior, tmp_path, capsys):
    prior_ckpt, tok = trained_prior
    resume = ["--ckpt_path", str(prior_ckpt), "--trainer.max_steps=6"]
    args = _prior_args(tok, tmp_path / "resumed", tmp_path / "cache", *resume)
    assert main(["prior", *args]) == 0
    last = torch.load(next((tmp_path / "resumed").rglob("last.ckpt")), weights_only=True)
    assert last["global_step"] == 6  # went on from step 4
    assert (
        last["tokenizer"]["sha256"]
        == torch.load(prior_ckpt, weights_only=True)["tokenizer"]["sha256"]
    )
    # another tokenizer written over the file: resuming with it is refused before any step
    backup = tmp_path / "backup.ckpt"
    shutil.copy2(tok, backup)
    _nudged(tok, tok)
    try:
        capsys.readouterr()
        args = _prior_args(tok, tmp_path / "swapped", tmp_path / "cache", *resume)
        assert main(["prior", *args]) == 1
        err = capsys.readouterr().err
        assert f"vqkit prior: error: {tok.resolve()} is not the tokenizer {prior_ckpt}" in err
        assert "trained on other codes" in err
        assert not list((tmp_path / "swapped").rglob("*.ckpt"))
    finally:
        shutil.copyfile(backup, tok)


def test_an_old_prior_checkpoint_reads_its_tokenizer_from_the_path(trained_prior, tmp_path):
    prior_ckpt, tok = trained_prior
    state = torch.load(prior_ckpt, weights_only=True)
    digest = state.pop("tokenizer")["sha256"]
    torch.save(state, tmp_path / "old.ckpt")  # written before priors carried their tokenizer
    assert load_prior(tmp_path / "old.ckpt").tokenizer_sha256 == digest  # read from tok
    # the file gone: one line naming it and the way out
    gone = tmp_path / "gone.ckpt"
    state["hyper_parameters"]["tokenizer"] = str(gone)
    torch.save(state, tmp_path / "old_gone.ckpt")
    with pytest.raises(CheckpointError) as e:
        load_prior(tmp_path / "old_gone.ckpt")
    message = str(e.value)
    assert f"{gone} is gone" in message and "load_prior(path, tokenizer=...)" in message
    assert "\n" not in message
    assert load_prior(tmp_path / "old_gone.ckpt", tokenizer=tok).tokenizer_sha256 == digest
    # a sha256 recorded without the weights: the file at the path must match it
    state["tokenizer"] = {"sha256": digest}
    state["hyper_parameters"]["tokenizer"] = str(_nudged(tok, tmp_path / "other.ckpt"))
    torch.save(state, tmp_path / "slim.ckpt")
    with pytest.raises(CheckpointError, match="trained on other codes"):
        load_prior(tmp_path / "slim.ckpt")
    state["hyper_parameters"]["tokenizer"] = str(tok)
    torch.save(state, tmp_path / "slim.ckpt")
    assert load_prior(tmp_path / "slim.ckpt").tokenizer_sha256 == digest


def test_a_tampered_carried_tokenizer_is_refused(trained_prior, tmp_path):
    prior_ckpt, _ = trained_prior
    state = torch.load(prior_ckpt, weights_only=True)
    state["tokenizer"]["state_dict"]["decoder.conv_out.weight"] += 1e-3
    torch.save(state, tmp_path / "tampered.ckpt")
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded with it"):
        load_prior(tmp_path / "tampered.ckpt")
