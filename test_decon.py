"""DeCon tests, in the order a reader meets the code: the paper's equations and each loss recomputed a second way,
the models and the Table 3 parameter counts, optimization; then data, the training loop and its reliability
(resume, pre-emption, DDP, NaN); then the downstream scripts (fine-tuning, evaluation, export) and the tools.

    python -m pytest -q test_decon.py
"""
import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import bench
import convert
import data
import eval as eval_module
import finetune_det as fdet
import finetune_seg as ft
import losses
import models
import pretrain
import utils
import visualize
from data import IGNORE_INDEX, DataError, EvalTransform, Transformed, build_dataset, check_dataset
from eval import confusion_matrix, evaluate, predict, segmentation_scores, window_starts
from eval import get_args_parser as eval_parser, main as eval_main
from models import Segmenter

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


def tiny_args(name="decon-ml-slotcon-fpn", **extra):
    """pretrain.py's finalized arguments of a paper variant at the test size."""
    parser = pretrain.get_args_parser()
    return pretrain.finalize_args(parser.parse_args(flags(**{**VARIANTS[name], **TINY, "output_dir": NOWHERE,
                                                             **extra})), parser)


def tiny_model(name="decon-ml-slotcon-fpn", seed=0, **extra):
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


def fake_checkpoint(path, name="decon-sl-slotcon-fcn", arch="resnet18"):
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


def pretrain_here(capsys, name="decon-ml-slotcon-fpn", **extra):
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


def run_pretrain(name="decon-ml-slotcon-fpn", timeout=300, **extra):
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
    m = tiny_model("decon-ml-slotcon-fpn")
    assert m.levels == ["p2", "p3", "p4", "p5"] and "c5" not in m.student.heads and "c5" not in m.objectives
    assert not any(".c5." in n for n, _ in m.named_parameters())


def test_export_names_follow_mmseg_and_detectron2():
    fcn = tiny_model("decon-sl-slotcon-fcn").student.decoder.state_dict()
    assert {"convs.0.conv.weight", "convs.0.bn.running_var", "convs.1.conv.weight"} <= set(fcn)
    fpn_sl = set(tiny_model("decon-sl-slotcon-fpn").student.decoder.state_dict())
    fpn_ml = set(tiny_model("decon-ml-slotcon-fpn").student.decoder.state_dict())
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
    crops, coords, flags_ = batch()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    loss32, _ = m(crops, coords, flags_, 1.0)
    m.load_state_dict(state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16, _ = m(crops, coords, flags_, 1.0)
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert loss16.item() == pytest.approx(loss32.item(), rel=0.05)


@pytest.mark.parametrize("name", ["decon-sl-slotcon-fcn", "decon-ml-densecl-fpn"])
def test_a_state_dict_with_the_per_level_state_on_decon_loads(name):
    """last.pt files that keep the per-level state on DeCon itself (predictors.LVL.*, center_LVL, queue_LVL,
    queue2_LVL, queue_ptr_LVL) load into the objectives, tensor for tensor."""
    source = tiny_model(name, seed=1)
    flat = {}
    for k, v in source.state_dict().items():
        if k.startswith("objectives."):
            _, lvl, rest = k.split(".", 2)
            k = f"predictors.{lvl}.{rest[len('predictor.'):]}" if rest.startswith("predictor.") else f"{rest}_{lvl}"
        flat[k] = v
    assert any(k.startswith(("predictors.", "center_", "queue_ptr_")) for k in flat)
    target = tiny_model(name, seed=2)
    target.load_state_dict(flat)  # strict: every key found
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())


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


