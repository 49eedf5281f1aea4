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
import signal
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
import finetune_seg as ft
import losses
import models
import pretrain
import utils
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
            synthetic_images=16, workers=0, log_every=1)
NOWHERE = os.path.join(tempfile.gettempdir(), "decon-tests-write-nothing-here")


def flags(**kw):
    """Keyword arguments -> pretrain.py command-line flags (True: the bare flag; False: --no-FLAG)."""
    out = []
    for k, v in kw.items():
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
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for rec in recs:
        assert {"step", "epoch", "loss", "loss_enc", "loss_dec", "lr", "momentum", "img_per_s"} <= set(rec)
        assert math.isfinite(rec["loss"]) and rec["loss_enc"] is None and rec["loss"] == rec["loss_dec"]
    assert recs[0]["momentum"] == pytest.approx(0.99) and recs[1]["momentum"] > 0.99
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1 and ckpt["args"]["alpha"] == 0.0
    assert set(ckpt) >= {"model", "optimizer", "epoch", "step", "args"}
    r = run_pretrain(epochs=3, max_steps=4, output_dir=out, resume=out / "last.pt")
    assert r.returncode == 0, r.stderr
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    r = run_pretrain("decon-sl-slotcon-fcn", epochs=3, max_steps=5, output_dir=out, resume=out / "last.pt")
    assert r.returncode == 2 and "another variant" in r.stderr and "--decoder fpn (checkpoint) vs fcn" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


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


def test_sigkill_then_resume_continues_the_same_trajectory(tmp_path):
    """Dropout, two views, a data worker, mid-epoch kill: from the checkpoint on, per-step losses equal an
    uninterrupted run's (CPU, fp32)."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert run_pretrain(**RESUME, output_dir=ref).returncode == 0
    proc = popen_pretrain(cut, save_every=2)
    _wait_for_lines(cut / "metrics.jsonl", 5, proc)  # killed during step 6, after the step-4 checkpoint
    proc.kill()
    proc.wait()
    saved = torch.load(cut / "last.pt", weights_only=True)["step"]
    assert 4 <= saved < 8
    r = run_pretrain(**RESUME, save_every=2, output_dir=cut, resume=cut / "last.pt")
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
    os.killpg(proc.pid, signal.SIGKILL)
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
    assert sorted(os.listdir(out)) == ["last.pt", "metrics.jsonl"]
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
    assert sorted(os.listdir(tmp_path)) == ["last.pt", "metrics.jsonl"]


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
    specs = {"r50_fpn": ("decon-ml-slotcon-fpn", "resnet50"), "r18_fpn_sl": ("decon-sl-slotcon-fpn", "resnet18"),
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
    assert "type='FCNHead', in_channels=512, channels=256, num_convs=2, concat_input=False, dilation=6" in text

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

@pytest.mark.parametrize("name,arch", [("r50_fpn", "resnet50"), ("r18_none", "resnet18")])
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
    if name == "r50_fpn":
        assert "note: torchvision has no counterpart of the DeCon decoders; exported the encoder only" in text

@pytest.mark.parametrize("name,branch,expected", [("r18_none", None, "teacher"), ("r18_none", "student", "student"),
                                                  ("r18_densecl_fpn", None, "student"),
                                                  ("r18_densecl_fpn", "teacher", "teacher")])
def test_branch_default_and_choice(ckpts, tmp_path, name, branch, expected):
    out = tmp_path / "b.pth"
    text = run("--checkpoint", ckpts[name], "--to", "torchvision", "--output", out,
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
    ("r18_fpn_sl", ["--to", "torchvision", "--part", "decoder"], "x.pth",
     "--part decoder --to torchvision: torchvision has no counterpart of the DeCon decoders"),
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


# ---------------------------------------------------------------- tools: bench.py

def test_bench_runs_a_tiny_config_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    parser = bench.get_args_parser()
    a = parser.parse_args(["--variants", "ml-fpn", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--dim-hidden", "32", "--num-prototypes", "8",
                           "--baseline", "--checkpoint-heads", "--json", str(out)])
    bench.main(bench.check_args(a, parser))
    records = json.loads(out.read_text())
    assert [(r["variant"], r["config"]) for r in records] == [
        ("ml-fpn", "authors (fp32)"), ("ml-fpn", "bf16+channels_last+ckpt_heads")]
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
    run = bench.Run(variant, bench.ours_config(a), a, torch.device("cpu"))
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
