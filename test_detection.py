"""Tests of the detection room: COCO / VOC AP against pycocotools and hand cases, COCO masks, the detection
datasets and transforms (det_data.py), the detector and its transfer (detection.py, weights.py), finetune_det.py
and detection.py end to end.

    python -m pytest -q test_*.py
"""
import contextlib
import hashlib
import io
import json
import math
import os
import pickle
import random
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import data
import det_data
import detection
import finetune_det as fdet
import seg_data
import weights
from eval import get_args_parser as eval_parser, main as eval_main
from test_decon import fake_checkpoint, pretrain_here
from test_segmentation import fake_finetuned, write_image
from test_weights import branch_tensors, fingerprints, run


# ---------------------------------------------------------------- detection (det_data.py, detection.py, finetune_det.py)

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
    as list-count RLEs; detections as RLEs (from det_data.masks_to_rles, which pycocotools then decodes) of shifted or
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
            dets.append({"image_id": i, "category_id": cat, "segmentation": det_data.masks_to_rles(m[None])[0],
                         "score": float(np.round(score, 2))})
    return gts, dets, [{"id": i, "height": h, "width": w} for i, (h, w) in sizes.items()], list(cats), sizes


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("seed", range(4))
def test_coco_box_ap_matches_pycocotools(coco_tools, seed):
    gts, dets, images, cats = random_coco_boxes(seed)
    reference = pycoco_scores(coco_tools, gts, dets, images, cats, "bbox")
    assert_same_scores(detection.coco_evaluate(gts, dets, "bbox", [im["id"] for im in images]), reference)
    assert 0.05 < reference["AP"] < 0.95 and reference["APs"] > 0 and reference["APl"] > 0  # not degenerate


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("seed", range(2))
def test_coco_mask_ap_matches_pycocotools(coco_tools, seed):
    gts, dets, images, cats, sizes = random_coco_masks(seed, coco_tools)
    reference = pycoco_scores(coco_tools, gts, dets, images, cats, "segm")
    assert_same_scores(detection.coco_evaluate(gts, dets, "segm", [im["id"] for im in images], sizes), reference)
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
    s = detection.coco_evaluate(gts, dets)
    assert s["AP50"] == 1.0 and s["AP75"] == pytest.approx(67 / 101) and s["APs"] == s["AP"]
    assert s["AP"] == pytest.approx((1 + 6 * 67 / 101 + 3 * 34 / 101) / 10)
    assert math.isnan(s["APm"]) and math.isnan(s["APl"])  # no medium or large object
    assert_same_scores(s, pycoco_scores(coco_tools, gts, dets, [{"id": 1, "height": 200, "width": 200}], [1], "bbox"))
    # equal IoUs (0.82 with a and with b): the detection takes the later object, b, and leaves a (IoU 0.67) to the
    # next one, whose IoU with b is 0.43
    gts = [gt(1, [-1, 0, 10, 10], 100), gt(2, [1, 0, 10, 10], 100)]
    dets = [{"image_id": 1, "category_id": 1, "bbox": box, "score": s}
            for box, s in (([0, 0, 10, 10], 0.9), ([-3, 0, 10, 10], 0.8))]
    assert detection.coco_evaluate(gts, dets)["AP50"] == 1.0


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
    r = detection.voc_evaluate(gts, dets, ["cat"])
    assert r["AP50"] == pytest.approx(28 / 33) and r["AP75"] == pytest.approx(6 / 11)
    assert r["AP"] == pytest.approx((4 * 28 / 33 + 6 * 6 / 11) / 10)
    assert detection.voc_evaluate(gts, dets, ["cat", "dog"])["AP50"] == pytest.approx(28 / 33 / 2)  # dog: 0
    # recall exactly 3/10 stays below np.arange's level 0.30000000000000004: that level takes the next precision
    gts = [{"image_id": i, "class": "cat", "bbox": [1, 1, 10, 10], "difficult": 0} for i in range(10)]
    dets = [{"image_id": i, "class": "cat", "bbox": [0, 0, 10, 10] if i < 4 else [50, 50, 60, 60], "score": s}
            for i, s in ((0, 0.9), (1, 0.8), (2, 0.7), (4, 0.6), (3, 0.5))]
    assert detection.voc_evaluate(gts, dets, ["cat"])["AP50"] == pytest.approx((3 + 0.8 + 0.8) / 11)


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
            assert det_data.masks_to_rles(torch.from_numpy(m)[None])[0] == {"size": list(shape),
                                                                        "counts": reference["counts"].decode()}
            for segm in (reference, {"size": list(shape), "counts": list_counts(m)}):
                assert np.array_equal(det_data.segmentation_to_mask(segm, *shape), m)
    for n in range(500):
        H, W, k = int(rng.integers(1, 120)), int(rng.integers(1, 120)), int(rng.integers(3, 15))
        parts = [np.column_stack([rng.uniform(-20, W + 20, k), rng.uniform(-20, H + 20, k)]).ravel().tolist()
                 for _ in range(1 + n % 3)]
        if n % 4 == 0:  # on the grid of halves and fifths: the rounding cases
            parts = [(np.round(np.asarray(p) * 5) / 5).tolist() for p in parts]
        reference = mask_api.decode(mask_api.merge(mask_api.frPyObjects(parts, H, W))).astype(bool)
        assert np.array_equal(det_data.segmentation_to_mask(parts, H, W), reference), (parts, H, W)


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
    scenes = det_data.SyntheticDetection(6, 64, 100)
    transform = det_data.DetectionTrainTransform([48, 96], max_size=80, with_masks=True)
    random.seed(0)
    flips, sides = 0, set()
    for i in range(len(scenes)):
        image, annotations = scenes[i]
        x, target = transform(image, annotations)
        sides.add(tuple(x.shape[1:]))
        assert x.shape[1:] == target["masks"].shape[1:] and len(target["boxes"]) == len(annotations)
        for box, m in zip(target["boxes"], target["masks"].bool().numpy()):
            tight = torch.tensor(det_data.mask_box(m))
            assert (box - torch.cat([tight[:2], tight[:2] + tight[2:]])).abs().max() <= 1.0
        first = torch.tensor(annotations[0]["bbox"]) * x.shape[2] / 64
        flips += bool(abs(target["boxes"][0, 0] - (x.shape[2] - first[0] - first[2])) < 1e-4)
    assert sides == {(48, 48), (80, 80)} and 0 < flips < len(scenes)  # 96 px is bounded to 80