@pytest.mark.parametrize("name,option", [("decon-ml-slotcon-fpn", "checkpoint_heads"),
                                         ("decon-ml-densecl-fpn", "checkpoint_heads"),
                                         ("decon-ml-slotcon-fpn", "checkpoint_encoder"),
                                         ("decon-ml-slotcon-fpn", "checkpoint_decoder")])
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
    m = tiny_model("decon-sl-slotcon-fcn")
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    expected = [0.97 * t + 0.03 * s for t, s in zip(m.teacher.parameters(), m.student.parameters())]
    m.update_teacher(0.97)
    for t, e in zip(m.teacher.parameters(), expected):
        torch.testing.assert_close(t, e, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["decon-ml-slotcon-fpn", "decon-sl-densecl-fpn"])
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
    r = run_pretrain("decon-sl-slotcon-fcn", epochs=3, max_steps=5, output_dir=out, resume=out / "last.pt")
    assert r.returncode == 2 and "another variant" in r.stderr and "--decoder fpn (checkpoint) vs fcn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("name,extra,variant,warning", [
    ("decon-ml-slotcon-fpn", {}, "DeCon-ML-SlotCon-FPN: levels p2..p5, alpha 0, skip dropout 0.5", None),
    ("decon-sl-slotcon-fcn", dict(alpha=0.25), "DeCon-SL-SlotCon-FCN: levels c5, fcn, alpha 0.25", None),
    ("decon-sl-slotcon-fpn", {}, "DeCon-SL-SlotCon-FPN: levels c5, p2, alpha 0.5, skip dropout 0", None),
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
    argv = [*launcher, "pretrain.py", *flags(**{**VARIANTS["decon-ml-slotcon-fpn"], **TINY, **RESUME,
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
    args = tiny_args("decon-sl-slotcon-fcn", save_every=1, epochs=1, output_dir=tmp_path)
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
        pretrain.main(tiny_args("decon-sl-slotcon-fcn", save_every=1, epochs=5, output_dir=tmp_path))
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


DDP_CASES = [("decon-ml-slotcon-fpn", dict(alpha=0.5, dropout=0.0)), ("decon-sl-densecl-fcn", dict(queue_size=24))]


def ddp_step(case, lo, hi, wrap=None):
    """One forward and backward of `case` on scenes lo..hi-1: (loss, gradients, the objectives' state)."""
    name, extra = case
    args = tiny_args(name, synthetic_images=8, **extra)
    model = per_sample_norm(tiny_model(name, synthetic_images=8, **extra))
    model.teacher.requires_grad_(False)  # the new norms of the teacher too: DDP must see student parameters only
    ds = data.pretraining_dataset(args.framework, args.image_size, args.min_scale, args.seed,
                                  synthetic_images=args.synthetic_images)
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


# ---------------------------------------------------------------- segmentation: the metric and inference (eval.py)

HAND_CM = np.array([[3, 1, 0, 0, 0],
                    [0, 2, 0, 0, 1],
                    [0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0]])

def test_scores_of_a_hand_made_confusion_matrix():
    s = segmentation_scores(torch.tensor(HAND_CM))
    # IoU_0 = 3 / (4 + 4 - 3), IoU_1 = 2 / (3 + 3 - 2), IoU_3 = 0 / 1, IoU_4 = 0 / 1
    np.testing.assert_allclose(s["iou"], [0.6, 0.5, np.nan, 0.0, 0.0])
    assert s["miou"] == pytest.approx((0.6 + 0.5 + 0 + 0) / 4)
    assert s["pixel_acc"] == pytest.approx(5 / 8)

def test_confusion_matrix_counts_pixels_and_skips_the_ignore_index():
    pairs = [(t, p) for t in range(5) for p in range(5) for _ in range(HAND_CM[t, p])]
    pairs += [(IGNORE_INDEX, 0), (IGNORE_INDEX, 3), (IGNORE_INDEX, 4)]  # ignored whatever the prediction
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    target = torch.tensor([pairs[i][0] for i in order]).view(1, -1)
    pred = torch.tensor([pairs[i][1] for i in order]).view(1, -1)
    assert torch.equal(confusion_matrix(pred, target, 5), torch.tensor(HAND_CM))
    with pytest.raises(ValueError, match="class 7"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]), 5)

def test_all_classes_absent_gives_nan_not_an_error():
    s = segmentation_scores(np.zeros((3, 3)))
    assert np.isnan(s["miou"]) and np.isnan(s["iou"]).all()

class Pointwise(nn.Module):
    """A 1x1 conv: its logits at a pixel depend on that pixel only, so every window agrees with the whole image."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_classes, 1)

    def forward(self, x):
        return self.conv(x)

def test_window_starts_cover_the_side_and_end_flush():
    assert window_starts(37, 16, 10) == [0, 10, 20, 21]
    assert window_starts(16, 16, 10) == [0]
    assert window_starts(9, 16, 10) == [0]  # shorter than a window: one window, the whole side

def test_slide_inference_matches_whole_for_a_pointwise_model():
    torch.manual_seed(0)
    model, image = Pointwise(), torch.randn(2, 3, 37, 45)
    whole = predict(model, image, "whole")
    slide = predict(model, image, "slide", crop=16, stride=10)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    assert predict(model, image, "whole", out_size=(74, 90)).shape == (2, 4, 74, 90)

def test_segmenter_output_size_and_stride():
    x = torch.randn(1, 3, 50, 70)  # not a multiple of 32: the FPN pads internally
    for arch, decoder, stride in (("resnet18", "fcn", 32), ("resnet18", "fpn", 32), ("resnet50", "fcn", 16)):
        model = Segmenter(arch, decoder, 5).eval()
        assert model.output_stride == stride
        with torch.no_grad():
            assert model(x).shape == (1, 5, 50, 70)


def test_refuge_reports_the_optic_disc_as_rim_plus_cup():
    """Classes 0 background, 1 rim, 2 cup. The disc is rim + cup: TP = both in {1, 2}; the cup is class 2."""
    cm = np.array([[50, 3, 1],    # ground truth background: 3 predicted rim, 1 cup
                   [4, 20, 6],    # rim: 4 missed, 6 taken for cup (still disc)
                   [0, 2, 10]])   # cup: 2 taken for rim (still disc)
    regions = eval_module.region_scores(torch.tensor(cm), data.DATASETS["refuge"]["regions"])
    disc_tp, disc_fp, disc_fn = 20 + 6 + 2 + 10, 3 + 1, 4
    cup_tp, cup_fp, cup_fn = 10, 1 + 6, 2
    assert regions["optic disc"]["iou"] == pytest.approx(100 * disc_tp / (disc_tp + disc_fp + disc_fn), abs=1e-4)
    assert regions["optic disc"]["dice"] == pytest.approx(100 * 2 * disc_tp / (2 * disc_tp + disc_fp + disc_fn),
                                                          abs=1e-4)
    assert regions["optic cup"]["iou"] == pytest.approx(100 * cup_tp / (cup_tp + cup_fp + cup_fn), abs=1e-4)
    assert regions["optic cup"]["dice"] == pytest.approx(100 * 2 * cup_tp / (2 * cup_tp + cup_fp + cup_fn), abs=1e-4)
    assert data.DATASETS["refuge"]["classes"] == ("background", "optic disc rim", "optic cup")


# ---------------------------------------------------------------- segmentation datasets, in each dataset's layout

def write_image(path, w=40, h=32, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, fmt)

def write_mask(path, values, w=40, h=32, palette=False, fmt=None):
    """A mask whose rows cycle through `values`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = np.array([values[i % len(values)] for i in range(h)], dtype=np.uint8)[:, None].repeat(w, 1)
    im = Image.fromarray(mask)
    if palette:  # VOC stores class ids as palette indices: putpalette turns the L image into P, ids unchanged
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    im.save(path, fmt)
    return mask

def mask_ids(dataset, idx=0):
    return sorted(np.unique(dataset[idx][1]).tolist())

def make_voc(root):
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    lists = {"train.txt": ["2007_000032"], "aug.txt": ["2008_000002", "2008_000003"], "val.txt": ["2007_000033"]}
    for name, ids in lists.items():
        os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"), exist_ok=True)
        with open(os.path.join(voc, "ImageSets", "Segmentation", name), "w") as f:
            f.write("\n".join(ids) + "\n")
        folder = "SegmentationClassAug" if name == "aug.txt" else "SegmentationClass"
        for i in ids:
            write_image(os.path.join(voc, "JPEGImages", i + ".jpg"))
            write_mask(os.path.join(voc, folder, i + ".png"), [0, 15, 255], palette=folder == "SegmentationClass")
    return voc

def test_voc_loader(tmp_path):
    voc = make_voc(str(tmp_path))
    train = build_dataset("voc", "train", voc)
    assert len(train) == 3 and train.classes[15] == "person"  # train.txt + SBD's aug.txt
    assert mask_ids(train, 0) == [0, 15, 255] and mask_ids(train, 2) == [0, 15, 255]
    assert len(build_dataset("voc", "test", os.path.dirname(voc))) == 1  # VOCdevkit works too; test = val
    image, mask = Transformed(train, EvalTransform(64))[0]
    assert image.shape == (3, 64, 80) and mask.shape == (32, 40)  # short side to 64; the metric at native size

def test_cityscapes_loader_maps_label_ids_to_train_ids(tmp_path):
    root = str(tmp_path)
    for split in ("train", "val"):
        stem = f"aachen_000000_00001{split == 'val'}"
        write_image(os.path.join(root, "leftImg8bit", split, "aachen", stem + "_leftImg8bit.png"))
        write_mask(os.path.join(root, "gtFine", split, "aachen", stem + "_gtFine_labelIds.png"), [0, 7, 26, 33, 4])
    train = build_dataset("cityscapes", "train", root)
    assert len(train) == 1 and len(build_dataset("cityscapes", "test", root)) == 1
    # unlabeled 0 and static 4 -> ignore; road 7 -> 0, car 26 -> 13, bicycle 33 -> 18
    assert mask_ids(train) == [0, 13, 18, 255]

def test_isic2017_loader(tmp_path):
    root = str(tmp_path)
    names = {"train": ("train", "Training"), "val": ("val", "Validation"), "test": ("test", "Test_v2")}
    for split, (sub, tag) in names.items():
        for k in range(2):
            name = f"ISIC_000000{k}"
            write_image(os.path.join(root, sub, f"ISIC-2017_{tag}_Data", name + ".jpg"))
            write_mask(os.path.join(root, sub, f"ISIC-2017_{tag}_Part1_GroundTruth", name + "_segmentation.png"),
                       [0, 255])
        write_image(os.path.join(root, sub, f"ISIC-2017_{tag}_Data", "ISIC_0000000_superpixels.png"))
    for split in names:
        data = build_dataset("isic2017", split, root)
        assert len(data) == 2 and mask_ids(data) == [0, 1]

def make_refuge(root):
    for image, mask in (("REFUGE-Training400/Training400/Glaucoma/g0001.jpg",
                         "Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0001.bmp"),
                        ("REFUGE-Training400/Training400/Non-Glaucoma/n0001.jpg",
                         "Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma/n0001.bmp"),
                        ("REFUGE-Validation400/V0001.jpg", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"),
                        ("REFUGE-Test400/Test400/T0001.jpg", "REFUGE-Test-GT/Disc_Cup_Masks/G/T0001.bmp")):
        write_image(os.path.join(root, image))
        write_mask(os.path.join(root, mask), [255, 128, 0])
    # the annotation archive also holds .jpg illustrations with the same stems: not masks
    write_image(os.path.join(root, "Annotation-Training400/Disc_Cup_Fovea_Illustration/g0001.jpg"))

def test_refuge_loader_maps_grey_levels(tmp_path):
    make_refuge(str(tmp_path))
    train = build_dataset("refuge", "train", str(tmp_path))
    assert len(train) == 2 and train.pairs[0][1].endswith("g0001.bmp")
    image, mask = train[0]
    assert mask[0, 0] == 0 and mask[1, 0] == 1 and mask[2, 0] == 2  # 255 background, 128 disc, 0 cup
    assert len(build_dataset("refuge", "val", str(tmp_path))) == 1
    assert len(build_dataset("refuge", "test", str(tmp_path))) == 1

def make_folder(root, values=(0, 1, 2, 255)):
    for split in ("train", "val", "test"):
        for name in ("a", "sub/b"):
            write_image(os.path.join(root, "images", split, name + ".jpg"))
            write_mask(os.path.join(root, "masks", split, name + ".png"), list(values))
    return root

def test_folder_loader(tmp_path):
    root = make_folder(str(tmp_path))
    data = build_dataset("folder", "val", root, num_classes=3)
    assert len(data) == 2 and data.classes == ("class0", "class1", "class2") and mask_ids(data) == [0, 1, 2, 255]
    check_dataset(data)

def test_synthetic_splits_are_distinct_and_deterministic():
    a, b = build_dataset("synthetic", "train", synthetic_size=64), build_dataset("synthetic", "test", synthetic_size=64)
    assert (len(a), len(b)) == (256, 64)
    assert np.array_equal(np.asarray(a[3][0]), np.asarray(build_dataset("synthetic", "train", synthetic_size=64)[3][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
    assert a[0][1].max() <= 8 and len(a.classes) == 9

def test_image_without_mask_is_named(tmp_path):
    root = make_folder(str(tmp_path))
    write_image(os.path.join(root, "images", "train", "orphan.jpg"))
    with pytest.raises(DataError, match="orphan.jpg has no mask"):
        build_dataset("folder", "train", root, num_classes=3)
    voc = make_voc(str(tmp_path / "v"))
    os.remove(os.path.join(voc, "SegmentationClassAug", "2008_000003.png"))
    with pytest.raises(DataError, match="2008_000003.jpg has no mask"):
        build_dataset("voc", "train", voc)

def test_mask_value_beyond_the_classes_is_named(tmp_path):
    root = make_folder(str(tmp_path), values=(0, 1, 5))
    data = build_dataset("folder", "train", root, num_classes=3)
    with pytest.raises(DataError, match=r"masks/train/a\.png: value 5 is not a class id below 3"):
        check_dataset(data)
    voc = make_voc(str(tmp_path / "v"))
    write_mask(os.path.join(voc, "SegmentationClass", "2007_000033.png"), [0, 21])
    with pytest.raises(DataError, match="2007_000033.png: value 21"):
        check_dataset(build_dataset("voc", "val", voc))


def test_eval_reports_refuge_disc_and_cup(tmp_path, capsys):
    make_refuge(str(tmp_path / "refuge"))
    path = fake_finetuned(str(tmp_path / "seed0.pt"), num_classes=3)
    out = tmp_path / "report.json"
    eval_main(eval_parser().parse_args(["--checkpoint", path, "--dataset", "refuge", "--data-root",
                                        str(tmp_path / "refuge"), "--workers", "0", "--output", str(out),
                                        "--precision", "fp32"]))
    report = json.loads(out.read_text())
    model, _ = eval_module.load_checkpoint(path)  # the same split scored again, outside eval.main
    test = Transformed(build_dataset("refuge", "test", str(tmp_path / "refuge")), EvalTransform(512))
    cm = evaluate(model, test)["cm"]
    assert set(report["regions"]) == {"optic disc", "optic cup"}
    assert report["regions"] == eval_module.region_scores(cm, data.DATASETS["refuge"]["regions"])
    assert "optic disc" in capsys.readouterr().out


def test_macos_archive_leftovers_are_skipped_everywhere(tmp_path):
    root = str(tmp_path)
    make_refuge(root)
    for leftover in ("__MACOSX/REFUGE-Training400/Training400/Glaucoma/g0001.jpg",
                     "REFUGE-Training400/Training400/Glaucoma/._g0001.jpg",
                     "Annotation-Training400/Disc_Cup_Masks/Glaucoma/._g0001.bmp"):
        os.makedirs(os.path.dirname(os.path.join(root, leftover)), exist_ok=True)
        open(os.path.join(root, leftover), "wb").write(b"\x00\x05\x16\x07 AppleDouble")
    train = build_dataset("refuge", "train", root)
    assert len(train) == 2 and not any("MACOSX" in a or "/._" in a for pair in train.pairs for a in pair)
    check_dataset(train)
    folder = make_folder(str(tmp_path / "f"))
    open(os.path.join(folder, "images", "train", "._a.jpg"), "wb").write(b"AppleDouble")
    assert len(build_dataset("folder", "train", folder, num_classes=3)) == 2


def test_layouts_users_already_have(tmp_path):
    """mmseg's converted REFUGE (labels 0 background, 1 cup, 2 rim -> ours), VOC with mmseg's trainaug.txt or
    DeepLab's train_aug.txt, and training / validation folders for --dataset folder."""
    root = str(tmp_path / "refuge")
    for split in ("training", "validation", "test"):
        write_image(os.path.join(root, "images", split, "g0001.png"))
        write_mask(os.path.join(root, "annotations", split, "g0001.png"), [0, 1, 2])
    refuge = build_dataset("refuge", "train", root)
    assert len(refuge) == 1 and len(build_dataset("refuge", "val", root)) == 1
    mask = refuge[0][1]
    assert (mask[0, 0], mask[1, 0], mask[2, 0]) == (0, 2, 1)
    for list_name in ("trainaug.txt", "train_aug.txt"):
        voc = make_voc(str(tmp_path / list_name))
        lists = os.path.join(voc, "ImageSets", "Segmentation")
        os.rename(os.path.join(lists, "aug.txt"), os.path.join(lists, list_name))
        with open(os.path.join(lists, list_name), "a") as f:
            f.write("2007_000032\n")  # train+aug lists hold the VOC train ids too: masks in SegmentationClass
        train = build_dataset("voc", "train", voc)
        assert len(train) == 3 and train.warnings == []
        assert [os.path.basename(os.path.dirname(m)) for _, m in train.pairs] == \
            ["SegmentationClass", "SegmentationClassAug", "SegmentationClassAug"]
    folder = make_folder(str(tmp_path / "f"))
    for split, alias in (("train", "training"), ("val", "validation")):
        for part in ("images", "masks"):
            os.rename(os.path.join(folder, part, split), os.path.join(folder, part, alias))
    assert len(build_dataset("folder", "train", folder, num_classes=3)) == 2
    assert len(build_dataset("folder", "val", folder, num_classes=3)) == 2


def test_voc_without_an_aug_list_warns_at_start_and_at_the_end(tmp_path, capsys):
    voc = make_voc(str(tmp_path))
    os.remove(os.path.join(voc, "ImageSets", "Segmentation", "aug.txt"))
    args = finetune_args("--dataset", "voc", "--data-root", voc, "--arch", "resnet18", "--decoder", "fpn",
                         "--iters", "2", "--batch-size", "2", "--crop-size", "64", "--workers", "0",
                         "--output-dir", str(tmp_path / "out"))
    results = ft.main(args)
    lines = capsys.readouterr()
    assert "warning: no aug.txt, trainaug.txt or train_aug.txt" in lines.err
    assert lines.out.strip().splitlines()[-1].endswith("(1464 images, not the paper's 10582; see docs/DATASETS.md, "
                                                       "'Dataset layouts'))")
    assert results["warnings"] and "training on VOC train.txt only" in results["warnings"][0]


def test_folder_class_names_from_classes_txt(tmp_path, capsys):
    root = make_folder(str(tmp_path))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("background\nanimals\nplants\n")
    assert build_dataset("folder", "val", root).classes == ("background", "animals", "plants")
    assert finetune_args("--dataset", "folder", "--data-root", root).num_classes == 3
    with pytest.raises(SystemExit):
        finetune_args("--dataset", "folder", "--data-root", root, "--num-classes", "4")
    assert "classes.txt: 3 class names, but --num-classes 4" in capsys.readouterr().err


# ---------------------------------------------------------------- finetune_seg.py: flags, fractions, crops

def finetune_args(*argv):
    parser = ft.get_args_parser()
    return ft.finalize_args(parser.parse_args(list(argv)), parser)

def test_flags_are_rejected_before_any_work(tmp_path, capsys):
    for argv, message in ((["--dataset", "voc"], "--data-root is required"),
                          (["--dataset", "voc", "--data-root", str(tmp_path / "nope")], "no such folder"),
                          (["--fraction", "0"], "--fraction 0.0: must be in (0, 1]"),
                          (["--fraction", "1.5"], "--fraction 1.5: must be in (0, 1]"),
                          (["--dataset", "folder", "--data-root", str(tmp_path)], "--num-classes"),
                          (["--select", "best", "--eval-every", "0"], "--select best needs --eval-every"),
                          (["--transfer", "encoder+decoder"], "needs --pretrained")):
        with pytest.raises(SystemExit):
            finetune_args(*argv)
        assert message in capsys.readouterr().err

def test_bad_mask_stops_the_run_before_training(tmp_path):
    root = make_folder(str(tmp_path / "data"), values=(0, 3))
    out = tmp_path / "out"
    args = finetune_args("--dataset", "folder", "--data-root", root, "--num-classes", "3", "--arch", "resnet18",
                         "--workers", "0", "--output-dir", str(out))
    with pytest.raises(SystemExit, match="error: mask .*a.png: value 3"):
        ft.main(args)
    assert not out.exists()

def test_finetune_output_folder_rules(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seed3.pt").write_bytes(b"earlier run")
    with pytest.raises(SystemExit):
        finetune_args("--output-dir", str(out))
    assert f"--output-dir {out} holds an earlier run (seed3.pt); use --overwrite" in capsys.readouterr().err
    assert finetune_args("--output-dir", str(out), "--overwrite").overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):  # cannot be created: refused before any work, as one line
        finetune_args("--output-dir", str(tmp_path / "file" / "out"))
    assert f"--output-dir {tmp_path / 'file' / 'out'} cannot be created: {tmp_path / 'file'} is a file" in \
        capsys.readouterr().err
    assert not (tmp_path / "new").exists() and finetune_args("--output-dir", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # checked without creating anything

@pytest.mark.parametrize("dataset,expected", [
    ("voc", dict(iters=30000, lr=0.003, schedule="step", lr_steps=[21000, 27000], weight_decay=1e-4, crop_size=513,
                 base_size=513, max_size=2049, align_corners=True, mode="whole", select="last")),
    ("cityscapes", dict(iters=90000, lr=0.01, schedule="step", lr_steps=[63000, 81000], weight_decay=1e-4,
                        crop_size=769, base_size=1025, max_size=2049, align_corners=True, mode="slide", stride=513)),
    ("isic2017", dict(iters=24000, lr=0.01, schedule="poly", weight_decay=5e-4, crop_size=512, base_size=512,
                      max_size=None, align_corners=False, mode="whole", select="best", eval_every=500)),
    ("refuge", dict(iters=80000, lr=0.01, schedule="poly", weight_decay=5e-4, crop_size=512, align_corners=False,
                    select="last")),
])
def test_each_dataset_defaults_to_its_paper_recipe(dataset, expected, tmp_path):
    """VOC and Cityscapes: SlotCon's fcn_d6_r50-d16 mmseg configs; ISIC and REFUGE: the paper's Sec. 3.4."""
    args = finetune_args("--dataset", dataset, "--data-root", str(tmp_path))
    assert {k: getattr(args, k) for k in expected} == expected
    assert args.batch_size == 16 and args.momentum == 0.9 and tuple(args.scale_range) == (0.5, 2.0)


def test_step_schedule_and_the_mmcv_rescale_rule(tmp_path):
    lrs = ft.step_schedule(0.003, 30000, [21000, 27000])
    assert (lrs[0], lrs[20999], lrs[21000], lrs[26999], lrs[27000], lrs[-1]) == pytest.approx(
        (0.003, 0.003, 3e-4, 3e-4, 3e-5, 3e-5))
    short = finetune_args("--dataset", "voc", "--data-root", str(tmp_path), "--iters", "1000")
    assert short.lr_steps == [700, 900]  # 70 % and 90 % of the iterations
    assert data.rescaled_size(500, 375, 513, 2049) == (684, 513)      # a VOC image: the short side binds
    assert data.rescaled_size(2048, 1024, 1025, 2049) == (2049, 1025)  # Cityscapes: both bind, barely
    assert data.rescaled_size(500, 375, 513, 2049, ratio=0.5) == (342, 257)
    assert data.rescaled_size(4000, 1000, 513, 2049) == (2049, 512)     # a panorama: the long side binds
    assert data.rescaled_size(40, 32) == (40, 32)
    assert Segmenter("resnet18", "fcn", 3, align_corners=True).align_corners


def test_fraction_subsets_are_deterministic_per_seed_and_nested():
    a = data.fraction_indices(400, 0.05, seed=0)
    assert a == data.fraction_indices(400, 0.05, seed=0) and len(a) == 20 and a == sorted(a)
    assert a != data.fraction_indices(400, 0.05, seed=1)
    assert set(a) <= set(data.fraction_indices(400, 0.25, seed=0))
    assert data.fraction_indices(400, 1.0, seed=3) == list(range(400))
    assert len(data.fraction_indices(10, 0.01, seed=0)) == 1

def test_iteration_sampler_repeats_small_sets_and_does_not_depend_on_the_world_size():
    one = data.IterationSampler(3, iters=5, batch_per_rank=4, seed=0)
    keys = list(one)
    assert len(keys) == 20 and sorted({k % 3 for k in keys}) == [0, 1, 2]  # 3 images fill batches of 4
    assert len(set(keys)) == 20  # each repeat is another epoch: another augmentation key
    ranks = []
    for r in range(2):
        s = data.IterationSampler(3, iters=5, batch_per_rank=2, seed=0)
        s.rank, s.world = r, 2
        ranks.append(torch.tensor(list(s)).view(5, 2))
    assert torch.equal(torch.cat(ranks, 1).flatten(), torch.tensor(keys))

def test_poly_schedule():
    lrs = ft.poly_schedule(0.01, 100, power=0.9, min_lr=1e-4)
    assert lrs[0] == pytest.approx(0.01) and np.all(np.diff(lrs) < 0)
    assert lrs[50] == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)

def test_train_transform_keeps_image_and_mask_aligned():
    mask = np.array([[(x // 5 + y // 7) % 3 for x in range(40)] for y in range(30)], dtype=np.uint8)
    colours = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], dtype=np.uint8)
    image = Image.fromarray(colours[mask])
    t = data.TrainTransform(crop_size=48, scale_range=(1.0, 1.0))
    random.seed(0)
    for _ in range(4):
        x, y = t(image, mask)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert (y[30:] == IGNORE_INDEX).all() and (y[:, 40:] == IGNORE_INDEX).all()  # padding is ignored
        valid = y != IGNORE_INDEX
        std, mean = torch.tensor([0.229, 0.224, 0.225])[:, None], torch.tensor([0.485, 0.456, 0.406])[:, None]
        rgb = ((x[:, valid] * std + mean) * 255).round()
        torch.testing.assert_close(rgb, torch.from_numpy(colours[y[valid].numpy()]).T.float())


# ---------------------------------------------------------------- fine-tuning: what is transferred

def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}

def changed(model, before, prefix):
    """Names under `prefix` whose tensor differs from `before`."""
    return {k for k, v in model.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}

def fresh_segmenter(decoder="fcn"):
    torch.manual_seed(0)
    return Segmenter("resnet18", decoder, 3)

def test_transfer_encoder_only(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    model = fresh_segmenter()
    before = snapshot(model)
    pretrained = ft.read_pretrained([path])
    notes = ft.transfer(model, pretrained, "encoder")
    assert "teacher branch (the authors' choice for slotcon)" in pretrained["notes"][0]
    for k, v in decon.teacher.encoder.state_dict().items():  # the teacher, SlotCon's default
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert not changed(model, before, "decode_head.") and "random init (--transfer encoder)" in notes[-1]

def test_transfer_encoder_and_decoder_and_student_branch(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    model = fresh_segmenter()
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path], branch="student"), "encoder+decoder")
    for k, v in decon.student.decoder.state_dict().items():
        assert torch.equal(model.decode_head.state_dict()[k], v), k
    assert torch.equal(model.backbone.conv1.weight, decon.student.encoder.conv1.weight)
    assert changed(model, before, "decode_head.") == {k for k in before if k.startswith("decode_head.convs.")}
    assert "random init: conv_seg" in notes[-1]

def test_transfer_fpn_without_deep_supervision_keeps_missing_levels_random(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path, "decon-sl-slotcon-fpn")
    model = fresh_segmenter("fpn")
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path]), "encoder+decoder")
    loaded = changed(model, before, "decode_head.")
    assert any(k.startswith("decode_head.fpn_lateral5") for k in loaded)
    assert any(k.startswith("decode_head.fpn_output2") for k in loaded)
    assert not any(k.startswith(("decode_head.fpn_output3", "decode_head.conv_seg", "decode_head.scale_heads"))
                   for k in loaded)
    assert torch.equal(model.decode_head.fpn_output2.weight, decon.teacher.decoder.fpn_output2.weight)
    assert "fpn_output3, fpn_output4, fpn_output5" in notes[-1] and "deep supervision" in notes[-1]

def test_heterogeneous_decoders_transfer_the_encoder_only(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_checkpoint(path, "decon-ml-slotcon-fpn")
    model = fresh_segmenter("fcn")
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path]), "encoder+decoder")
    assert changed(model, before, "backbone.") and not changed(model, before, "decode_head.")
    assert "heterogeneous decoders (pre-trained fpn, fine-tuned fcn)" in notes[-1]

