"""Detection downstream, for finetune_det.py: the detector (torchvision's Faster / Mask R-CNN v2 around our ResNet
and FPN), COCO box and mask AP as pycocotools computes them and Pascal VOC AP as Detectron2 reports it (numpy
only), inference, and the command that scores a fine-tuned detector again (docs/DETECTION.md).

    python detection.py --checkpoint runs/det/seed0.pt
    python detection.py --checkpoint runs/det-coco/seed0.pt --save-detections dets.json   # COCO results format
"""
import json
import os
import shlex
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torchvision
from tqdm import tqdm

import utils
from data import DataError
from det_data import (build_detection_dataset, collate_lists, detection_eval_item, masks_to_rles, ranks_in_groups,
                      rle_counts_many, runs_of_ones, segmentation_runs)
from models import ARCH_CHANNELS
from seg_data import Transformed, check_dataset


# ---------------------------------------------------------------- the detector

def build_detector(arch="resnet50", num_classes=81, kind="mask", test_size=800, max_size=1333, roi_batch_size=512,
                   test_proposals=1000):
    """torchvision's Faster R-CNN (kind 'faster') or Mask R-CNN ('mask') v2 around a ResNet-18/34/50: the body is a
    torchvision ResNet with BatchNorm (all stages trained), the FPN takes that arch's c2..c5 widths with BatchNorm
    (the layout of fasterrcnn_resnet50_fpn_v2 / maskrcnn_resnet50_fpn_v2, so `backbone.fpn` holds our FPNDecoder),
    then the RPN head of Detectron2's StandardRPNHead (one 3x3 conv + ReLU, `RPN.CONV_DIMS [-1]`; the v2 builders
    stack two), the v2 box head (4conv1fc with BatchNorm) and mask head (4 convs with BatchNorm), initialized as
    Detectron2 initializes them (detectron2_init). Apart from the RPN's second conv, the v2 builders give the same
    keys and shapes for ResNet-50. num_classes counts the
    background (label 0).
    images: a list of (3, h, w) floats in [0, 1]; the detector normalizes them (ImageNet mean and std), pads them to
    multiples of 32, and at test time resizes them to `test_size` (short side, long side at most `max_size`) and
    maps its boxes and masks back. Training images come resized by the data pipeline (DetectionTrainTransform,
    seeded per sample): `_skip_resize` is torchvision's own switch for that, used by its detection references.
    roi_batch_size: RoIs sampled per image for the box head in training (Detectron2 and torchvision: 512);
    test_proposals: RPN proposals per image at test time (1000)."""
    if arch not in ARCH_CHANNELS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CHANNELS)}")
    if kind not in ("faster", "mask"):
        raise ValueError(f"unknown detector {kind!r}; choose faster or mask")
    tvd = torchvision.models.detection
    body = getattr(torchvision.models, arch)(weights=None)
    backbone = tvd.backbone_utils.BackboneWithFPN(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                                                  list(ARCH_CHANNELS[arch]), 256, norm_layer=nn.BatchNorm2d)
    anchors = tvd.anchor_utils.AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    heads = dict(rpn_anchor_generator=anchors, rpn_head=tvd.rpn.RPNHead(256, 3, conv_depth=1),
                 box_head=tvd.faster_rcnn.FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], norm_layer=nn.BatchNorm2d))
    if kind == "mask":
        heads["mask_head"] = tvd.mask_rcnn.MaskRCNNHeads(256, [256] * 4, 1, norm_layer=nn.BatchNorm2d)
    detector = (tvd.MaskRCNN if kind == "mask" else tvd.FasterRCNN)(
        backbone, num_classes, min_size=test_size, max_size=max_size, box_batch_size_per_image=roi_batch_size,
        rpn_post_nms_top_n_test=test_proposals, _skip_resize=True, **heads)
    detectron2_init(detector.roi_heads)
    # torchvision decodes boxes in the dtype of the predicted offsets: under bf16 autocast, coordinates near 800 px
    # would be 4 px apart. The two box predictors hand on fp32 (the convs before them still run in bf16).
    for predictor in (detector.rpn.head, detector.roi_heads.box_predictor):
        predictor.register_forward_hook(float_outputs)
    detector.arch, detector.kind, detector.num_classes = arch, kind, num_classes
    return detector


def detectron2_init(roi_heads):
    """Detectron2's initialization of the RoI heads' layers where torchvision's differs: the box head's fully
    connected layer as c2_xavier_fill (Kaiming uniform with a = 1), the box predictor N(0, 0.01) for the class
    scores and N(0, 0.001) for the box deltas, the mask predictor N(0, 0.001); their biases 0. The RPN head, the
    convs, the FPN and the ResNet start alike in both libraries."""
    for m in roi_heads.box_head.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
    layers = [(roi_heads.box_predictor.cls_score, 0.01), (roi_heads.box_predictor.bbox_pred, 0.001)]
    if roi_heads.has_mask():
        layers.append((roi_heads.mask_predictor.mask_fcn_logits, 0.001))
    for layer, std in layers:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def float_outputs(module, inputs, outputs):
    """Forward hook: a predictor's outputs (tensors, or lists of tensors per FPN level) as fp32."""
    return [[t.float() for t in o] if isinstance(o, list) else o.float() for o in outputs]


