"""What a pre-training put into the frozen features, level by level, beside its baselines: a dense linear probe,
unsupervised segmentation by k-means, and (SlotCon) the teacher's own prototypes, on a labelled dataset.

    python probe.py --pretrained runs/demo/last.pt --output-dir runs/probe
    python probe.py --pretrained runs/decon-ml/last.pt --dataset voc --data-root data/VOCdevkit/VOC2012 \
        --train-images 2000 --output-dir runs/probe-voc

Networks (`inits`), each the teacher branch in eval mode, no gradient, probed at the same levels:
- `checkpoint`: the checkpoint's teacher (encoder, decoder, SlotCon heads).
- `random`: a fresh network of the same shape (same framework, arch, decoder and heads), seeded by --seed.
- `enc+rand-dec`: the checkpoint's encoder with the random init's decoder (and heads): the random network with only
  its encoder swapped, at the decoder levels. At c5 it would be the checkpoint itself, so it is not repeated.
Levels: c5 and the decoder's: `fcn`, or all four FPN outputs p2..p5, with or without deep supervision. A checkpoint
pre-trained without deep supervision has no FPN output convs at p3..p5 (only fpn_output2): there its laterals and
top-down path feed the random init's output convs (the note says so), as finetune_seg.py transfers such an FPN. An
encoder-only checkpoint (--decoder none) is probed at the decoder levels of a random --decoder (default fpn): there
`checkpoint` and `enc+rand-dec` are one network, computed once and reported under both names.

Images are resized to --size on the short side (default: the pre-training's image size) with the long side rounded
to a multiple of 32, so that every level's grid covers the image exactly (an aspect change of at most 16 px); the
labels stay at native size, as eval.py scores them. Pixels labelled 255 are left out everywhere.

Measures, per level and network (test mIoU and pixel accuracy, in percent, from eval.segmentation_scores):
- `linear`: a frozen dense linear probe, a 1x1 conv (the only trained parameters) on the features standardized with
  the training set's per-channel mean and std, its logits upsampled bilinearly to the label size, pixel
  cross-entropy (ignore 255), Adam for --probe-epochs over the labelled training images with its learning rate decayed
  to 0 (cosine); features are computed once and cached. Scored on the test split.
- `kmeans`: unsupervised segmentation. k-means (k-means++ seeds, --kmeans-restarts, --kmeans-iters) with K = the
  number of classes on the test features, L2-normalized per position (transductive, as unsupervised segmentation is
  scored); cluster ids upsampled to the label size (nearest); the cluster x class contingency matrix; clusters matched
  to classes one-to-one by the Hungarian algorithm (maximum matched pixels), then mIoU under that matching.
- `prototypes` (SlotCon only, at the levels the checkpoint has heads): the teacher's argmax prototype at each position
  (as visualize.teacher_maps). There are more prototypes than classes, so each prototype goes to the class it
  overlaps most (many-to-one *majority* matching, not one-to-one): a generous reading of the grouping, which grows
  with the number of prototypes. K-means has K = the number of classes and is matched one-to-one.
- `linear_fgbg`, `kmeans_fgbg`: the same on background (class 0, for --dataset folder too) vs any object, K = 2
  and Hungarian matching: on the built-in scenes, colour and texture are shared between classes, so figure/ground
  can be within reach where the classes are not. On by default (--no-binary turns it off); off for Cityscapes (no
  background class) and two-class datasets.
The linear probes of the classes and of fg/bg are two 1x1 convs trained in one loop on the summed losses: their
parameters are disjoint and Adam's update is per parameter, so each trains exactly as it would alone.

Cost: one network at a time; its features of every level and training image are cached in float32 (on VOC at 224 px
with a ResNet-50 FPN, about 6 MB an image: --train-images bounds it); k-means is fitted on at most --kmeans-samples
test positions and assigns every one. The defaults take under 2 minutes on one CPU core for a ResNet-18 FPN at 96 px
on the built-in scenes, most of it in the 14 linear probes.

probe.json: {"args", "checkpoint", "dataset", "classes", "size", "inits", "notes", "units": "percent",
"levels": {level: {init: {measure: {"miou", "pixel_acc", "per_class_iou", "contingency", "matching",
"matching_kind"}}}}}. `contingency` is (rows, classes) pixel counts of the test set: rows are the clusters,
prototypes or (linear) predicted classes, columns the ground-truth classes; `matching` gives each row's class (None:
an empty prototype).
"""
import argparse
import copy
import functools
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import utils
from data import IMAGENET_MEAN, IMAGENET_STD
from eval import confusion_matrix, segmentation_scores
from models import DeCon, decoder_levels
from seg_data import DATASETS, IGNORE_INDEX, Transformed, build_dataset, check_dataset, folder_classes
from weights import build_decon, read_checkpoint