def test_converted_files_load_by_their_keys(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    enc, dec = decon.teacher.encoder.state_dict(), decon.teacher.decoder.state_dict()
    files = {"backbone.pth": {"state_dict": enc}, "decode_head.pth": {"state_dict": dec},
             "full.pth": {"state_dict": {**{f"backbone.{k}": v for k, v in enc.items()},
                                         **{f"decode_head.{k}": v for k, v in dec.items()}}},
             "tv.pth": {**enc, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}}
    for name, content in files.items():
        torch.save(content, str(tmp_path / name))
    for paths, mode in (([tmp_path / "backbone.pth", tmp_path / "decode_head.pth"], "encoder+decoder"),
                        ([tmp_path / "full.pth"], "encoder+decoder"), ([tmp_path / "tv.pth"], "encoder")):
        model = fresh_segmenter()
        pretrained = ft.read_pretrained([str(p) for p in paths])
        assert pretrained["arch"] == "resnet18"
        ft.transfer(model, pretrained, mode)
        assert torch.equal(model.backbone.layer4[1].bn2.weight, decon.teacher.encoder.layer4[1].bn2.weight)
        if mode == "encoder+decoder":
            assert torch.equal(model.decode_head.convs[1].conv.weight, decon.teacher.decoder.convs[1].conv.weight)
    assert "ignored 2 (fc.weight, fc.bias)" in ft.read_pretrained([str(tmp_path / "tv.pth")])["notes"][0]
    # mmseg's FPN neck names, as convert.py exports them, map back onto the FPN
    fpn = fake_checkpoint(path, "decon-ml-slotcon-fpn").teacher.decoder.state_dict()
    neck = {}
    for k, v in fpn.items():  # fpn_lateral3.norm.bias -> neck.lateral_convs.1.bn.bias
        name, rest = k.split(".", 1)
        module = "lateral_convs" if name.startswith("fpn_lateral") else "fpn_convs"
        layer = "conv.weight" if rest == "weight" else "bn." + rest[len("norm."):]
        neck[f"neck.{module}.{int(name[-1]) - 2}.{layer}"] = v
    _, _, got, _ = ft.split_state_dict(neck)
    assert got.keys() == fpn.keys() and all(torch.equal(got[k], fpn[k]) for k in fpn)
    # so do the torchvision detection-backbone names of convert.py --to torchvision (body.*, fpn.*)
    decon_fpn_enc = fake_checkpoint(path, "decon-ml-slotcon-fpn").teacher.encoder.state_dict()
    tv = {**{f"body.{k}": v for k, v in decon_fpn_enc.items()}, **{f"fpn.{models.torchvision_fpn_key(k)}": v
                                                         for k, v in fpn.items()}}
    got_enc, _, got, ignored = ft.split_state_dict(tv)
    assert ignored == [] and got.keys() == fpn.keys() and all(torch.equal(got[k], fpn[k]) for k in fpn)
    assert got_enc.keys() == decon_fpn_enc.keys()

def test_transfer_errors_are_one_line(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_checkpoint(path, "slotcon")
    args = finetune_args("--pretrained", path, "--transfer", "encoder+decoder", "--workers", "0")
    with pytest.raises(ValueError, match="has no decoder weights; use --transfer encoder"):
        ft.prepare(args)
    args = finetune_args("--pretrained", path, "--arch", "resnet50", "--workers", "0")
    with pytest.raises(ValueError, match="--arch resnet50: --pretrained holds a resnet18 encoder"):
        ft.prepare(args)
    torch.save({"optimizer": {"lr": 1.0}}, str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="junk.pt: neither a pretrain.py checkpoint nor a state dict"):
        ft.read_pretrained([str(tmp_path / "junk.pt")])

def fake_finetuned(path, arch="resnet18", decoder="fcn", num_classes=9):
    """A finetune_seg.py-style seedN.pt (random weights) of the built-in scenes."""
    args = dict(vars(finetune_args("--workers", "0")), arch=arch, decoder=decoder, num_classes=num_classes)
    torch.save({"model": Segmenter(arch, decoder, num_classes).state_dict(), "args": args, "seed": 0}, path)
    return path

def test_a_finetuned_checkpoint_is_not_taken_for_pretrained_weights(tmp_path):
    path = fake_finetuned(str(tmp_path / "seed0.pt"))
    with pytest.raises(ValueError, match="a fine-tuned checkpoint .* --dataset synthetic.*--allow-finetuned"):
        ft.read_pretrained([path])
    taken = ft.read_pretrained([path], allow_finetuned=True)
    assert taken["arch"] == "resnet18" and taken["decoder_kind"] == "fcn"


# ---------------------------------------------------------------- fine-tuning and evaluation end to end

def test_eval_checks_its_output_before_evaluating(tmp_path, monkeypatch):
    path = fake_finetuned(str(tmp_path / "seed0.pt"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys.modules["eval"], "evaluate", lambda *a, **kw: pytest.fail("evaluated"))
    with pytest.raises(SystemExit, match="error: cannot write .*file/r.json: .* cannot be created"):
        eval_main(eval_parser().parse_args(["--checkpoint", path, "--output", str(tmp_path / "file" / "r.json")]))

@pytest.fixture
def one_thread():
    """On 64 px inputs, intra-op threads cost more in synchronization than they save, and when the cores are
    shared (parallel CI jobs) a 2-thread step can be 10x slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def test_finetune_folder_belongs_to_one_job_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "seg"
    tiny = ["finetune_seg.py", "--arch", "resnet18", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train",
            "8", "--synthetic-val", "2", "--synthetic-test", "2", "--batch-size", "2", "--workers", "0",
            "--eval-every", "0", "--precision", "fp32", "--output-dir", str(out), "--overwrite"]
    first = subprocess.Popen([sys.executable, *tiny, "--iters", "100000"], cwd=HERE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while f"PID {first.pid}," not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()
            time.sleep(0.05)
        listing = sorted(os.listdir(out))
        second = run_script(*tiny, "--iters", "2", timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: --output-dir {out} is in use by another job (host "
                                        f"{socket.gethostname()}, PID {first.pid}, since ")
        assert sorted(os.listdir(out)) == listing
    finally:
        first.kill()  # SIGKILL
        first.wait()
    third = run_script(*tiny, "--iters", "2", timeout=120)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "results.json").read_text())["args"]["iters"] == 2


def test_short_finetune_beats_the_untrained_model_and_eval_reproduces_it(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["--arch", "resnet18", "--synthetic-size", "64", "--synthetic-train", "64", "--synthetic-val", "8",
              "--synthetic-test", "24", "--crop-size", "64", "--workers", "0"]
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"seed": 0, "iter": 40, "loss": 9.9}) + "\n")  # an earlier run's
    args = finetune_args(*common, "--decoder", "fpn", "--iters", "40", "--batch-size", "8", "--lr", "0.05",
                         "--eval-every", "20", "--select", "best", "--output-dir", str(out), "--overwrite")
    results = ft.main(args)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], "val_miou" in r) for r in log] == [(20, False), (20, True), (40, False), (40, True)]

    torch.manual_seed(0)  # the fine-tune's initial weights (seed 0)
    untrained = Segmenter("resnet18", "fpn", 9)
    test = Transformed(build_dataset("synthetic", "test", synthetic_lengths=(64, 8, 24), synthetic_size=64),
                       EvalTransform())
    before = 100 * evaluate(untrained, test)["miou"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["miou_mean"] == results["miou_mean"] and saved["seeds"][0]["checkpoint"].endswith("seed0.pt")
    assert saved["miou_mean"] > before + 5, (saved["miou_mean"], before)
    assert saved["command"].startswith("python") and len(saved["iou_per_class_mean"]) == 9

    capsys.readouterr()
    scores = eval_main(eval_parser().parse_args(["--checkpoint", str(out / "seed0.pt"), "--workers", "0"]))
    printed = capsys.readouterr().out
    assert "mIoU" in printed
    assert 100 * scores["miou"] == pytest.approx(saved["miou_mean"], abs=1e-3)
    report = json.loads((out / "seed0.synthetic-test.json").read_text())
    assert report["miou"] == pytest.approx(saved["miou_mean"], abs=1e-3)


# ---------------------------------------------------------------- export (convert.py): each library's names, derived

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

FROZEN_BN = ("weight", "bias", "running_mean", "running_var")  # Detectron2's FrozenBatchNorm2d buffers

def resnet_blocks(depth):
    """(stage 1..4, block, convs [(index, cin, cout, kernel)], shortcut (cin, cout) or None), from the ResNet
    paper's table: stage widths 64/128/256/512, bottlenecks expand x4, a projection shortcut wherever the
    shape changes."""
    counts, bottleneck = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}[depth]
    cin = 64
    for stage, n in enumerate(counts, start=1):
        width = 64 * 2 ** (stage - 1)
        cout = 4 * width if bottleneck else width
        for b in range(n):
            convs = ([(1, cin, width, 1), (2, width, width, 3), (3, width, cout, 1)] if bottleneck
                     else [(1, cin, width, 3), (2, width, width, 3)])
            shortcut = (cin, cout) if b == 0 and (cin != cout or stage > 1) else None
            yield stage, b, convs, shortcut
            cin = cout

def stage_channels(depth):
    out = {}
    for stage, _, convs, _ in resnet_blocks(depth):
        out[stage] = convs[-1][2]
    return [out[s] for s in (1, 2, 3, 4)]

def norm(prefix, c, stats=BN):
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in stats}

def d2_resnet(depth, stats=BN):
    """Detectron2 ResNet (build_resnet_backbone): stem.conv1 + res2..res5, Conv2d with a `norm` submodule."""
    keys = {"stem.conv1.weight": (64, 3, 7, 7), **norm("stem.conv1.norm", 64, stats)}
    for stage, b, convs, shortcut in resnet_blocks(depth):
        block = f"res{stage + 1}.{b}"
        for i, cin, cout, k in convs:
            keys[f"{block}.conv{i}.weight"] = (cout, cin, k, k)
            keys.update(norm(f"{block}.conv{i}.norm", cout, stats))
        if shortcut:
            keys[f"{block}.shortcut.weight"] = (shortcut[1], shortcut[0], 1, 1)
            keys.update(norm(f"{block}.shortcut.norm", shortcut[1], stats))
    return keys

def d2_fpn(in_channels, out=256):
    """Detectron2 FPN with MODEL.FPN.NORM BN/SyncBN: fpn_lateral{s} (1x1) and fpn_output{s} (3x3), no bias."""
    keys = {}
    for s, cin in zip((2, 3, 4, 5), in_channels):
        keys[f"fpn_lateral{s}.weight"] = (out, cin, 1, 1)
        keys.update(norm(f"fpn_lateral{s}.norm", out))
        keys[f"fpn_output{s}.weight"] = (out, out, 3, 3)
        keys.update(norm(f"fpn_output{s}.norm", out))
    return keys

def d2_mask_rcnn_fpn(depth):
    """Mask R-CNN R-FPN as in SlotCon's COCO config: SyncBN everywhere, 4conv1fc box head, 4-conv mask head.
    The heads contain `conv1.norm.weight`-like names, so a stem key without its `stem.` prefix is ambiguous."""
    keys = {f"backbone.bottom_up.{k}": v for k, v in d2_resnet(depth).items()}
    keys.update({f"backbone.{k}": v for k, v in d2_fpn(stage_channels(depth)).items()})
    keys.update({"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1),
                 "proposal_generator.rpn_head.conv.weight": (256, 256, 3, 3),
                 "proposal_generator.rpn_head.conv.bias": (256,),
                 "proposal_generator.rpn_head.objectness_logits.weight": (3, 256, 1, 1),
                 "proposal_generator.rpn_head.objectness_logits.bias": (3,),
                 "proposal_generator.rpn_head.anchor_deltas.weight": (12, 256, 1, 1),
                 "proposal_generator.rpn_head.anchor_deltas.bias": (12,),
                 "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,),
                 "roi_heads.box_predictor.cls_score.weight": (81, 1024),
                 "roi_heads.box_predictor.cls_score.bias": (81,),
                 "roi_heads.box_predictor.bbox_pred.weight": (320, 1024),
                 "roi_heads.box_predictor.bbox_pred.bias": (320,),
                 "roi_heads.mask_head.deconv.weight": (256, 256, 2, 2), "roi_heads.mask_head.deconv.bias": (256,),
                 "roi_heads.mask_head.predictor.weight": (80, 256, 1, 1),
                 "roi_heads.mask_head.predictor.bias": (80,)})
    for i in (1, 2, 3, 4):
        keys[f"roi_heads.box_head.conv{i}.weight"] = (256, 256, 3, 3)
        keys.update(norm(f"roi_heads.box_head.conv{i}.norm", 256))
        keys[f"roi_heads.mask_head.mask_fcn{i}.weight"] = (256, 256, 3, 3)
        keys.update(norm(f"roi_heads.mask_head.mask_fcn{i}.norm", 256))
    return keys

def d2_faster_rcnn_c4(depth, stats=BN):
    """Faster R-CNN R-C4 (the paper's VOC detection): stem..res4 in `backbone`, res5 in `roi_heads`."""
    keys = {}
    for k, v in d2_resnet(depth, stats).items():
        keys[("roi_heads." if k.startswith("res5.") else "backbone.") + k] = v
    c4, c5 = stage_channels(depth)[2:]
    keys.update({"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1),
                 "proposal_generator.rpn_head.conv.weight": (c4, c4, 3, 3),
                 "proposal_generator.rpn_head.conv.bias": (c4,),
                 "proposal_generator.rpn_head.objectness_logits.weight": (15, c4, 1, 1),
                 "proposal_generator.rpn_head.objectness_logits.bias": (15,),
                 "proposal_generator.rpn_head.anchor_deltas.weight": (60, c4, 1, 1),
                 "proposal_generator.rpn_head.anchor_deltas.bias": (60,),
                 "roi_heads.box_predictor.cls_score.weight": (21, c5), "roi_heads.box_predictor.cls_score.bias": (21,),
                 "roi_heads.box_predictor.bbox_pred.weight": (80, c5), "roi_heads.box_predictor.bbox_pred.bias": (80,)})
    return keys

def mm_resnet(depth):
    """mmseg ResNet(style='pytorch') = torchvision names: conv1, bn1, layer{i}.{j}.conv{k}/bn{k}/downsample.{0,1}."""
    keys = {"conv1.weight": (64, 3, 7, 7), **norm("bn1", 64)}
    for stage, b, convs, shortcut in resnet_blocks(depth):
        block = f"layer{stage}.{b}"
        for i, cin, cout, k in convs:
            keys[f"{block}.conv{i}.weight"] = (cout, cin, k, k)
            keys.update(norm(f"{block}.bn{i}", cout))
        if shortcut:
            keys[f"{block}.downsample.0.weight"] = (shortcut[1], shortcut[0], 1, 1)
            keys.update(norm(f"{block}.downsample.1", shortcut[1]))
    return keys

def mm_fcn_head(in_channels, channels=256, num_classes=19):
    """mmseg FCNHead(num_convs=2, concat_input=False): convs.{i} ConvModules (conv + bn) and conv_seg."""
    keys = {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}
    for i, cin in enumerate((in_channels, channels)):
        keys[f"convs.{i}.conv.weight"] = (channels, cin, 3, 3)
        keys.update(norm(f"convs.{i}.bn", channels))
    return keys

def mm_fpn_neck(in_channels, out=256):
    """mmseg FPN neck with norm_cfg=BN: lateral_convs.{i} (1x1) and fpn_convs.{i} (3x3) ConvModules."""
    keys = {}
    for i, cin in enumerate(in_channels):
        keys[f"lateral_convs.{i}.conv.weight"] = (out, cin, 1, 1)
        keys.update(norm(f"lateral_convs.{i}.bn", out))
        keys[f"fpn_convs.{i}.conv.weight"] = (out, out, 3, 3)
        keys.update(norm(f"fpn_convs.{i}.bn", out))
    return keys

def prefixed(prefix, keys):
    return {prefix + k: v for k, v in keys.items()}

def d2_align(model, ckpt):
    """Detectron2's align_and_update_state_dicts (matching_heuristics): each model key takes the longest
    checkpoint key b with key == b or key.endswith('.' + b); a shape mismatch skips the key; one checkpoint key
    matching two model keys is an error. Returns ({model key: ckpt key}, [shape mismatches])."""
    loaded, used, mismatched = {}, {}, []
    for key in sorted(model):
        cands = [b for b in ckpt if key == b or key.endswith("." + b)]
        if not cands:
            continue
        b = max(cands, key=len)
        if tuple(ckpt[b].shape) != tuple(model[key]):
            mismatched.append((key, b))
            continue
        if b in used:
            raise ValueError(f"Cannot match one checkpoint key to multiple keys: {b} -> {used[b]}, {key}")
        used[b], loaded[key] = key, b
    return loaded, mismatched

def check_d2(ckpt, model, expected_model_keys):
    """Every exported key lands on exactly one model key, and those are exactly `expected_model_keys`."""
    loaded, mismatched = d2_align(model, ckpt)
    assert mismatched == []
    assert sorted(set(ckpt) - set(loaded.values())) == [], "exported keys that load nowhere"
    assert sorted(set(expected_model_keys) - set(loaded)) == [], "model keys left uninitialized"
    assert sorted(set(loaded) - set(expected_model_keys)) == []

def check_mm(state_dict, expected):
    """mmengine loads with strict=False: every key must be an expected name of the right shape, none missing."""
    assert sorted(set(state_dict) - set(expected)) == [], "unexpected keys"
    assert sorted(set(expected) - set(state_dict)) == [], "missing keys"
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(v) for k, v in expected.items()}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    specs = {"r50_fpn": ("decon-ml-slotcon-fpn", "resnet50"), "r50_fcn": ("decon-sl-slotcon-fcn", "resnet50"),
             "r18_fpn_sl": ("decon-sl-slotcon-fpn", "resnet18"),
             "r18_fcn": ("decon-sl-slotcon-fcn", "resnet18"), "r18_none": ("slotcon", "resnet18"),
             "r18_densecl_fpn": ("decon-ml-densecl-fpn", "resnet18")}
    paths = {name: str(d / f"{name}.pt") for name in specs}
    for name, (variant, arch) in specs.items():
        fake_checkpoint(paths[name], variant, arch)
    return paths


def run(*argv):
    """convert.main in-process; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        convert.main([str(a) for a in argv])
    return out.getvalue()

def branch_tensors(path, prefix):
    sd = torch.load(path, weights_only=True)["model"]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

def fingerprints(values):
    """Sorted (shape, hash of the bytes): equal iff the same tensors, whatever their names."""
    return sorted((tuple(np.shape(v)), hashlib.sha1(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest())
                  for v in values)

def load_pkl(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # how Detectron2 reads it

def test_detectron2_r50_fpn_lands_on_mask_rcnn_fpn(ckpts, tmp_path):
    out = tmp_path / "decon.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out)
    data = load_pkl(out)
    assert data["__author__"] == "DeCon" and data["matching_heuristics"] is True
    ckpt = data["model"]
    assert all(isinstance(v, np.ndarray) for v in ckpt.values())
    model = d2_mask_rcnn_fpn(50)
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))])
    # total size of the ResNet part agrees with torchvision's resnet50 without fc
    tv = torchvision.models.resnet50(weights=None).state_dict()
    assert sum(v.numel() for k, v in tv.items() if not k.startswith("fc.")) == \
        sum(int(np.prod(v)) for k, v in model.items() if k.startswith("backbone.bottom_up."))

    # values: SlotCon exports the teacher; one pair per rename rule, then all tensors as a multiset
    enc = branch_tensors(ckpts["r50_fpn"], "teacher.encoder.")
    dec = branch_tensors(ckpts["r50_fpn"], "teacher.decoder.")
    pairs = {"stem.conv1.weight": enc["conv1.weight"], "stem.conv1.norm.running_var": enc["bn1.running_var"],
             "res2.0.conv3.norm.weight": enc["layer1.0.bn3.weight"],
             "res5.2.conv2.weight": enc["layer4.2.conv2.weight"],
             "res3.0.shortcut.weight": enc["layer2.0.downsample.0.weight"],
             "res4.0.shortcut.norm.bias": enc["layer3.0.downsample.1.bias"],
             "res2.1.conv1.norm.num_batches_tracked": enc["layer1.1.bn1.num_batches_tracked"],
             "fpn_output4.norm.running_mean": dec["fpn_output4.norm.running_mean"],
             "fpn_lateral5.weight": dec["fpn_lateral5.weight"]}
    for key, want in pairs.items():
        np.testing.assert_array_equal(ckpt[key], want.numpy(), err_msg=key)
    assert fingerprints(ckpt.values()) == fingerprints(v.numpy() for v in [*enc.values(), *dec.values()])

    for line in ("MODEL.RESNETS.STRIDE_IN_1X1 False", "INPUT.FORMAT RGB", "MODEL.RESNETS.DEPTH 50",
                 'MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]"', 'MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"',
                 "MODEL.FPN.NORM SyncBN", f"MODEL.WEIGHTS {out}"):
        assert f"  {line}\n" in text
    assert "RES2_OUT_CHANNELS" not in text

def test_detectron2_encoder_lands_on_faster_rcnn_c4(ckpts, tmp_path):
    out = tmp_path / "enc.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out, "--part", "encoder")
    ckpt = load_pkl(out)["model"]
    model = d2_faster_rcnn_c4(50)
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.", "roi_heads.res5."))])
    assert "FPN.NORM" not in text
    # with Detectron2's default FrozenBN the only leftovers are the BN step counters, which it ignores
    loaded, _ = d2_align(d2_faster_rcnn_c4(50, FROZEN_BN), ckpt)
    assert {k.rsplit(".", 1)[1] for k in set(ckpt) - set(loaded.values())} == {"num_batches_tracked"}

def test_detectron2_r18_single_level_fpn(ckpts, tmp_path):
    out = tmp_path / "r18.pkl"
    text = run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "detectron2", "--output", out)
    ckpt = load_pkl(out)["model"]
    model = d2_mask_rcnn_fpn(18)
    untrained = ("backbone.fpn_output3.", "backbone.fpn_output4.", "backbone.fpn_output5.")
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))
                           and not k.startswith(untrained)])
    assert "  MODEL.RESNETS.DEPTH 18\n" in text and "  MODEL.RESNETS.RES2_OUT_CHANNELS 64\n" in text
    assert "note: DeCon-SL pre-trains fpn_output2 only" in text

def test_detectron2_fcn_exports_encoder_with_note(ckpts, tmp_path):
    out = tmp_path / "fcn.pkl"
    text = run("--checkpoint", ckpts["r18_fcn"], "--to", "detectron2", "--output", out)
    ckpt = load_pkl(out)["model"]
    model = d2_mask_rcnn_fpn(18)
    check_d2(ckpt, model, [k for k in model if k.startswith("backbone.bottom_up.")])
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert notes == ["note: Detectron2 has no counterpart of the FCN decoder; exported the encoder only "
                     "(--to mmseg takes the FCN decoder)"]

@pytest.mark.parametrize("mutation", ["rename", "drop", "unprefix_stem"])
def test_detectron2_checker_catches_bad_keys(ckpts, tmp_path, mutation):
    """The checks above can fail: a renamed, missing or ambiguous key is caught."""
    out = tmp_path / "m.pkl"
    run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "detectron2", "--output", out, "--part", "encoder")
    ckpt = load_pkl(out)["model"]
    if mutation == "rename":
        ckpt["res2.0.downsample.1.weight"] = ckpt.pop("res3.0.shortcut.norm.weight")
    elif mutation == "drop":
        del ckpt["res4.1.conv2.norm.bias"]
    else:
        ckpt["conv1.norm.weight"] = ckpt.pop("stem.conv1.norm.weight")
    model = d2_mask_rcnn_fpn(18)
    with pytest.raises((AssertionError, ValueError)):
        check_d2(ckpt, model, [k for k in model if k.startswith("backbone.bottom_up.")])

def test_mmseg_r50_fpn_backbone_neck_full(ckpts, tmp_path):
    prefix = tmp_path / "decon_r50"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "mmseg", "--output", prefix)
    files = {name: torch.load(f"{prefix}_{name}.pth", weights_only=True) for name in ("backbone", "neck", "full")}
    assert not os.path.exists(f"{prefix}_decode_head.pth")
    assert all(set(f) == {"state_dict"} for f in files.values())
    backbone, neck, full = (files[n]["state_dict"] for n in ("backbone", "neck", "full"))
    check_mm(backbone, mm_resnet(50))
    check_mm(neck, mm_fpn_neck([256, 512, 1024, 2048]))
    check_mm(full, {**prefixed("backbone.", mm_resnet(50)), **prefixed("neck.", mm_fpn_neck([256, 512, 1024, 2048]))})

    dec = branch_tensors(ckpts["r50_fpn"], "teacher.decoder.")
    enc = branch_tensors(ckpts["r50_fpn"], "teacher.encoder.")
    assert torch.equal(neck["lateral_convs.0.conv.weight"], dec["fpn_lateral2.weight"])
    assert torch.equal(neck["fpn_convs.3.bn.running_var"], dec["fpn_output5.norm.running_var"])
    assert torch.equal(full["neck.lateral_convs.2.bn.bias"], dec["fpn_lateral4.norm.bias"])
    assert torch.equal(full["backbone.layer3.5.bn2.weight"], enc["layer3.5.bn2.weight"])
    assert fingerprints(v.numpy() for v in backbone.values()) == fingerprints(v.numpy() for v in enc.values())
    assert "norm_cfg=dict(type='SyncBN', requires_grad=True)" in text and f"load_from = '{prefix}_full.pth'" in text

def test_mmseg_fcn_backbone_decode_head_full(ckpts, tmp_path):
    prefix = tmp_path / "fcn"
    text = run("--checkpoint", ckpts["r18_fcn"], "--to", "mmseg", "--output", prefix)
    backbone, head, full = (torch.load(f"{prefix}_{n}.pth", weights_only=True)["state_dict"]
                            for n in ("backbone", "decode_head", "full"))
    expected_head = {k: v for k, v in mm_fcn_head(512).items() if not k.startswith("conv_seg.")}  # classifier: new
    check_mm(backbone, mm_resnet(18))
    check_mm(head, expected_head)
    check_mm(full, {**prefixed("backbone.", mm_resnet(18)), **prefixed("decode_head.", expected_head)})
    dec = branch_tensors(ckpts["r18_fcn"], "teacher.decoder.")
    assert all(torch.equal(head[k], dec[k]) for k in dec)
    assert "type='FCNHead', in_channels=512, in_index=3, channels=256, num_convs=2, concat_input=False, dilation=6" \
        in text

def test_mmseg_directory_output_and_decoder_only(ckpts, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    run("--checkpoint", ckpts["r18_fcn"], "--to", "mmseg", "--output", out, "--part", "decoder")
    assert sorted(os.listdir(out)) == ["decode_head.pth", "full.pth"]
    full = torch.load(out / "full.pth", weights_only=True)["state_dict"]
    check_mm(full, {k: v for k, v in prefixed("decode_head.", mm_fcn_head(512)).items() if "conv_seg" not in k})

def test_mmseg_checker_catches_bad_keys(ckpts, tmp_path):
    prefix = tmp_path / "m"
    run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "mmseg", "--output", prefix, "--part", "decoder")
    neck = torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"]
    expected = {k: v for k, v in mm_fpn_neck([64, 128, 256, 512]).items()
                if not k.startswith(("fpn_convs.1.", "fpn_convs.2.", "fpn_convs.3."))}  # DeCon-SL: p2 only
    check_mm(neck, expected)
    neck["lateral_convs.0.norm.weight"] = neck.pop("lateral_convs.0.bn.weight")
    with pytest.raises(AssertionError):
        check_mm(neck, expected)

@pytest.mark.parametrize("name,arch", [("r50_fcn", "resnet50"), ("r18_none", "resnet18")])
def test_torchvision_loads_with_only_fc_missing(ckpts, tmp_path, name, arch):
    out = tmp_path / "tv.pth"
    text = run("--checkpoint", ckpts[name], "--to", "torchvision", "--output", out)
    sd = torch.load(out, weights_only=True)
    net = getattr(torchvision.models, arch)(weights=None)
    result = net.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    enc = branch_tensors(ckpts[name], "teacher.encoder.")
    assert sorted(sd) == sorted(enc)
    assert all(torch.equal(net.state_dict()[k], enc[k]) for k in enc)
    if name == "r50_fcn":
        assert "note: torchvision has no counterpart of the FCN decoder; exported the encoder only" in text

@pytest.mark.parametrize("name,branch,expected", [("r18_none", None, "teacher"), ("r18_none", "student", "student"),
                                                  ("r18_densecl_fpn", None, "student"),
                                                  ("r18_densecl_fpn", "teacher", "teacher")])
def test_branch_default_and_choice(ckpts, tmp_path, name, branch, expected):
    out = tmp_path / "b.pth"
    text = run("--checkpoint", ckpts[name], "--to", "torchvision", "--output", out, "--part", "encoder",
               *(["--branch", branch] if branch else []))
    sd = torch.load(out, weights_only=True)
    enc = branch_tensors(ckpts[name], f"{expected}.encoder.")
    other = branch_tensors(ckpts[name], f"{({'teacher': 'student', 'student': 'teacher'})[expected]}.encoder.")
    assert all(torch.equal(sd[k], enc[k]) for k in enc)
    assert not torch.equal(sd["conv1.weight"], other["conv1.weight"])
    assert f"of the {expected} branch" in text

def foreign_files(d, ckpts):
    (d / "random.pt").write_bytes(b"these are not weights\n" * 100)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, d / "foreign.pt")
    return {"random": d / "random.pt", "foreign": d / "foreign.pt", "missing": d / "nope.pt", **ckpts}

@pytest.mark.parametrize("ckpt,argv,output,message", [
    ("random", ["--to", "mmseg"], "x", "random.pt: cannot be read as a PyTorch checkpoint"),
    ("foreign", ["--to", "mmseg"], "x",
     "not a DeCon pretrain.py checkpoint (expected a dict with 'model' and 'args')"),
    ("missing", ["--to", "mmseg"], "x", "no such file"),
    ("r18_none", ["--to", "mmseg", "--part", "decoder"], "x",
     "was pre-trained without a decoder (--decoder none); export --part encoder"),
    ("r18_fcn", ["--to", "detectron2", "--part", "decoder"], "x.pkl",
     "--part decoder --to detectron2: Detectron2 has no counterpart of the FCN decoder (--decoder fcn); "
     "use --to mmseg, or --part encoder"),
    ("r18_fcn", ["--to", "torchvision", "--part", "decoder"], "x.pth",
     "--part decoder --to torchvision: torchvision has no counterpart of the FCN decoder (--decoder fcn)"),
    ("r18_fpn_sl", ["--to", "mmseg", "--fold-bn"], "x", "--fold-bn is for --to torchvision"),
    ("r18_none", ["--to", "torchvision", "--fold-bn"], "x.pth", "--fold-bn: the export holds no FPN to fold"),
    ("r18_none", ["--to", "torchvision", "--part", "decoder"], "x.pth", "was pre-trained without a decoder"),
    ("r18_fpn_sl", ["--to", "detectron2"], "x.pth", "Detectron2 needs a file name ending in .pkl"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(ckpts, tmp_path, capsys, ckpt, argv, output, message):
    path = foreign_files(tmp_path, ckpts)[ckpt]
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run("--checkpoint", path, "--output", out_dir / output, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out_dir.exists()

def test_output_never_overwrites_the_checkpoint(tmp_path, capsys):
    path = str(tmp_path / "tv_self.pt")
    fake_checkpoint(path, "slotcon")
    before = open(path, "rb").read()
    with pytest.raises(SystemExit) as e:
        run("--checkpoint", path, "--to", "torchvision", "--output", path)
    assert e.value.code == 2 and "would overwrite the checkpoint" in capsys.readouterr().err
    assert open(path, "rb").read() == before

def test_real_pretrain_checkpoint_via_cli(tmp_path):
    """A checkpoint written by pretrain.py itself (channels_last weights, real args), through the CLI."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "pretrain.py", "--framework", "slotcon", "--decoder", "fpn", "--alpha", "0",
                    "--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
                    "--max-steps", "1", "--dim-hidden", "64", "--num-prototypes", "16", "--synthetic-images", "16",
                    "--workers", "0", "--output-dir", str(tmp_path / "run")],
                   cwd=HERE, env=env, check=True, capture_output=True)
    ckpt = tmp_path / "run" / "last.pt"
    out = tmp_path / "real.pkl"
    res = subprocess.run([sys.executable, "convert.py", "--checkpoint", str(ckpt), "--to", "detectron2",
                          "--output", str(out)], cwd=HERE, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    model = d2_mask_rcnn_fpn(18)
    check_d2(load_pkl(out)["model"], model,
             [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))])
    assert "teacher branch (slotcon, resnet18, step 1)" in res.stdout and "  MODEL.FPN.NORM SyncBN\n" in res.stdout

    prefix = tmp_path / "real_mm"
    run("--checkpoint", ckpt, "--to", "mmseg", "--output", prefix, "--branch", "student")
    neck = torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"]
    check_mm(neck, mm_fpn_neck([64, 128, 256, 512]))
    student = branch_tensors(ckpt, "student.decoder.")
    assert torch.equal(neck["fpn_convs.1.conv.weight"], student["fpn_output3.weight"])


