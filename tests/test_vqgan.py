"""VQ-GAN: the PatchGAN discriminator, the adversarial losses and their schedule, and the
two-optimizer training module (alternation, precision, accumulation, resume, checkpoints)."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vqkit.losses import (
    AdversarialLoss,
    hinge_d_loss,
    hinge_g_loss,
    non_saturating_d_loss,
    non_saturating_g_loss,
)
from vqkit.losses.adversarial import adaptive_weight
from vqkit.models import PatchDiscriminator, ResNetVQModel
from vqkit.quantize import VectorQuantizer
from vqkit.training import VQGANModule

# ------------------------------------------------------------------------------ discriminator


@pytest.mark.parametrize(("size", "out"), [(32, 2), (64, 6), (256, 30)])
def test_discriminator_output_shapes(size, out):
    d = PatchDiscriminator()
    assert d(torch.randn(2, 3, size, size)).shape == (2, 1, out, out)


def test_receptive_field_is_70_pixels_at_256():
    torch.manual_seed(0)
    d = PatchDiscriminator().eval()  # batch norm on running stats: no mixing across pixels
    assert d.receptive_field == 70
    x = torch.randn(1, 3, 256, 256, requires_grad=True)
    d(x)[0, 0, 15, 15].backward()
    rows, cols = (x.grad.abs().sum(dim=(0, 1)) > 0).nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70
    assert int((x.grad.abs().sum(dim=(0, 1)) > 0).sum()) == 70 * 70


@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_norm_options_and_taming_init(norm):
    torch.manual_seed(0)
    d = PatchDiscriminator(base_channels=16, norm=norm)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 5
    # taming's init: conv weights N(0, 0.02); batch norm convs have no bias
    w = torch.cat([c.weight.flatten() for c in convs])
    assert abs(float(w.std()) - 0.02) < 0.002
    assert (convs[1].bias is None) == (norm == "batch")
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_spectral_norm_keeps_its_vectors_in_the_state_dict():
    d = PatchDiscriminator(base_channels=8, spectral_norm=True)
    keys = list(d.state_dict())
    assert sum(k.endswith("_u") for k in keys) == 5
    d.train()
    d(torch.randn(2, 3, 32, 32))
    # the normalized weight has spectral norm ~1 (power iteration of the reshaped matrix)
    w = d.main[0].weight.flatten(1)
    assert abs(float(torch.linalg.matrix_norm(w, ord=2)) - 1) < 0.1


def test_bad_discriminator_arguments_name_the_value():
    with pytest.raises(ValueError, match="norm must be one of .* got 'layer'"):
        PatchDiscriminator(norm="layer")
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        PatchDiscriminator(num_layers=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) images, got shape \(3, 32, 32\)"):
        PatchDiscriminator()(torch.zeros(3, 32, 32))


# ------------------------------------------------------------------------------ losses


def test_hinge_and_non_saturating_values_on_hand_made_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2.5] -> 7/6
    assert float(hinge_d_loss(real, fake)) == pytest.approx(0.5 * (5 / 6 + 7 / 6))
    assert float(hinge_g_loss(fake)) == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)

    def sp(v: float) -> float:
        return math.log1p(math.exp(v))

    ns_d = 0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3 + (sp(-2.0) + sp(0.0) + sp(1.5)) / 3)
    assert float(non_saturating_d_loss(real, fake)) == pytest.approx(ns_d)
    assert float(non_saturating_g_loss(fake)) == pytest.approx((sp(2.0) + sp(0) + sp(-1.5)) / 3)
    # confident, correct discriminator: hinge loss exactly 0
    assert float(hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0))) == 0.0


def test_gan_weight_schedule_at_chosen_steps():
    # seed 004: pure VQ-VAE for 20k steps, then 0 -> 0.1 over 20k
    adv = AdversarialLoss(PatchDiscriminator(base_channels=8), weight=0.1, disc_start=20000,
                          ramp_steps=20000)  # fmt: skip
    expected = {0: 0.0, 19999: 0.0, 20000: 0.0, 25000: 0.025, 30000: 0.05, 40000: 0.1, 1e6: 0.1}
    for step, w in expected.items():
        assert adv.gan_weight(int(step)) == pytest.approx(w), step
    assert not adv.discriminator_active(19999) and adv.discriminator_active(20000)
    jump = AdversarialLoss(PatchDiscriminator(base_channels=8), weight=0.2, disc_start=5)
    assert [jump.gan_weight(s) for s in (4, 5, 6)] == [0.0, 0.2, 0.2]


def test_bad_adversarial_arguments_name_the_value():
    d = PatchDiscriminator(base_channels=8)
    with pytest.raises(ValueError, match="loss must be one of .* got 'wgan'"):
        AdversarialLoss(d, loss="wgan")
    with pytest.raises(ValueError, match="disc_start must be >= 0, got -1"):
        AdversarialLoss(d, disc_start=-1)
    with pytest.raises(ValueError, match="r1_every must be >= 1, got 0"):
        AdversarialLoss(d, r1_every=0)


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 8, 8)
    rec = torch.tanh(last(h))
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    d = PatchDiscriminator(base_channels=8, num_layers=1, norm="none")
    rec_loss = F.l1_loss(rec, target)
    g_loss = hinge_g_loss(d(rec))
    got = adaptive_weight(rec_loss, g_loss, last.weight)
    a = torch.autograd.grad(rec_loss, last.weight, retain_graph=True)[0]
    b = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
    want = a.norm() / (b.norm() + 1e-4)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    # scaling both losses (an AMP loss scale) leaves the ratio unchanged
    scaled = adaptive_weight(rec_loss, g_loss, last.weight, scale=1024.0)
    torch.testing.assert_close(scaled, want.detach(), rtol=1e-4, atol=0)
    # the clamp
    assert float(adaptive_weight(rec_loss * 1e9, g_loss, last.weight, max_weight=5.0)) == 5.0


def test_generator_loss_leaves_the_discriminator_without_gradients():
    d = PatchDiscriminator(base_channels=8, num_layers=1)
    adv = AdversarialLoss(d)
    fake = torch.randn(2, 3, 16, 16, requires_grad=True)
    g_loss, _ = adv.generator_loss(fake)
    g_loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in d.parameters())


class LinearD(nn.Module):
    """D(x) = sum over channels of w_c * x_c (a 1x1 conv without bias): grad_x D is known."""

    def __init__(self, w=(1.0, -2.0, 0.5)) -> None:  # noqa: ANN001
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(w).view(1, 3, 1, 1))

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.conv(x)


def test_r1_penalty_value_and_lazy_scaling():
    adv = AdversarialLoss(LinearD(), r1_weight=10.0, r1_every=4)
    x = torch.randn(2, 3, 5, 5)
    # ||grad_x sum D(x)||^2 per image = H * W * sum(w^2) = 25 * 5.25
    assert float(adv.r1_penalty(x)) == pytest.approx(25 * 5.25)
    total, terms = adv.discriminator_loss(x, torch.randn(2, 3, 5, 5), r1=True)
    assert float(terms["r1"]) == pytest.approx(10.0 / 2 * 25 * 5.25 * 4)
    assert float(total) == pytest.approx(float(terms["d_loss"] + terms["r1"]))
    _, no_r1 = adv.discriminator_loss(x, x, r1=False)
    assert "r1" not in no_r1


def test_lecam_penalty_and_its_ema_buffers():
    adv = AdversarialLoss(LinearD(), lecam_weight=0.5, lecam_decay=0.9)
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 0.0])
    # first call: the EMAs take the means (2.0, -0.5)
    p = adv.lecam_penalty(real, fake)
    want = ((real + 0.5).clamp(min=0) ** 2).mean() + ((2.0 - fake).clamp(min=0) ** 2).mean()
    assert float(p) == pytest.approx(float(want))
    assert float(adv.lecam_ema_real) == 2.0 and float(adv.lecam_ema_fake) == -0.5
    # second call: ema = 0.9 * ema + 0.1 * mean
    adv.lecam_penalty(torch.tensor([4.0]), torch.tensor([0.5]))
    assert float(adv.lecam_ema_real) == pytest.approx(0.9 * 2.0 + 0.1 * 4.0)
    assert float(adv.lecam_ema_fake) == pytest.approx(0.9 * -0.5 + 0.1 * 0.5)
    state = adv.state_dict()
    assert {"lecam_ema_real", "lecam_ema_fake", "lecam_updates", "disc_steps"} <= set(state)
    assert int(state["lecam_updates"]) == 2


# ------------------------------------------------------------------------------ training


class FakePerceptual(nn.Module):
    """A stand-in for LPIPS: a frozen conv, per-image mean feature distance."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.dropout = nn.Dropout(0.5)
        self.modes: list[bool] = []

    def forward(self, x, y):  # noqa: ANN001, ANN201
        self.modes.append(self.training)
        return (self.dropout(self.conv(x)) - self.dropout(self.conv(y))).abs().mean(dim=(1, 2, 3))