def test_warmup_multistep_schedule_and_weight_decay_groups():
    lrs = fdet.warmup_multistep_schedule(0.02, 100, [60, 80], 10)
    assert lrs[0] == pytest.approx(0.02 * 0.001) and lrs[5] == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert lrs[10] == lrs[59] == pytest.approx(0.02) and lrs[60] == pytest.approx(0.002)
    assert lrs[80] == lrs[99] == pytest.approx(0.0002) and len(lrs) == 100
    model = detection.build_detector("resnet18", 9, "faster")
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
    decon = fake_checkpoint(path, "ml-fpn")
    decon.load_state_dict(positive_variances(path))
    detector = detection.build_detector("resnet18", 9, "mask")
    weights.transfer_detector(detector, weights.read_pretrained([path]), "encoder+decoder")
    teacher, backbone = decon.teacher.eval(), detector.backbone.eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours, theirs = teacher.decoder(teacher.encoder(x)), backbone(x)
    for s in (2, 3, 4, 5):
        scale = ours[f"p{s}"].abs().max()
        assert (ours[f"p{s}"] - theirs[str(s - 2)]).abs().max() <= 1e-5 * scale, s
    assert torch.equal(theirs["pool"], F.max_pool2d(theirs["3"], 1, 2))


def test_rpn_head_is_detectron2s_standard_head_with_one_conv():
    """Detectron2's StandardRPNHead (RPN.CONV_DIMS [-1]): one 3x3 conv with bias + ReLU shared by the levels, then
    1x1 objectness (A = 3 anchors per position) and 1x1 box deltas (4A), all N(0, 0.01) with zero bias."""
    torch.manual_seed(0)
    head = detection.build_detector("resnet18", num_classes=3, kind="faster").rpn.head
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.in_channels, c.out_channels) for c in convs] == \
        [((3, 3), 256, 256), ((1, 1), 256, 3), ((1, 1), 256, 12)]
    for c in convs:
        assert abs(c.weight.std().item() - 0.01) < 1e-3 and not c.bias.any()
    conv, cls, box = convs
    for c in convs:  # non-zero biases, so that the check below sees them
        nn.init.uniform_(c.bias, -0.1, 0.1)
    feats = [torch.randn(2, 256, 16, 20), torch.randn(2, 256, 8, 10)]
    logits, deltas = head(feats)
    for x, lo, de in zip(feats, logits, deltas):
        t = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
        torch.testing.assert_close(lo, F.conv2d(t, cls.weight, cls.bias))
        torch.testing.assert_close(de, F.conv2d(t, box.weight, box.bias))