def mmseg_printed_model(text):
    """The printed `model = dict(...)` (and `load_from`) of convert.py --to mmseg, run as the config file it is."""
    config = {}
    exec(text[text.index("model = dict("):], {}, config)
    return config["model"]


@pytest.mark.parametrize("name,dataset", [("r50_fcn", "voc"), ("r50_fpn", "cityscapes"), ("r18_fcn", "voc")])
def test_mmseg_config_builds_and_loads_every_exported_tensor(ckpts, tmp_path, name, dataset):
    """The printed config is complete for mmseg 1.x (EncoderDecoder, a plain ResNet, norm_cfg everywhere,
    data_preprocessor with a size, test_cfg, num_classes), and the names it builds are exactly the exported ones."""
    prefix = tmp_path / name
    text = run("--checkpoint", ckpts[name], "--to", "mmseg", "--output", prefix, "--dataset", dataset)
    model = mmseg_printed_model(text)
    assert model["type"] == "EncoderDecoder" and model["pretrained"] is None and model["auxiliary_head"] is None
    pre = model["data_preprocessor"]
    assert pre["type"] == "SegDataPreProcessor" and pre["bgr_to_rgb"] is True and pre["mean"] == convert.PIXEL_MEAN
    assert pre["size"] == {"voc": (513, 513), "cityscapes": (769, 769)}[dataset]
    assert model["test_cfg"] == {"voc": dict(mode="whole"), "cityscapes": dict(mode="slide", crop_size=(769, 769),
                                                                                stride=(513, 513))}[dataset]
    backbone, head = model["backbone"], model["decode_head"]
    assert backbone["type"] == "ResNet" and backbone["norm_cfg"]["type"] == "SyncBN"
    assert backbone["init_cfg"] == dict(type="Pretrained", checkpoint=f"{prefix}_backbone.pth")
    files = {n: torch.load(f"{prefix}_{n}.pth", weights_only=True)["state_dict"] for n in ("backbone", "full")}
    check_mm(files["backbone"], mm_resnet(backbone["depth"]))
    assert head["num_classes"] == {"voc": 21, "cityscapes": 19}[dataset] and head["norm_cfg"]["type"] == "SyncBN"
    assert head["init_cfg"][0] == dict(type="Normal", std=0.01, override=dict(name="conv_seg"))  # mmseg's, kept
    if head["type"] == "FCNHead":
        assert (backbone["dilations"], backbone["strides"]) == (((1, 1, 1, 2), (1, 2, 2, 1)) if name.startswith("r50")
                                                                else ((1, 1, 1, 1), (1, 2, 2, 2)))
        assert backbone["contract_dilation"] and head["align_corners"] is True
        assert (head["num_convs"], head["concat_input"], head["dilation"], head["dropout_ratio"]) == (2, False, 6, 0)
        assert head["init_cfg"][1] == dict(type="Pretrained", checkpoint=f"{prefix}_decode_head.pth")
        built = {k: v for k, v in mm_fcn_head(head["in_channels"], head["channels"], head["num_classes"]).items()
                 if not k.startswith("conv_seg.")}  # the classifier is new
        check_mm(torch.load(f"{prefix}_decode_head.pth", weights_only=True)["state_dict"], built)
        check_mm(files["full"], {**prefixed("backbone.", mm_resnet(backbone["depth"])),
                                 **prefixed("decode_head.", built)})
    else:
        neck = model["neck"]
        assert head["type"] == "FPNHead" and neck["type"] == "FPN" and neck["norm_cfg"]["type"] == "SyncBN"
        assert neck["init_cfg"] == dict(type="Pretrained", checkpoint=f"{prefix}_neck.pth")
        built = mm_fpn_neck(neck["in_channels"], neck["out_channels"])
        check_mm(torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"], built)
        check_mm(files["full"], {**prefixed("backbone.", mm_resnet(backbone["depth"])), **prefixed("neck.", built)})
    assert f"load_from = '{prefix}_full.pth'" in text


def test_detectron2_overrides_yaml_and_docs_are_one_and_the_same(ckpts, tmp_path):
    out = tmp_path / "decon_r50.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out)
    settings = convert.detectron2_settings(str(out), {"arch": "resnet50"}, fpn=True)
    assert settings["MODEL.RESNETS.NORM"] == settings["MODEL.FPN.NORM"] == "SyncBN"
    assert settings["MODEL.BACKBONE.FREEZE_AT"] == 0 and settings["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    overrides, yaml = text.split("or in the config file (YAML):\n")
    assert [line[2:] for line in overrides.splitlines() if line.startswith("  ")] == \
        convert.detectron2_overrides(settings)
    yaml_lines = [line[2:] for line in yaml.splitlines() if line.startswith("  ")]
    assert yaml_lines == convert.detectron2_yaml(settings)
    for key, value in settings.items():  # every setting, once, in both forms
        assert sum(line.strip().startswith(key.split(".")[-1] + ":") for line in yaml_lines) >= 1
    docs = open(os.path.join(HERE, "docs", "EXPORT.md")).read()
    block = docs[docs.index("```yaml\n") + 8:]
    block = block[:block.index("```")].splitlines()
    assert block == convert.detectron2_yaml(convert.detectron2_settings("decon_r50.pkl", {"arch": "resnet50"}, True))


# ---------------------------------------------------------------- pictures (visualize.py, eval.py --save-predictions)

@pytest.fixture(scope="module")
def pretrained_runs(tmp_path_factory):
    """Real last.pt files of one-step pretrain.py runs, a SlotCon and a DenseCL variant, shared by this section."""
    paths, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as pretrain_here: at 64 px a second thread costs more than it saves
    try:
        for name in ("decon-ml-slotcon-fpn", "decon-sl-densecl-fcn"):
            out = tmp_path_factory.mktemp(name)
            pretrain.main(tiny_args(name, output_dir=str(out), max_steps=1))
            paths[name] = str(out / "last.pt")
    finally:
        torch.set_num_threads(threads)
    return paths

def run_visualize(*argv):
    return visualize.main(visualize.get_args_parser().parse_args([str(a) for a in argv]))

def test_visualize_strip_has_one_panel_per_level_of_the_expected_size(pretrained_runs, tmp_path, one_thread):
    for name in ("a", "b"):
        write_image(str(tmp_path / "in" / f"{name}.png"), w=50, h=40)
    ckpt = pretrained_runs["decon-ml-slotcon-fpn"]
    run_visualize("--checkpoint", ckpt, "--images", tmp_path / "in", "--output", tmp_path / "viz")
    s, gap, top = 64, visualize.GAP, visualize.LABEL
    assert sorted(os.listdir(tmp_path / "viz")) == ["000-a.png", "001-b.png", "summary.png"]
    strip = np.asarray(Image.open(tmp_path / "viz" / "001-b.png"))
    assert strip.shape == (top + s, 5 * s + 4 * gap, 3)  # the image, p2, p3, p4, p5
    assert Image.open(tmp_path / "viz" / "summary.png").size == (5 * s + 4 * gap, top + 2 * s + gap)
    assert all((strip[:top, c * (s + gap):c * (s + gap) + s] < 100).any() for c in range(5))  # a label on each

    model = tiny_model("decon-ml-slotcon-fpn")  # the teacher again, through Branch.forward
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    image = data.load_rgb(str(tmp_path / "in" / "b.png")).resize((s, s), Image.BICUBIC)
    with torch.no_grad():
        out = model.eval().teacher([data.to_tensor(image)[None]])[0]
    panels = [strip[top:, c * (s + gap):c * (s + gap) + s] for c in range(5)]
    assert np.array_equal(panels[0], np.asarray(image))
    for lvl, panel, cells in zip(("p2", "p3", "p4", "p5"), panels[1:], (16, 8, 4, 2)):
        ids = out[lvl].scores[0].argmax(0).numpy()
        assert ids.shape == (cells, cells)
        grid = Image.fromarray(visualize.prototype_palette(8)[ids]).resize((s, s), Image.NEAREST)
        assert np.array_equal(panel, np.asarray(Image.blend(image, grid, 0.5))), lvl

def test_visualize_gives_a_prototype_one_colour_in_every_image(pretrained_runs, tmp_path, one_thread):
    ckpt, s = pretrained_runs["decon-ml-slotcon-fpn"], 64
    run_visualize("--checkpoint", ckpt, "--scenes", 2, "--output", tmp_path)
    model = visualize.build_model(*visualize.read_checkpoint(ckpt))
    scenes = data.SyntheticScenes(2, 128, data.SYNTHETIC_SPLIT_SEEDS["test"])
    seen = {}  # prototype id -> the colours recovered from its blended cells, over both images
    for i, name in enumerate(("000-scene0.png", "001-scene1.png")):
        image = np.asarray(scenes[i].resize((s, s), Image.BICUBIC), dtype=int)
        ids = visualize.teacher_maps(model, data.to_tensor(Image.fromarray(image.astype(np.uint8)))[None])["p3"]
        p3 = np.asarray(Image.open(tmp_path / name), dtype=int)[visualize.LABEL:, 2 * (s + visualize.GAP):][:, :s]
        for (y, x), k in np.ndenumerate(ids):  # at the centre of each 8 x 8 cell, colour = 2 * blend - image
            cy, cx = 8 * y + 4, 8 * x + 4
            seen.setdefault(k, ([], []))[i].append(2 * p3[cy, cx] - image[cy, cx])
    palette = visualize.prototype_palette(8).astype(int)
    assert any(first and second for first, second in seen.values()), "no prototype in both images"
    for k, (first, second) in seen.items():
        assert all(np.abs(c - palette[k]).max() <= 2 for c in first + second), k
    assert np.abs(palette[:, None] - palette[None]).max(-1)[~np.eye(8, dtype=bool)].min() > 8  # ids stand apart
    assert np.array_equal(visualize.prototype_palette(64)[:8], palette)  # the colour of an id, whatever K

def test_pca_colours_match_an_svd_of_all_positions_of_all_images():
    rng = np.random.default_rng(0)
    scale = np.array([6.0, 4.0, 2.5, 1.0, 0.5, 0.2])  # well separated components
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    maps = [(rng.normal(size=(h, w, 6)) * scale) @ basis.T + 3.0 for h, w in ((4, 5), (2, 3), (6, 6))]
    x = np.concatenate([m.reshape(-1, 6) for m in maps])
    x = x - x.mean(0)
    vt = np.linalg.svd(x, full_matrices=False)[2][:3]
    vt = vt * np.sign(vt[np.arange(3), np.abs(vt).argmax(1)])[:, None]  # the largest loading positive
    p = x @ vt.T
    lo, hi = np.percentile(p, 1, axis=0), np.percentile(p, 99, axis=0)
    expected = np.round(np.clip((p - lo) / (hi - lo), 0, 1) * 255)
    got = np.concatenate([c.reshape(-1, 3) for c in visualize.pca_colours(maps)]).astype(int)
    assert [c.shape for c in visualize.pca_colours(maps)] == [(4, 5, 3), (2, 3, 3), (6, 6, 3)]
    assert np.abs(got - expected).max() <= 1

def test_visualize_pca_colours_are_deterministic_and_fitted_on_all_images(pretrained_runs, tmp_path, one_thread):
    ckpt = pretrained_runs["decon-sl-densecl-fcn"]
    for name in ("a", "b"):
        write_image(str(tmp_path / f"{name}.png"))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in ("one", "two"):
        run_visualize("--checkpoint", ckpt, "--images", a, b, a, "--output", tmp_path / out)
    names = ["000-a.png", "001-b.png", "002-a.png", "summary.png"]
    assert sorted(os.listdir(tmp_path / "one")) == names
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    strips = [np.asarray(Image.open(tmp_path / "one" / n)) for n in names[:3]]
    assert strips[0].shape == (visualize.LABEL + 64, 3 * 64 + 2 * visualize.GAP, 3)  # the image, c5, fcn
    assert np.array_equal(strips[0], strips[2]) and not np.array_equal(strips[0], strips[1])
    run_visualize("--checkpoint", ckpt, "--images", a, "--output", tmp_path / "alone")
    alone = np.asarray(Image.open(tmp_path / "alone" / "000-a.png"))
    assert not np.array_equal(alone, strips[0])  # one fit over the call's images, not one per image

def test_visualize_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    good = str(tmp_path / "last.pt")
    fake_checkpoint(good)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    finetuned = fake_finetuned(str(tmp_path / "seed0.pt"))
    cases = ((["--checkpoint", finetuned], f"--checkpoint {finetuned}: not a pretrain.py checkpoint (a fine-tuned"),
             (["--checkpoint", tmp_path / "notes.txt"], "notes.txt: cannot be read as a PyTorch checkpoint"),
             (["--checkpoint", tmp_path / "nope.pt"], f"--checkpoint {tmp_path / 'nope.pt'}: no such file"),
             (["--checkpoint", good, "--images", tmp_path / "empty"], f"--images {tmp_path / 'empty'}: no images"),
             (["--checkpoint", good, "--images", tmp_path / "nope.jpg"], "nope.jpg: no such file or folder"),
             (["--checkpoint", good, "--images", tmp_path / "broken"],
              f"none of the 1 files can be decoded (first: {tmp_path / 'broken' / 'x.jpg'})"),
             (["--checkpoint", good, "--size", 16], "--size 16: must be at least 32"),
             (["--checkpoint", good, "--output", tmp_path / "notes.txt" / "viz"], "notes.txt is a file"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run_visualize(*argv, *([] if "--output" in argv else ["--output", tmp_path / "viz"]))
        lines = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and lines[-1].startswith("error: ") and message in lines[-1], (message, lines)
        assert len(lines) == 1 + ("broken" in str(argv)), lines  # the undecodable file: its warning, then the error
    assert not (tmp_path / "viz").exists()

def test_visualize_skips_an_undecodable_image_with_a_warning(pretrained_runs, tmp_path, capsys, one_thread):
    write_image(str(tmp_path / "in" / "a.png"))
    (tmp_path / "in" / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    write_image(str(tmp_path / "in" / "c.png"))
    run_visualize("--checkpoint", pretrained_runs["decon-ml-slotcon-fpn"], "--images", tmp_path / "in", "--output",
                  tmp_path / "viz")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "b.jpg" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: cannot decode image {tmp_path / 'in' / 'b.jpg'}: ")
    assert warnings[0].endswith("(skipped)")
    assert sorted(os.listdir(tmp_path / "viz")) == ["000-a.png", "001-c.png", "summary.png"]
    assert Image.open(tmp_path / "viz" / "summary.png").height == visualize.LABEL + 2 * 64 + visualize.GAP

def test_prediction_picture_uses_the_dataset_palette_and_grey_for_ignore():
    voc, city = eval_module.class_palette("voc", 21), eval_module.class_palette("cityscapes", 19)
    # the published colours: the VOC devkit's labelcolormap, cityscapesScripts' labels.py
    assert [tuple(voc[i]) for i in (0, 1, 7, 15, 20)] == [(0, 0, 0), (128, 0, 0), (128, 128, 128), (192, 128, 128),
                                                          (0, 64, 128)]
    assert [tuple(city[i]) for i in (0, 10, 13, 18)] == [(128, 64, 128), (70, 130, 180), (0, 0, 142), (119, 11, 32)]
    assert np.array_equal(eval_module.class_palette("synthetic", 9)[:9], voc[:9])
    for lut, k in ((voc, 21), (city, 19), (eval_module.class_palette("folder", 255), 255)):
        assert tuple(lut[IGNORE_INDEX]) == (224, 224, 224) and not (lut[:k] == lut[IGNORE_INDEX]).all(1).any()
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    image = ((torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1) - mean) / std).expand(3, 1, 2)  # smaller than the mask
    mask = torch.tensor([[0, 1, 255], [15, 20, 255]])
    pred = torch.tensor([[1, 1, 0], [15, 0, 7]])
    picture = np.asarray(eval_module.prediction_picture(image, mask, pred, voc))
    assert picture.shape == (2, 9, 3)
    assert (picture[:, :3] == [51, 102, 153]).all()  # the image, resized to the mask's size
    grey = [224, 224, 224]
    assert picture[:, 3:6].tolist() == [[[0, 0, 0], [128, 0, 0], grey], [[192, 128, 128], [0, 64, 128], grey]]
    assert picture[:, 6:].tolist() == [[[128, 0, 0], [128, 0, 0], [0, 0, 0]],
                                       [[192, 128, 128], [0, 0, 0], [128, 128, 128]]]

def test_eval_save_predictions_draws_every_image_with_its_mask(tmp_path, capsys, one_thread):
    root = make_folder(str(tmp_path / "data"))  # masks: rows cycling through 0, 1, 2, 255
    ckpt = fake_finetuned(str(tmp_path / "seed0.pt"), num_classes=3)
    eval_main(eval_parser().parse_args(["--checkpoint", ckpt, "--dataset", "folder", "--data-root", root,
                                        "--workers", "0", "--save-predictions", str(tmp_path / "pictures")]))
    assert "2 pictures in" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "pictures")) == ["00000.png", "00001.png"]
    colours = {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0], 255: [224, 224, 224]}  # VOC's colour map, ignore grey
    for name, image in (("00000.png", "a.jpg"), ("00001.png", "sub/b.jpg")):
        picture = np.asarray(Image.open(tmp_path / "pictures" / name), dtype=int)
        assert picture.shape == (32, 120, 3)
        rgb = np.asarray(data.load_rgb(os.path.join(root, "images", "test", image)), dtype=int)
        assert np.abs(picture[:, :40] - rgb).max() <= 1
        assert all((picture[y, 40:80] == colours[(0, 1, 2, 255)[y % 4]]).all() for y in range(32))
        assert {tuple(c) for c in picture[:, 80:].reshape(-1, 3)} <= {tuple(colours[k]) for k in (0, 1, 2)}


# ---------------------------------------------------------------- detection (finetune_det.py, eval.py, convert.py)

@pytest.fixture(scope="module")
def coco_tools():
    """pycocotools, the reference the COCO numbers are checked against (requirements-test.txt; no script uses it).
    Its mask.decode warns under numpy 2 (an __array__ without copy=): that warning is not ours."""
    pytest.importorskip("pycocotools")
    from pycocotools import mask
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    return mask, COCO, COCOeval


COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def pycoco_scores(coco_tools, gts, dets, images, categories, iou_type):
    """pycocotools' first six numbers on in-memory annotations (it edits them: it gets copies), NaN for its -1."""
    _, COCO, COCOeval = coco_tools
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "categories": [{"id": c} for c in categories],
                      "annotations": pickle.loads(pickle.dumps(gts))}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(pickle.loads(pickle.dumps(dets))), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: math.nan if v == -1 else float(v) for k, v in zip(COCO_KEYS, ev.stats)}


