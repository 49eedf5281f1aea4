"""Tests of the method and its pre-training, in the order a reader meets the code: the paper's equations and each
loss recomputed a second way, the models and the Table 3 parameter counts, optimization; then data, the training
loop and its operation (resume, pre-emption, one job per folder, DDP, NaN). The downstream rooms and the tools are
tested in test_segmentation.py, test_weights.py, test_detection.py and test_tools.py.

    python -m pytest -q test_*.py
"""
import argparse
import contextlib
import errno
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import bench
import data
import losses
import models
import pretrain
import utils
import weights
from models import Segmenter

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

VARIANTS = pretrain.VARIANTS  # the paper's variants, as the README's table
# the one test size: ResNet-18, 64 px, batch 8, tiny heads
TINY = dict(arch="resnet18", image_size=64, batch_size=8, dim_hidden=32, dim_out=16, num_prototypes=8, queue_size=32,
            synthetic_images=16, workers=0, log_every=1, precision="fp32")  # fp32: the same numbers on every CPU
NOWHERE = os.path.join(tempfile.gettempdir(), "decon-tests-write-nothing-here")


def flags(**kw):
    """Keyword arguments -> pretrain.py command-line flags (True: the bare flag; False: --no-FLAG)."""
    out = []
    for k, v in kw.items():
        if v is None:  # the flag's default
            continue
        name = k.replace("_", "-")
        out += [f"--{name}"] if v is True else [f"--no-{name}"] if v is False else [f"--{name}", str(v)]
    return out


def tiny_args(name="ml-fpn", **extra):
    """pretrain.py's finalized arguments of a paper variant at the test size."""
    parser = pretrain.get_args_parser()
    return pretrain.finalize_args(parser.parse_args(flags(**{**VARIANTS[name], **TINY, "output_dir": NOWHERE,
                                                             **extra})), parser)


def tiny_model(name="ml-fpn", seed=0, **extra):
    """The one tiny-model builder: pretrain.build_model (DeCon with the memory options of `extra`), seeded."""
    torch.manual_seed(seed)
    return pretrain.build_model(tiny_args(name, **extra))


def batch(n=4, size=64, seed=0):
    """Two views of n scenes through the real augmentation: crops list, coords (2, n, 4), flags (2, n)."""
    torch.manual_seed(seed)
    random.seed(seed)
    ds = data.SyntheticScenes(n, 96, seed, transform=data.SlotConTwoView(size))
    views, coords, flags_ = zip(*[ds[i] for i in range(n)])
    views, coords, flags_ = torch.stack(views), torch.stack(coords), torch.stack(flags_)
    return [views[:, 0], views[:, 1]], coords.transpose(0, 1), flags_.T


def fake_checkpoint(path, name="sl-fcn", arch="resnet18"):
    """The one fake-checkpoint helper: a pretrain.py-style last.pt of a tiny variant whose every tensor (BatchNorm
    counters too) is redrawn, so that teacher, student, a fresh model and any two tensors differ. Returns the
    DeCon holding those tensors."""
    args = tiny_args(name, arch=arch)
    model = pretrain.build_model(args)
    g = torch.Generator().manual_seed(0)
    redraw = lambda v: (torch.randn(v.shape, generator=g) if v.is_floating_point()
                        else torch.randint(1, 10 ** 6, v.shape, generator=g))
    model.load_state_dict({k: redraw(v) for k, v in model.state_dict().items()})
    torch.save({"model": model.state_dict(), "args": vars(args), "step": 7, "epoch": 0, "optimizer": {}}, path)
    return model


