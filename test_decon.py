"""DeCon tests: every loss recomputed a second way, schedules, LARS, Table 3 parameter counts, every variant's
forward and training step, data decoding and augmentation geometry, CLI errors, and a 2-process torchrun run.

    python -m pytest -q test_decon.py
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import data
import losses
import models
import pretrain

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

VARIANTS = {  # paper name -> pretrain.py flags (the README's table)
    "slotcon": dict(framework="slotcon", decoder="none"),
    "decon-sl-slotcon-fcn": dict(framework="slotcon", decoder="fcn", alpha=0.5),
    "decon-sl-slotcon-fpn": dict(framework="slotcon", decoder="fpn", deep_supervision=False),
    "decon-ml-slotcon-fpn": dict(framework="slotcon", decoder="fpn", alpha=0.0, dropout=0.5),
    "densecl": dict(framework="densecl", decoder="none"),
    "decon-sl-densecl-fcn": dict(framework="densecl", decoder="fcn"),
    "decon-sl-densecl-fpn": dict(framework="densecl", decoder="fpn", deep_supervision=False),
    "decon-ml-densecl-fpn": dict(framework="densecl", decoder="fpn", dropout=0.5),
}


def variant_args(name, **extra):
    """pretrain.py arguments of a variant at test size (64 px, ResNet-18, tiny heads)."""
    parser = pretrain.get_args_parser()
    args = parser.parse_args([])
    for k, v in {**VARIANTS[name], **dict(arch="resnet18", image_size=64, batch_size=4, dim_hidden=32,
                                          dim_out=16, num_prototypes=8, queue_size=32), **extra}.items():
        setattr(args, k, v)
    return pretrain.finalize_args(args, parser)


def tiny_model(name, **extra):
    torch.manual_seed(0)
    return pretrain.build_model(variant_args(name, **extra))


def batch(n=4, size=64, seed=0):
    """Two views of n images through the real augmentation: crops list, coords (2, n, 4), flags (2, n)."""
    torch.manual_seed(seed)
    ds = data.SyntheticScenes(n, 96, seed, transform=data.SlotConTwoView(size))
    views, coords, flags = zip(*[ds[i] for i in range(n)])
    views, coords, flags = torch.stack(views), torch.stack(coords), torch.stack(flags)
    return [views[:, 0], views[:, 1]], coords.transpose(0, 1), flags.T


# ---------------------------------------------------------------- Eq. 1-3

def test_decon_loss_eq1_and_eq2():
    l_enc, l_dec = torch.tensor(2.0), torch.tensor(6.0)
    assert losses.decon_loss(l_enc, l_dec, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    assert losses.decon_loss(l_enc, None, 1.0) is l_enc   # encoder-only baseline: no decoder loss exists
    assert losses.decon_loss(None, l_dec, 0.0) is l_dec   # alpha = 0: no encoder heads exist
    with pytest.raises(ValueError, match="alpha must be in"):
        losses.decon_loss(l_enc, l_dec, 1.5)


def test_deep_supervision_loss_eq3_is_the_mean_over_levels():
    levels = [torch.tensor(v) for v in (1.0, 2.0, 4.0, 9.0)]
    assert losses.deep_supervision_loss(levels).item() == pytest.approx(4.0)
    assert losses.deep_supervision_loss(levels[:1]).item() == pytest.approx(1.0)  # j = 1 is Eq. 1
    with pytest.raises(ValueError):
        losses.deep_supervision_loss([])


# ---------------------------------------------------------------- invaug

def test_invaug_identity_box_and_flip():
    x = torch.randn(3, 5, 6, 7)
    full = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3)
    out = losses.invaug(x, full, torch.tensor([False, True, False]))
    assert out.shape == x.shape
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)  # aligned=True samples the pixel centres exactly
    torch.testing.assert_close(out[1], x[1].flip(-1), atol=1e-6, rtol=0)


def test_invaug_crops_the_box_like_bilinear_sampling():
    H, W = 4, 8
    xs = torch.arange(W, dtype=torch.float32).expand(1, 1, H, W).clone()  # value = column index
    out = losses.invaug(xs, torch.tensor([[0.5, 0.0, 1.0, 1.0]]), torch.tensor([False]))
    # the right half [W/2, W) resampled to W columns: bin j covers [4 + j/2, 4 + (j+1)/2), 1 sample at its
    # centre minus the half-pixel offset of aligned=True; roi_align samples two points per bin here
    # (ceil(roi_w / W) = 1 horizontally); value at x is x (linear ramp), clamped at the last pixel
    expected = torch.clamp(torch.tensor([4 + (j + 0.5) / 2 - 0.5 for j in range(W)]), max=W - 1)
    torch.testing.assert_close(out[0, 0, 0], expected, atol=1e-5, rtol=0)


def test_two_view_overlap_boxes_point_at_the_same_image_content():
    """Render a coordinate image through SlotConTwoView's geometry; after invaug both views must show the same
    image coordinates at every position (what the group loss assumes)."""
    size = 240
    yy, xx = np.mgrid[0:size, 0:size]
    coord_img = Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))
    t = data.SlotConTwoView(64, min_scale=0.3)
    t.colour = (lambda im: torch.from_numpy(np.asarray(im, np.float32)).permute(2, 0, 1),) * 2
    for seed in range(6):
        data.random.seed(seed)
        torch.manual_seed(seed)
        views, coords, flags = t(coord_img)
        a = [losses.invaug(views[v][None, :2], coords[v][None], flags[v][None])[0] for v in (0, 1)]
        err = (a[0] - a[1]).abs()[:, 4:-4, 4:-4]  # interior: away from the resampling border
        assert err.median() < 2.0, (seed, err.median())


# ---------------------------------------------------------------- SlotCon losses, re-derived in NumPy / loops

def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_self_distillation_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t, c = rng.uniform(-1, 1, (10, 6)), rng.uniform(-1, 1, (10, 6)), rng.uniform(-0.1, 0.1, (1, 6))
    p_t = np_softmax((t - c) / 0.07)
    log_p_s = np.log(np_softmax(s / 0.1))
    expected = np.mean([-(p_t[n] * log_p_s[n]).sum() for n in range(10)])
    got = losses.self_distillation_loss(*(torch.tensor(a, dtype=torch.float32) for a in (s, t, c)))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the cross-entropy is at least the teacher's entropy
    assert got.item() >= float(np.mean(-(p_t * np.log(p_t)).sum(-1))) - 1e-5


def test_slot_contrastive_loss_matches_a_loop():
    rng = np.random.default_rng(1)
    B, K, D, H, W, tau = 3, 5, 4, 2, 3, 0.2
    q, k = rng.normal(size=(B, K, D)), rng.normal(size=(B, K, D))
    sq, sk = rng.normal(size=(B, K, H, W)), rng.normal(size=(B, K, H, W))
    predictor = lambda x: 2 * x + 1  # any callable
    present = lambda s: [{int(a) for a in s[b].argmax(0).ravel()} for b in range(B)]
    pq, pk = present(sq), present(sk)
    keys = [(b, kk) for b in range(B) for kk in range(K) if kk in pk[b]]  # all present teacher slots
    norm = lambda v: v / np.linalg.norm(v)
    total, count = 0.0, 0
    for b in range(B):
        for kk in range(K):
            if kk in pq[b] and kk in pk[b]:
                z = norm(2 * q[b, kk] + 1)
                logits = np.array([z @ norm(k[bb, j]) for bb, j in keys]) / tau
                pos = keys.index((b, kk))
                total += -(logits[pos] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
                count += 1
    expected = total / count * 2 * tau
    got = losses.slot_contrastive_loss(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, sq, sk)),
                                       predictor, tau)
    assert count >= 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_slotcon_loss_is_the_weighted_sum_of_both_directions():
    torch.manual_seed(0)
    B, K, D, h = 2, 4, 3, 3
    pair = lambda: (torch.randn(B, K, D), torch.randn(B, K, h, h))
    s, t = [pair(), pair()], [pair(), pair()]
    coords, flags = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * B] * 2), torch.zeros(2, B, dtype=torch.bool)
    center, pred = torch.zeros(1, K), (lambda x: x)
    rows = lambda x: x.permute(0, 2, 3, 1).flatten(0, 2)
    sd = lambda a, b: losses.self_distillation_loss(rows(a[1]), rows(b[1]), center)
    ctr = lambda a, b: losses.slot_contrastive_loss(a[0], b[0], a[1], b[1], pred)
    expected = 0.3 * (sd(s[0], t[1]) + sd(s[1], t[0])) + 0.7 * (ctr(s[0], t[1]) + ctr(s[1], t[0]))
    got = losses.slotcon_loss(s, t, coords, flags, pred, center, group_weight=0.3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------- DenseCL losses

def test_info_nce_loss_matches_numpy():
    rng = np.random.default_rng(2)
    n = lambda a, ax: a / np.linalg.norm(a, axis=ax, keepdims=True)
    q, k, queue = n(rng.normal(size=(5, 8)), 1), n(rng.normal(size=(5, 8)), 1), n(rng.normal(size=(8, 11)), 0)
    expected = 0.0
    for i in range(5):
        logits = np.concatenate([[q[i] @ k[i]], q[i] @ queue]) / 0.2
        expected += -np.log(np_softmax(logits)[0]) / 5
    got = losses.info_nce_loss(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, queue)))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_dense_contrastive_loss_matches_a_loop():
    rng = np.random.default_rng(3)
    N, C, Cf, S, L = 2, 4, 6, 5, 7
    n = lambda a, ax: a / np.linalg.norm(a, axis=ax, keepdims=True)
    qg, kg = n(rng.normal(size=(N, C, S)), 1), n(rng.normal(size=(N, C, S)), 1)
    qf, kf = n(rng.normal(size=(N, Cf, S)), 1), n(rng.normal(size=(N, Cf, S)), 1)
    queue = n(rng.normal(size=(C, L)), 0)
    total = 0.0
    for i in range(N):
        for s in range(S):
            match = max(range(S), key=lambda t: qf[i, :, s] @ kf[i, :, t])
            logits = np.concatenate([[qg[i, :, s] @ kg[i, :, match]], qg[i, :, s] @ queue]) / 0.2
            total += -np.log(np_softmax(logits)[0])
    got = losses.dense_contrastive_loss(*(torch.tensor(a, dtype=torch.float32) for a in (qg, kg, qf, kf, queue)))
    assert got.item() == pytest.approx(total / (N * S), rel=1e-5)


def test_densecl_loss_combines_global_and_dense_with_lambda():
    torch.manual_seed(0)
    f = lambda *s: nn.functional.normalize(torch.randn(*s), dim=1)
    st, te = (f(3, 4), f(3, 4, 5), f(3, 6, 5)), (f(3, 4), f(3, 4, 5), f(3, 6, 5))
    q1, q2 = nn.functional.normalize(torch.randn(4, 9), dim=0), nn.functional.normalize(torch.randn(4, 9), dim=0)
    expected = 0.5 * losses.info_nce_loss(st[0], te[0], q1) + 0.5 * losses.dense_contrastive_loss(
        st[1], te[1], st[2], te[2], q2)
    assert losses.densecl_loss(st, te, q1, q2).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- schedules and LARS

def test_lr_schedule_warmup_then_cosine():
    lrs = pretrain.lr_schedule(2.0, 1e-6, 100, 10)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.02)                      # warm-up starts at lr / 100
    assert lrs[5] == pytest.approx(0.02 * (99 * 5 / 10 + 1))  # lr/100 * (99 t / W + 1)
    assert lrs[10] == pytest.approx(2.0)                      # cosine starts at the peak
    assert lrs[10 + 45] == pytest.approx(1e-6 + (2.0 - 1e-6) * 0.5)
    assert np.all(np.diff(lrs[10:]) <= 0) and lrs[-1] < 1e-3


def test_momentum_schedule_cosine_to_one_counted_once_per_step():
    m = pretrain.momentum_schedule(0.99, 1000)
    assert m[0] == pytest.approx(0.99)
    assert m[500] == pytest.approx(0.995)              # half-way: once-per-step counting (the authors' doubled
    assert m[750] == pytest.approx(1 - 0.01 * (math.cos(math.pi * 0.75) + 1) / 2)  # counter gives 1.0 here)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0 and m[-1] > 0.99999
    assert np.all(pretrain.momentum_schedule(0.999, 10, "constant") == 0.999)


def test_lars_excludes_1d_parameters_from_decay_and_scaling():
    w, b = nn.Parameter(torch.full((3, 2), 2.0)), nn.Parameter(torch.full((3,), 2.0))
    w.grad, b.grad = torch.full((3, 2), 0.5), torch.full((3,), 0.5)
    opt = pretrain.LARS([w, b], lr=0.1, weight_decay=0.1, momentum=0.9, eta=0.001)
    opt.step()
    d = 0.5 + 0.1 * 2.0                                          # grad + wd * p
    trust = 0.001 * math.sqrt(6 * 4.0) / math.sqrt(6 * d * d)    # eta |p| / |d|
    torch.testing.assert_close(w, torch.full((3, 2), 2.0 - 0.1 * d * trust))
    torch.testing.assert_close(b, torch.full((3,), 2.0 - 0.1 * 0.5))  # 1-D: plain momentum SGD, no decay
    w.grad, b.grad = torch.full((3, 2), 0.5), torch.full((3,), 0.5)
    opt.step()  # momentum: mu = 0.9 mu + d
    torch.testing.assert_close(b, torch.full((3,), 2.0 - 0.1 * 0.5 - 0.1 * (0.9 * 0.5 + 0.5)))


# ---------------------------------------------------------------- Table 3

@pytest.mark.parametrize("decoder,ds,expected", [
    ("none", False, dict(enc=23.51, dec=0.0, enc_aux=71.51, dec_aux=0.0, full=118.52)),
    ("fcn", False, dict(enc=23.51, dec=5.31, enc_aux=71.51, dec_aux=56.83, full=185.97)),
    ("fpn", False, dict(enc=23.51, dec=1.58, enc_aux=71.51, dec_aux=56.83, full=178.50)),
    ("fpn", True, dict(enc=23.51, dec=3.35, enc_aux=71.51, dec_aux=227.31, full=352.53)),
])
def test_parameter_counts_match_supplement_table3(decoder, ds, expected):
    with torch.device("meta"):  # no memory, no init cost
        m = models.DeCon("slotcon", "resnet50", decoder, 1.0 if decoder == "none" else 0.5, 0.0, ds)
    got = {k: round(v / 1e6, 2) for k, v in models.parameter_table(m).items()}
    assert got == expected


def test_alpha_zero_builds_no_encoder_heads():
    m = tiny_model("decon-ml-slotcon-fpn")
    assert m.levels == ["p2", "p3", "p4", "p5"] and "c5" not in m.student.heads
    assert not any(n.startswith("predictors.c5") for n, _ in m.named_parameters())


def test_export_names_follow_mmseg_and_detectron2():
    fcn = tiny_model("decon-sl-slotcon-fcn").student.decoder.state_dict()
    assert {"convs.0.conv.weight", "convs.0.bn.running_var", "convs.1.conv.weight"} <= set(fcn)
    fpn_sl = set(tiny_model("decon-sl-slotcon-fpn").student.decoder.state_dict())
    fpn_ml = set(tiny_model("decon-ml-slotcon-fpn").student.decoder.state_dict())
    assert {f"fpn_lateral{s}.norm.weight" for s in (2, 3, 4, 5)} <= fpn_sl
    assert "fpn_output2.weight" in fpn_sl and "fpn_output3.weight" not in fpn_sl
    assert {f"fpn_output{s}.norm.running_mean" for s in (2, 3, 4, 5)} <= fpn_ml
    enc = set(tiny_model("slotcon").student.encoder.state_dict())
    import torchvision
    assert enc == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}


# ---------------------------------------------------------------- every variant: forward and two steps

@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shapes_of_every_variant(name):
    m = tiny_model(name)
    crops, coords, flags = batch()
    feats = m.student.features(crops[0])
    assert feats["c5"].shape == (4, 512, 2, 2)
    if "fcn" in name:
        assert feats["fcn"].shape == (4, 256, 2, 2)
    if "fpn" in name:
        sizes = {"p2": 16, "p3": 8, "p4": 4, "p5": 2} if "ml" in name else {"p2": 16}
        assert {k: v.shape[-1] for k, v in feats.items() if k.startswith("p")} == sizes
        assert all(v.shape[:2] == (4, 256) for k, v in feats.items() if k.startswith("p"))
    loss, logs = m(crops, coords, flags, 0.99)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(logs) >= {"loss"} | {f"loss_{lvl}" for lvl in m.levels}
    expected = losses.decon_loss(logs.get("loss_enc"), logs.get("loss_dec"), m.alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    if m.dec_levels:
        dec = torch.stack([logs[f"loss_{lvl}"] for lvl in m.dec_levels]).mean()
        assert logs["loss_dec"].item() == pytest.approx(dec.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_training_steps_of_every_variant(name):
    args = variant_args(name)
    torch.manual_seed(0)
    m = pretrain.build_model(args).to(memory_format=torch.channels_last)
    opt = pretrain.build_optimizer(args, [p for p in m.parameters() if p.requires_grad])
    for g in opt.param_groups:
        g["lr"] = 0.05
    crops, coords, flags = batch()
    crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    s0 = {k: v.clone() for k, v in m.student.state_dict().items()}
    for step, mom in enumerate((0.99, 0.9)):
        s_before = [p.detach().clone() for p in m.student.parameters()]
        t_before = [p.detach().clone() for p in m.teacher.parameters()]
        loss, _ = m(crops, coords, flags, mom)
        # the teacher moved by EMA of the student, before the teacher forward of this step
        for t_new, t_old, s_old in zip(m.teacher.parameters(), t_before, s_before):
            torch.testing.assert_close(t_new, mom * t_old + (1 - mom) * s_old, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not any(p.requires_grad for p in m.teacher.parameters())
    changed = [k for k, v in m.student.state_dict().items() if v.dtype.is_floating_point and
               not torch.equal(v, s0[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("heads.") for k in changed)
    if m.student.decoder is not None:
        assert any(k.startswith("decoder.") for k in changed)
    t_enc = dict(m.teacher.encoder.named_parameters())["conv1.weight"]
    assert not torch.equal(t_enc, s0["encoder.conv1.weight"])  # teacher moved after student updates
    if m.framework == "slotcon":
        assert any(getattr(m, f"center_{lvl}").abs().sum() > 0 for lvl in m.levels)
    else:
        assert all(int(getattr(m, f"queue_ptr_{lvl}")) == 2 * 4 % 32 for lvl in m.levels)


def test_skip_dropout_is_student_only_training_only_and_never_on_c5():
    m = tiny_model("decon-ml-slotcon-fpn")
    assert isinstance(m.student.decoder.skip_dropout, nn.Dropout2d) and m.student.decoder.skip_dropout.p == 0.5
    assert isinstance(m.teacher.decoder.skip_dropout, nn.Identity)
    dec = m.student.decoder
    feats = [torch.randn(2, c, 32 // 2 ** i, 32 // 2 ** i) for i, c in enumerate((64, 128, 256, 512))]
    dec.train()
    a, b = dec(feats), dec(feats)
    assert not torch.allclose(a["p2"], b["p2"])      # random channel masks in training
    torch.testing.assert_close(a["p5"], b["p5"])     # p5 only sees c5: never dropped
    dec.eval()
    torch.testing.assert_close(dec(feats)["p2"], dec(feats)["p2"])


def test_teacher_decoder_prototypes_follow_the_ema():
    """The authors' code never updates the teacher's decoder prototypes (notes, Pitfall B); ours does."""
    m = tiny_model("decon-sl-slotcon-fcn")
    with torch.no_grad():
        m.student.heads["fcn"].prototypes.weight.add_(1.0)
    before = m.teacher.heads["fcn"].prototypes.weight.clone()
    m.update_teacher(0.9)
    torch.testing.assert_close(m.teacher.heads["fcn"].prototypes.weight,
                               0.9 * before + 0.1 * m.student.heads["fcn"].prototypes.weight)


def test_bf16_autocast_forward_is_finite_and_close_to_fp32():
    m = tiny_model("decon-sl-slotcon-fcn")
    crops, coords, flags = batch()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    loss32, _ = m(crops, coords, flags, 1.0)
    m.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = m(crops, coords, flags, 1.0)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)


# ---------------------------------------------------------------- data

def _save(img, path, **kw):
    img.save(path, **kw)
    return str(path)


def test_load_rgb_converts_every_mode(tmp_path):
    gray = _save(Image.new("L", (8, 6), 100), tmp_path / "gray.png")
    rgba = Image.new("RGBA", (8, 6), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))
    rgba = _save(rgba, tmp_path / "rgba.png")
    pal = _save(Image.new("RGB", (8, 6), (0, 0, 255)).convert("P"), tmp_path / "pal.png")
    deep = _save(Image.fromarray(np.full((6, 8), 65535, np.uint16)), tmp_path / "deep.png")
    cmyk = _save(Image.new("CMYK", (8, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    for p in (gray, rgba, pal, deep, cmyk):
        im = data.load_rgb(p)
        assert im.mode == "RGB" and im.size == (8, 6), p
    assert data.load_rgb(gray).getpixel((1, 1)) == (100, 100, 100)
    assert data.load_rgb(rgba).getpixel((0, 0)) == (0, 0, 0) and data.load_rgb(rgba).getpixel((1, 1)) == (200, 10, 10)
    assert data.load_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    assert data.load_rgb(pal).getpixel((0, 0)) == (0, 0, 255)
    r, g, b = data.load_rgb(cmyk).getpixel((3, 3))
    assert r > 200 and g < 60 and b < 60


def test_load_rgb_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(im, tmp_path / "rot.jpg", exif=exif)
    assert data.load_rgb(path).size == (4, 8)


def test_image_folder_skips_corrupt_files_once_with_their_path(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    _save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "sub" / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    jpg = tmp_path / "c.jpg"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated
    (tmp_path / "notes.txt").write_text("ignored")
    ds = data.ImageFolder(str(tmp_path))
    assert len(ds) == 3  # recursive, image extensions only
    got = [ds[i].getpixel((0, 0)) for i in range(3)] + [ds[1].getpixel((0, 0))]
    assert got == [(1, 2, 3)] * 4  # bad files replaced by the next readable one
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert sum("b.jpg" in ln for ln in lines) == 1 and sum("c.jpg" in ln for ln in lines) == 1
    assert all("cannot decode" in ln for ln in lines)


def test_image_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        data.ImageFolder(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no images"):
        data.ImageFolder(str(tmp_path))


def test_synthetic_scenes_are_deterministic_and_varied():
    a, ma = data.synthetic_scene(3, 64, seed=1)
    b, mb = data.synthetic_scene(3, 64, seed=1)
    c, _ = data.synthetic_scene(3, 64, seed=2)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8 and ma.shape == (64, 64)
    classes = set()
    for i in range(40):
        classes |= set(np.unique(data.synthetic_scene(i, 64)[1]).tolist())
    assert classes == set(range(data.NUM_SYNTHETIC_CLASSES + 1))


def test_seeded_augmentation_ignores_worker_and_global_rng_state():
    ds = pretrain.SeededAugment(data.SyntheticScenes(4, 64, 0, transform=data.SlotConTwoView(32)), seed=5)
    a = ds[6]
    torch.manual_seed(123)
    data.random.seed(99)
    b = ds[6]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[2][0], ds[6][0])  # same image, another epoch: another augmentation
    state = torch.get_rng_state()
    ds[1]
    assert torch.equal(state, torch.get_rng_state())  # the training RNG (dropout) is untouched


def test_epoch_sampler_resumes_mid_epoch():
    s = pretrain.EpochSampler(23, 4, seed=0)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 20 and len(set(full)) == 20 and all(46 <= k < 69 for k in full)
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[12:]


# ---------------------------------------------------------------- CLI

def run_pretrain(*flags, env=None, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *flags], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=HERE)


@pytest.mark.parametrize("flags,message", [
    (["--alpha", "1.5", "--decoder", "fcn"], "must be in [0, 1]"),
    (["--alpha", "1", "--decoder", "fpn"], "use --decoder none"),
    (["--alpha", "0"], "there is no decoder loss"),
    (["--dropout", "1.0", "--decoder", "fpn"], "must be in [0, 1)"),
    (["--dropout", "0.5", "--decoder", "fcn"], "only the FPN decoder has"),
    (["--deep-supervision", "--decoder", "fcn"], "needs the FPN"),
    (["--decoder", "fpn", "--image-size", "100"], "multiple of 32"),
    (["--data", "/nonexistent/folder"], "no such folder"),
])
def test_impossible_settings_fail_before_work_with_one_line(flags, message, tmp_path):
    r = run_pretrain(*flags, "--output-dir", str(tmp_path / "o"), timeout=60)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("pretrain.py: error:") or message in err[-1]
    assert not (tmp_path / "o").exists()


def test_empty_data_folder_is_an_error(tmp_path):
    r = run_pretrain("--data", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "no images" in r.stderr


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "pretrain.py", "--help"], capture_output=True, text=True, cwd=HERE).stdout
    for flag in ("--framework", "--decoder", "--alpha", "--dropout", "--deep-supervision", "--no-deep-supervision",
                 "--arch", "--data", "--image-size", "--batch-size", "--epochs", "--max-steps", "--optimizer",
                 "--base-lr", "--weight-decay", "--warmup-epochs", "--num-prototypes", "--num-prototypes-dec",
                 "--dim-hidden", "--dim-out", "--queue-size", "--teacher-momentum", "--precision", "--workers",
                 "--output-dir", "--resume", "--seed"):
        assert flag in out, flag


TINY = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--dim-hidden", "32", "--dim-out", "16",
        "--num-prototypes", "8", "--synthetic-images", "16", "--workers", "0", "--log-every", "1"]


def test_pretrain_script_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    r = run_pretrain("--framework", "slotcon", "--decoder", "fpn", "--alpha", "0", "--dropout", "0.5", *TINY,
                     "--epochs", "3", "--max-steps", "3", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for rec in recs:
        assert {"step", "epoch", "loss", "loss_enc", "loss_dec", "lr", "momentum", "img_per_s"} <= set(rec)
        assert math.isfinite(rec["loss"]) and rec["loss_enc"] is None and rec["loss"] == rec["loss_dec"]
    assert recs[0]["momentum"] == pytest.approx(0.99) and recs[1]["momentum"] > 0.99
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1 and ckpt["args"]["alpha"] == 0.0
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "args"}
    r = run_pretrain("--framework", "slotcon", "--decoder", "fpn", "--alpha", "0", "--dropout", "0.5", *TINY,
                     "--epochs", "3", "--max-steps", "4", "--output-dir", str(out), "--resume", str(out / "last.pt"))
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    r = run_pretrain("--framework", "slotcon", "--decoder", "fcn", *TINY, "--epochs", "3", "--max-steps", "5",
                     "--output-dir", str(out), "--resume", str(out / "last.pt"))
    assert r.returncode == 2 and "another variant" in r.stderr and "--decoder fpn (checkpoint) vs fcn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_torchrun_two_gloo_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29517", "pretrain.py", "--framework", "slotcon", "--decoder", "fcn", *TINY, "--device", "cpu",
                        "--epochs", "1", "--max-steps", "2", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]  # rank 0 only writes
    assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 2


# ---------------------------------------------------------------- reliability: resume, SIGTERM, DDP, NaN

RESUME_FLAGS = ["--framework", "slotcon", "--decoder", "fpn", "--alpha", "0", "--dropout", "0.5", "--arch", "resnet18",
                "--image-size", "64", "--batch-size", "8", "--dim-hidden", "32", "--dim-out", "16",
                "--num-prototypes", "8", "--synthetic-images", "24", "--workers", "1", "--log-every", "1",
                "--epochs", "4", "--max-steps", "8"]


def _losses_by_step(path):
    out = {}
    for line in open(path):  # a resumed run appends; the last record of a step is the one that counts
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _wait_for_lines(path, n, proc, timeout=240):
    import time
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached {n} lines")


def test_sigkill_then_resume_continues_the_same_trajectory(tmp_path):
    """Dropout, two views, a data worker, mid-epoch kill: from the checkpoint on, per-step losses equal an
    uninterrupted run's (CPU, fp32)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_pretrain(*RESUME_FLAGS, "--output-dir", str(ref)).returncode == 0
    proc = subprocess.Popen([sys.executable, "pretrain.py", *RESUME_FLAGS, "--save-every", "2", "--output-dir",
                             str(cut)], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(cut / "metrics.jsonl", 5, proc)  # killed during step 6, after the step-4 checkpoint
    proc.kill()
    proc.wait()
    saved = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 4 <= saved < 8
    r = run_pretrain(*RESUME_FLAGS, "--save-every", "2", "--output-dir", str(cut), "--resume", str(cut / "last.pt"))
    assert r.returncode == 0, r.stderr
    a, b = _losses_by_step(ref / "metrics.jsonl"), _losses_by_step(cut / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(saved + 1, 9):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    ta, tb = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (ref, cut))
    assert all(torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6) for k in ta)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    import signal
    flags = RESUME_FLAGS[:-4] + ["--epochs", "300", "--max-steps", "1000"]
    proc = subprocess.Popen([sys.executable, "pretrain.py", *flags, "--output-dir", str(tmp_path)], cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] >= 2 and f"at step {ckpt['step']}" in err and "--resume" in err


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    pretrain.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies_mid_write(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pretrain.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


DDP_SCRIPT = r'''
import os, sys
sys.path.insert(0, sys.argv[1])
import torch, torch.nn as nn, torch.distributed as dist
import pretrain

def per_sample_norm(module):  # the test-only switch: no batch statistics, so batch splits cannot matter
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        elif isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.LayerNorm(child.num_features))
        else:
            per_sample_norm(child)
    return module

def build(flags):
    parser = pretrain.get_args_parser()
    args = pretrain.finalize_args(parser.parse_args(flags + ["--output-dir", sys.argv[2]]), parser)
    torch.manual_seed(0)
    model = per_sample_norm(pretrain.build_model(args))
    model.teacher.requires_grad_(False)  # the new norms of the teacher too: DDP must see only student params
    return model, args

def step(model, lo, hi, ddp=None):
    ds = pretrain.build_dataset(args)
    views, coords, flags = (torch.stack(x) for x in zip(*[ds[i] for i in range(lo, hi)]))
    loss, _ = (ddp if ddp is not None else model)([views[:, 0], views[:, 1]], coords.transpose(0, 1), flags.T, 0.99)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers() if "center" in n or "queue" in n}

VARIANTS = [["--framework", "slotcon", "--decoder", "fpn", "--alpha", "0.5"],
            ["--framework", "densecl", "--decoder", "fcn"]]
COMMON = ["--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--dim-hidden", "32", "--dim-out", "16",
          "--num-prototypes", "8", "--queue-size", "24", "--synthetic-images", "8"]
rank = int(os.environ["RANK"])
refs = []
for v in VARIANTS:
    if rank == 0:  # the single-process reference, before the process group exists
        model, args = build(v + COMMON)
        refs.append(step(model, 0, 8))
dist.init_process_group("gloo")
for i, v in enumerate(VARIANTS):
    model, args = build(v + COMMON)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    loss, grads, bufs = step(model, 4 * rank, 4 * rank + 4, ddp)
    dist.all_reduce(loss)
    if rank == 0:
        ref_loss, ref_grads, ref_bufs = refs[i]
        torch.testing.assert_close(loss / 2, ref_loss, rtol=1e-5, atol=1e-5)
        assert set(grads) == set(ref_grads) and len(grads) > 20
        for n in grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
        for n in bufs:
            torch.testing.assert_close(bufs[n], ref_bufs[n], rtol=1e-5, atol=1e-5, msg=n)
        print("EQUIVALENT", v[1], float(loss / 2), float(ref_loss), len(grads), flush=True)
dist.destroy_process_group()
'''


def test_ddp_two_processes_equal_one_process_at_twice_the_batch(tmp_path):
    """Checks the gathers of the slot contrastive loss, the center all-reduce and the DenseCL queue updates."""
    script = tmp_path / "ddp_equiv.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29518", str(script), HERE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env, cwd=HERE)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "EQUIVALENT slotcon" in r.stdout and "EQUIVALENT densecl" in r.stdout


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = models.DeCon.forward

    def poisoned(self, *a, **kw):
        loss, logs = forward(self, *a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] in (2, 4, 5, 6) else (loss, logs)
    monkeypatch.setattr(models.DeCon, "forward", poisoned)
    parser = pretrain.get_args_parser()
    args = pretrain.finalize_args(parser.parse_args(
        ["--decoder", "fcn", *TINY, "--save-every", "1", "--epochs", "5", "--output-dir", str(tmp_path)]), parser)
    with pytest.raises(SystemExit) as e:
        pretrain.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradients at step 2: step skipped" in err
    assert "3 non-finite steps in a row (last at step 6)" in err and "last.pt (step 5)" in err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # skipped steps leave the weights as they were
    assert ckpt["step"] == 5 and ckpt["skipped"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.dtype.is_floating_point)


def test_images_smaller_than_the_crop_are_upsampled(tmp_path):
    Image.new("RGB", (10, 7), (50, 60, 70)).save(tmp_path / "tiny.png")
    ds = data.ImageFolder(str(tmp_path), data.SlotConTwoView(64))
    views, coords, flags = ds[0]
    assert views.shape == (2, 3, 64, 64) and coords.shape == (2, 4) and flags.shape == (2,)


def test_unwritable_output_dir_fails_before_work(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_pretrain("--output-dir", str(tmp_path / "file" / "out"), timeout=60)
    assert r.returncode == 2 and "--output-dir" in r.stderr and "not writable" in r.stderr


def test_every_torch_load_is_weights_only():
    import re
    for name in os.listdir(HERE):
        if name.endswith(".py"):
            src = open(os.path.join(HERE, name)).read()
            assert "weights_only=False" not in src.replace('"weights_only=False"', ""), name
            for call in re.findall(r"torch\.load\([^)]*\)", src):
                assert "weights_only=True" in call, (name, call)