def assert_same_scores(ours, reference, tol=1e-4):
    for k in COCO_KEYS:
        assert (math.isnan(ours[k]) and math.isnan(reference[k])) or abs(ours[k] - reference[k]) <= tol, \
            (k, ours[k], reference[k])


def random_coco_boxes(seed, n_img=24, cats=(1, 3, 7)):
    """Objects of every size (crowd regions among them, areas on the range bounds 1024 and 9216, 3 images without
    any) and detections near them or anywhere: 2-decimal scores (ties), exact duplicates, 130 of one category on
    the first image (beyond maxDets 100), a category without ground truth (42)."""
    rng = np.random.default_rng(seed)
    ids = sorted(rng.choice(1000, n_img, replace=False).tolist())
    gts, dets = [], []
    for i in ids[:-3]:
        for _ in range(rng.integers(0, 8)):
            w, h = np.exp(rng.uniform(np.log(2), np.log(350), 2))
            area = float(rng.choice([1024, 9216])) if rng.random() < 0.08 else float(w * h * rng.uniform(0.4, 1))
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": int(rng.choice(cats)), "area": area,
                        "bbox": [*map(float, rng.uniform(-10, 450, 2)), float(w), float(h)],
                        "iscrowd": int(rng.random() < 0.1)})
    for i in ids:
        mine = [g for g in gts if g["image_id"] == i]
        for _ in range(130 if i == ids[0] else int(rng.integers(0, 30))):
            if mine and rng.random() < 0.6:
                g = mine[rng.integers(len(mine))]
                (x, y, w, h), j = g["bbox"], rng.normal(0, 0.12, 4)
                box, cat, score = [x + j[0] * w, y + j[1] * h, w * np.exp(j[2]), h * np.exp(j[3])], \
                    g["category_id"], rng.uniform(0.3, 1.0)
            else:
                w, h = np.exp(rng.uniform(np.log(2), np.log(350), 2))
                box, cat, score = [*rng.uniform(0, 450, 2), w, h], int(rng.choice(cats + (42,))), rng.uniform(0, 0.8)
            dets.append({"image_id": i, "category_id": cats[0] if i == ids[0] else cat,
                         "bbox": [float(v) for v in box], "score": float(np.round(score, 2))})
            if rng.random() < 0.03:
                dets.append(dict(dets[-1]))
    return gts, dets, [{"id": i, "height": 480, "width": 640} for i in ids], sorted(set(cats) | {42})