def pretrain_here(capsys, name="ml-fpn", **extra):
    """pretrain.py's argument checks and main in this process (no interpreter start-up): (exit status, stdout,
    stderr), a paper variant at the test size."""
    parser = pretrain.get_args_parser()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses: at 64 px a second thread costs more than it saves
    try:
        pretrain.main(pretrain.finalize_args(parser.parse_args(flags(**{**VARIANTS[name], **TINY, **extra})), parser))
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_pretrain(name="ml-fpn", timeout=300, **extra):
    """pretrain.py in a subprocess, a paper variant at the test size."""
    argv = flags(**{**VARIANTS[name], **TINY, **extra})
    return subprocess.run([sys.executable, os.path.join(HERE, "pretrain.py"), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


# ---------------------------------------------------------------- SlotCon: invaug, group and slot losses

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

def test_cross_entropy_sum_in_chunks_equals_one_logits_matrix_and_stores_none():
    torch.manual_seed(0)
    N, M, tau = 10, 7, 0.2
    q, k, y = torch.randn(N, 8, requires_grad=True), torch.randn(M, 8), torch.randint(0, M, (N,))

    def run(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            loss = fn()
        loss.backward()
        grad, q.grad = q.grad.clone(), None
        return loss.detach(), grad, sizes

    ref, g_ref, sizes_ref = run(lambda: F.cross_entropy(q @ k.T / tau, y, reduction="sum"))
    got, g_got, sizes = run(lambda: losses.cross_entropy_sum(q, k, y, tau, chunk=3))  # chunks of 3, 3, 3, 1
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-6)
    assert max(sizes_ref) == N * M and max(sizes) < N * M  # the (N, M) log-probabilities are not kept

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


# ---------------------------------------------------------------- DenseCL losses; the objectives' state

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


def test_objectives_keep_their_state():
    """SlotCon's objective moves its center towards the mean teacher score after the loss (Eq. in SlotCon:
    c <- m c + (1 - m) mean); DenseCL's writes the teacher keys into its queues as a ring buffer."""
    torch.manual_seed(0)
    obj = models.SlotConObjective(num_prototypes=4, dim_out=3, dim_hidden=8, center_momentum=0.9)
    pair = lambda: models.Slots(torch.randn(2, 4, 3), torch.randn(2, 4, 3, 3))
    student, teacher = [pair(), pair()], [pair(), pair()]
    full = torch.tensor([[[0.0, 0.0, 1.0, 1.0]] * 2] * 2)
    loss = obj(student, teacher, full, torch.zeros(2, 2, dtype=torch.bool))
    assert torch.isfinite(loss)
    rows = torch.cat([t.scores.permute(0, 2, 3, 1).reshape(-1, 4) for t in teacher])
    torch.testing.assert_close(obj.center, 0.1 * rows.mean(0, keepdim=True))
    dense = models.DenseCLObjective(dim_out=3, queue_size=5)
    for step in range(3):  # 2 keys per step into 5 slots: 0 1 | 2 3 | 4 0
        proj = lambda: models.DenseProjections(*(F.normalize(torch.randn(2, 3, *s), dim=1)
                                                 for s in ((), (4,), (4,), ())))
        t = proj()
        dense([proj()], [t])
    assert int(dense.queue_ptr) == 1
    torch.testing.assert_close(dense.queue[:, 4], t.q[0])
    torch.testing.assert_close(dense.queue[:, 0], t.q[1])
    torch.testing.assert_close(dense.queue2[:, 0], t.pooled[1])


# ---------------------------------------------------------------- models: Table 3, names, every variant

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
    m = tiny_model("ml-fpn")
    assert m.levels == ["p2", "p3", "p4", "p5"] and "c5" not in m.student.heads and "c5" not in m.objectives
    assert not any(".c5." in n for n, _ in m.named_parameters())


def test_export_names_follow_mmseg_and_detectron2():
    fcn = tiny_model("sl-fcn").student.decoder.state_dict()
    assert {"convs.0.conv.weight", "convs.0.bn.running_var", "convs.1.conv.weight"} <= set(fcn)
    fpn_sl = set(tiny_model("sl-fpn").student.decoder.state_dict())
    fpn_ml = set(tiny_model("ml-fpn").student.decoder.state_dict())
    assert {f"fpn_lateral{s}.norm.weight" for s in (2, 3, 4, 5)} <= fpn_sl
    assert "fpn_output2.weight" in fpn_sl and "fpn_output3.weight" not in fpn_sl
    assert {f"fpn_output{s}.norm.running_mean" for s in (2, 3, 4, 5)} <= fpn_ml
    enc = set(tiny_model("slotcon").student.encoder.state_dict())
    assert enc == set(torchvision.models.resnet18().state_dict()) - {"fc.weight", "fc.bias"}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_shapes_of_every_variant(name):
    m = tiny_model(name)
    crops, coords, flags_ = batch()
    feats = m.student.features(crops[0])
    assert feats["c5"].shape == (4, 512, 2, 2)
    if "fcn" in name:
        assert feats["fcn"].shape == (4, 256, 2, 2)
    if "fpn" in name:
        sizes = {"p2": 16, "p3": 8, "p4": 4, "p5": 2} if "ml" in name else {"p2": 16}
        assert {k: v.shape[-1] for k, v in feats.items() if k.startswith("p")} == sizes
        assert all(v.shape[:2] == (4, 256) for k, v in feats.items() if k.startswith("p"))
    (out,) = m.student([crops[0]])
    for lvl in m.levels:  # named head outputs
        if m.framework == "slotcon":
            assert out[lvl].slots.shape == (4, 8, 16) and out[lvl].scores.shape[:2] == (4, 8)
        else:
            assert out[lvl].q.shape == (4, 16) and out[lvl].grid.shape[:2] == (4, 16)
    loss, logs = m(crops, coords, flags_, 0.99)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert set(logs) >= {"loss"} | {f"loss_{lvl}" for lvl in m.levels}
    expected = losses.decon_loss(logs.get("loss_enc"), logs.get("loss_dec"), m.alpha)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    if m.dec_levels:
        dec = torch.stack([logs[f"loss_{lvl}"] for lvl in m.dec_levels]).mean()
        assert logs["loss_dec"].item() == pytest.approx(dec.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_training_steps_of_every_variant(name):
    args = tiny_args(name)
    m = tiny_model(name).to(memory_format=torch.channels_last)
    opt = pretrain.build_optimizer(args, [p for p in m.parameters() if p.requires_grad])
    for g in opt.param_groups:
        g["lr"] = 0.05
    crops, coords, flags_ = batch()
    crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
    s0 = {k: v.clone() for k, v in m.student.state_dict().items()}
    for step, mom in enumerate((0.99, 0.9)):
        s_before = [p.detach().clone() for p in m.student.parameters()]
        t_before = [p.detach().clone() for p in m.teacher.parameters()]
        loss, _ = m(crops, coords, flags_, mom)
        # the teacher moved by EMA of the student, before the teacher forward of this step
        for t_new, t_old, s_old in zip(m.teacher.parameters(), t_before, s_before):
            torch.testing.assert_close(t_new, mom * t_old + (1 - mom) * s_old, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not any(p.requires_grad for p in m.teacher.parameters())
    changed_ = [k for k, v in m.student.state_dict().items() if v.dtype.is_floating_point and
                not torch.equal(v, s0[k])]
    assert any(k.startswith("encoder.") for k in changed_) and any(k.startswith("heads.") for k in changed_)
    if m.student.decoder is not None:
        assert any(k.startswith("decoder.") for k in changed_)
    t_enc = dict(m.teacher.encoder.named_parameters())["conv1.weight"]
    assert not torch.equal(t_enc, s0["encoder.conv1.weight"])  # teacher moved after student updates
    if m.framework == "slotcon":
        assert any(m.objectives[lvl].center.abs().sum() > 0 for lvl in m.levels)
    else:
        assert all(int(m.objectives[lvl].queue_ptr) == 2 * 4 % 32 for lvl in m.levels)


def test_skip_dropout_is_student_only_training_only_and_never_on_c5():
    m = tiny_model("ml-fpn")
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
    m = tiny_model("sl-fcn")
    with torch.no_grad():
        m.student.heads["fcn"].prototypes.weight.add_(1.0)
    before = m.teacher.heads["fcn"].prototypes.weight.clone()
    m.update_teacher(0.9)
    torch.testing.assert_close(m.teacher.heads["fcn"].prototypes.weight,
                               0.9 * before + 0.1 * m.student.heads["fcn"].prototypes.weight)


def test_bf16_autocast_forward_is_finite_and_close_to_fp32():
    m = tiny_model("sl-fcn")
    crops, coords, flags_ = batch()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    loss32, _ = m(crops, coords, flags_, 1.0)
    m.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = m(crops, coords, flags_, 1.0)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)


def test_a_framework_is_named_once_and_an_unknown_one_is_an_error(tmp_path):
    """Every framework-dependent part comes from models.FRAMEWORKS; a name it does not hold stops with one line."""
    assert list(models.FRAMEWORKS) == ["slotcon", "densecl"]
    for name, fw in models.FRAMEWORKS.items():
        m = tiny_model("slotcon" if name == "slotcon" else "densecl")
        assert m.framework == name and (m.student_views, m.teacher_views) == fw.views
        assert type(m.objectives["c5"]).views == fw.views and fw.recipe["batch_size"] in (256, 512)
        assert bool(m.student.encoder.layer1[0].bn2.weight.abs().sum() == 0) == fw.zero_init_residual  # ResNet-18
    with pytest.raises(ValueError, match="unknown framework 'mae'; choose from slotcon, densecl"):
        models.DeCon("mae", "resnet18")
    path = tmp_path / "last.pt"
    fake_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["args"]["framework"] = "mae"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="framework 'mae' is not one of slotcon, densecl"):
        weights.load_pretrained(path)


def test_fcn_backbone_dilates_layer4_as_mmseg_contract_dilation():
    """mmseg's ResNet with dilations (1, 1, 1, 2), strides (1, 2, 2, 1) and contract_dilation=True (SlotCon's FCN
    configs): layer4's first block keeps dilation 1 (stride 1), the others dilation 2; c5 at stride 16."""
    net = models.Backbone("resnet50", dilate_c5=True)
    convs = [(b.conv2.stride, b.conv2.dilation, b.conv2.padding) for b in net.layer4]
    assert convs == [((1, 1), (1, 1), (1, 1)), ((1, 1), (2, 2), (2, 2)), ((1, 1), (2, 2), (2, 2))]
    assert net.layer4[0].downsample[0].stride == (1, 1)
    assert all(b.conv2.dilation == (1, 1) for layer in (net.layer1, net.layer2, net.layer3) for b in layer)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 64, 64))[3].shape == (1, 2048, 4, 4)
    assert Segmenter("resnet50", "fcn", 3).backbone.layer4[0].conv2.dilation == (1, 1)