def tiny_module(**kw) -> VQGANModule:  # noqa: ANN003
    torch.manual_seed(0)
    q = VectorQuantizer(dim=8, codebook_size=16, channel_first=True)
    model = ResNetVQModel(q, resolution=16, base_channels=8, channel_mult=(1, 2), z_channels=8)
    adv_kw = {k: kw.pop(k) for k in list(kw) if k in AdversarialLoss.__init__.__code__.co_varnames}
    d = PatchDiscriminator(base_channels=8, num_layers=2)
    adv = AdversarialLoss(d, **{"disc_start": 2, "ramp_steps": 2, **adv_kw})
    return VQGANModule(model, adversarial=adv, **{"lr": 1e-3, "warmup_steps": 1, **kw})


def loader(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(
        TensorDataset(torch.rand(n, 3, 16, 16, generator=g) * 2 - 1), batch_size=batch
    )


def trainer(max_steps: int, **kw) -> L.Trainer:  # noqa: ANN003
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


class Recorder(L.Callback):
    """Per batch: which optimizers stepped (in order) and which parameter groups moved."""

    def __init__(self) -> None:
        self.steps: list[list[str]] = []
        self.moved: list[dict[str, bool]] = []

    def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
        for name, opt in zip(("G", "D"), module.optimizers(), strict=True):
            raw = opt.optimizer
            step = raw.step

            def recorded(*a, _step=step, _name=name, **k):  # noqa: ANN002, ANN003, ANN202
                self.steps[-1].append(_name)
                return _step(*a, **k)

            raw.step = recorded

    def _snap(self, module) -> dict[str, list[torch.Tensor]]:  # noqa: ANN001
        parts = {"G": module.model, "D": module.discriminator}
        if module.perceptual is not None:
            parts["P"] = module.perceptual
        return {k: [p.detach().clone() for p in m.parameters()] for k, m in parts.items()}

    def on_train_batch_start(self, trainer, module, *args) -> None:  # noqa: ANN001, ANN002
        self.steps.append([])
        self.before = self._snap(module)

    def on_train_batch_end(self, trainer, module, *args) -> None:  # noqa: ANN001, ANN002
        after = self._snap(module)
        self.moved.append(
            {
                k: any(not torch.equal(a, b) for a, b in zip(self.before[k], after[k], strict=True))
                for k in after
            }
        )


def test_steps_alternate_and_each_optimizer_moves_only_its_own_parameters():
    perceptual = FakePerceptual()
    module = tiny_module(
        perceptual=perceptual, perceptual_weight=0.5, adaptive_weight=True, lecam_weight=0.1,
        r1_weight=1.0, r1_every=2, gradient_clip_val=1.0,
    )  # fmt: skip
    rec = Recorder()
    t = trainer(5, callbacks=[rec])
    t.fit(module, loader(24))
    # disc_start=2: two VQ-VAE steps, then discriminator then generator on every batch
    assert rec.steps == [["G"], ["G"], ["D", "G"], ["D", "G"], ["D", "G"]]
    assert [m["G"] for m in rec.moved] == [True] * 5
    assert [m["D"] for m in rec.moved] == [False, False, True, True, True]
    assert not any(m["P"] for m in rec.moved)  # the perceptual net never trains
    assert perceptual.modes and not any(perceptual.modes)  # and stays in eval mode
    # global_step counts generator steps only; the discriminator keeps its own count
    assert t.global_step == 5
    assert int(module.adversarial.disc_steps) == 3
    g_opt, d_opt = module.optimizers()
    assert {id(p) for g in g_opt.param_groups for p in g["params"]} == {
        id(p) for p in module.model.parameters()
    }
    assert {id(p) for g in d_opt.param_groups for p in g["params"]} == {
        id(p) for p in module.discriminator.parameters()
    }
    m = t.callback_metrics
    for key in ("g_loss", "d_loss", "logits_real", "logits_fake", "gan_weight",
                "adaptive_weight", "lecam", "r1", "perceptual", "gan", "loss", "l1"):  # fmt: skip
        assert torch.isfinite(m[f"train/{key}"]), key
    # last step 4: lambda_gan = 0.1 * (4 - 2) / 2
    assert float(m["train/gan_weight"]) == pytest.approx(0.1)
    assert float(m["train/adaptive_weight"]) > 0
    # the generator's lr follows the parent's warm-up + cosine schedule
    assert g_opt.param_groups[0]["lr"] < 1e-3 and d_opt.param_groups[0]["lr"] == 2e-4


def test_bf16_mixed_run_trains_both_networks():
    module = tiny_module(disc_start=1, ramp_steps=0, adaptive_weight=True, gradient_clip_val=1.0)
    d0 = [p.detach().clone() for p in module.discriminator.parameters()]
    t = trainer(3, precision="bf16-mixed")
    t.fit(module, loader(12))
    assert t.global_step == 3 and int(module.adversarial.disc_steps) == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(d0, module.discriminator.parameters(), strict=True)
    )
    for key in ("loss", "g_loss", "d_loss", "adaptive_weight"):
        assert torch.isfinite(t.callback_metrics[f"train/{key}"]), key