def list_counts(mask):
    """Uncompressed COCO counts of a bool mask, computed here with numpy (not with data.py)."""
    flat = np.asarray(mask, bool).ravel(order="F")
    counts = np.diff(np.concatenate(([0], np.flatnonzero(np.diff(flat.astype(np.int8))) + 1, [flat.size]))).tolist()
    return [0] + counts if flat.size and flat[0] else counts


def random_coco_masks(seed, coco_tools, n_img=10, cats=(1, 2, 5)):
    """Objects as polygons (some in two parts, some partly outside the image), compressed RLEs, and crowd regions
    as list-count RLEs; detections as RLEs (from data.masks_to_rles, which pycocotools then decodes) of shifted or
    thinned objects and of random rectangles."""
    mask_api = coco_tools[0]
    rng = np.random.default_rng(seed)
    sizes = {i: (int(rng.integers(60, 160)), int(rng.integers(60, 200))) for i in range(1, n_img + 1)}
    gts, dets, masks = [], [], {}
    for i, (H, W) in sizes.items():
        yy, xx = np.mgrid[:H, :W]
        for _ in range(rng.integers(0, 6) if i < n_img else 0):
            r = float(np.exp(rng.uniform(np.log(3), np.log(min(H, W) / 1.5))))
            cx, cy, crowd = rng.uniform(-5, W + 5), rng.uniform(-5, H + 5), int(rng.random() < 0.12)
            if crowd or rng.random() < 0.3:
                m = ((xx - cx) / r) ** 2 + ((yy - cy) / (r * rng.uniform(0.5, 1.5))) ** 2 <= 1
                counts = list_counts(m) if crowd else \
                    mask_api.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
                segm = {"size": [H, W], "counts": counts}
            else:
                segm = []
                for part in range(1 + (rng.random() < 0.2)):
                    n = int(rng.integers(3, 12))
                    angle, radius = np.sort(rng.uniform(0, 2 * np.pi, n)), r * rng.uniform(0.4, 1.0, n) / (1 + part)
                    segm.append(np.column_stack([cx + r * part + radius * np.cos(angle),
                                                 cy + radius * np.sin(angle)]).ravel().tolist())
                m = mask_api.decode(mask_api.merge(mask_api.frPyObjects(segm, H, W))).astype(bool)
            gts.append({"id": len(gts) + 1, "image_id": i, "category_id": int(rng.choice(cats)), "iscrowd": crowd,
                        "bbox": [0.0, 0.0, 1.0, 1.0], "area": float(m.sum()), "segmentation": segm})
            masks[gts[-1]["id"]] = m
    for i, (H, W) in sizes.items():
        mine = [g for g in gts if g["image_id"] == i]
        for _ in range(int(rng.integers(0, 20))):
            if mine and rng.random() < 0.6:
                g = mine[rng.integers(len(mine))]
                m = np.roll(masks[g["id"]], tuple(rng.integers(-2, 3, 2)), axis=(0, 1)) & (rng.random((H, W)) < 0.97)
                cat, score = g["category_id"], rng.uniform(0.3, 1.0)
            else:
                m, (y, x) = np.zeros((H, W), bool), rng.integers(0, (H, W))
                m[y:y + rng.integers(1, 60), x:x + rng.integers(1, 60)] = True
                cat, score = int(rng.choice(cats)), rng.uniform(0.0, 0.8)
            dets.append({"image_id": i, "category_id": cat, "segmentation": data.masks_to_rles(m[None])[0],
                         "score": float(np.round(score, 2))})
    return gts, dets, [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()], list(cats), sizes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("seed", range(4))
def test_coco_box_ap_matches_pycocotools(coco_tools, seed):
    gts, dets, images, cats = random_coco_boxes(seed)
    reference = pycoco_scores(coco_tools, gts, dets, images, cats, "bbox")
    assert_same_scores(eval_module.coco_evaluate(gts, dets, "bbox", [im["id"] for im in images]), reference)
    assert 0.05 < reference["AP"] < 0.95 and reference["APs"] > 0 and reference["APl"] > 0  # not degenerate


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("seed", range(2))
def test_coco_mask_ap_matches_pycocotools(coco_tools, seed):
    gts, dets, images, cats, sizes = random_coco_masks(seed, coco_tools)
    reference = pycoco_scores(coco_tools, gts, dets, images, cats, "segm")
    assert_same_scores(eval_module.coco_evaluate(gts, dets, "segm", [im["id"] for im in images], sizes), reference)
    assert reference["AP"] > 0.05 and reference["APs"] > 0 and reference["APm"] > 0


def test_coco_ap_hand_case_crowd_region_and_thresholds(coco_tools):
    """Three 10x10 objects (A, B, D inside a crowd region C) and four detections, by score: d4 on D (IoU 100/120 =
    0.83) and wholly inside C, d1 = A, d2 half inside C (IoU with a crowd region = overlap / own area = 0.5), d3 on
    B at IoU 0.5 exactly. d4 takes D rather than C (real objects first) while IoU >= t; IoU may equal t.
    t = 0.50: TP, TP, ignored, TP: AP_t = 1. t = 0.55..0.80: TP, TP, FP, FP: recall 2/3 at precision 1, the 67
    recall levels 0.00..0.66 of 101. t = 0.85..0.95: d4 falls back on C (ignored), TP, FP, FP: 34 levels."""
    gt = lambda i, box, area, crowd=0: {"id": i, "image_id": 1, "category_id": 1, "bbox": box, "area": area,
                                        "iscrowd": crowd}
    gts = [gt(1, [0, 0, 10, 10], 100), gt(2, [50, 50, 10, 10], 100), gt(3, [100, 0, 50, 50], 2500, 1),
           gt(4, [100, 0, 10, 10], 100)]
    dets = [{"image_id": 1, "category_id": 1, "bbox": box, "score": s}
            for box, s in (([100, 0, 10, 12], 0.95), ([0, 0, 10, 10], 0.9), ([140, 0, 20, 10], 0.8),
                           ([50, 50, 10, 20], 0.7))]
    s = eval_module.coco_evaluate(gts, dets)
    assert s["AP50"] == 1.0 and s["AP75"] == pytest.approx(67 / 101) and s["APs"] == s["AP"]
    assert s["AP"] == pytest.approx((1 + 6 * 67 / 101 + 3 * 34 / 101) / 10)
    assert math.isnan(s["APm"]) and math.isnan(s["APl"])  # no medium or large object
    assert_same_scores(s, pycoco_scores(coco_tools, gts, dets, [{"id": 1, "height": 200, "width": 200}], [1], "bbox"))
    # equal IoUs (0.82 with a and with b): the detection takes the later object, b, and leaves a (IoU 0.67) to the
    # next one, whose IoU with b is 0.43
    gts = [gt(1, [-1, 0, 10, 10], 100), gt(2, [1, 0, 10, 10], 100)]
    dets = [{"image_id": 1, "category_id": 1, "bbox": box, "score": s}
            for box, s in (([0, 0, 10, 10], 0.9), ([-3, 0, 10, 10], 0.8))]
    assert eval_module.coco_evaluate(gts, dets)["AP50"] == 1.0