def test_each_framework_initializes_its_resnet_as_its_own_code():
    """SlotCon's ResNet zeroes the last BatchNorm of every residual block; DenseCL's (WXinlong/DenseCL, mmselfsup)
    does not."""
    last_bn = lambda m: [b.bn2.weight for layer in (m.layer1, m.layer4) for b in layer]  # ResNet-18: bn2 is last
    assert all((w == 0).all() for w in last_bn(tiny_model("slotcon").student.encoder))
    assert all((w == 1).all() for w in last_bn(tiny_model("densecl").student.encoder))


# ---------------------------------------------------------------- memory and speed options (speed.py)

def step_and_grads(model, size=32):
    """Loss, student gradients, state dict after backward, and the bytes autograd saved in the forward."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = model(*batch(4, size), 0.99)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {k: v.clone() for k, v in model.state_dict().items()}, sum(saved.values())


@pytest.mark.parametrize("name,option", [("ml-fpn", "checkpoint_heads"),
                                         ("densecl-ml-fpn", "checkpoint_heads"),
                                         ("ml-fpn", "checkpoint_encoder"),
                                         ("ml-fpn", "checkpoint_decoder")])
def test_checkpointing_gives_the_same_loss_gradients_and_bn_statistics(name, option):
    dropout = 0.5 if option == "checkpoint_decoder" else 0.0  # the recompute must draw the same skip-dropout masks
    loss, grads, state, saved = step_and_grads(tiny_model(name, dropout=dropout))
    loss_c, grads_c, state_c, saved_c = step_and_grads(tiny_model(name, dropout=dropout, **{option: True}))
    assert saved_c < saved  # the checkpointed activations were not stored
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
    part = {"checkpoint_heads": "student.heads.p2", "checkpoint_encoder": "student.encoder.conv1",
            "checkpoint_decoder": "student.decoder.fpn_lateral2"}[option]
    assert grads_c.keys() == grads.keys() and any(k.startswith(part) for k in grads)
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=0, atol=1e-5, msg=k)
    for k in state:  # the recompute in backward did not update the BatchNorm running statistics again
        torch.testing.assert_close(state_c[k], state[k], rtol=0, atol=1e-6, msg=k)
    assert state.keys() == state_c.keys()  # the options leave the state-dict keys alone


def test_recompute_follows_norm_layers_swapped_after_it_is_applied():
    """pretrain.py converts BatchNorm to SyncBatchNorm on several GPUs after the memory options are applied: the
    recomputed heads must run the swapped layers (here a per-sample norm, which runs on CPU)."""
    loss, grads, _, _ = step_and_grads(per_sample_norm(tiny_model(dropout=0.0)))
    loss_c, grads_c, _, _ = step_and_grads(per_sample_norm(tiny_model(dropout=0.0, checkpoint_heads=True,
                                                                      checkpoint_encoder=True)))
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=1e-5)
    assert grads_c.keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(grads_c[k], grads[k], rtol=0, atol=1e-5, msg=k)


def test_batch_views_is_per_view_without_batch_statistics_and_differs_with_them():
    per_view, batched = tiny_model(dropout=0.0), tiny_model(dropout=0.0, batch_views=True)
    for m in (per_view, batched):
        m.eval()  # BatchNorm from running statistics: each image is computed independently of the batch
    loss, grads, _, _ = step_and_grads(per_view)
    loss_b, grads_b, _, _ = step_and_grads(batched)
    torch.testing.assert_close(loss_b, loss, rtol=1e-5, atol=1e-5)
    for k in grads:
        torch.testing.assert_close(grads_b[k], grads[k], rtol=1e-4, atol=1e-5, msg=k)
    loss_train, _, _, _ = step_and_grads(tiny_model(dropout=0.0))
    loss_train_b, _, _, _ = step_and_grads(tiny_model(dropout=0.0, batch_views=True))
    assert torch.isfinite(loss_train_b)
    assert abs(loss_train_b.item() - loss_train.item()) > 1e-6  # statistics over 2B images, not B


# ---------------------------------------------------------------- optimization: schedules, LARS, the NaN guard

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


@pytest.mark.parametrize("kind", ["lars", "sgd"])
def test_a_non_finite_step_is_skipped_and_the_others_follow_the_formula(kind):
    """train_step three times on a one-layer 'model': gradients 0.5, then non-finite, then 0.5 again. The
    skipped step leaves weights and momentum as they were; the others follow mu = 0.9 mu + d, p = p - lr * mu
    with d = g + wd * p (SGD: every parameter; LARS: no decay on 1-D parameters)."""
    w, b = nn.Parameter(torch.full((3, 2), 2.0)), nn.Parameter(torch.full((3,), 2.0))
    opt = pretrain.build_optimizer(argparse.Namespace(optimizer=kind, weight_decay=0.1), [w, b])
    wd = 0.1 if kind == "sgd" else 0.0
    p_ref, mu_ref, finites = 2.0, 0.0, []
    for bad in (False, True, False):
        def model(*_, bad=bad):  # loss = 0.5 (w.sum() + b.sum()): every gradient 0.5 (or non-finite)
            loss = (w.sum() + b.sum()) * (float("nan") if bad else 0.5)
            return loss, {"loss": loss.detach()}
        before = [t.detach().clone() for t in [w, b, *[v for s in opt.state.values() for v in s.values()]]]
        _, finite = pretrain.train_step(model, opt, contextlib.nullcontext(), None, None, None, 0.1, None)
        finites.append(finite)
        if bad:
            after = [w, b, *[v for s in opt.state.values() for v in s.values()]]
            assert len(after) == 4 and all(torch.equal(x, y) for x, y in zip(before, after))
        else:
            mu_ref = 0.9 * mu_ref + 0.5 + wd * p_ref
            p_ref = p_ref - 0.1 * mu_ref
        torch.testing.assert_close(b, torch.full((3,), p_ref))
    assert finites == [True, False, True]
    assert p_ref == pytest.approx(1.855 if kind == "lars" else 1.7977)  # by hand


def lars_per_parameter(params, lr, weight_decay, momentum, eta, state):
    """The reference LARS: one parameter at a time, as the formula reads (pretrain.LARS's docstring)."""
    for p in params:
        d = p.grad
        if p.ndim > 1:
            d = d + weight_decay * p
            p_norm, d_norm = torch.norm(p), torch.norm(d)
            d = d * (eta * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0)
        mu = state.setdefault(p, torch.zeros_like(p))
        mu.mul_(momentum).add_(d)
        p.sub_(lr * mu)


def test_multi_tensor_lars_equals_the_per_parameter_formula():
    """Matrices, 4-D kernels, 1-D parameters, a zero tensor (trust ratio 1) and a parameter without a gradient,
    three steps with new gradients each."""
    g = torch.Generator().manual_seed(0)
    shapes = [(8, 4, 3, 3), (16,), (5, 7), (3,), (6, 2, 1, 1)]
    ours = [nn.Parameter(torch.randn(s, generator=g)) for s in shapes] + [nn.Parameter(torch.zeros(4, 4))]
    frozen = nn.Parameter(torch.randn(3, 3, generator=g))
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    opt, state = pretrain.LARS(ours + [frozen], lr=0.3, weight_decay=1e-2, momentum=0.9, eta=0.02), {}
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ours[-1].grad.zero_()  # |p| = |d| = 0: the trust ratio is 1
        ref[-1].grad.zero_()
        opt.step()
        with torch.no_grad():
            lars_per_parameter(ref, 0.3, 1e-2, 0.9, 0.02, state)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert frozen not in opt.state and not torch.equal(ours[0], ref[0].detach() * 0)


def test_multi_tensor_ema_equals_the_per_parameter_lerp():
    m = tiny_model("sl-fcn")
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    expected = [0.97 * t + 0.03 * s for t, s in zip(m.teacher.parameters(), m.student.parameters())]
    m.update_teacher(0.97)
    for t, e in zip(m.teacher.parameters(), expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ml-fpn", "densecl-sl-fpn"])
def test_optimizer_step_and_ema_dispatch_fewer_ops_than_there_are_parameters(name):
    """Counted with a dispatch mode (bench.OpCount): on a GPU each aten op is at least one kernel launch."""
    args = tiny_args(name)
    m = tiny_model(name)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = pretrain.build_optimizer(args, params)
    crops, coords, flags_ = batch()
    pretrain.train_step(m, opt, contextlib.nullcontext(), crops, coords, flags_, 0.1, 0.99)
    with bench.OpCount() as step:
        opt.step()
    with bench.OpCount() as ema:
        m.update_teacher(0.99)
    assert len(params) > 80 and 0 < step.n < 40 and ema.n == 1, (len(params), step.n, ema.n)


def test_precision_follows_what_the_cpu_runs_natively_and_nhwc_is_for_cuda(tmp_path, monkeypatch, capsys):
    amx, avx2, arm = tmp_path / "amx", tmp_path / "avx2", tmp_path / "arm"
    amx.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16 amx_int8\n")
    avx2.write_text("processor : 0\nflags : fpu sse2 avx avx2 fma\n")
    arm.write_text("processor : 0\nFeatures : fp asimd sve bf16 i8mm\n")
    assert utils.cpu_has_native_bf16(amx) and utils.cpu_has_native_bf16(arm)
    assert not utils.cpu_has_native_bf16(avx2) and not utils.cpu_has_native_bf16(tmp_path / "no-such-file")
    for native in (True, False):
        monkeypatch.setattr(utils, "cpu_has_native_bf16", lambda native=native: native)
        assert utils.choose_precision("cpu") == ("bf16" if native else "fp32")
        assert utils.choose_precision("cuda") == "bf16" and utils.choose_precision("cpu", "fp32") == "fp32"
        assert utils.memory_format("cpu") == torch.contiguous_format and utils.memory_format("cuda") == torch.channels_last
        assert capsys.readouterr().err == ""
        assert utils.choose_precision("cpu", "bf16") == "bf16"  # asked for: obeyed, and warned about if emulated
        err = capsys.readouterr().err
        assert (err == "") if native else (err.startswith("warning: --precision bf16 on a CPU without bf16 "
                                                           "instructions") and err.count("\n") == 1)
        args = tiny_args("slotcon", precision=None, device="cpu")
        assert args.precision == ("bf16" if native else "fp32")


def test_schedule_defaults_fit_any_length(tmp_path, capsys):
    """Values derived from the recipe fit a short run (and say so); values typed are still checked."""
    args = tiny_args("slotcon", precision=None, epochs=2)
    assert args.warmup_epochs == pytest.approx(0.2) and "note: warm-up 0.2 epochs" in capsys.readouterr().out
    assert tiny_args("slotcon", epochs=100).warmup_epochs == 5
    with pytest.raises(SystemExit):
        tiny_args("slotcon", epochs=2, warmup_epochs=3)
    assert "error: --warmup-epochs 3: must be in [0, --epochs 2)" in capsys.readouterr().err


# ---------------------------------------------------------------- data: decoding, folders, scenes, two views, sampling

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

def test_symlink_loops_list_each_image_once(tmp_path, capsys):
    """A loop through a link to an ancestor, a second loop, a link to a file already listed, macOS archive
    leftovers: three distinct images, the duplicates counted. (Listed in a subprocess: a walk that follows
    two loops without a stop never ends.)"""
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    for path in (root / "x.png", root / "a" / "y.png", root / "a" / "b" / "z.png"):
        _save(Image.new("RGB", (8, 8)), path)
    os.symlink(root, root / "a" / "b" / "loop")
    os.symlink(root / "a", root / "a" / "b" / "loop2")
    os.symlink(root / "x.png", root / "a" / "x_again.png")
    (root / "__MACOSX").mkdir()
    _save(Image.new("RGB", (8, 8)), root / "__MACOSX" / "x.png")
    (root / "._x.png").write_bytes(b"resource fork")
    code = f"import data; print(repr(data.list_images({str(root)!r})))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert r.returncode == 0, r.stderr
    listed = eval(r.stdout.strip().splitlines()[-1])
    assert sorted(os.path.relpath(f, root) for f in listed) == ["a/b/z.png", "a/y.png", "x.png"]
    assert "paths reached again through symbolic links were left out (3 distinct images)" in r.stdout

def test_images_smaller_than_the_crop_are_upsampled(tmp_path):
    Image.new("RGB", (10, 7), (50, 60, 70)).save(tmp_path / "tiny.png")
    ds = data.ImageFolder(str(tmp_path), data.SlotConTwoView(64))
    views, coords, flags = ds[0]
    assert views.shape == (2, 3, 64, 64) and coords.shape == (2, 4) and flags.shape == (2,)

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

def test_seeded_augmentation_ignores_worker_and_global_rng_state():
    ds = data.SeededAugment(data.SyntheticScenes(4, 64, 0, transform=data.SlotConTwoView(32)), seed=5)
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
    s = data.EpochSampler(23, 4, seed=0)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 20 and len(set(full)) == 20 and all(46 <= k < 69 for k in full)
    s.set_epoch(2, start_batch=3)
    assert list(s) == full[12:]


# ---------------------------------------------------------------- pretrain.py: command line

def run_script(script, *argv, timeout=60):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@pytest.mark.parametrize("argv,message", [
    (["--alpha", "1.5", "--decoder", "fcn"], "must be in [0, 1]"),
    (["--alpha", "1", "--decoder", "fpn"], "use --decoder none"),
    (["--alpha", "0"], "there is no decoder loss"),
    (["--dropout", "1.0", "--decoder", "fpn"], "must be in [0, 1)"),
    (["--dropout", "0.5", "--decoder", "fcn"], "only the FPN decoder has"),
    (["--deep-supervision", "--decoder", "fcn"], "needs the FPN"),
    (["--checkpoint-decoder"], "there is no decoder to recompute"),
    (["--decoder", "fpn", "--image-size", "100"], "multiple of 32"),
    (["--data", "/nonexistent/folder"], "no such folder"),
    (["--decoder", "unet"], "argument --decoder: invalid choice: 'unet'"),
])
def test_impossible_settings_fail_before_work_with_one_line(argv, message, tmp_path, capsys):
    parser = pretrain.get_args_parser()
    with pytest.raises(SystemExit) as e:
        pretrain.finalize_args(parser.parse_args(argv + ["--output-dir", str(tmp_path / "o")]), parser)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err  # one line
    assert not (tmp_path / "o").exists()


def test_empty_data_folder_is_an_error(tmp_path, capsys):
    code, _, err = pretrain_here(capsys, data=tmp_path, output_dir=tmp_path / "o")
    assert code == 2 and err.startswith(f"error: --data {tmp_path}: no images") and err.count("\n") == 1


def test_help_documents_every_flag():
    out = run_script("pretrain.py", "--help").stdout
    for flag in ("--framework", "--decoder", "--alpha", "--dropout", "--deep-supervision", "--no-deep-supervision",
                 "--arch", "--data", "--image-size", "--batch-size", "--epochs", "--max-steps", "--optimizer",
                 "--base-lr", "--weight-decay", "--warmup-epochs", "--num-prototypes", "--num-prototypes-dec",
                 "--dim-hidden", "--dim-out", "--queue-size", "--teacher-momentum", "--precision", "--workers",
                 "--output-dir", "--resume", "--auto-resume", "--overwrite", "--seed", "--checkpoint-heads",
                 "--batch-views"):
        assert flag in out, flag
    for group in ("method (paper Sec. 3):", "architecture:", "data:", "optimization:", "run:"):
        assert group in out, group


def test_pretrain_script_end_to_end_and_resume(tmp_path):
    out = tmp_path / "run"
    r = run_pretrain(epochs=3, max_steps=3, output_dir=out)
    assert r.returncode == 0, r.stderr
    assert "pre-training DeCon-ML-SlotCon-FPN: levels p2..p5, alpha 0, skip dropout 0.5\n" in r.stdout
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert {rec["variant"] for rec in recs} == {"DeCon-ML-SlotCon-FPN: levels p2..p5, alpha 0, skip dropout 0.5"}
    for rec in recs:
        assert {"step", "epoch", "loss", "loss_enc", "loss_dec", "lr", "momentum", "img_per_s"} <= set(rec)
        assert math.isfinite(rec["loss"]) and rec["loss_enc"] is None and rec["loss"] == rec["loss_dec"]
    assert recs[0]["momentum"] == pytest.approx(0.99) and recs[1]["momentum"] > 0.99
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1 and ckpt["args"]["alpha"] == 0.0
    assert ckpt["args"]["variant"] == recs[0]["variant"]
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "args"}
    r = run_pretrain(epochs=3, max_steps=4, output_dir=out, resume=out / "last.pt")
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    r = run_pretrain("sl-fcn", epochs=3, max_steps=5, output_dir=out, resume=out / "last.pt")
    assert r.returncode == 2 and "another variant" in r.stderr and "--decoder fpn (checkpoint) vs fcn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name,extra,variant,warning", [
    ("ml-fpn", {}, "DeCon-ML-SlotCon-FPN: levels p2..p5, alpha 0, skip dropout 0.5", None),
    ("sl-fcn", dict(alpha=0.25), "DeCon-SL-SlotCon-FCN: levels c5, fcn, alpha 0.25", None),
    ("sl-fpn", {}, "DeCon-SL-SlotCon-FPN: levels c5, p2, alpha 0.5, skip dropout 0", None),
    ("densecl", {}, "DenseCL: level c5", None),
    ("slotcon", dict(decoder="fpn"), "DeCon-ML-SlotCon-FPN: levels c5, p2..p5, alpha 0.5, skip dropout 0",
     "not the paper's DeCon-ML"),
    ("densecl", dict(decoder="fpn"), "DeCon-ML-DenseCL-FPN: levels c5, p2..p5, alpha 0.5, skip dropout 0",
     "the paper ran DenseCL with DeCon-SL only"),
])
def test_the_variant_is_named_as_the_paper_names_it(name, extra, variant, warning):
    args = tiny_args(name, **extra)
    assert args.variant == variant
    assert (args.variant_warning or "").startswith(warning or "")
    assert (args.variant_warning is None) == (warning is None)