def test_roi_heads_start_as_detectron2s():
    """Detectron2's init where torchvision's differs: box head fc c2_xavier_fill (Kaiming uniform, a = 1: bound
    sqrt(3 / fan_in)), class scores N(0, 0.01), box deltas N(0, 0.001), mask logits N(0, 0.001), biases 0; the
    convs Kaiming normal (fan out) in both."""
    torch.manual_seed(0)
    roi = detection.build_detector("resnet18", num_classes=5, kind="mask").roi_heads
    fc = [m for m in roi.box_head.modules() if isinstance(m, nn.Linear)]
    assert len(fc) == 1 and fc[0].weight.shape == (1024, 256 * 7 * 7) and not fc[0].bias.any()
    bound = (3 / fc[0].in_features) ** 0.5
    assert fc[0].weight.abs().max() <= bound and fc[0].weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.01)
    for layer, std in ((roi.box_predictor.cls_score, 0.01), (roi.box_predictor.bbox_pred, 0.001),
                       (roi.mask_predictor.mask_fcn_logits, 0.001)):
        assert layer.weight.std().item() == pytest.approx(std, rel=0.15) and not layer.bias.any()
        assert abs(layer.weight.mean().item()) < std / 3


def test_the_transfer_log_says_what_is_loaded_and_what_stays_random(tmp_path):
    """The log lines of each case, and the FPN blocks whose tensors the transfer changed (torchvision's names)."""
    lateral = "fpn_lateral2, fpn_lateral3, fpn_lateral4, fpn_lateral5"
    inner = [f"inner_blocks.{i}" for i in range(4)]
    cases = {
        ("ml-fpn", "encoder+decoder"): (
            [f"FPN -> backbone.fpn: 48 pre-trained tensors ({lateral}, fpn_output2, fpn_output3, fpn_output4, "
             "fpn_output5)", "random init: RPN, box head, mask head"], inner + [f"layer_blocks.{i}" for i in range(4)]),
        ("sl-fpn", "encoder+decoder"): (
            [f"FPN -> backbone.fpn: 30 pre-trained tensors ({lateral}, fpn_output2)",
             "random init: fpn_output3, fpn_output4, fpn_output5, RPN, box head, mask head (pre-trained without deep "
             "supervision: only fpn_output2 exists)"], inner + ["layer_blocks.0"]),
        ("sl-fcn", "encoder+decoder"): (
            ["random init: FPN (the pre-trained decoder is an FCN, which has no counterpart in the detector), RPN, "
             "box head, mask head"], []),
        ("ml-fpn", "encoder"): (["random init: FPN (--transfer encoder), RPN, box head, mask head"], [])}
    for (name, mode), (lines, blocks) in cases.items():
        path = str(tmp_path / f"{name}.pt")
        fake_checkpoint(path, name)
        detector = detection.build_detector("resnet18", 9, "mask")
        before = {k: v.clone() for k, v in detector.backbone.fpn.state_dict().items()}
        assert weights.transfer_detector(detector, weights.read_pretrained([path]), mode) == \
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
    fake_checkpoint(path, "ml-fpn")
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
    train, test = (det_data.build_detection_dataset("voc", s, voc) for s in ("train", "test"))
    assert train.image_ids == ["000001", "2008_000002"] and test.image_ids == ["000003"] and train.metric == "voc"
    image, (dog, cat) = train[0]
    assert image.size == (40, 32) and dog["bbox"] == [0.0, 1.0, 20.0, 29.0] and dog["xml_box"] == [1, 2, 20, 30]
    assert (dog["label"], cat["label"], cat["difficult"]) == (seg_data.VOC_CLASSES.index("dog"), 8, 1)  # kept
    coco = make_coco_detection(tmp_path / "coco")
    train, val = (det_data.build_detection_dataset("coco", s, coco) for s in ("train", "val"))
    assert train.image_ids == [1] and val.image_ids == [1, 2, 3]  # training skips crowd-only and empty images
    assert train.classes == ("background", "cat", "dog") and train.category_ids == [3, 7]
    (_, (dog, cat)), (_, (crowd,)) = train[0], val[1]
    assert (dog["label"], cat["label"], crowd["iscrowd"]) == (2, 1, 1)
    assert det_data.segmentation_to_mask(dog["segmentation"], 32, 40)[4:12, 2:12].all()
    assert det_data.segmentation_to_mask(dog["segmentation"], 32, 40).sum() == 80
    assert det_data.segmentation_to_mask(crowd["segmentation"], 32, 40).sum() == 640
    _, target = det_data.DetectionTrainTransform([32], 1333, with_masks=True)(*val[1])
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 32, 40)  # crowd regions: no target