def test_voc07_ap_hand_case():
    """One image, three objects (one difficult), four detections: A = the first object, B = the difficult one, C
    far off, D the second object at IoU 0.7 exactly (boxes 0-based as the detector gives them; the XML is 1-based).
    t < 0.7: A TP, B neither, C FP, D TP: recall .5 .5 1, precision 1 .5 .67: 11-point AP (6 x 1 + 5 x 2/3) / 11
    = 28/33. t >= 0.7 (IoU must exceed t): D is an FP, recall stays .5: 6/11."""
    gts = [{"image_id": "000001", "class": "cat", "bbox": box, "difficult": d}
           for box, d in (([1, 1, 10, 10], 0), ([21, 21, 40, 40], 0), ([51, 51, 60, 60], 1))]
    dets = [{"image_id": "000001", "class": "cat", "bbox": box, "score": s}
            for box, s in (([0, 0, 10, 10], 0.9), ([50, 50, 60, 60], 0.8), ([100, 100, 110, 110], 0.7),
                           ([20, 20, 40, 34], 0.6))]
    r = eval_module.voc_evaluate(gts, dets, ["cat"])
    assert r["AP50"] == pytest.approx(28 / 33) and r["AP75"] == pytest.approx(6 / 11)
    assert r["AP"] == pytest.approx((4 * 28 / 33 + 6 * 6 / 11) / 10)
    assert eval_module.voc_evaluate(gts, dets, ["cat", "dog"])["AP50"] == pytest.approx(28 / 33 / 2)  # dog: 0
    # recall exactly 3/10 stays below np.arange's level 0.30000000000000004: that level takes the next precision
    gts = [{"image_id": i, "class": "cat", "bbox": [1, 1, 10, 10], "difficult": 0} for i in range(10)]
    dets = [{"image_id": i, "class": "cat", "bbox": [0, 0, 10, 10] if i < 4 else [50, 50, 60, 60], "score": s}
            for i, s in ((0, 0.9), (1, 0.8), (2, 0.7), (4, 0.6), (3, 0.5))]
    assert eval_module.voc_evaluate(gts, dets, ["cat"])["AP50"] == pytest.approx((3 + 0.8 + 0.8) / 11)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_mask_format_matches_pycocotools(coco_tools):
    """data.py's RLE strings and polygon rasterisation are pycocotools', pixel for pixel."""
    mask_api = coco_tools[0]
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 7), (37, 53), (480, 640)):
        for p in (0.0, 0.01, 0.5, 0.99, 1.0):
            m = rng.random(shape) < p
            if p == 0.5 and m.size > 10:  # long runs: numbers of several characters, negative differences
                m[:] = False
                m[shape[0] // 3:, shape[1] // 4:] = True
            reference = mask_api.encode(np.asfortranarray(m.astype(np.uint8)))
            assert data.masks_to_rles(torch.from_numpy(m)[None])[0] == {"size": list(shape),
                                                                        "counts": reference["counts"].decode()}
            for segm in (reference, {"size": list(shape), "counts": list_counts(m)}):
                assert np.array_equal(data.segmentation_to_mask(segm, *shape), m)
    for n in range(500):
        H, W, k = int(rng.integers(1, 120)), int(rng.integers(1, 120)), int(rng.integers(3, 15))
        parts = [np.column_stack([rng.uniform(-20, W + 20, k), rng.uniform(-20, H + 20, k)]).ravel().tolist()
                 for _ in range(1 + n % 3)]
        if n % 4 == 0:  # on the grid of halves and fifths: the rounding cases
            parts = [(np.round(np.asarray(p) * 5) / 5).tolist() for p in parts]
        reference = mask_api.decode(mask_api.merge(mask_api.frPyObjects(parts, H, W))).astype(bool)
        assert np.array_equal(data.segmentation_to_mask(parts, H, W), reference), (parts, H, W)


def test_synthetic_scene_objects_leave_the_image_and_mask_unchanged():
    """With `instances`, the same draws: the image and mask are the ones pre-training and the segmentation results
    were made with (their digest frozen here), and the objects tile the mask exactly."""
    digest = hashlib.sha1()
    for seed, size in ((0, 96), (102, 64)):
        for i in range(6):
            image, mask, masks, classes = data.synthetic_scene(i, size, seed, instances=True)
            digest.update(image.tobytes())
            digest.update(mask.tobytes())
            assert all(np.array_equal(a, b) for a, b in zip(data.synthetic_scene(i, size, seed), (image, mask)))
            assert masks.any((1, 2)).all() and (masks.sum(0) <= 1).all()
            assert np.array_equal((masks * classes[:, None, None]).sum(0), mask)
    assert digest.hexdigest() == "7f54999fd8331a08eba86848298043007192a0b5"


def test_detection_train_transform_keeps_boxes_masks_and_flips_aligned():
    """Resized (short side drawn from the sizes, long side bound) and flipped half the time: each box is still the
    tight box of its mask, computed apart (boxes by arithmetic, masks by nearest resizing), to a pixel."""
    scenes = data.SyntheticDetection(6, 64, 100)
    transform = data.DetectionTrainTransform([48, 96], max_size=80, with_masks=True)
    random.seed(0)
    flips, sides = 0, set()
    for i in range(len(scenes)):
        image, annotations = scenes[i]
        x, target = transform(image, annotations)
        sides.add(tuple(x.shape[1:]))
        assert x.shape[1:] == target["masks"].shape[1:] and len(target["boxes"]) == len(annotations)
        for box, m in zip(target["boxes"], target["masks"].bool().numpy()):
            tight = torch.tensor(data.mask_box(m))
            assert (box - torch.cat([tight[:2], tight[:2] + tight[2:]])).abs().max() <= 1.0
        first = torch.tensor(annotations[0]["bbox"]) * x.shape[2] / 64
        flips += bool(abs(target["boxes"][0, 0] - (x.shape[2] - first[0] - first[2])) < 1e-4)
    assert sides == {(48, 48), (80, 80)} and 0 < flips < len(scenes)  # 96 px is bounded to 80


def test_warmup_multistep_schedule_and_weight_decay_groups():
    lrs = fdet.warmup_multistep_schedule(0.02, 100, [60, 80], 10)
    assert lrs[0] == pytest.approx(0.02 * 0.001) and lrs[5] == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lrs[10] == lrs[59] == pytest.approx(0.02) and lrs[60] == pytest.approx(0.002)
    assert lrs[80] == lrs[99] == pytest.approx(0.0002) and len(lrs) == 100
    model = models.build_detector("resnet18", 9, "faster")
    decay, no_decay = fdet.parameter_groups(model, 1e-4)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(no_decay["params"]) == 2 * len(bn) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def detection_args(*argv):
    parser = fdet.get_args_parser()
    return fdet.finalize_args(parser.parse_args([str(a) for a in argv]), parser)


def test_paper_recipes_are_the_detection_defaults(tmp_path):
    voc = detection_args("--dataset", "voc", "--data-root", tmp_path, "--output-dir", tmp_path / "o")
    coco = detection_args("--dataset", "coco", "--data-root", tmp_path, "--output-dir", tmp_path / "o")
    assert (voc.model, voc.iters, voc.batch_size, voc.lr, voc.lr_steps, voc.warmup_iters) == \
        ("faster", 24000, 16, 0.02, [18000, 22000], 100)
    assert voc.min_size == [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800] and voc.test_size == 800
    assert (coco.model, coco.iters, coco.batch_size, coco.lr, coco.lr_steps, coco.warmup_iters) == \
        ("mask", 90000, 16, 0.02, [60000, 80000], 1000)
    assert coco.min_size == [640, 672, 704, 736, 768, 800] and coco.max_size == 1333 and coco.roi_batch_size == 512


def test_detection_flags_are_rejected_before_any_work(tmp_path, capsys):
    for argv, message in ((["--dataset", "coco"], "--data-root is required for --dataset coco"),
                          (["--lr-steps", "400"], "--lr-steps 400: increasing iterations within (0, --iters 100)"),
                          (["--min-size", "16", "64"], "--min-size / --test-size 16: the ResNet needs at least 32 px"),
                          (["--warmup-iters", "100"], "--warmup-iters 100: must be in [0, --iters 100)"),
                          (["--transfer", "encoder+decoder"], "--transfer encoder+decoder needs --pretrained")):
        with pytest.raises(SystemExit):
            detection_args(*argv, "--output-dir", tmp_path / "o")
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_recipe_schedules_fit_any_iters(tmp_path, capsys):
    """Steps and warm-up nobody typed are fitted to a short --iters, and say so; typed ones are still checked."""
    args = detection_args("--iters", 4, "--output-dir", tmp_path / "a")
    assert args.lr_steps == [3] and args.warmup_iters == 0
    assert "note: --iters 4: lr steps [3], warm-up 0 iterations (the recipe's would not fit)" in capsys.readouterr().out
    args = detection_args("--iters", 12, "--output-dir", tmp_path / "b")
    assert args.lr_steps == [8, 11] and args.warmup_iters == 2
    args = detection_args("--iters", 1, "--output-dir", tmp_path / "c")
    assert args.lr_steps == [] and args.warmup_iters == 0 and "lr steps none" in capsys.readouterr().out
    assert detection_args("--output-dir", tmp_path / "d").lr_steps == [70, 90]  # the recipe when it fits
    assert "note:" not in capsys.readouterr().out
    for argv, message in ((["--iters", 4, "--lr-steps", 3, 4], "--lr-steps 3 4: increasing iterations within"),
                          (["--iters", 12, "--warmup-iters", 20], "--warmup-iters 20: must be in [0, --iters 12)")):
        with pytest.raises(SystemExit):
            detection_args(*argv, "--output-dir", tmp_path / "o")
        assert message in capsys.readouterr().err


def positive_variances(path):
    """fake_checkpoint draws BatchNorm running variances from N(0, 1); BatchNorm in eval mode needs them positive."""
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"] = {k: v.abs() + 0.1 if k.endswith("running_var") else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, path)
    return ckpt["model"]


def test_transferred_encoder_and_fpn_give_our_p2_to_p5(tmp_path):
    """Our FPNDecoder (deep supervision) on our encoder and torchvision's detection backbone loaded by
    finetune_det.transfer compute the same p2..p5, on an input whose sides are multiples of 32 (the detector pads
    to them); p6 is a max-pool of p5."""
    path = str(tmp_path / "ml.pt")
    decon = fake_checkpoint(path, "decon-ml-slotcon-fpn")
    decon.load_state_dict(positive_variances(path))
    detector = models.build_detector("resnet18", 9, "mask")
    fdet.transfer(detector, ft.read_pretrained([path]), "encoder+decoder")
    teacher, backbone = decon.teacher.eval(), detector.backbone.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = teacher.decoder(teacher.encoder(x)), backbone(x)
    for s in (2, 3, 4, 5):
        scale = ours[f"p{s}"].abs().max()
        assert (ours[f"p{s}"] - theirs[str(s - 2)]).abs().max() <= 1e-5 * scale, s
    assert torch.equal(theirs["pool"], F.max_pool2d(theirs["3"], 1, 2))


def test_the_transfer_log_says_what_is_loaded_and_what_stays_random(tmp_path):
    """The log lines of each case, and the FPN blocks whose tensors the transfer changed (torchvision's names)."""
    lateral = "fpn_lateral2, fpn_lateral3, fpn_lateral4, fpn_lateral5"
    inner = [f"inner_blocks.{i}" for i in range(4)]
    cases = {
        ("decon-ml-slotcon-fpn", "encoder+decoder"): (
            [f"FPN -> backbone.fpn: 48 pre-trained tensors ({lateral}, fpn_output2, fpn_output3, fpn_output4, "
             "fpn_output5)", "random init: RPN, box head, mask head"], inner + [f"layer_blocks.{i}" for i in range(4)]),
        ("decon-sl-slotcon-fpn", "encoder+decoder"): (
            [f"FPN -> backbone.fpn: 30 pre-trained tensors ({lateral}, fpn_output2)",
             "random init: fpn_output3, fpn_output4, fpn_output5, RPN, box head, mask head (pre-trained without deep "
             "supervision: only fpn_output2 exists)"], inner + ["layer_blocks.0"]),
        ("decon-sl-slotcon-fcn", "encoder+decoder"): (
            ["random init: FPN (the pre-trained decoder is an FCN, which has no counterpart in the detector), RPN, "
             "box head, mask head"], []),
        ("decon-ml-slotcon-fpn", "encoder"): (["random init: FPN (--transfer encoder), RPN, box head, mask head"], [])}
    for (name, mode), (lines, blocks) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        fake_checkpoint(path, name)
        detector = models.build_detector("resnet18", 9, "mask")
        before = {k: v.clone() for k, v in detector.backbone.fpn.state_dict().items()}
        assert fdet.transfer(detector, ft.read_pretrained([path]), mode) == \
            ["encoder -> backbone.body: 120 pre-trained tensors"] + lines
        after = detector.backbone.fpn.state_dict()
        assert sorted({k.rsplit(".", 2)[0] for k in before if not torch.equal(before[k], after[k])}) == blocks


def test_convert_to_torchvision_loads_strictly_into_the_v2_detection_backbone(ckpts, tmp_path):
    out = tmp_path / "tv.pth"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "torchvision", "--output", out)
    sd = torch.load(out, weights_only=True)
    backbone = torchvision.models.detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).backbone
    backbone.load_state_dict(sd)  # strict: no key missing or unexpected, every shape right
    encoder, decoder = (branch_tensors(ckpts["r50_fpn"], f"teacher.{part}.") for part in ("encoder", "decoder"))
    assert all(torch.equal(sd[f"body.{k}"], v) for k, v in encoder.items())
    assert torch.equal(sd["fpn.inner_blocks.0.0.weight"], decoder["fpn_lateral2.weight"])
    assert torch.equal(sd["fpn.layer_blocks.3.1.running_var"], decoder["fpn_output5.norm.running_var"])
    assert fingerprints(v for k, v in sd.items() if k.startswith("fpn.")) == fingerprints(decoder.values())
    assert "maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=K).backbone.load_state_dict(" \
           in text
    run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "torchvision", "--output", out)  # DeCon-SL, ResNet-18
    backbone = torchvision.models.detection.backbone_utils.BackboneWithFPN(
        torchvision.models.resnet18(), {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}, [64, 128, 256, 512], 256,
        norm_layer=nn.BatchNorm2d)
    result = backbone.load_state_dict(torch.load(out, weights_only=True), strict=False)
    assert result.unexpected_keys == [] and sorted({k.rsplit(".", 2)[0] for k in result.missing_keys}) == \
        ["fpn.layer_blocks.1", "fpn.layer_blocks.2", "fpn.layer_blocks.3"]


def test_fold_bn_gives_the_v1_fpn_the_same_outputs(tmp_path):
    path = str(tmp_path / "ml.pt")
    fake_checkpoint(path, "decon-ml-slotcon-fpn")
    positive_variances(path)
    run("--checkpoint", path, "--to", "torchvision", "--output", tmp_path / "v2.pth")
    text = run("--checkpoint", path, "--to", "torchvision", "--output", tmp_path / "v1.pth", "--fold-bn")
    tvd = torchvision.models.detection
    layers = {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)}
    v2 = tvd.backbone_utils.BackboneWithFPN(torchvision.models.resnet18(), layers, [64, 128, 256, 512], 256,
                                            norm_layer=nn.BatchNorm2d)
    v2.load_state_dict(torch.load(tmp_path / "v2.pth", weights_only=True))
    v1 = tvd.backbone_utils.resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                                trainable_layers=5)
    v1.load_state_dict(torch.load(tmp_path / "v1.pth", weights_only=True))  # strict: convs with biases, no norm
    assert "resnet_fpn_backbone(backbone_name='resnet18', weights=None" in text
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        folded, reference = v1.eval()(x), v2.eval()(x)
        for k in reference:
            assert (folded[k] - reference[k]).abs().max() <= 1e-5 * reference[k].abs().max(), k
        for name, conv in v1.fpn.named_modules():  # the folding matters: the convs alone give other outputs
            if isinstance(conv, nn.Conv2d):
                conv.weight.copy_(v2.fpn.get_submodule(name).weight)
                conv.bias.zero_()
        assert (v1(x)["0"] - reference["0"]).abs().max() > 0.1 * reference["0"].abs().max()


def make_voc_detection(root, objects=None):
    """VOCdevkit/VOC2007 (trainval: 000001, test: 000003) and VOC2012 (trainval: 2008_000002), 40x32 JPEGs, one
    XML each; `objects` (name, difficult, xmin, ymin, xmax, ymax) go into 000001.xml."""
    objects = objects or [("dog", 0, 1, 2, 20, 30), ("cat", 1, 5, 5, 40, 32)]
    for year, split, image_id in (("VOC2007", "trainval", "000001"), ("VOC2012", "trainval", "2008_000002"),
                                  ("VOC2007", "test", "000003")):
        base = os.path.join(root, "VOCdevkit", year)
        os.makedirs(os.path.join(base, "ImageSets", "Main"), exist_ok=True)
        with open(os.path.join(base, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write(image_id + "\n")
        write_image(os.path.join(base, "JPEGImages", image_id + ".jpg"), fmt="JPEG")
        os.makedirs(os.path.join(base, "Annotations"), exist_ok=True)
        mine = objects if image_id == "000001" else [("person", 0, 3, 3, 9, 9)]
        boxes = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x1}</xmin>"
                        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                        for n, d, x1, y1, x2, y2 in mine)
        with open(os.path.join(base, "Annotations", image_id + ".xml"), "w") as f:
            f.write(f"<annotation><size><width>40</width><height>32</height></size>{boxes}</annotation>")
    return str(root)


def make_coco_detection(root, annotations=None):
    """train2017/ and val2017/ with 40x32 JPEGs 1, 2, 3 and annotations/instances_*.json: categories 3 (cat) and 7
    (dog); image 1 a polygon dog and a cat box, image 2 only a crowd region (an RLE), image 3 nothing."""
    annotations = annotations or [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 4, 10, 8], "area": 80.0, "iscrowd": 0,
         "segmentation": [[2, 4, 12, 4, 12, 12, 2, 12]]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 10, 15, 20], "area": 150.0, "iscrowd": 0,
         "segmentation": [[20, 10, 35, 10, 35, 30]]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 16], "area": 640.0, "iscrowd": 1,
         "segmentation": {"size": [32, 40], "counts": [0, 16, 16] * 40}}]
    for split in ("train2017", "val2017"):
        for i in (1, 2, 3):
            write_image(os.path.join(root, split, f"{i}.jpg"), fmt="JPEG")
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": [{"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 32} for i in (1, 2, 3)],
                       "categories": [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
                       "annotations": annotations}, f)
    return str(root)


def test_voc_and_coco_detection_layouts(tmp_path):
    voc = make_voc_detection(tmp_path / "voc")
    train, test = (data.build_detection_dataset("voc", s, voc) for s in ("train", "test"))
    assert train.image_ids == ["000001", "2008_000002"] and test.image_ids == ["000003"] and train.metric == "voc"
    image, (dog, cat) = train[0]
    assert image.size == (40, 32) and dog["bbox"] == [0.0, 1.0, 20.0, 29.0] and dog["xml_box"] == [1, 2, 20, 30]
    assert (dog["label"], cat["label"], cat["difficult"]) == (data.VOC_CLASSES.index("dog"), 8, 1)  # kept
    coco = make_coco_detection(tmp_path / "coco")
    train, val = (data.build_detection_dataset("coco", s, coco) for s in ("train", "val"))
    assert train.image_ids == [1] and val.image_ids == [1, 2, 3]  # training skips crowd-only and empty images
    assert train.classes == ("background", "cat", "dog") and train.category_ids == [3, 7]
    (_, (dog, cat)), (_, (crowd,)) = train[0], val[1]
    assert (dog["label"], cat["label"], crowd["iscrowd"]) == (2, 1, 1)
    assert data.segmentation_to_mask(dog["segmentation"], 32, 40)[4:12, 2:12].all()
    assert data.segmentation_to_mask(dog["segmentation"], 32, 40).sum() == 80
    assert data.segmentation_to_mask(crowd["segmentation"], 32, 40).sum() == 640
    _, target = data.DetectionTrainTransform([32], 1333, with_masks=True)(*val[1])
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 40)  # crowd regions: no target


def test_voc_metric_through_detect_gets_the_xml_boxes_back(tmp_path):
    """A stand-in detector returning the test image's objects as the dataset gives them (Detectron2's boxes, xmin - 1
    and ymin - 1): through eval.detect (COCO's x, y, w, h) and the VOC metric (x1, y1 + 1 again) they are the XML's
    boxes, so AP 1 for their class (person) and 0 for the 19 others at every IoU threshold."""
    test = data.build_detection_dataset("voc", "test", make_voc_detection(tmp_path))

    class Objects(nn.Module):
        def forward(self, images):
            annotations = test[0][1]
            return [{"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]),
                     "labels": torch.tensor([a["label"] for a in annotations]), "scores": torch.ones(len(annotations))}]

    results = eval_module.detect(Objects(), test)
    assert results[0][3][0]["category_id"] == data.VOC_CLASSES.index("person")
    scores = eval_module.detection_scores(test, results)["bbox"]
    assert scores["AP"] == scores["AP50"] == scores["AP75"] == pytest.approx(1 / 20)