def test_gradient_accumulation_steps_every_second_batch():
    module = tiny_module(disc_start=0, accumulate_grad_batches=2)
    rec = Recorder()
    t = trainer(-1, max_epochs=1, callbacks=[rec])
    t.fit(module, loader(32))  # 8 batches
    assert rec.steps == [[], ["D", "G"]] * 4
    assert t.global_step == 4 and int(module.adversarial.disc_steps) == 4
    g_opt, d_opt = module.optimizers()
    assert all(int(s["step"]) == 4 for s in g_opt.optimizer.state.values())
    assert all(int(s["step"]) == 4 for s in d_opt.optimizer.state.values())
    # the cosine schedule ends after 8 / 2 generator steps, not after 8
    assert module._total_optimizer_steps() == 4


@pytest.mark.parametrize("fp16_scaler", [False, True], ids=["fp32", "fp16-grad-scaler"])
def test_gradient_clipping_bounds_each_optimizers_gradient_norm(fp16_scaler):
    """Each optimizer steps on gradients clipped to the norm; under a loss scaler they are
    unscaled first (clipping scaled gradients would leave norm 1e-3 / 1024 at the step)."""
    module = tiny_module(disc_start=0, gradient_clip_val=1e-3, adaptive_weight=True)
    norms: dict[str, float] = {}

    class Spy(L.Callback):
        def on_train_start(self, trainer, module) -> None:  # noqa: ANN001
            for name, opt in zip(("G", "D"), module.optimizers(), strict=True):
                raw, step = opt.optimizer, opt.optimizer.step

                def spied(closure=None, _s=step, _n=name, _o=raw):  # noqa: ANN001, ANN202
                    if closure is not None:  # Lightning clips inside the closure it passes
                        closure()
                    grads = [p.grad for g in _o.param_groups for p in g["params"]]
                    norms[_n] = float(torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(g) for g in grads if g is not None])
                    ))  # fmt: skip
                    return _s()

                raw.step = spied

    kw = {}
    if fp16_scaler:
        # Lightning makes a GradScaler only on CUDA; a CPU one exercises the same path here.
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        kw["plugins"] = [MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    trainer(1, callbacks=[Spy()], **kw).fit(module, loader(8))
    assert set(norms) == {"G", "D"}
    assert all(0.9e-3 <= v <= 1e-3 * (1 + 1e-3) for v in norms.values()), norms
    if fp16_scaler:
        assert scaler.get_scale() == 1024.0  # one update per cycle, no overflow


def test_trainer_level_clipping_is_rejected_with_a_pointer():
    with pytest.raises(Exception, match="gradient clipping"):
        trainer(1, gradient_clip_val=1.0).fit(tiny_module(), loader(8))


# ------------------------------------------------------------------------------ CLI, resume


ROOT = Path(__file__).resolve().parents[1]
VQGAN_QUICKSTART = ROOT / "configs" / "vqgan_quickstart.yaml"


def _vqgan_config(tmp: Path, every: int) -> Path:
    """vqgan_quickstart with a periodic checkpoint every ``every`` steps, LeCAM and lazy R1 on
    (their state must resume too) and the fake perceptual net."""
    import yaml

    cfg = yaml.safe_load(VQGAN_QUICKSTART.read_text())
    for cb in cfg["trainer"]["callbacks"]:
        if cb["class_path"].endswith("ModelCheckpoint"):
            cb["init_args"].update(every_n_train_steps=every, save_last=True)
    init = cfg["model"]["init_args"]
    init["adversarial"]["init_args"].update(
        disc_start=2, ramp_steps=4, lecam_weight=0.1, r1_weight=1.0, r1_every=2
    )
    init["adversarial"]["init_args"]["discriminator"]["init_args"]["base_channels"] = 16
    init["perceptual"] = {"class_path": "tests.test_vqgan.FakePerceptual"}
    init["perceptual_weight"] = 0.5
    # every maintenance event inside the run: k-means init at step 2, dead-mode re-estimation
    # at steps 3 and 6, restarts
    quantizer = init["model"]["init_args"]["quantizer"]["init_args"]
    quantizer["maintenance"] = [
        {"class_path": "vqkit.KMeansInit", "init_args": {"warmup_steps": 2, "reservoir_size": 256}},
        {
            "class_path": "vqkit.KMeansReestimate",
            "init_args": {"every": 3, "until": 8, "reservoir_size": 256, "mode": "dead"},
        },
        {"class_path": "vqkit.DeadCodeRestart", "init_args": {"threshold": 0.5}},
    ]
    path = tmp / f"vqgan_every{every}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_resume_in_the_adversarial_phase_matches_an_uninterrupted_run(tmp_path):
    from tests.test_training import _fit, make_folder

    folder = make_folder(tmp_path / "images")
    config = _vqgan_config(tmp_path, every=4)
    whole, part = tmp_path / "whole", tmp_path / "part"
    _fit(folder, whole, 8, config=config)
    stop = (
        '--trainer.callbacks+={"class_path": "tests.test_training.StopAt", '
        '"init_args": {"step": 6}}'
    )
    _fit(folder, part, 8, stop, config=config)
    assert not list(part.rglob("periodic-step=8.ckpt"))
    # step 4 is past disc_start=2 and mid-ramp: the discriminator, its optimizer, the LeCAM
    # EMAs and the R1 phase are all mid-flight
    ck = next(part.rglob("periodic-step=4.ckpt"))
    state4 = torch.load(ck, weights_only=False)
    assert int(state4["state_dict"]["adversarial.disc_steps"]) == 2
    assert int(state4["state_dict"]["adversarial.lecam_updates"]) == 2
    assert len(state4["optimizer_states"]) == 2
    q = "model.quantizer."
    assert bool(state4["state_dict"][q + "maintenance.0.done"])  # k-means init at step 2
    replaced4 = int(state4["state_dict"][q + "num_replacements"])
    assert replaced4 >= 2  # ... and the re-estimation at step 3
    _fit(folder, part / "resumed", 8, f"--ckpt_path={ck}", config=config)
    a = torch.load(next(whole.rglob("periodic-step=8.ckpt")), weights_only=False)
    b = torch.load(next((part / "resumed").rglob("periodic-step=8.ckpt")), weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    assert int(a["state_dict"]["adversarial.disc_steps"]) == 6
    assert int(a["state_dict"][q + "num_replacements"]) > replaced4  # re-estimation at step 6
    assert not any(k.startswith("perceptual.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=0, atol=0, msg=k)
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for (i, sa), (_, sb) in zip(oa["state"].items(), ob["state"].items(), strict=True):
            for name in sa:
                torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=f"{i}.{name}")

    # The checkpoint rebuilds its tokenizer alone (the perceptual net is not needed).
    from vqkit.training import load_model, load_tokenizer

    ckpt = next(whole.rglob("periodic-step=8.ckpt"))
    module = load_tokenizer(ckpt)
    assert type(module) is VQGANModule and module.perceptual is None
    assert module.adversarial.disc_start == 2 and int(module.adversarial.disc_steps) == 6
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            load_model(ckpt)(x).reconstructions, module.model(x).reconstructions
        )


@pytest.mark.slow
def test_inception_feature_loss_as_the_perceptual_term_from_a_yaml_config(tmp_path):
    """The documented route for a perceptual term without VGG weights: ``perceptual:`` names
    ``vqkit.losses.InceptionFeatureLoss`` in the config; it trains, and stays out of checkpoints."""
    import yaml

    from tests.test_training import make_folder, tiny_args
    from vqkit.cli import build_cli
    from vqkit.losses import InceptionFeatureLoss

    cfg = yaml.safe_load(VQGAN_QUICKSTART.read_text())
    init = cfg["model"]["init_args"]
    init["perceptual"] = {
        "class_path": "vqkit.losses.InceptionFeatureLoss",
        "init_args": {"input_size": 80, "layers": ["conv_2", "mixed"]},
    }
    init["perceptual_weight"] = 0.5
    init["adversarial"]["init_args"].update(disc_start=1, ramp_steps=1)
    config = tmp_path / "vqgan_inception.yaml"
    config.write_text(yaml.safe_dump(cfg))
    folder = make_folder(tmp_path / "images")
    args = [*tiny_args(folder, tmp_path / "run"), "--trainer.max_steps=3"]
    args += ["--trainer.val_check_interval=3", "--model.warmup_steps=1"]
    cli = build_cli(["--config", str(config), *args], run=False)
    module = cli.model
    assert isinstance(module.perceptual, InceptionFeatureLoss)
    assert module.perceptual.input_size == 80 and module.perceptual.layers == ("conv_2", "mixed")
    decoder_before = module.last_layer().detach().clone()
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 3
    logged = cli.trainer.callback_metrics
    # the term is in the generator loss (weighted), next to the adversarial one
    assert float(logged["train/perceptual"]) > 0
    assert "train/gan" in logged and "train/d_loss" in logged
    assert not torch.equal(module.last_layer().detach(), decoder_before)
    ckpt = torch.load(next((tmp_path / "run").rglob("last.ckpt")), weights_only=False)
    assert not any(k.startswith("perceptual") for k in ckpt["state_dict"])