def test_voc_metric_through_detect_gets_the_xml_boxes_back(tmp_path):
    """A stand-in detector returning the test image's objects as the dataset gives them (Detectron2's boxes, xmin - 1
    and ymin - 1): through eval.detect (COCO's x, y, w, h) and the VOC metric (x1, y1 + 1 again) they are the XML's
    boxes, so AP 1 for their class (person) and 0 for the 19 others at every IoU threshold."""
    test = det_data.build_detection_dataset("voc", "test", make_voc_detection(tmp_path))

    class Objects(nn.Module):
        def forward(self, images):
            annotations = test[0][1]
            return [{"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)]),
                     "labels": torch.tensor([a["label"] for a in annotations]), "scores": torch.ones(len(annotations))}]

    results = detection.detect(Objects(), test)
    assert results[0][3][0]["category_id"] == seg_data.VOC_CLASSES.index("person")
    scores = detection.detection_scores(test, results)["bbox"]
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
    iterations), then detection.py on its seed0.pt: the same detections, box for box, and the same AP."""
    def detector(*a, **kw):  # 4 iterations leave every score below Detectron2's 0.05: keep the 20 best per image
        model = build(*a, **kw)
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 20
        return model

    def recording_detect(*a, **kw):
        detected.append(detection.detect(*a, **kw))
        return detected[-1]

    detected, build = [], detection.build_detector
    monkeypatch.setattr(fdet, "build_detector", detector)
    monkeypatch.setattr(detection, "build_detector", detector)
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
    scores = detection.main(detection.get_args_parser().parse_args(
        ["--checkpoint", str(out / "seed0.pt"), "--workers", "0", "--save-detections", str(tmp_path / "dets.json")]))
    assert "segm" in capsys.readouterr().out
    assert scores == {kind: saved["seeds"][0][kind] for kind in ("bbox", "segm")}
    rescored = json.loads((tmp_path / "dets.json").read_text())
    trained = [d for r in detected[-1] for d in r[3]]
    assert len(rescored) == len(trained) == 6 * 20 and [d["segmentation"] for d in rescored] == \
        [d["segmentation"] for d in trained]
    for a, b in zip(rescored, trained):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
    with pytest.raises(SystemExit, match="seed0.pt: a finetune_det.py detector; score it with python detection.py"):
        eval_main(eval_parser().parse_args(["--checkpoint", str(out / "seed0.pt"), "--mode", "slide"]))
    segmenter = fake_finetuned(str(tmp_path / "seg.pt"))
    with pytest.raises(SystemExit, match="seg.pt: not a finetune_det.py checkpoint .score a finetune_seg.py one with "
                                         "eval.py."):
        detection.main(detection.get_args_parser().parse_args(["--checkpoint", segmenter]))


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
    scenes = det_data.SyntheticDetection(8, 64, seg_data.SYNTHETIC_SPLIT_SEEDS["test"])
    results = detection.detect(SceneOracle(scenes), scenes)
    ours = detection.detection_scores(scenes, results, segm=True)
    path = tmp_path / "dets.json"
    path.write_text(json.dumps([d for r in results for d in r[3]]))
    dets = json.loads(path.read_text())
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score", "segmentation"}
    gts = [{**{k: a[k] for k in ("id", "bbox", "area", "iscrowd")}, "image_id": i, "category_id": a["label"],
            "segmentation": det_data.masks_to_rles(a["segmentation"][None])[0]}
           for i in range(len(scenes)) for a in scenes[i][1]]
    images = [{"id": i, "height": 64, "width": 64} for i in range(len(scenes))]
    for kind in ("bbox", "segm"):
        reference = pycoco_scores(coco_tools, gts, dets, images, list(range(1, 9)), kind)
        assert_same_scores(ours[kind], reference)
        assert 0.3 < reference["AP50"] < 1.0  # not degenerate: hits, misses and false positives