@pytest.mark.parametrize("layout,change,message", [
    ("voc", [("dog", 0, 1, 2, 20, 30), ("wolf", 0, 1, 1, 5, 5)], r"VOC2007/Annotations/000001.xml: unknown class "
                                                                 r"'wolf'"),
    ("voc", [("dog", 0, 1, 2, 48, 30)], r"VOC2007/Annotations/000001.xml: box \[x 0, y 1, w 48, h 29\] is not "
                                       r"inside its 40x32 image"),
    ("voc", "broken", r"cannot decode image .*VOC2007/JPEGImages/000001.jpg"),
    ("coco", [{"id": 5, "image_id": 1, "category_id": 99, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
     r"instances_train2017.json, annotation 5: unknown category_id 99"),
    ("coco", [{"id": 6, "image_id": 1, "category_id": 3, "bbox": [30, 0, 20, 5], "area": 100, "iscrowd": 0}],
     r"instances_train2017.json, annotation 6: box \[x 30, y 0, w 20, h 5\] is not inside its 40x32 image"),
    ("coco", "missing", r"cannot decode image .*train2017/1.jpg"),
])
def test_bad_detection_data_is_one_line_naming_the_file_before_training(tmp_path, capsys, monkeypatch, layout,
                                                                       change, message):
    if layout == "voc":
        root = make_voc_detection(tmp_path, None if isinstance(change, str) else change)
        image = os.path.join(root, "VOCdevkit", "VOC2007", "JPEGImages", "000001.jpg")
    else:
        root = make_coco_detection(tmp_path, None if isinstance(change, str) else change)
        image = os.path.join(root, "train2017", "1.jpg")
    if change == "broken":
        with open(image, "wb") as f:
            f.write(b"not a JPEG")
    elif change == "missing":
        os.remove(image)
    monkeypatch.setattr(fdet, "finetune", lambda *a, **kw: pytest.fail("training started"))
    with pytest.raises(SystemExit) as e:
        fdet.main(detection_args("--dataset", layout, "--data-root", root, "--workers", "0",
                                 "--output-dir", tmp_path / "out"))
    assert str(e.value).count("\n") == 0 and re.search(message, str(e.value)), str(e.value)


def test_short_detection_finetune_and_eval_give_the_same_detections(tmp_path, capsys, monkeypatch, one_thread):
    """finetune_det.py on the built-in scenes (ResNet-18, the encoder and FPN of a one-step pretrain.py run, 4
    iterations), then eval.py on its seed0.pt: the same detections, box for box, and the same AP."""
    def detector(*a, **kw):  # 4 iterations leave every score below Detectron2's 0.05: keep the 20 best per image
        model = models.build_detector(*a, **kw)
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 20
        return model

    def recording_detect(*a, **kw):
        detected.append(eval_module.detect(*a, **kw))
        return detected[-1]

    detected = []
    monkeypatch.setattr(fdet, "build_detector", detector)
    monkeypatch.setattr(eval_module, "build_detector", detector)
    monkeypatch.setattr(fdet, "detect", recording_detect)
    assert pretrain_here(capsys, epochs=1, max_steps=1, output_dir=tmp_path / "pre")[0] == 0
    pretrained = str(tmp_path / "pre" / "last.pt")
    out = tmp_path / "run"
    results = fdet.main(detection_args(
        "--pretrained", pretrained, "--transfer", "encoder+decoder", "--synthetic-size", 64, "--synthetic-train", 16,
        "--synthetic-val", 3, "--synthetic-test", 6, "--min-size", 64, "--test-size", 64, "--iters", 4,
        "--batch-size", 2, "--eval-every", 2, "--log-every", 2,
        "--roi-batch-size", 16, "--test-proposals", 30, "--workers", 0, "--output-dir", out))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], "loss" in r, "val_segm" in r) for r in log] == [(2, True, False), (2, False, True),
                                                                        (4, True, False)]
    saved = json.loads((out / "results.json").read_text())
    assert saved["bbox"]["AP"] == results["bbox"]["AP"] and saved["seeds"][0]["transfer"][2].startswith("FPN ->")
    assert torch.load(out / "seed0.pt", weights_only=True)["task"] == "detection"

    capsys.readouterr()
    scores = eval_main(eval_parser().parse_args(["--checkpoint", str(out / "seed0.pt"), "--workers", "0",
                                                 "--save-detections", str(tmp_path / "dets.json")]))
    assert "segm" in capsys.readouterr().out
    assert scores == {kind: saved["seeds"][0][kind] for kind in ("bbox", "segm")}
    rescored = json.loads((tmp_path / "dets.json").read_text())
    trained = [d for r in detected[-1] for d in r[3]]
    assert len(rescored) == len(trained) == 6 * 20 and [d["segmentation"] for d in rescored] == \
        [d["segmentation"] for d in trained]
    for a, b in zip(rescored, trained):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
    with pytest.raises(SystemExit, match="error: --mode is for segmentation; .*seed0.pt is a detector"):
        eval_main(eval_parser().parse_args(["--checkpoint", str(out / "seed0.pt"), "--mode", "slide"]))
    segmenter = fake_finetuned(str(tmp_path / "seg.pt"))
    with pytest.raises(SystemExit, match="are for detectors; .*seg.pt is not a finetune_det.py checkpoint"):
        eval_main(eval_parser().parse_args(["--checkpoint", segmenter, "--save-detections", str(tmp_path / "x")]))


class SceneOracle(nn.Module):
    """A stand-in detector for eval.detect: each scene's own objects (boxes from their masks, the masks as
    probabilities), some of them 2 px off, one left out, and a confident false positive per image."""

    def __init__(self, scenes):
        super().__init__()
        self.scenes, self.calls = scenes, 0

    def forward(self, images):
        _, annotations = self.scenes[self.calls]
        self.calls += 1
        h, w = images[0].shape[-2:]
        boxes, labels, masks = [], [], []
        for k, a in enumerate(annotations[1:]):
            x, y, bw, bh = a["bbox"]
            shift = 2.0 * (k % 2)
            boxes.append([x + shift, y, x + bw + shift, y + bh])
            labels.append(a["label"])
            masks.append(np.roll(a["segmentation"], int(shift), axis=1))
        boxes.append([0.0, 0.0, w / 2, h / 2])
        labels.append(1)
        masks.append(np.pad(np.ones((h // 2, w // 2), bool), ((0, h - h // 2), (0, w - w // 2))))
        scores = torch.linspace(0.9, 0.5, len(boxes))
        return [{"boxes": torch.tensor(boxes), "labels": torch.tensor(labels), "scores": scores,
                 "masks": torch.from_numpy(np.stack(masks)).float()[:, None]}]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_detections_in_coco_results_format_score_the_same_with_pycocotools(coco_tools, tmp_path):
    """eval.detect's detections, written as eval.py --save-detections writes them, read by pycocotools' loadRes
    against the scenes as a COCO ground-truth file: its box and mask AP are ours."""
    scenes = data.SyntheticDetection(8, 64, data.SYNTHETIC_SPLIT_SEEDS["test"])
    results = eval_module.detect(SceneOracle(scenes), scenes)
    ours = eval_module.detection_scores(scenes, results, segm=True)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([d for r in results for d in r[3]]))
    dets = json.loads(path.read_text())
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    gts = [{**{k: a[k] for k in ("id", "bbox", "area", "iscrowd")}, "image_id": i, "category_id": a["label"],
            "segmentation": data.masks_to_rles(a["segmentation"][None])[0]}
           for i in range(len(scenes)) for a in scenes[i][1]]
    images = [{"id": i, "height": 64, "width": 64} for i in range(len(scenes))]
    for kind in ("bbox", "segm"):
        reference = pycoco_scores(coco_tools, gts, dets, images, list(range(1, 9)), kind)
        assert_same_scores(ours[kind], reference)
        assert 0.3 < reference["AP50"] < 1.0  # not degenerate: hits, misses and false positives


# ---------------------------------------------------------------- tools: bench.py

def test_bench_runs_a_tiny_config_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    parser = bench.get_args_parser()
    a = parser.parse_args(["--variants", "ml-fpn", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--dim-hidden", "32", "--num-prototypes", "8",
                           "--baseline", "--checkpoint-heads", "--precision", "fp32", "--json", str(out)])
    bench.main(bench.check_args(a, parser))
    records = json.loads(out.read_text())
    assert [(r["variant"], r["config"]) for r in records] == [
        ("ml-fpn", "authors (fp32)"), ("ml-fpn", "fp32+ckpt_heads")]  # NHWC is for CUDA
    ops = records[1]["dispatched_ops"]
    assert ops["parameters"] > 100 and 0 < ops["optimizer_step"] < 40 and ops["ema_update"] == 1
    for r in records:
        assert {"variant", "config", "img_per_s", "ms_per_step", "peak_mem_mb", "gflop_per_img"} <= set(r)
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        assert sum(r["flop_share"].values()) == pytest.approx(1.0)
        assert r["flop_share"]["encoder"] > 0 and r["flop_share"]["decoder"] > 0
        assert set(r["head_flop_share"]) == {"p2 head", "p2 predictor", "p3 head", "p3 predictor", "p4 head",
                                             "p4 predictor", "p5 head", "p5 predictor"}
    base, ours = records
    assert ours["speedup_vs_baseline"] == pytest.approx(ours["img_per_s"] / base["img_per_s"])
    # the checkpointed heads run their forward twice: 4/3 of the student heads' FLOPs
    assert ours["gflop_per_img"] > base["gflop_per_img"]

def test_bench_rejects_unknown_variants_before_work(capsys):
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit):
        bench.check_args(parser.parse_args(["--variants", "ml-fpn,dino"]), parser)
    assert "--variants: unknown dino" in capsys.readouterr().err

def test_bench_rejects_memory_estimates_of_what_it_does_not_count(capsys):
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit):
        bench.check_args(parser.parse_args(["--estimate-memory", "--baseline"]), parser)
    assert "--estimate-memory counts our training step only" in capsys.readouterr().err

def test_live_bytes_counts_each_storage_while_it_is_alive():
    with bench.LiveBytes() as count:
        a = torch.empty(1000)                         # 4000 bytes
        b = torch.empty(2000)                         # 8000: 12000 alive
        del a                                         # 8000
        view = b[:10]                                 # the same storage: nothing new
        c = torch.empty(500, dtype=torch.bfloat16)    # 1000: 9000 alive
    assert (count.peak, count.live) == (12000, 9000)
    assert view.untyped_storage() is b.untyped_storage() and c.numel() == 500

@pytest.mark.parametrize("variant", ["densecl-ml-fpn", "ml-fpn"])
def test_memory_estimate_on_fake_tensors_counts_what_the_real_step_allocates(variant, tmp_path):
    """The same two steps, counted on real tensors and (bench.py --estimate-memory) on fake ones. DenseCL has no
    data-dependent shape: the counts are equal. SlotCon's slot losses keep the present prototypes only (at most
    4 of the 1024 at c5, 2x2 here: the slot logits are the largest tensors at this size), and the estimate takes
    every prototype as present: an upper bound."""
    parser = bench.get_args_parser()
    a = bench.check_args(parser.parse_args(
        ["--variants", variant, "--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--steps", "1",
         "--warmup", "0", "--dim-hidden", "32", "--num-prototypes", "1024", "--checkpoint-heads", "--estimate-memory",
         "--json", str(tmp_path / "est.json")]), parser)
    bench.main(a)
    [est] = json.loads((tmp_path / "est.json").read_text())
    assert est["variant"] == variant and est["config"] == "bf16+channels_last+ckpt_heads"
    run = bench.Run(variant, bench.ours_config(a, "cuda"), a, torch.device("cpu"))
    resident = bench.tensor_mb([*run.model.parameters(), *run.model.buffers(), *run.crops, run.coords, run.flags])
    with bench.LiveBytes() as count:
        run.step()
        run.step()
    real = resident + count.peak / 2 ** 20
    assert est["resident_mb"] == pytest.approx(resident) and est["state_mb"] == pytest.approx(run.state_mb())
    grads_and_optimizer = run.state_mb() - bench.tensor_mb([*run.model.parameters(), *run.model.buffers()])
    assert real > resident + grads_and_optimizer  # and activations on top
    if variant.startswith("densecl"):
        assert est["est_peak_mb"] == pytest.approx(real, rel=1e-3)
    else:
        assert real < est["est_peak_mb"] < 3 * real


# ---------------------------------------------------------------- tools: reproduce.py (one --quick run, shared)

ROWS = [("Random init", "none"), ("SlotCon", "encoder"), ("DeCon-SL-SlotCon-FPN", "encoder"),
        ("DeCon-SL-SlotCon-FPN", "encoder+decoder"), ("DeCon-ML-SlotCon-FPN", "encoder"),
        ("DeCon-ML-SlotCon-FPN", "encoder+decoder")]

def _reproduce(out, *flags, rc=0):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "reproduce.py"), "--quick", "--output-dir", str(out),
                           *flags], capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, _reproduce(out).stdout

def test_reproduce_quick_writes_table7_shaped_results(quick_run):
    out, stdout = quick_run
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 + 6 * 3 + 1 and all("done in" in line for line in lines[:-1])  # one line per stage
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["fractions"] == [0.05, 0.25, 1.0]
    assert [(r["pretraining"], r["transfer"]) for r in results["table"]] == ROWS
    for row in results["table"]:
        assert len(row["cells"]) == 3
        for cell in row["cells"]:
            assert math.isfinite(cell["mean"]) and 0 <= cell["mean"] <= 100 and cell["std"] >= 0
    assert len(results["stages"]) == 21 and all(s["command"].startswith("python ") for s in results["stages"])
    md = (out / "results.md").read_text()
    assert "| pre-training | transfer | 5 % | 25 % | 100 % |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "+-" in line]
    assert [tuple(c.strip() for c in line.split("|")[1:3]) for line in table] == ROWS
    assert "python pretrain.py --framework slotcon --decoder fpn --alpha 0 --dropout 0.5" in md

def test_reproduce_starts_a_finetune_when_its_own_pretraining_is_done(monkeypatch):
    """Two jobs, pre-trainings A (quick) and B (which finishes only once A's fine-tune has started): B times out
    if the fine-tunes wait for every pre-training. A failed stage stops what is still queued."""
    import reproduce
    started, ran = threading.Event(), []

    def stage(label, cmd, out_dir, done_file, threads, progress, inputs=()):
        ran.append(label)
        if label == "ft A":
            started.set()
        if label == "B" and not started.wait(timeout=30):
            raise AssertionError("the fine-tune of A did not start while B was running")
        if label == "C":
            raise SystemExit("error: C failed")
        return {"command": label, "seconds": 0.0}

    monkeypatch.setattr(reproduce, "run_stage", stage)
    spec = lambda label, *inputs: (label, [], "", f"{label}.done", list(inputs))
    args = argparse.Namespace(jobs=2, threads=1)
    stages = reproduce.run_all([spec("A"), spec("B"), spec("ft B", "B.done"), spec("ft A", "A.done")], args, print)
    assert [s["label"] for s in stages] == ["A", "B", "ft B", "ft A"]
    assert ran.index("ft A") < ran.index("ft B")
    ran.clear()
    args.jobs = 1
    with pytest.raises(SystemExit, match="C failed"):
        reproduce.run_all([spec("C"), spec("ft none"), spec("ft C", "C.done")], args, print)
    assert ran == ["C"]

def _finetune_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "finetune").glob("*/results.json")}

def test_reproduce_reuses_finished_stages(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    lines = _reproduce(out).stdout.strip().splitlines()
    assert all("reused" in line for line in lines[:-1]) and len(lines) == 22
    assert _finetune_mtimes(out) == before and len(before) == 18
    with open(out / "results.json") as f:
        assert len(json.load(f)["table"]) == 6

def test_reproduce_refuses_stages_made_with_other_settings(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    err = _reproduce(out, "--finetune-lr", "0.05", rc=1).stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "run with other settings" in err
    assert "--lr 0.02" in err and "use another --output-dir or delete it" in err
    assert _finetune_mtimes(out) == before  # refused before any work

def test_reproduce_redoes_the_finetunes_of_a_redone_pretraining(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    ckpt = out / "pretrain" / "slotcon" / "last.pt"
    later = max(before.values()) + 10**9
    os.utime(ckpt, ns=(later, later))  # as if SlotCon had been pre-trained again after its fine-tunes
    lines = _reproduce(out).stdout.strip().splitlines()
    redone = sorted(line.split("] ")[1].split(":")[0] for line in lines[:-1] if "done in" in line)
    assert redone == [f"finetune SlotCon / encoder / {f} %" for f in ("100", "25", "5")]
    after = _finetune_mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {f"slotcon-encoder-{f}" for f in ("0.05", "0.25", "1")}