INITS = {"checkpoint": "the checkpoint's teacher",
         "random": "random init: a fresh network of the same shape (--seed)",
         "enc+rand-dec": "the checkpoint's encoder + the random init's decoder (decoder levels)"}
MEASURES = {"linear": "linear", "kmeans": "k-means", "prototypes": "prototypes", "linear_fgbg": "fg/bg linear",
            "kmeans_fgbg": "fg/bg k-means"}
FGBG_CLASSES = ("background", "object")


# ---------------------------------------------------------------- matching clusters to classes

def hungarian(cost):
    """Minimum-cost assignment (Kuhn-Munkres with potentials, Jonker-Volgenant's shortest augmenting paths, O(n^3)).
    cost (n, m) finite -> (rows, cols), int64 arrays of length min(n, m), rows increasing, as
    scipy.optimize.linear_sum_assignment. A rectangular matrix is padded with zeros to square: a row matched to a
    padded column (or the reverse) is unmatched, and the padding adds the same 0 to every assignment."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or not np.isfinite(cost).all():
        raise ValueError(f"hungarian: need a finite 2-d cost matrix, got shape {cost.shape}")
    n, m = cost.shape
    size = max(n, m)
    a = np.zeros((size + 1, size + 1))
    a[1:n + 1, 1:m + 1] = cost  # 1-based; column 0 is the virtual start of each augmenting path
    u, v = np.zeros(size + 1), np.zeros(size + 1)  # row and column potentials: a[i, j] - u[i] - v[j] >= 0
    owner = np.zeros(size + 1, dtype=np.int64)  # owner[j]: the row holding column j (0: free)
    for i in range(1, size + 1):
        owner[0], j0 = i, 0
        dist, prev = np.full(size + 1, np.inf), np.zeros(size + 1, dtype=np.int64)
        used = np.zeros(size + 1, dtype=bool)
        while owner[j0]:  # Dijkstra on reduced costs until a free column is reached
            used[j0] = True
            reduced = a[owner[j0]] - u[owner[j0]] - v
            closer = ~used & (reduced < dist)
            dist[closer], prev[closer] = reduced[closer], j0
            j1 = int(np.argmin(np.where(used, np.inf, dist)))
            delta = dist[j1]
            u[owner[used]] += delta
            v[used] -= delta
            dist[~used] -= delta
            j0 = j1
        while j0:  # flip the path back to its start
            j1 = prev[j0]
            owner[j0], j0 = owner[j1], j1
    rows, cols = owner[1:] - 1, np.arange(size)
    keep = (rows >= 0) & (rows < n) & (cols < m)
    order = np.argsort(rows[keep])
    return rows[keep][order], cols[keep][order]


def hungarian_matching(contingency):
    """(K, C) pixel counts -> (K,) class of each cluster, one-to-one, maximizing the matched pixels (-1: a cluster
    left unmatched when K > C)."""
    rows, cols = hungarian(-np.asarray(contingency, dtype=np.float64))
    matching = np.full(len(contingency), -1, dtype=np.int64)
    matching[rows] = cols
    return matching


def majority_matching(contingency):
    """(K, C) pixel counts -> (K,) the class each row overlaps most, many-to-one (-1: a row with no pixel)."""
    contingency = np.asarray(contingency)
    return np.where(contingency.sum(1) > 0, contingency.argmax(1), -1)


def matched_scores(contingency, matching):
    """(K, C) cluster x class pixel counts and (K,) class of each cluster (-1: none) -> segmentation_scores of the
    matched prediction ({"iou": (C,), "miou", "pixel_acc"}, fractions). Pixels of an unmatched cluster are
    errors: missed for their class, predicted as none."""
    contingency = np.asarray(contingency, dtype=np.float64)
    k, c = contingency.shape
    to_class = np.zeros((k, c + 1))
    to_class[np.arange(k), np.where(np.asarray(matching) < 0, c, matching)] = 1
    cm = np.zeros((c + 1, c + 1))
    cm[:c] = contingency.T @ to_class  # rows: ground truth, columns: matched class (+ "none")
    scores = segmentation_scores(cm)
    iou = scores["iou"][:c]
    return {"iou": iou, "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
            "pixel_acc": scores["pixel_acc"]}


def measure_record(contingency, matching, kind):
    """The JSON record of one measure, in percent."""
    s = matched_scores(contingency, matching)
    return {"miou": utils.as_percent(s["miou"]), "pixel_acc": utils.as_percent(s["pixel_acc"]),
            "per_class_iou": utils.as_percent(s["iou"]), "contingency": np.asarray(contingency).astype(int).tolist(),
            "matching": [int(m) if m >= 0 else None for m in matching], "matching_kind": kind}


# ---------------------------------------------------------------- k-means

def kmeans_plus_plus(x, k, generator):
    """k-means++ seeds: the first point uniformly, each next one with probability proportional to its squared
    distance to the nearest seed. x (N, D) -> (k, D)."""
    first = int(torch.randint(len(x), (1,), generator=generator))
    centers = [x[first]]
    nearest = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        weights = nearest.double().cpu()
        pick = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else \
            int(torch.randint(len(x), (1,), generator=generator))  # every point on a seed already
        centers.append(x[pick])
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(1))
    return torch.stack(centers)


def squared_distances(x, centers):
    """(N, D), (K, D) -> (N, K) squared Euclidean distances."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(1)).clamp_min(0)