# ---------------------------------------------------------------- pretrain.py: long runs

RESUME = dict(synthetic_images=24, workers=1, epochs=4, max_steps=8)  # ML-FPN with skip dropout, a data worker


def _losses_by_step(path):
    out = {}
    for line in open(path):  # a resumed run appends; the last record of a step is the one that counts
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]
    return out


def _wait_for_lines(path, n, proc, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path) and sum(1 for _ in open(path)) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.1)
    raise AssertionError(f"{path} never reached {n} lines")


def popen_pretrain(out, *launcher, **extra):
    """pretrain.py (under `launcher`, e.g. torchrun) in its own process group, ML-FPN at RESUME size."""
    argv = [*launcher, "pretrain.py", *flags(**{**VARIANTS["ml-fpn"], **TINY, **RESUME,
                                                "output_dir": out, **extra})]
    return subprocess.Popen([sys.executable, *argv], cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def kill_tree(pid):
    """SIGKILL `pid` and every process below it, children first found from /proc (as a node's crash would)."""
    children = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (ValueError, OSError):
            pass
    todo, tree = [pid], []
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for p in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_sigkill_then_resume_continues_the_same_trajectory(tmp_path):
    """Dropout, two views, a data worker, mid-epoch kill -9 (the folder's lock goes with the process): restarted
    with --auto-resume, from the checkpoint on, per-step losses equal an uninterrupted run's (CPU, fp32)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_pretrain(**RESUME, output_dir=ref).returncode == 0
    proc = popen_pretrain(cut, save_every=2)
    _wait_for_lines(cut / "metrics.jsonl", 5, proc)  # killed during step 6, after the step-4 checkpoint
    proc.kill()
    proc.wait()
    saved = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 4 <= saved < 8
    assert f"PID {proc.pid}," in (cut / ".lock").read_text()  # the killed job's record: it blocks nothing
    r = run_pretrain(**RESUME, save_every=2, output_dir=cut, auto_resume=True)  # as a requeued job
    assert r.returncode == 0, r.stderr
    a, b = _losses_by_step(ref / "metrics.jsonl"), _losses_by_step(cut / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(saved + 1, 9):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    ta, tb = (torch.load(p / "last.pt", weights_only=True)["model"] for p in (ref, cut))
    assert all(torch.allclose(ta[k].float(), tb[k].float(), atol=1e-6) for k in ta)


def test_two_process_run_killed_and_resumed_on_two_processes_continues_the_same_trajectory(tmp_path):
    """torchrun, 2 gloo processes, skip dropout on (each rank's RNG stream matters): the whole job is killed
    after its step-4 checkpoint, resumed on 2 processes, and from the checkpoint on its per-step losses equal an
    uninterrupted run's. Rank 0 alone writes metrics.jsonl."""
    torchrun = lambda port: ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    proc = popen_pretrain(ref, *torchrun(29531), device="cpu")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    proc = popen_pretrain(cut, *torchrun(29532), device="cpu", save_every=2)
    _wait_for_lines(cut / "metrics.jsonl", 5, proc)
    kill_tree(proc.pid)  # torchrun starts each rank in a process group of its own
    proc.wait()
    saved = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 4 <= saved < 8
    proc = popen_pretrain(cut, *torchrun(29533), device="cpu", save_every=2, resume=cut / "last.pt")
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    a, b = _losses_by_step(ref / "metrics.jsonl"), _losses_by_step(cut / "metrics.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for s in range(saved + 1, 9):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])
    assert [json.loads(line)["step"] for line in open(cut / "metrics.jsonl")] == list(range(1, 9))  # no repeats


def test_sigterm_to_the_process_group_saves_and_exits_0(tmp_path):
    """What a scheduler sends: SIGTERM to every process of the job, DataLoader workers included. The workers
    ignore it; the main process saves last.pt and exits 0."""
    proc = popen_pretrain(tmp_path, workers=2, epochs=300, max_steps=1000)
    _wait_for_lines(tmp_path / "metrics.jsonl", 2, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 0, err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert ckpt["step"] >= 2 and f"at step {ckpt['step']}" in err and "--auto-resume" in err


def hold_folder(folder):
    """Another job holding `folder` (utils.lock_output_dir in a process of its own) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time, utils; utils.lock_output_dir(sys.argv[1]); "
                             "print('held', flush=True); time.sleep(600)", str(folder)], cwd=HERE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def _records(path):
    """metrics.jsonl without its timing fields."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("img_per_s", "time")} for line in open(path)]


def test_a_second_job_in_a_folder_in_use_stops_with_one_line_and_writes_nothing(tmp_path):
    """Started while another job holds the folder: the same command, and a requeued --auto-resume one."""
    out = tmp_path / "run"
    holder = hold_folder(out)
    try:
        for extra in ({"seed": 2}, {"auto_resume": True}):
            r = run_pretrain(**RESUME, output_dir=out, **extra)
            assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
            assert r.stderr.startswith(f"error: --output-dir {out} is in use by another job (host "
                                       f"{socket.gethostname()}, PID {holder.pid}, since "), r.stderr
            assert sorted(os.listdir(out)) == [".lock"] and f"PID {holder.pid}," in (out / ".lock").read_text()
    finally:
        holder.kill()
        holder.wait()


def test_two_jobs_started_together_leave_the_first_ones_run_as_if_alone(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run_pretrain(**RESUME, output_dir=ref).returncode == 0
    first = popen_pretrain(out)
    t0 = time.time()
    while f"PID {first.pid}," not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
        assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()
        time.sleep(0.05)
    second = run_pretrain(**RESUME, output_dir=out, seed=2, auto_resume=True)
    assert second.returncode == 2 and "is in use by another job" in second.stderr
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _records(out / "metrics.jsonl") == _records(ref / "metrics.jsonl")
    a, b = (torch.load(p / "last.pt", weights_only=True) for p in (ref, out))
    assert a["step"] == b["step"] == 8 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    utils.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def dies_mid_write(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_a_run_is_never_replaced_by_accident(tmp_path, capsys):
    """An --output-dir holding last.pt: a new run is refused with one line; --auto-resume continues it (and starts
    fresh where there is none); --overwrite starts over; --resume of that same last.pt continues it."""
    out = tmp_path / "run"
    run = lambda **kw: pretrain_here(capsys, "slotcon", epochs=3, output_dir=out, **kw)
    code, stdout, err = run(auto_resume=True, max_steps=1)
    assert code == 0 and "resumed" not in stdout, err
    code, _, err = run(max_steps=2)
    assert code == 2 and err.count("\n") == 1
    assert f"error: --output-dir {out} already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1  # untouched
    code, stdout, err = run(auto_resume=True, max_steps=2)
    assert code == 0 and f"resumed from {out / 'last.pt'} at step 1" in stdout, err
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    assert run(resume=out / "last.pt", max_steps=3)[0] == 0
    code, _, _ = run(overwrite=True, max_steps=1)
    assert code == 0 and torch.load(out / "last.pt", weights_only=True)["step"] == 1
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1]  # started over
    code, _, err = run(auto_resume=True, overwrite=True)
    assert code == 2 and "--auto-resume with --overwrite: choose one" in err


def test_stale_partial_checkpoints_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt.tmp.12345").write_bytes(b"x" * 2 ** 20)
    code, stdout, err = pretrain_here(capsys, "slotcon", epochs=1, max_steps=1, output_dir=out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == [".lock", "last.pt", "metrics.jsonl"]
    assert "removed" in stdout and "last.pt.tmp.12345 (1 MB)" in stdout


def test_full_disk_at_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    args = tiny_args("sl-fcn", save_every=1, epochs=1, output_dir=tmp_path)
    real_save, saves = torch.save, []

    def fills_the_disk(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(SystemExit) as e:
        pretrain.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    err = err[err.index("error: "):].strip()
    assert err.startswith("error: no space left on the device to write") and "needs about" in err \
        and "MB are free" in err and f"Last good checkpoint, intact: {tmp_path / 'last.pt'} (step 1)" in err
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == [".lock", "last.pt", "metrics.jsonl"]


def test_resume_warns_when_the_data_changed(tmp_path, capsys):
    out = tmp_path / "run"
    run = lambda **kw: pretrain_here(capsys, "slotcon", epochs=3, output_dir=out, auto_resume=True, **kw)
    assert run(max_steps=1)[0] == 0
    data_fp = torch.load(out / "last.pt", weights_only=True)["data"]
    assert data_fp["images"] == 16 and len(data_fp["files_sha1"]) == 40
    code, _, err = run(max_steps=2)
    assert code == 0 and "data differ" not in err
    code, _, err = run(max_steps=3, synthetic_images=24)
    assert code == 0 and "warning: the data differ from the checkpoint's (16 images" in err and "24 images" in err
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (i, 2 * i, 3 * i)).save(folder / f"{i}.png")
    run = lambda **kw: pretrain_here(capsys, "slotcon", epochs=3, data=folder, output_dir=tmp_path / "f",
                                     auto_resume=True, **kw)
    assert run(max_steps=1)[0] == 0
    (folder / "0.png").rename(folder / "renamed.png")  # as many images, another file list
    code, _, err = run(max_steps=2)
    assert code == 0 and "warning: the data differ from the checkpoint's (8 images" in err


def test_a_data_folder_of_broken_files_is_one_line(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    code, _, err = pretrain_here(capsys, "slotcon", data=tmp_path, output_dir=tmp_path / "o")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --data {tmp_path}: none of its 3 image files can be decoded")


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = models.DeCon.forward

    def poisoned(self, *a, **kw):
        loss, logs = forward(self, *a, **kw)
        calls["n"] += 1
        return (loss * float("nan"), logs) if calls["n"] in (2, 4, 5, 6) else (loss, logs)
    monkeypatch.setattr(models.DeCon, "forward", poisoned)
    with pytest.raises(SystemExit) as e:
        pretrain.main(tiny_args("sl-fcn", save_every=1, epochs=5, output_dir=tmp_path))
    assert e.value.code == 1 and calls["n"] == 6
    err = capsys.readouterr().err
    assert [f"at step {n}: step skipped" in err for n in range(1, 7)] == [False, True, False, True, True, True]
    assert "3 non-finite steps in a row (last at step 6)" in err and "last.pt (step 5)" in err
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)  # skipped steps leave the weights as they were
    assert ckpt["step"] == 5 and ckpt["skipped"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.dtype.is_floating_point)
    assert [json.loads(line)["skipped_steps"] for line in open(tmp_path / "metrics.jsonl")] == [0, 1, 1, 2, 3]


def test_unwritable_output_dir_fails_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, _, err = pretrain_here(capsys, output_dir=tmp_path / "file" / "out")
    assert code == 2 and err.startswith(f"error: --output-dir {tmp_path / 'file' / 'out'} cannot be created: ")


def test_every_torch_load_is_weights_only():
    import re
    for name in os.listdir(HERE):
        if name.endswith(".py"):
            src = open(os.path.join(HERE, name)).read()
            assert "weights_only=False" not in src.replace('"weights_only=False"', ""), name
            for call in re.findall(r"torch\.load\([^)]*\)", src):
                assert "weights_only=True" in call, (name, call)


# ---------------------------------------------------------------- DDP: two processes equal one at twice the batch

def per_sample_norm(module):
    """The test-only switch: no batch statistics, so how the batch is split cannot matter."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        elif isinstance(child, nn.BatchNorm1d):
            setattr(module, name, nn.LayerNorm(child.num_features))
        else:
            per_sample_norm(child)
    return module


DDP_CASES = [("ml-fpn", dict(alpha=0.5, dropout=0.0)), ("densecl-sl-fcn", dict(queue_size=24))]


def ddp_step(case, lo, hi, wrap=None):
    """One forward and backward of `case` on scenes lo..hi-1: (loss, gradients, the objectives' state)."""
    name, extra = case
    args = tiny_args(name, synthetic_images=8, **extra)
    model = per_sample_norm(tiny_model(name, synthetic_images=8, **extra))
    model.teacher.requires_grad_(False)  # the new norms of the teacher too: DDP must see student parameters only
    ds = data.pretraining_dataset(models.FRAMEWORKS[args.framework].two_view, args.image_size, args.min_scale,
                                  args.seed, synthetic_images=args.synthetic_images)
    views, coords, flags_ = (torch.stack(x) for x in zip(*[ds[i] for i in range(lo, hi)]))
    runner = wrap(model) if wrap else model
    loss, _ = runner([views[:, 0], views[:, 1]], coords.transpose(0, 1), flags_.T, 0.99)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in model.named_buffers() if n.startswith("objectives.")}


def ddp_worker(rank, port, references):
    """Rank `rank` of 2 (gloo): its half of the batch under DistributedDataParallel, checked on rank 0 against
    the single-process references."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    wrap = lambda model: utils.ddp_without_buffer_sync(model, torch.device("cpu"))
    for case, (ref_loss, ref_grads, ref_bufs) in zip(DDP_CASES, references):
        loss, grads, bufs = ddp_step(case, 4 * rank, 4 * rank + 4, wrap)
        torch.distributed.all_reduce(loss)
        if rank == 0:
            torch.testing.assert_close(loss / 2, ref_loss, rtol=1e-5, atol=1e-5)
            assert set(grads) == set(ref_grads) and len(grads) > 20
            for n in grads:
                torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
            assert set(bufs) == set(ref_bufs) and bufs
            for n in bufs:
                torch.testing.assert_close(bufs[n], ref_bufs[n], rtol=1e-5, atol=1e-5, msg=n)
    utils.shutdown()


def test_ddp_two_processes_equal_one_process_at_twice_the_batch():
    """Checks the gathers of the slot contrastive loss, the center all-reduce and the DenseCL queue updates."""
    references = [ddp_step(case, 0, 8) for case in DDP_CASES]
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, references), nprocs=2, join=True)