# ---------------------------------------------------------------- detection metrics
# COCO box and mask AP as pycocotools' COCOeval computes them (evaluate, accumulate, summarize: the same numbers to
# the last digit on the tests' data), and Pascal VOC AP as Detectron2's PascalVOCDetectionEvaluator reports it for
# test2007. numpy only. A COCO box is [x, y, w, h] in continuous pixel coordinates.

COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # pycocotools' floats (np.arange gives others)
COCO_RECALL_LEVELS = np.linspace(0.0, 1.0, 101)
COCO_MAX_DETS = 100  # detections kept per image and category, by score
COCO_AREA_RANGES = (("all", 0.0, 1e10), ("small", 0.0, 32.0 ** 2), ("medium", 32.0 ** 2, 96.0 ** 2),
                    ("large", 96.0 ** 2, 1e10))  # object areas, both bounds inclusive (1024 is small and medium)


def box_iou_pairs(d, g, crowd):
    """COCO box IoU of broadcastable d (..., 4), g (..., 4), crowd (...): the overlap of the boxes over their
    union, or over the detection's own area when the ground truth is a crowd region; 0 unless the overlap's width
    and height are both > 0. The same operations as pycocotools (bit-identical values)."""
    ow = np.minimum(d[..., 2] + d[..., 0], g[..., 2] + g[..., 0]) - np.maximum(d[..., 0], g[..., 0])
    oh = np.minimum(d[..., 3] + d[..., 1], g[..., 3] + g[..., 1]) - np.maximum(d[..., 1], g[..., 1])
    inter, area_d = ow * oh, d[..., 2] * d[..., 3]
    union = np.where(crowd, area_d, area_d + g[..., 2] * g[..., 3] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((ow > 0) & (oh > 0), inter / union, 0.0)


def run_intersections(d_runs, n_d, g_runs, n_g, npix):
    """|det_i AND gt_j| in pixels for all pairs, from runs of 1s -> (n_d, n_g) int64. d_runs, g_runs:
    (starts, ends, owner). The GT masks are laid end to end (mask j shifted by j * npix); for such sorted, disjoint
    runs the covered length of [0, x) is a binary search, and a detection run [s, e) meets GT j in
    covered(e + j * npix) - covered(s + j * npix) pixels."""
    ds, de, do = d_runs
    gs, ge, go = g_runs
    if gs.size == 0 or ds.size == 0:
        return np.zeros((n_d, n_g), np.int64)
    start, length = gs + go * npix, ge - gs
    before = np.cumsum(length) - length

    def covered(x):
        i = np.searchsorted(start, x, side="right") - 1
        ic = np.maximum(i, 0)
        return np.where(i >= 0, before[ic] + np.minimum(x - start[ic], length[ic]), 0)

    shift = (np.arange(n_g, dtype=np.int64) * npix)[:, None]
    per_run = covered(de[None, :] + shift) - covered(ds[None, :] + shift)  # (n_g, runs)
    slot = (np.arange(n_g)[:, None] * n_d + do[None, :]).ravel()
    return np.bincount(slot, weights=per_run.ravel(), minlength=n_g * n_d).reshape(n_g, n_d).T.astype(np.int64)


def coco_groups(gts, dets, image_ids):
    """Index the annotations as COCOeval groups them: one group per (category, image), numbered category-major
    with the images in id order. Ground truth keeps its input order in a group; detections are sorted by
    descending score, ties in input order (pycocotools' stable sort), and the first COCO_MAX_DETS of each group
    are kept. Returns flat arrays ("gt_*" per ground truth, "dt_*" per kept detection, "*_bounds" (groups + 1,)
    the offsets of each group in them)."""
    images = sorted(set(image_ids) if image_ids is not None else {g["image_id"] for g in gts})
    cats = sorted({g["category_id"] for g in gts})  # a category without ground truth is left out of every mean
    img_index, cat_index = {v: i for i, v in enumerate(images)}, {v: i for i, v in enumerate(cats)}

    def locate(anns):
        return (np.array([img_index.get(a["image_id"], -1) for a in anns], np.int64),
                np.array([cat_index.get(a["category_id"], -1) for a in anns], np.int64))

    (g_img, g_cat), (d_img, d_cat) = locate(gts), locate(dets)
    if (d_img < 0).any():
        raise ValueError("a detection on an image outside the evaluated images")
    n_groups = len(cats) * len(images)
    kg = np.flatnonzero((g_img >= 0) & (g_cat >= 0))
    g_group = g_cat[kg] * len(images) + g_img[kg]
    order = np.lexsort((kg, g_group))
    kg, g_group = kg[order], g_group[order]
    score = np.array([d["score"] for d in dets], np.float64)
    kd = np.flatnonzero(d_cat >= 0)
    d_group = d_cat[kd] * len(images) + d_img[kd]
    order = np.lexsort((kd, -score[kd], d_group))
    kd, d_group = kd[order], d_group[order]
    rank = ranks_in_groups(d_group)
    top = rank < COCO_MAX_DETS
    kd, d_group, rank = kd[top], d_group[top], rank[top]
    return {"images": images, "n_cats": len(cats), "n_groups": n_groups,
            "gt_src": kg, "gt_cat": g_cat[kg], "gt_area": np.array([float(gts[i]["area"]) for i in kg]),
            "gt_crowd": np.array([bool(gts[i].get("iscrowd", 0)) for i in kg], bool),
            "dt_src": kd, "dt_cat": d_cat[kd], "dt_img": d_img[kd], "dt_score": score[kd], "dt_rank": rank,
            "gt_bounds": np.searchsorted(g_group, np.arange(n_groups + 1)),
            "dt_bounds": np.searchsorted(d_group, np.arange(n_groups + 1))}


def pair_layout(P):
    """The groups with detections and ground truth, and where each one's row-major (D, G) IoU block starts in one
    flat array (-1 for the others) -> (groups, offset (n_groups,), total length)."""
    size = np.diff(P["dt_bounds"]) * np.diff(P["gt_bounds"])
    groups = np.flatnonzero(size > 0)
    offset = np.full(P["n_groups"], -1, np.int64)
    offset[groups] = np.cumsum(size[groups]) - size[groups]
    return groups, offset, int(size.sum())


def coco_box_ious(P, gts, dets):
    """All IoU blocks of bbox evaluation, flat, with their offsets, and the detections' areas (w * h)."""
    groups, offset, total = pair_layout(P)
    nd, ng = np.diff(P["dt_bounds"])[groups], np.diff(P["gt_bounds"])[groups]
    gt_box = np.array([gts[i]["bbox"] for i in P["gt_src"]], np.float64).reshape(-1, 4)
    dt_box = np.array([dets[i]["bbox"] for i in P["dt_src"]], np.float64).reshape(-1, 4)
    pair_group = np.repeat(np.arange(groups.size), nd * ng)
    local = ranks_in_groups(pair_group)
    di = P["dt_bounds"][groups][pair_group] + local // ng[pair_group]
    gi = P["gt_bounds"][groups][pair_group] + local % ng[pair_group]
    return box_iou_pairs(dt_box[di], gt_box[gi], P["gt_crowd"][gi]), offset, dt_box[:, 2] * dt_box[:, 3]


def coco_mask_ious(P, gts, dets, image_sizes, chunk=8192):
    """All IoU blocks of segm evaluation, flat, with their offsets, and the detections' mask areas. IoU = |d AND g|
    / |d OR g|, or / |d| for a crowd region. The detections' RLEs are decoded about `chunk` at a time."""
    groups, offset, total = pair_layout(P)
    ious = np.zeros(total)
    g_runs = [segmentation_runs(gts[i]["segmentation"], *image_sizes[gts[i]["image_id"]]) for i in P["gt_src"]]
    g_own = np.concatenate([np.full(s.size, n, np.int64) for n, (s, _) in enumerate(g_runs)] + [np.zeros(0, int)])
    g_st = np.concatenate([s for s, _ in g_runs] + [np.zeros(0, int)])
    g_en = np.concatenate([e for _, e in g_runs] + [np.zeros(0, int)])
    g_first = np.searchsorted(g_own, np.arange(len(g_runs) + 1))
    g_area = np.bincount(g_own, g_en - g_st, len(g_runs))
    d_area = np.zeros(P["dt_src"].size)
    bounds, gb, n_groups = P["dt_bounds"], P["gt_bounds"], P["n_groups"]
    busy = np.zeros(n_groups, bool)
    busy[groups] = True
    first = 0
    while first < n_groups:
        last = min(max(int(np.searchsorted(bounds, bounds[first] + chunk, side="right")) - 1, first + 1), n_groups)
        lo, hi = bounds[first], bounds[last]
        st, en, own = runs_of_ones(*rle_counts_many([dets[i]["segmentation"] for i in P["dt_src"][lo:hi]]))
        d_area[lo:hi] = np.bincount(own, en - st, hi - lo)
        d_first = np.searchsorted(own, np.arange(hi - lo + 1))
        for grp in np.flatnonzero(busy[first:last]) + first:
            d0, d1, g0, g1 = bounds[grp] - lo, bounds[grp + 1] - lo, gb[grp], gb[grp + 1]
            h, w = image_sizes[P["images"][grp % len(P["images"])]]
            dr, gr = slice(d_first[d0], d_first[d1]), slice(g_first[g0], g_first[g1])
            inter = run_intersections((st[dr], en[dr], own[dr] - d0), d1 - d0,
                                      (g_st[gr], g_en[gr], g_own[gr] - g0), g1 - g0, h * w)
            a_d, a_g = d_area[lo + d0:lo + d1, None], g_area[None, g0:g1]
            union = np.where(P["gt_crowd"][None, g0:g1], a_d, a_d + a_g - inter)
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = np.where(inter > 0, inter / union, 0.0)
            ious[offset[grp]:offset[grp] + iou.size] = iou.ravel()
        first = last
    return ious, offset, d_area


def greedy_match(ious, gt_ignore, gt_crowd, n_det):
    """COCOeval's matching for U groups at once, at every IoU threshold t. ious (U, D, G): each group's
    detections (by descending score) against its ground truth, -1 as padding; gt_ignore, gt_crowd (U, G);
    n_det (U,) non-increasing. In score order, a detection takes the available ground truth of highest IoU >= t,
    an ignored one only when no other qualifies, the later one among equal IoUs; a ground truth is available until
    taken, a crowd region always (it absorbs any number of detections). -> (U, T, D) index of the match, -1 none."""
    U, D, G = ious.shape
    T = COCO_IOU_THRESHOLDS.size
    thr = COCO_IOU_THRESHOLDS[None, :, None]
    taken = np.zeros((U, T, G), bool)
    out = np.full((U, T, D), -1, np.int64)
    uu, tt = np.arange(U)[:, None], np.arange(T)[None, :]
    real, ign, crowd = ~gt_ignore[:, None, :], gt_ignore[:, None, :], gt_crowd[:, None, :]
    for r in range(D):
        n = int(np.count_nonzero(n_det > r))  # the groups that still have an r-th detection: a prefix
        iou = ious[:n, r, None, :]
        ok = (iou >= thr) & (~taken[:n] | crowd[:n])
        ok_real = ok & real[:n]
        cand = np.where(ok_real.any(-1, keepdims=True), ok_real, ok & ign[:n])
        val = np.where(cand, iou, -np.inf)
        m = G - 1 - np.argmax((cand & (val == val.max(-1, keepdims=True)))[..., ::-1], axis=-1)  # the last best
        found = cand.any(-1)
        out[:n, :, r] = np.where(found, m, -1)
        taken[uu[:n], tt, m] |= found
    return out


def coco_match(P, ious, offset, dt_area, budget=1 << 22):
    """COCOeval.evaluateImg for every group and area range -> (matched, ignored), (A, T, N) bool over the kept
    detections: matched took a ground truth; ignored took an ignored one (a crowd region, or an object whose area
    is outside the range), or took none and is itself outside the range. Groups of similar sizes (within a factor
    of 2) are matched together, so that little padding is computed."""
    A, T, N = len(COCO_AREA_RANGES), COCO_IOU_THRESHOLDS.size, P["dt_src"].size
    matched, took_ignored = np.zeros((A, T, N), bool), np.zeros((A, T, N), bool)
    nd, ng = np.diff(P["dt_bounds"]), np.diff(P["gt_bounds"])
    work = np.flatnonzero((nd > 0) & (ng > 0))
    bucket = np.floor(np.log2(ng[work])) * 64 + np.floor(np.log2(nd[work]))
    for b in np.unique(bucket):
        members = work[bucket == b]
        per = max(1, budget // (int(nd[members].max()) * int(ng[members].max())))
        for c in range(0, members.size, per):
            match_groups(P, members[c:c + per], ious, offset, matched, took_ignored)
    ignored = np.empty_like(took_ignored)
    for a, (_, lo, hi) in enumerate(COCO_AREA_RANGES):
        ignored[a] = took_ignored[a] | (~matched[a] & ((dt_area < lo) | (dt_area > hi))[None, :])
    return matched, ignored


def match_groups(P, groups, ious, offset, matched, took_ignored):
    """greedy_match on a chunk of groups for every area range; writes into matched and took_ignored."""
    groups = groups[np.argsort(-np.diff(P["dt_bounds"])[groups], kind="stable")]  # most detections first
    nd, ng = np.diff(P["dt_bounds"])[groups], np.diff(P["gt_bounds"])[groups]
    D, G = int(nd.max()), int(ng.max())
    d_valid, g_valid = np.arange(D)[None, :] < nd[:, None], np.arange(G)[None, :] < ng[:, None]
    d_pos = P["dt_bounds"][groups][:, None] + np.arange(D)[None, :]
    g_pos = np.where(g_valid, P["gt_bounds"][groups][:, None] + np.arange(G)[None, :], 0)
    idx = offset[groups][:, None, None] + np.arange(D)[None, :, None] * ng[:, None, None] + np.arange(G)[None, None]
    valid = d_valid[:, :, None] & g_valid[:, None, :]
    iou = np.where(valid, ious[np.where(valid, idx, 0)], -1.0)
    area, crowd = P["gt_area"][g_pos], P["gt_crowd"][g_pos]
    rows = np.arange(groups.size)[:, None, None]
    sel = np.broadcast_to(d_valid[:, None, :], (groups.size, COCO_IOU_THRESHOLDS.size, D))
    cols = np.broadcast_to(d_pos[:, None, :], sel.shape)[sel]
    ts = np.broadcast_to(np.arange(COCO_IOU_THRESHOLDS.size)[None, :, None], sel.shape)[sel]
    for a, (_, lo, hi) in enumerate(COCO_AREA_RANGES):
        ignore = crowd | (area < lo) | (area > hi)
        m = greedy_match(iou, ignore, crowd, nd)
        found = m >= 0
        matched[a, ts, cols] = found[sel]
        took_ignored[a, ts, cols] = (found & ignore[rows, np.maximum(m, 0)])[sel]


def coco_precision(P, matched, ignored):
    """COCOeval.accumulate at maxDets 100 -> precision (T, R, K, A), -1 where a (category, area range) has no
    ground truth that is not ignored. Per category, the detections of all images are sorted by descending score
    (ties: image id, then rank in the image); recall = TP / #objects, precision = TP / (TP + FP) made
    non-increasing from the right, read at the 101 recall levels (at the first detection reaching the level, 0 if
    none does)."""
    T, R, A, K = COCO_IOU_THRESHOLDS.size, COCO_RECALL_LEVELS.size, len(COCO_AREA_RANGES), P["n_cats"]
    precision = -np.ones((T, R, K, A))
    order = np.lexsort((P["dt_rank"], P["dt_img"], -P["dt_score"], P["dt_cat"]))
    cat_bounds = np.searchsorted(P["dt_cat"][order], np.arange(K + 1))
    for a, (_, lo, hi) in enumerate(COCO_AREA_RANGES):
        counted = ~P["gt_crowd"] & (P["gt_area"] >= lo) & (P["gt_area"] <= hi)
        n_pos = np.bincount(P["gt_cat"][counted], minlength=K)
        for k in np.flatnonzero(n_pos):
            sel = order[cat_bounds[k]:cat_bounds[k + 1]]
            tp, fp = matched[a][:, sel] & ~ignored[a][:, sel], ~matched[a][:, sel] & ~ignored[a][:, sel]
            precision[:, :, k, a] = 0.0
            if sel.size == 0:
                continue
            tp_sum, fp_sum = np.cumsum(tp, 1).astype(float), np.cumsum(fp, 1).astype(float)
            recall = tp_sum / n_pos[k]
            pr = np.maximum.accumulate((tp_sum / (tp_sum + fp_sum + np.spacing(1)))[:, ::-1], axis=1)[:, ::-1]
            for t in range(T):
                i = np.searchsorted(recall[t], COCO_RECALL_LEVELS, side="left")
                precision[t, i < sel.size, k, a] = pr[t, i[i < sel.size]]
    return precision


def coco_evaluate(gts, dets, iou_type="bbox", image_ids=None, image_sizes=None):
    """COCO AP, AP50, AP75, APs, APm, APl as pycocotools' COCOeval reports them (fractions; NaN where it prints -1:
    no ground truth in that area range).
    gts: [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd", and for segm "segmentation":
    polygons, RLE or (h, w) bool array}]; "area" (not the box) decides small / medium / large; crowd regions are
    ignored: a detection inside one is neither right nor wrong.
    dets: [{"image_id", "category_id", "score", "bbox" or (segm) "segmentation": RLE}]; their area is w * h or the
    mask's. image_ids: the evaluated images (COCO's "images", which may hold images without annotations; default:
    the images of gts). image_sizes: {image_id: (h, w)}, for segm.
    AP is the mean over categories with ground truth and over the 10 IoU thresholds 0.50:0.05:0.95 of the
    precision at 101 recall levels, each image keeping its 100 best detections per category."""
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    P = coco_groups(gts, dets, image_ids)
    ious, offset, dt_area = coco_box_ious(P, gts, dets) if iou_type == "bbox" else \
        coco_mask_ious(P, gts, dets, image_sizes)
    precision = coco_precision(P, *coco_match(P, ious, offset, dt_area))

    def mean(p):
        return float(p[p > -1].mean()) if (p > -1).any() else float("nan")

    t50, t75 = np.flatnonzero(COCO_IOU_THRESHOLDS == 0.5), np.flatnonzero(COCO_IOU_THRESHOLDS == 0.75)
    return {"AP": mean(precision[..., 0]), "AP50": mean(precision[t50][..., 0]), "AP75": mean(precision[t75][..., 0]),
            "APs": mean(precision[..., 1]), "APm": mean(precision[..., 2]), "APl": mean(precision[..., 3])}


VOC_IOU_THRESHOLDS = tuple(t / 100.0 for t in range(50, 100, 5))  # Detectron2's range(50, 100, 5) / 100.0


def voc07_ap(recall, precision):
    """VOC2007's 11-point AP: the mean over the recall levels np.arange(0, 1.1, 0.1) of the best precision at a
    recall >= the level (0 if none). Those are arange's floats: 0.30000000000000004 is above 0.3, so a recall of
    exactly 3/10 does not reach that level."""
    return sum((precision[recall >= level].max() if (recall >= level).any() else 0.0) / 11.0
               for level in np.arange(0.0, 1.1, 0.1))


def voc_best_overlap(det_img, det_box, gt_img, gt_box):
    """Each detection's best ground truth in its image, with VOC's inclusive pixels (width = x2 - x1 + 1).
    det_img (N,), det_box (N, 4) [x1, y1, x2, y2]; gt_img (G,), gt_box (G, 4) -> (best IoU (N,), -inf without
    ground truth; index of the first ground truth reaching it (N,), -1 without)."""
    n = det_img.size
    ovmax, jmax = np.full(n, -np.inf), np.full(n, -1, np.int64)
    if n == 0 or gt_img.size == 0:
        return ovmax, jmax
    g_order = np.argsort(gt_img, kind="stable")
    first = np.searchsorted(gt_img[g_order], det_img, side="left")
    count = np.searchsorted(gt_img[g_order], det_img, side="right") - first
    det = np.repeat(np.arange(n), count)
    gi = g_order[np.repeat(first, count) + ranks_in_groups(det)]
    bb, g = det_box[det], gt_box[gi]
    iw = np.maximum(np.minimum(g[:, 2], bb[:, 2]) - np.maximum(g[:, 0], bb[:, 0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(g[:, 3], bb[:, 3]) - np.maximum(g[:, 1], bb[:, 1]) + 1.0, 0.0)
    inters = iw * ih
    ov = inters / ((bb[:, 2] - bb[:, 0] + 1.0) * (bb[:, 3] - bb[:, 1] + 1.0)
                   + (g[:, 2] - g[:, 0] + 1.0) * (g[:, 3] - g[:, 1] + 1.0) - inters)
    has = np.flatnonzero(count > 0)
    starts = np.searchsorted(det, has)
    best = np.maximum.reduceat(ov, starts)
    ovmax[has] = best
    jmax[has] = gi[np.minimum.reduceat(np.where(ov == np.repeat(best, count[has]), np.arange(ov.size), ov.size),
                                       starts)]
    return ovmax, jmax


def voc_class_aps(gt_img, gt_box, gt_difficult, det_img, det_score, det_box):
    """One class's VOC07 AP at each VOC_IOU_THRESHOLDS -> 10 fractions. Detections sorted by np.argsort(-score)
    (numpy's default sort, not stable, as Detectron2: the arrival order decides ties); each one's best ground truth
    in its image: IoU > t (strictly) on a difficult object, neither TP nor FP; on an object not yet taken, TP (it is
    taken); otherwise FP. recall = TP / #objects that are not difficult, precision = TP / (TP + FP)."""
    npos = int(np.sum(~gt_difficult))
    order = np.argsort(-det_score)
    ovmax, jmax = voc_best_overlap(det_img[order], det_box[order], gt_img, gt_box)
    aps = []
    for thr in VOC_IOU_THRESHOLDS:
        over = ovmax > thr
        counts = over & ~gt_difficult[np.maximum(jmax, 0)] if gt_img.size else over
        tp = np.zeros(ovmax.size, bool)
        cand = np.flatnonzero(counts)
        tp[cand[np.unique(jmax[cand], return_index=True)[1]]] = True  # the first claim of each object wins
        fp = ~over | (counts & ~tp)
        tp_sum, fp_sum = np.cumsum(tp).astype(float), np.cumsum(fp).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tp_sum / float(npos)
        aps.append(voc07_ap(recall, tp_sum / np.maximum(tp_sum + fp_sum, np.finfo(np.float64).eps)))
    return aps


def voc_evaluate(gts, dets, class_names, image_ids=None):
    """Pascal VOC test2007 AP, AP50, AP75 as Detectron2's PascalVOCDetectionEvaluator reports them (fractions, not
    its percent): AP is the mean over the IoU thresholds 0.50:0.05:0.95 of the class-mean VOC07 11-point AP.
    gts: [{"image_id", "class", "bbox": the XML's 1-based [xmin, ymin, xmax, ymax], "difficult"}], per image in XML
    order (it breaks ties between equally overlapping objects). dets: [{"image_id", "class", "score", "bbox":
    [x1, y1, x2, y2]}] in 0-based continuous coordinates (a detector trained on Detectron2's boxes, xmin - 1, ymin
    - 1), in arrival order (image order, then the detector's). As Detectron2 writes and re-reads them: x1, y1 get
    their +1 back in float32, coordinates are rounded to 0.1 and scores to 0.001 (so many ties). A class without
    detections, or without objects that are not difficult, has AP 0.
    Returns {"AP", "AP50", "AP75", "per_class": {name: [AP at each threshold]}}."""
    images = {g["image_id"] for g in gts} | set(image_ids or ())
    if any(d["image_id"] not in images for d in dets):
        raise ValueError("a detection on an image outside the evaluated images")
    keys = {v: i for i, v in enumerate(sorted(images, key=str))}
    g_cls = np.array([g["class"] for g in gts], dtype=object)
    g_img = np.array([keys[g["image_id"]] for g in gts], np.int64)
    g_box = np.array([g["bbox"] for g in gts], np.float64).reshape(-1, 4)
    g_diff = np.array([bool(g.get("difficult", 0)) for g in gts], bool)
    box = np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)
    box[:, :2] += np.float32(1)
    d_box = np.array([float(f"{v:.1f}") for v in box.ravel().tolist()], np.float64).reshape(-1, 4)
    d_score = np.array([float(f"{d['score']:.3f}") for d in dets], np.float64)
    d_cls = np.array([d["class"] for d in dets], dtype=object)
    d_img = np.array([keys[d["image_id"]] for d in dets], np.int64)
    per_class = {}
    for name in class_names:
        g, d = g_cls == name, d_cls == name
        per_class[name] = voc_class_aps(g_img[g], g_box[g], g_diff[g], d_img[d], d_score[d], d_box[d])
    m_ap = np.mean([per_class[n] for n in class_names], axis=0)
    return {"AP": float(m_ap.mean()), "AP50": float(m_ap[0]), "AP75": float(m_ap[5]), "per_class": per_class}


# ---------------------------------------------------------------- detection: inference and scores

@torch.no_grad()
def detect(model, dataset, device="cpu", workers=0, ctx=None, desc=None):
    """Run the detector on every image of `dataset` (a detection dataset, data.py), sharded over ranks and
    gathered on each -> [(index, (h, w), annotations, detections)] in dataset order. detections are in COCO's
    results format: {"image_id", "category_id" (the dataset's), "bbox": [x, y, w, h], "score", with masks
    "segmentation": RLE of the mask thresholded at 0.5}, at the image's native size."""
    was_training = model.training
    model.eval()
    indices = range(utils.rank(), len(dataset), utils.world_size())
    shard = torch.utils.data.Subset(Transformed(dataset, detection_eval_item), indices)
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers, collate_fn=collate_lists)
    mine = []
    for idx, (images, annotations) in zip(indices, tqdm(loader, desc=desc, leave=False,
                                                         disable=desc is None or not utils.is_main())):
        with ctx or nullcontext():
            out = model([images[0].to(device)])[0]
        boxes, scores, labels = out["boxes"].float().cpu(), out["scores"].float().cpu(), out["labels"].cpu()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        dets = [{"image_id": dataset.image_ids[idx], "category_id": dataset.category_ids[int(c) - 1], "bbox": b,
                 "score": float(s)} for b, s, c in zip(xywh, scores.tolist(), labels.tolist())]
        if "masks" in out:
            for d, rle in zip(dets, masks_to_rles(out["masks"][:, 0] > 0.5)):
                d["segmentation"] = rle
        mine.append((idx, tuple(images[0].shape[-2:]), annotations[0], dets))
    model.train(was_training)
    return sorted((r for rank in utils.all_gather_objects(mine) for r in rank), key=lambda r: r[0])


def detection_scores(dataset, results, segm=False):
    """The dataset's metric on detect()'s results -> {"bbox": {...}, "segm": {...} with `segm`}, fractions.
    COCO metric (coco, synthetic): AP, AP50, AP75, APs, APm, APl; VOC metric (voc): AP, AP50, AP75."""
    dets = [d for r in results for d in r[3]]
    ids = [dataset.image_ids[r[0]] for r in results]
    if dataset.metric == "voc":
        name = lambda c: dataset.classes[dataset.category_ids.index(c) + 1]
        gts = [{"image_id": dataset.image_ids[i], "class": dataset.classes[a["label"]], "bbox": a["xml_box"],
                "difficult": a["difficult"]} for i, _, anns, _ in results for a in anns]
        boxes = [{"image_id": d["image_id"], "class": name(d["category_id"]), "score": d["score"],
                  "bbox": d["bbox"][:2] + [d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]} for d in dets]
        scores = voc_evaluate(gts, boxes, dataset.classes[1:], ids)
        return {"bbox": {k: scores[k] for k in ("AP", "AP50", "AP75")}}
    gts = [{**a, "image_id": dataset.image_ids[i], "category_id": dataset.category_ids[a["label"] - 1]}
           for i, _, anns, _ in results for a in anns]
    sizes = {dataset.image_ids[i]: hw for i, hw, _, _ in results}
    out = {"bbox": coco_evaluate(gts, dets, "bbox", ids)}
    if segm:
        out["segm"] = coco_evaluate(gts, dets, "segm", ids, sizes)
    return out


def detection_table(scores):
    """{"bbox": {...}, "segm": {...}} in percent -> aligned text, one row per kind, one column per number."""
    keys = list(scores["bbox"])
    lines = [" " * 4 + "".join(f"{k:>8}" for k in keys)]
    for kind, s in scores.items():
        lines.append(f"{kind:<4}" + "".join(f"{'n/a' if s[k] is None else f'{s[k]:.2f}':>8}" for k in keys))
    return "\n".join(lines)


def detection_checkpoint(path):
    """The dict of a finetune_det.py checkpoint, or None for anything else (load_checkpoint reports what it is)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return ckpt if isinstance(ckpt, dict) and ckpt.get("task") == "detection" else None


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = utils.ArgumentParser("detection.py", description="Box (and mask) AP of a finetune_det.py checkpoint. Unset "
                                                         "flags take the values the checkpoint was fine-tuned with.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a seedN.pt written by finetune_det.py")
    a("--dataset", choices=["synthetic", "voc", "coco"], default=None, help="default: the checkpoint's")
    a("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    a("--split", choices=["train", "val", "test"], default="test", help="voc: test2007; coco: val2017 is 'val'")
    a("--test-size", type=int, default=None, help="test short side (default: the fine-tuning's)")
    a("--workers", type=int, default=None, help="data-loading processes (0 = in-process)")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on CUDA and on "
      "CPUs with bf16 instructions, else fp32)")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--output", default=None, help="JSON file (default: the checkpoint's path with .<dataset>-<split>.json)")
    a("--save-detections", default=None, metavar="FILE", help="also write the detections as a COCO results JSON "
      "file (image_id, category_id, bbox as x, y, w, h, score, segmentation as RLE)")
    return p


def main(args):
    """A finetune_det.py checkpoint scored again: AP on --split of --dataset (default: the fine-tuning's), a JSON
    report, and with --save-detections the detections in COCO's results format (pycocotools' loadRes reads it)."""
    if not os.path.isfile(args.checkpoint):
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: no such file")
    if (ckpt := detection_checkpoint(args.checkpoint)) is None:
        raise SystemExit(f"error: --checkpoint {args.checkpoint}: not a finetune_det.py checkpoint (score a "
                         "finetune_seg.py one with eval.py)")
    ft = ckpt["args"]
    dataset = args.dataset or ft["dataset"]
    if dataset not in ("synthetic", "voc", "coco"):
        raise SystemExit(f"error: --dataset {dataset}: {args.checkpoint} is a detector (synthetic, voc or coco)")
    root = args.data_root or (ft["data_root"] if dataset == ft["dataset"] else None)
    out = args.output or f"{os.path.splitext(args.checkpoint)[0]}.{dataset}-{args.split}.json"
    for flag, path in (("--output", out), ("--save-detections", args.save_detections)):
        if path and (problem := utils.unwritable(os.path.dirname(os.path.abspath(path)))):
            raise SystemExit(f"error: {flag} cannot write {path}: {problem}")
    device = utils.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = utils.choose_precision(device.type, args.precision)
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        data = build_detection_dataset(dataset, args.split, root, (ft["synthetic_train"], ft["synthetic_val"],
                                                                   ft["synthetic_test"]), ft["synthetic_size"])
        check_dataset(data, threads=max(1, workers))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if len(data.classes) != ft["num_classes"]:
        raise SystemExit(f"error: --dataset {dataset} has {len(data.classes) - 1} classes but {args.checkpoint} "
                         f"detects {ft['num_classes'] - 1}")
    test_size = args.test_size or ft["test_size"]
    model = build_detector(ft["arch"], ft["num_classes"], ft["model"], test_size, ft["max_size"],
                           ft["roi_batch_size"], ft["test_proposals"])
    model.load_state_dict(ckpt["model"])
    model = model.to(device).to(memory_format=utils.memory_format(device.type))
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    results = detect(model, data, device, workers, ctx, desc=f"eval {dataset}/{args.split}")
    scores = {kind: {k: utils.as_percent(v) for k, v in s.items()}
              for kind, s in detection_scores(data, results, ft["model"] == "mask").items()}
    if utils.is_main():
        print(f"{args.checkpoint} on {dataset} {args.split} ({len(data)} images, short side {test_size}):")
        print(detection_table(scores))
        report = {"command": shlex.join(["python"] + sys.argv), "checkpoint": args.checkpoint, "task": "detection",
                  "dataset": dataset, "split": args.split, "images": len(data), "test_size": test_size, **scores,
                  "detections": args.save_detections, "units": "percent"}
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        if args.save_detections:
            with open(args.save_detections, "w") as f:
                json.dump([d for r in results for d in r[3]], f)
        print(f"wrote {out}" + (f" and {args.save_detections}" if args.save_detections else ""))
    utils.shutdown()
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