def sample_positions(feats, n, seed):
    """At most n positions of a list of (C, h, w) maps -> (n, C): all of them, or a seeded sample without
    replacement (the maps are never concatenated whole)."""
    sizes = torch.tensor([f[0].numel() for f in feats])
    if sizes.sum() <= n:
        return torch.cat([f.flatten(1).T for f in feats])
    pick = torch.randperm(int(sizes.sum()), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    image = torch.searchsorted(sizes.cumsum(0), pick, right=True)
    offset = pick - (sizes.cumsum(0) - sizes)[image]
    return torch.cat([feats[i].flatten(1)[:, offset[image == i]].T for i in image.unique().tolist()])


def kmeans(x, k, iters=30, restarts=3, seed=0):
    """Lloyd's k-means on x (N, D): the best of `restarts` runs from k-means++ seeds by inertia (sum of squared
    distances), each at most `iters` iterations or until no assignment changes. A cluster left empty keeps its
    center. Returns (centers (k, D), inertia)."""
    if len(x) < k:
        raise ValueError(f"k-means: {len(x)} points for {k} clusters")
    generator = torch.Generator().manual_seed(seed)
    best = (None, float("inf"))
    for _ in range(restarts):
        centers, labels = kmeans_plus_plus(x, k, generator), None
        for _ in range(iters):
            new = squared_distances(x, centers).argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            counts = torch.bincount(labels, minlength=k).unsqueeze(1)
            centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        inertia = float(squared_distances(x, centers).min(1).values.sum())
        if inertia < best[1]:
            best = (centers, inertia)
    return best


# ---------------------------------------------------------------- contingency matrices

def upsample_ids(ids, size):
    """(h, w) integer map -> (H, W) by nearest neighbour (pixel centres)."""
    if tuple(ids.shape) == tuple(size):
        return ids
    return F.interpolate(ids[None, None].float(), size=tuple(size), mode="nearest-exact")[0, 0].long()


def fgbg(mask):
    """(H, W) class ids -> 0 background, 1 any object, 255 kept."""
    return torch.where(mask == IGNORE_INDEX, IGNORE_INDEX, (mask > 0).long())


def contingency(ids, masks, rows, classes):
    """ids: per image an (h, w) map of row ids (clusters, prototypes, predicted classes) at any resolution; masks:
    per image (H, W) class ids (255 ignored) -> (rows, classes) int64 pixel counts, ids upsampled to each mask."""
    total = torch.zeros(classes, rows, dtype=torch.int64)
    for r, mask in zip(ids, masks):
        total += confusion_matrix(upsample_ids(r.cpu(), mask.shape), mask.long(), max(rows, classes))[:classes, :rows]
    return total.T


# ---------------------------------------------------------------- frozen dense linear probe

def shape_batches(shapes, batch_size, generator=None):
    """Indices grouped into batches of at most `batch_size` items of one shape (in order, or shuffled with
    `generator`: the items, then the batches)."""
    order = torch.randperm(len(shapes), generator=generator).tolist() if generator else range(len(shapes))
    groups = {}
    for i in order:
        groups.setdefault(tuple(shapes[i]), []).append(i)
    batches = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    if generator:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def channel_stats(feats):
    """Per-channel mean and std over every position of a list of (C, h, w) -> two (C,) float32 (std >= 1e-6)."""
    total = sum(f.double().sum((1, 2)) for f in feats)
    squares = sum((f.double() ** 2).sum((1, 2)) for f in feats)
    count = sum(f[0].numel() for f in feats)
    mean = total / count
    std = (squares / count - mean ** 2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def probe_targets(mask, binary):
    """(B, H, W) class ids -> the targets of the probe's heads: [classes] or [classes, fg/bg]."""
    return [mask, fgbg(mask)] if binary else [mask]


@functools.lru_cache(maxsize=64)
def bilinear_weights(n, size, device):
    """(size, n): F.interpolate's bilinear weights (align_corners=False) along one axis. Bilinear upsampling is
    separable, so (h, w) -> (H, W) is A_h @ map @ A_w.T: two matmuls, several times faster than F.interpolate (and
    its backward) on a CPU."""
    return F.interpolate(torch.eye(n, device=device)[None], size=size, mode="linear", align_corners=False)[0].T


def probe_logits(conv, feats, idx, mean, std, size, device):
    """The probe on the standardized features of items `idx` (one shape) -> (B, K, H, W) logits upsampled
    bilinearly to `size`."""
    x = (torch.stack([feats[i] for i in idx]).to(device) - mean[:, None, None]) / std[:, None, None]
    h, w = x.shape[-2:]
    return bilinear_weights(h, int(size[0]), device) @ conv(x) @ bilinear_weights(w, int(size[1]), device).T


def train_linear_probe(feats, masks, num_classes, binary, epochs, lr, batch_size, seed, device, desc=None):
    """A 1x1 conv on frozen features: feats, list of (C, h, w); masks, list of (H, W) class ids (255 ignored).
    Outputs num_classes (+ 2 fg/bg) channels; zero init; Adam, `lr` decayed to 0 (cosine); pixel cross-entropy
    averaged over labelled pixels, summed over the heads. Returns (conv, mean, std): the probe and the
    standardization (the training set's statistics)."""
    mean, std = (s.to(device) for s in channel_stats(feats))
    conv = nn.Conv2d(feats[0].shape[0], num_classes + 2 * binary, 1).to(device)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    optimizer = torch.optim.Adam(conv.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    keys = [(*f.shape, *m.shape) for f, m in zip(feats, masks)]
    batches_per_epoch = len(shape_batches(keys, batch_size))
    steps = epochs * batches_per_epoch
    lrs = lr * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))  # cosine decay to 0: a stable end point
    bar, step = tqdm(total=steps, desc=desc, dynamic_ncols=True, leave=False), 0
    for _ in range(epochs):
        for idx in shape_batches(keys, batch_size, generator):
            optimizer.param_groups[0]["lr"] = float(lrs[step])
            target = torch.stack([masks[i] for i in idx]).to(device).long()
            logits = probe_logits(conv, feats, idx, mean, std, target.shape[-2:], device)
            labelled = (target != IGNORE_INDEX).sum().clamp_min(1)
            parts = logits.split([num_classes, 2][:1 + binary], 1)
            loss = sum(F.cross_entropy(part, t, ignore_index=IGNORE_INDEX, reduction="sum") / labelled
                       for part, t in zip(parts, probe_targets(target, binary)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return conv, mean, std


@torch.no_grad()
def linear_predictions(conv, mean, std, feats, masks, num_classes, binary, batch_size, device):
    """Argmax of each head at the label size: [classes] or [classes, fg/bg], each a list of (H, W) int64."""
    out = [[None] * len(feats) for _ in range(1 + binary)]
    keys = [(*f.shape, *m.shape) for f, m in zip(feats, masks)]
    for idx in shape_batches(keys, batch_size):
        logits = probe_logits(conv, feats, idx, mean, std, masks[idx[0]].shape, device)
        for head, part in enumerate(logits.split([num_classes, 2][:1 + binary], 1)):
            for j, i in enumerate(idx):
                out[head][i] = part[j].argmax(0).cpu()
    return out


# ---------------------------------------------------------------- the networks

def probe_networks(state, pre, decoder, seed):
    """The three teacher branches, in eval mode, and what the probe needs to know about them.
    state, pre: the checkpoint's model state and pre-training args; decoder: the random decoder of an encoder-only
    checkpoint. Returns ({init: Branch}, levels (all probed), {init: levels it is probed at}, levels with SlotCon
    heads, notes)."""
    trained = build_decon(state, pre).teacher
    kind = pre["decoder"] if pre["decoder"] != "none" else decoder
    torch.manual_seed(seed)
    random = DeCon(pre["framework"], pre["arch"], kind, pre["alpha"], 0.0, kind == "fpn", pre["dim_hidden"],
                   pre["dim_out"], pre["num_prototypes"], pre.get("num_prototypes_dec"), pre["queue_size"]).teacher
    checkpoint, control = copy.deepcopy(random), copy.deepcopy(random)
    for branch in (checkpoint, control):
        branch.encoder.load_state_dict(trained.encoder.state_dict())
    for lvl, head in trained.heads.items():
        checkpoint.heads[lvl].load_state_dict(head.state_dict())
    dec_levels = decoder_levels(kind, True)
    levels = ["c5"] + dec_levels
    notes = []
    if trained.decoder is not None:
        missing, _ = checkpoint.decoder.load_state_dict(trained.decoder.state_dict(), strict=False)
        fresh = sorted({k.split(".")[0] for k in missing})
        if fresh:
            notes.append(f"p3, p4, p5 of the checkpoint: pre-trained without deep supervision, its FPN has no "
                         f"{', '.join(fresh)}: its laterals and top-down path feed the random init's output convs")
        at = {"checkpoint": levels, "random": levels, "enc+rand-dec": dec_levels}
    else:
        notes.append(f"encoder-only checkpoint: {', '.join(dec_levels)} through a random {kind.upper()} (--decoder), "
                     "so there 'checkpoint' is 'enc+rand-dec' (one network, reported under both names)")
        at = {"checkpoint": ["c5"], "random": levels, "enc+rand-dec": dec_levels}
    heads = list(trained.heads) if pre["framework"] == "slotcon" else []
    branches = {"checkpoint": checkpoint, "random": random, "enc+rand-dec": control}
    return {k: b.eval().requires_grad_(False) for k, b in branches.items()}, levels, at, heads, notes


def level_features(branch, x, levels):
    """(B, 3, H, W) -> {level: (B, C, h, w)} for `levels` only (the decoder runs when one of them needs it)."""
    feats = branch.encoder(x)
    out = {"c5": feats[-1]}
    if any(lvl != "c5" for lvl in levels):
        out.update(branch.decoder(feats))
    return {lvl: out[lvl] for lvl in levels}


@torch.no_grad()
def extract(branch, images, levels, heads, batch_size, device, desc=None):
    """images: list of (3, h, w) uint8 -> ({level: list of (C, h_l, w_l) float32 on the CPU},
    {level: list of (h_l, w_l) int64 argmax prototypes}) for `levels` and the SlotCon heads at `heads`."""
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None] * 255
    feats = {lvl: [None] * len(images) for lvl in levels}
    protos = {lvl: [None] * len(images) for lvl in heads}
    for idx in tqdm(shape_batches([im.shape for im in images], batch_size), desc=desc, dynamic_ncols=True,
                    leave=False):
        x = (torch.stack([images[i] for i in idx]).to(device).float() - mean) / std  # as data.to_tensor
        out = level_features(branch, x, levels)
        for lvl in levels:
            for j, i in enumerate(idx):
                feats[lvl][i] = out[lvl][j].float().cpu()
        for lvl in heads:
            ids = branch.heads[lvl](out[lvl]).scores.argmax(1).cpu()  # (B, K, h, w) scores
            for j, i in enumerate(idx):
                protos[lvl][i] = ids[j]
    return feats, protos


# ---------------------------------------------------------------- data

def probe_size(w, h, size):
    """(w, h) -> (w', h'): the short side `size`, the long side scaled alike and rounded to a multiple of 32."""
    short, long = min(w, h), max(w, h)
    long = max(32, round(long * size / short / 32) * 32)
    return (size, long) if w <= h else (long, size)


class ProbeTransform:
    """(PIL image, (H, W) ids) -> ((3, h, w) uint8 at the probe size, (H, W) uint8 ids at native size)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, image, mask):
        size = probe_size(*image.size, self.size)
        image = image.resize(size, Image.BILINEAR) if size != image.size else image
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels, torch.from_numpy(np.array(mask, dtype=np.uint8))


def read_split(dataset, indices, size, workers, desc=None):
    """Images and masks of `indices`, read once: (list of (3, h, w) uint8, list of (H, W) uint8)."""
    loader = torch.utils.data.DataLoader(Transformed(dataset, ProbeTransform(size), indices), batch_size=None,
                                         num_workers=workers)
    items = [(im.clone(), m.clone()) for im, m in tqdm(loader, total=len(indices), desc=desc, dynamic_ncols=True,
                                                        leave=False)]  # out of the workers' shared memory
    return [im for im, _ in items], [m for _, m in items]


# ---------------------------------------------------------------- probing

def probe_level(train, test, protos, num_prototypes, masks, num_classes, binary, args, device, desc):
    """The measures of one level of one network: train, test, lists of (C, h, w) features; protos, list of
    (h, w) ids among num_prototypes, or None; masks {"train", "test"}: lists of (H, W) ids.
    Returns {measure: record}."""
    out = {}
    conv, mean, std = train_linear_probe(train, masks["train"], num_classes, binary, args.probe_epochs, args.probe_lr,
                                         args.probe_batch_size, args.seed, device, desc=f"linear probe {desc}")
    predictions = linear_predictions(conv, mean, std, test, masks["test"], num_classes, binary, args.batch_size,
                                     device)
    targets = [masks["test"], [fgbg(m) for m in masks["test"]]]
    for name, pred, target, c in zip(("linear", "linear_fgbg"), predictions, targets, (num_classes, 2)):
        out[name] = measure_record(contingency(pred, target, c, c), np.arange(c), "identity")

    fit = F.normalize(sample_positions(test, args.kmeans_samples, args.seed).to(device), dim=1)
    for name, target, k in zip(("kmeans", "kmeans_fgbg"), targets, (num_classes, 2)[:1 + binary]):
        centers, _ = kmeans(fit, k, args.kmeans_iters, args.kmeans_restarts, args.seed)
        ids = [squared_distances(F.normalize(f.flatten(1).T.to(device), dim=1), centers).argmin(1).view(f.shape[1:])
               for f in test]  # every position, image by image
        table = contingency(ids, target, k, k)
        out[name] = measure_record(table, hungarian_matching(table), "hungarian")

    if protos is not None:
        table = contingency(protos, masks["test"], num_prototypes, num_classes)
        out["prototypes"] = measure_record(table, majority_matching(table), "majority")
    return {k: out[k] for k in MEASURES if k in out}


def prepare(checkpoint_path, args):
    """Everything that can fail on bad input, before any work: the checkpoint and its networks, the flags, the dataset
    and every mask that will be read. Raises ValueError (one line)."""
    state, pre = read_checkpoint(checkpoint_path, "--pretrained")
    size = check_flags(args, pre)
    data = labelled_data(args)
    try:
        networks = probe_networks(state, pre, args.decoder or "fpn", args.seed)
    except RuntimeError as e:  # load_state_dict: tensors that do not fit the recorded args
        raise ValueError(f"--pretrained {checkpoint_path}: its weights do not fit its pre-training args "
                         f"({str(e).splitlines()[0]})") from None
    return {"networks": networks, "pre": pre, "size": size, **data, "checkpoint": checkpoint_path,
            "device": torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))}


def check_flags(args, pre):
    """The flags that need no data, against the checkpoint's pre-training args `pre`. Returns the image size."""
    if pre["decoder"] != "none" and args.decoder not in (None, pre["decoder"]):
        raise ValueError(f"--decoder {args.decoder}: the checkpoint has its own {pre['decoder']} decoder; "
                         "--decoder is for encoder-only checkpoints")
    size = args.size if args.size is not None else max(32, round(pre["image_size"] / 32) * 32)
    if size < 32 or size % 32:
        raise ValueError(f"--size {size}: must be a positive multiple of 32")
    for name in ("batch_size", "probe_epochs", "probe_batch_size", "kmeans_iters", "kmeans_restarts",
                 "synthetic_size", "synthetic_train", "synthetic_val", "synthetic_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if not args.probe_lr > 0:
        raise ValueError(f"--probe-lr {args.probe_lr}: must be positive")
    if args.train_images is not None and args.train_images < 1:
        raise ValueError("--train-images must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise ValueError("--workers must be 0 (in-process) or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return size


def labelled_data(args):
    """The dataset's train and test splits, checked (every mask that will be read): {"data", "indices" (the
    training subset and the test images), "classes", "binary", "workers"}."""
    if args.dataset != "synthetic" and args.data_root is None:
        raise ValueError(f"--data-root is required for --dataset {args.dataset}")
    if args.dataset == "folder":
        if args.num_classes is not None and not 2 <= args.num_classes <= 255:
            raise ValueError(f"--dataset folder needs --num-classes between 2 and 255 (255 is the ignore index), "
                             f"got {args.num_classes}")
    elif args.num_classes is not None:
        raise ValueError(f"--num-classes is for --dataset folder; {args.dataset} has a fixed class list")
    if args.data_root is not None and not os.path.isdir(args.data_root):
        raise ValueError(f"--data-root {args.data_root}: no such folder")
    classes = (folder_classes(args.data_root, args.num_classes) if args.dataset == "folder"
               else DATASETS[args.dataset]["classes"])
    if args.kmeans_samples < len(classes):
        raise ValueError(f"--kmeans-samples {args.kmeans_samples}: k-means needs at least one point per class "
                         f"({len(classes)})")
    no_background = args.dataset == "cityscapes" or len(classes) == 2
    if args.binary and no_background:
        raise ValueError(f"--binary: {args.dataset} " + ("has no background class" if args.dataset == "cityscapes"
                                                         else "has two classes: its class-level probe is fg/bg"))
    binary = not no_background if args.binary is None else args.binary
    lengths = (args.synthetic_train, args.synthetic_val, args.synthetic_test)
    data = {s: build_dataset(args.dataset, s, args.data_root, args.num_classes, lengths, args.synthetic_size)
            for s in ("train", "test")}
    n = len(data["train"])
    train = list(range(n))
    if args.train_images is not None and args.train_images < n:
        train = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(args.seed))[:args.train_images]
                       .tolist())
    workers = (0 if args.dataset == "synthetic" else min(8, os.cpu_count() or 1)) if args.workers is None \
        else args.workers
    check_dataset(data["train"], train, threads=max(1, workers))
    check_dataset(data["test"], threads=max(1, workers))
    return {"data": data, "indices": {"train": train, "test": list(range(len(data["test"])))},
            "classes": list(classes), "binary": binary, "workers": workers}


def run_probes(setup, args):
    """The measures of every level of every network: the results dict written to probe.json."""
    start = time.perf_counter()
    device, pre, size = setup["device"], setup["pre"], setup["size"]
    num_classes, binary = len(setup["classes"]), setup["binary"]
    branches, levels, at, heads, notes = setup["networks"]
    images, masks = {}, {}
    for split in ("train", "test"):
        images[split], masks[split] = read_split(setup["data"][split], setup["indices"][split], size,
                                                 setup["workers"], desc=f"reading {split}")
    results = {lvl: {} for lvl in levels}
    for init, branch in branches.items():
        branch.to(device)
        proto_levels = [lvl for lvl in heads if lvl in at[init]]
        train, _ = extract(branch, images["train"], at[init], [], args.batch_size, device,
                           desc=f"features {init} train")
        test, protos = extract(branch, images["test"], at[init], proto_levels, args.batch_size, device,
                               desc=f"features {init} test")
        for lvl in at[init]:
            prototypes = branch.heads[lvl].prototypes.num_embeddings if lvl in protos else None
            results[lvl][init] = probe_level(train[lvl], test[lvl], protos.get(lvl), prototypes, masks, num_classes,
                                             binary, args, device, f"{lvl} {init}")
        branch.cpu()
        del train, test
    if at["checkpoint"] == ["c5"]:  # encoder-only: at the decoder levels the checkpoint is the control network
        for lvl in levels[1:]:
            results[lvl] = {"checkpoint": results[lvl]["enc+rand-dec"], **results[lvl]}
    results = {lvl: {init: results[lvl][init] for init in INITS if init in results[lvl]} for lvl in levels}
    return {"checkpoint": {"path": setup["checkpoint"], "framework": pre["framework"], "arch": pre["arch"],
                           "decoder": pre["decoder"], "deep_supervision": pre["deep_supervision"],
                           "alpha": pre["alpha"], "image_size": pre["image_size"],
                           "variant": pre.get("variant")},
            "dataset": args.dataset, "classes": setup["classes"], "size": size,
            "images": {s: len(images[s]) for s in images}, "binary": binary,
            "fgbg_classes": list(FGBG_CLASSES) if binary else None, "inits": INITS,
            "measures": {k: v for k, v in MEASURES.items()
                         if (k != "prototypes" or heads) and (binary or not k.endswith("fgbg"))},
            "notes": notes, "units": "percent", "levels": results, "seconds": round(time.perf_counter() - start, 1)}


def probe(checkpoint_path, args):
    """Probe a pretrain.py checkpoint with the flags of get_args_parser(): the results dict of probe.json (without
    "args"). Raises ValueError (one line) on bad input, before any work."""
    return run_probes(prepare(checkpoint_path, args), args)


# ---------------------------------------------------------------- output

def results_table(results):
    """Test mIoU (%) as aligned text: one row per level and network, one column per measure."""
    measures = results["measures"]
    width = max(12, *(len(t) for t in measures.values()))
    lines = [f"{'level':<6}{'network':<14}" + "".join(f"{t:>{width + 2}}" for t in measures.values())]
    for lvl, inits in results["levels"].items():
        for n, (init, record) in enumerate(inits.items()):
            cells = [f"{record[m]['miou']:.2f}" if m in record and record[m]["miou"] is not None else "-"
                     for m in measures]
            lines.append(f"{lvl if n == 0 else '':<6}{init:<14}" + "".join(f"{c:>{width + 2}}" for c in cells))
    return "\n".join(lines)


def header(results):
    """What was probed, how, and the notes, as the lines above the table."""
    c = results["checkpoint"]
    lines = [f"probe of {c['path']} ({c['variant'] or c['framework']}, {c['arch']}), {results['dataset']}: "
             f"{results['images']['train']} training / {results['images']['test']} test images at {results['size']} "
             f"px (short side), {len(results['classes'])} classes",
             "test mIoU % per level and network; networks: " +
             "; ".join(f"{k} = {v}" for k, v in results["inits"].items()),
             "linear: 1x1 conv on features standardized with the training set's per-channel mean and std; k-means: K = "
             "classes on L2-normalized test features, Hungarian (one-to-one) matching"]
    if "prototypes" in results["measures"]:
        lines.append("prototypes: the teacher's argmax prototype, majority (many-to-one) matching, at the levels "
                     "with SlotCon heads")
    if results["binary"]:
        lines.append("fg/bg: background (class 0) vs any object, K = 2")
    return "\n".join(lines + [f"note: {n}" for n in results["notes"]])


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = utils.ArgumentParser("probe.py", description="Frozen probes of a pretrain.py checkpoint at every level "
                                                     "(linear probe, k-means, prototypes), beside a random init and "
                                                     "its encoder with a random decoder. 'None' means the "
                                                     "checkpoint's or the dataset's value.")
    a = p.add_argument
    a("--pretrained", required=True, help="a last.pt written by pretrain.py")
    a("--dataset", choices=sorted(DATASETS), default="synthetic", help="as finetune_seg.py (docs/DATASETS.md)")
    a("--data-root", default=None, help="dataset folder (all but synthetic)")
    a("--num-classes", type=int, default=None, help="classes of --dataset folder (mask ids 0..K-1, 255 = ignore)")
    a("--synthetic-size", type=int, default=128, help="side of the built-in scenes")
    a("--synthetic-train", type=int, default=256, help="built-in training scenes")
    a("--synthetic-val", type=int, default=32, help="built-in validation scenes (not read: as finetune_seg.py's flag)")
    a("--synthetic-test", type=int, default=64, help="built-in test scenes")
    a("--train-images", type=int, default=None, help="labelled training images of the linear probe, a seeded "
      "subset (default: all; the feature cache holds them all)")
    a("--size", type=int, default=None, help="short side of the images, a multiple of 32 (default: the "
      "pre-training's image size)")
    a("--decoder", choices=["fcn", "fpn"], default=None, help="random decoder of an encoder-only checkpoint "
      "(default fpn)")
    a("--batch-size", type=int, default=16, help="images per forward pass")
    a("--probe-epochs", type=int, default=10, help="epochs of the linear probe over the training images")
    a("--probe-lr", type=float, default=0.05, help="Adam learning rate of the linear probe")
    a("--probe-batch-size", type=int, default=16, help="images per step of the linear probe")
    a("--kmeans-iters", type=int, default=30, help="Lloyd iterations at most per k-means run")
    a("--kmeans-restarts", type=int, default=3, help="k-means++ runs; the lowest inertia is kept")
    a("--kmeans-samples", type=int, default=100000, help="test positions k-means is fitted on, a seeded subset "
      "(all positions are assigned)")
    a("--binary", action=argparse.BooleanOptionalAction, default=None, help="also fg/bg probes (background vs any "
      "object); default on, off for cityscapes and two-class datasets")
    a("--seed", type=int, default=0, help="seed of the random init, the linear probe's batch order, k-means and "
      "the --train-images subset")
    a("--workers", type=int, default=None, help="data-loading processes (default: 0 for synthetic, else "
      "min(8, cores))")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--output-dir", default="output/probe", help="probe.json goes here")
    return p


def main(args):
    try:
        if problem := utils.unwritable(args.output_dir):
            raise ValueError(f"--output-dir {problem}")
        setup = prepare(args.pretrained, args)
    except ValueError as e:  # data.DataError included
        utils.fail(e)
    utils.lock_output_dir(args.output_dir)  # one job per folder, until this process ends
    results = {"args": vars(args), **run_probes(setup, args)}
    print(header(results))
    print(results_table(results))
    path = os.path.join(args.output_dir, "probe.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path} ({results['seconds']:.0f} s)", flush=True)
    utils.shutdown()
    return results


if __name__ == "__main__":
    main(get_args_parser().parse_args())
