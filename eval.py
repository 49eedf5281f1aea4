"""Semantic segmentation, evaluation side: the labelled datasets, the segmentation network (ResNet encoder + FCN or
FPN head), mIoU from a confusion matrix, and whole-image / sliding-window inference (paper Sec. 3.4).

    python eval.py --checkpoint output/seg/seed0.pt --split test
    python eval.py --checkpoint output/seg/seed0.pt --dataset cityscapes --data-root data/cityscapes --mode slide

finetune_seg.py imports the network, the datasets, the metric and the inference from here, so a number printed by
either script comes from one implementation. A checkpoint (written by finetune_seg.py) is a plain dict
{"model": state dict, "args": the fine-tuning flags, ...} that torch.load(weights_only=True) reads.
"""
import argparse
import json
import math
import os
import shlex
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF
from tqdm import tqdm

import distributed as du
from data import (_SHAPES, IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, NUM_SYNTHETIC_CLASSES, SyntheticScenes,
                  load_rgb)
from models import ARCH_CHANNELS, Backbone, ConvModule, FCNDecoder, FPNDecoder

IGNORE_INDEX = 255  # mmseg's: VOC's object borders, Cityscapes' unused classes, crop padding

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
# labelIds of the 19 evaluated classes, in trainId order (cityscapesScripts' labels.py); every other id -> ignore
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# Classes and test-time geometry of each dataset, as in the mmseg test pipelines the paper used: `base_size` is the
# short side images are resized to before inference (None: native size); the metric is computed at native size.
DATASETS = {
    "synthetic": dict(classes=("background",) + _SHAPES[:NUM_SYNTHETIC_CLASSES], base_size=None, mode="whole",
                      stride=None),
    "voc": dict(classes=VOC_CLASSES, base_size=512, mode="whole", stride=None),
    "cityscapes": dict(classes=CITYSCAPES_CLASSES, base_size=None, mode="slide", stride=513),  # 769 crops
    "isic2017": dict(classes=("background", "lesion"), base_size=512, mode="whole", stride=None),
    "refuge": dict(classes=("background", "optic disc", "optic cup"), base_size=512, mode="whole", stride=None),
    "folder": dict(classes=None, base_size=None, mode="whole", stride=None),
}
SYNTHETIC_SPLIT_SEEDS = {"train": 100, "val": 101, "test": 102}  # pretrain.py's scenes use --seed (0)
TEST_IS_VAL = ("voc", "cityscapes")  # no public test labels: the paper reports val2012 and val.fine


class DataError(ValueError):
    """A dataset that cannot be used as given: the message is one line naming the file or flag."""


# ---------------------------------------------------------------- mask decoding

def class_id_lut(num_classes):
    """Masks that already hold class ids: 0..K-1 and 255 are valid, anything else is an error (-1)."""
    lut = np.full(256, -1, np.int16)
    lut[:num_classes] = np.arange(num_classes)
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def cityscapes_lut():
    """gtFine labelIds -> the 19 trainIds; the 15 unused ids (and anything else) -> 255."""
    lut = np.full(256, IGNORE_INDEX, np.int16)
    lut[list(CITYSCAPES_LABEL_IDS)] = np.arange(len(CITYSCAPES_LABEL_IDS))
    return lut


def isic_lut():
    """ISIC 2017 Part 1 masks are 0 (background) / 255 (lesion); other grey levels (a resized copy) split at 128."""
    return (np.arange(256) >= 128).astype(np.int16)


def refuge_lut():
    """REFUGE Disc_Cup_Masks grey levels: 255 background -> 0, 128 optic disc (rim) -> 1, 0 optic cup -> 2;
    other levels go to the nearest of the three (the .bmp files are lossless, but copies may not be)."""
    v = np.arange(256)
    return np.where(v >= 192, 0, np.where(v >= 64, 1, 2)).astype(np.int16)


def read_mask(path, lut, grey=False):
    """Mask file -> (H, W) uint8 class ids (255 = ignore) through a 256-entry lookup table, -1 marking values that
    are not allowed. `grey`: convert to 8-bit luminance first (REFUGE, ISIC); otherwise the pixel values (the
    palette indices of a 'P' PNG, as VOC stores them) are the ids. Raises DataError naming the file."""
    try:
        with Image.open(path) as im:
            raw = np.asarray(im.convert("L") if grey else im)
    except Exception as e:  # PIL raises many types for bad files
        raise DataError(f"cannot decode mask {path}: {e}") from None
    if raw.ndim != 2:
        raise DataError(f"mask {path}: has {raw.shape[-1]} channels; save one channel of class ids (mode L or P)")
    if raw.dtype != np.uint8:  # 16-bit PNGs
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            bad = raw.max() if raw.max() > 255 else raw.min()
            raise DataError(f"mask {path}: value {bad} is not a class id (at most 254) or the ignore index 255")
        raw = raw.astype(np.uint8)
    ids = lut[raw]
    if (ids < 0).any():
        bad, k = int(raw[ids < 0][0]), int((lut[:255] >= 0).sum())
        raise DataError(f"mask {path}: value {bad} is not a class id below {k} or the ignore index {IGNORE_INDEX}")
    return ids.astype(np.uint8)


# ---------------------------------------------------------------- datasets

class LabelledImages(torch.utils.data.Dataset):
    """(image file, mask file) pairs. item -> transform(PIL RGB image, (H, W) uint8 ids), or the pair itself."""

    def __init__(self, pairs, classes, lut, grey=False, transform=None):
        self.pairs, self.classes, self.lut, self.grey, self.transform = pairs, tuple(classes), lut, grey, transform

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, idx):
        image = load_rgb(self.pairs[idx][0])
        mask = self._mask(idx, image.size)
        return self.transform(image, mask) if self.transform else (image, mask)

    def _mask(self, idx, image_size):
        """The (H, W) ids of pair `idx`, checked against the image's (W, H)."""
        image_path, mask_path = self.pairs[idx]
        mask = read_mask(mask_path, self.lut, self.grey)
        if image_size != (mask.shape[1], mask.shape[0]):
            raise DataError(f"mask {mask_path}: {mask.shape[1]}x{mask.shape[0]} px, but its image {image_path} "
                            f"is {image_size[0]}x{image_size[1]}")
        return mask

    def check(self, idx):
        """Decode one pair's mask and the image's header: the errors training would hit, before it starts."""
        try:
            with Image.open(self.pairs[idx][0]) as im:
                size = im.size
        except Exception as e:
            raise DataError(f"cannot decode image {self.pairs[idx][0]}: {e}") from None
        self._mask(idx, size)


class SyntheticSegmentation(torch.utils.data.Dataset):
    """data.py's procedural scenes with their masks (0 = background, 1..8 = shapes); one seed per split."""

    def __init__(self, length, size, seed, transform=None):
        self.scenes = SyntheticScenes(length, size=size, seed=seed, with_mask=True)
        self.classes, self.transform = DATASETS["synthetic"]["classes"], transform

    def __len__(self):
        return len(self.scenes)

    def __getitem__(self, idx):
        image, mask = self.scenes[idx]
        return self.transform(image, mask) if self.transform else (image, mask)

    def check(self, idx):
        pass  # generated, valid by construction


def find_folder(root, names, what):
    """The first folder under `root` (searched breadth-first, sorted) whose name is one of `names`: the official
    archives unpack with one or two extra levels depending on the tool."""
    level = [root]
    while level:
        for d in level:
            if os.path.basename(os.path.normpath(d)) in names:
                return d
        level = [os.path.join(d, e) for d in level for e in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, e))]
    raise DataError(f"--data-root {root}: no folder named {' or '.join(names)} ({what})")


def files_under(folder, extensions):
    """Every file under `folder` (recursive, sorted) whose name ends in one of `extensions` (lower case)."""
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder, followlinks=True) for f in fs
                  if f.lower().endswith(extensions))


def pair_by_stem(images, masks, mask_stem, where):
    """Pair each image with the mask whose file stem is mask_stem(image stem); an image without one is an error."""
    by_stem = {os.path.splitext(os.path.basename(m))[0]: m for m in masks}
    pairs = []
    for image in images:
        stem = mask_stem(os.path.splitext(os.path.basename(image))[0])
        if stem not in by_stem:
            raise DataError(f"image {image} has no mask (expected {stem}.* under {where})")
        pairs.append((image, by_stem[stem]))
    return pairs


def existing_pairs(pairs):
    """`pairs`, after checking that every file exists."""
    for image, mask in pairs:
        if not os.path.isfile(image):
            raise DataError(f"image {image} is listed but missing")
        if not os.path.isfile(mask):
            raise DataError(f"image {image} has no mask (expected {mask})")
    return pairs


def voc_pairs(root, split):
    """Pascal VOC 2012 with SBD, mmseg's voc12aug layout under VOCdevkit/VOC2012: train = train.txt (masks in
    SegmentationClass) + aug.txt (SBD masks in SegmentationClassAug) = 10582 images; val and test = val.txt
    (1449; the test labels are not public and the paper reports val2012)."""
    if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    lists = os.path.join(root, "ImageSets", "Segmentation")
    if split == "train":
        sources = [("train.txt", "SegmentationClass")]
        if os.path.isfile(os.path.join(lists, "aug.txt")):
            sources.append(("aug.txt", "SegmentationClassAug"))
        elif du.is_main():
            print(f"note: no {os.path.join(lists, 'aug.txt')}: training on VOC train.txt only, without the SBD "
                  "images (see README_finetune.md)", flush=True)
    else:
        sources = [("val.txt", "SegmentationClass")]
    pairs = {}
    for list_name, mask_dir in sources:
        path = os.path.join(lists, list_name)
        if not os.path.isfile(path):
            raise DataError(f"--data-root {root}: no list file {path} (VOC 2012 layout, see README_finetune.md)")
        with open(path) as f:
            for name in (line.split()[0] for line in f if line.strip()):
                pairs.setdefault(name, (os.path.join(root, "JPEGImages", name + ".jpg"),
                                        os.path.join(root, mask_dir, name + ".png")))
    return existing_pairs(list(pairs.values()))


def cityscapes_pairs(root, split):
    """Cityscapes fine annotations: leftImg8bit/{split}/CITY/*_leftImg8bit.png with
    gtFine/{split}/CITY/*_gtFine_labelIds.png; test = val (the test labels are not public; the paper reports
    val.fine)."""
    split = "val" if split == "test" else split
    image_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_dir):
        raise DataError(f"--data-root {root}: no folder {image_dir} (Cityscapes layout, see README_finetune.md)")
    images = [f for f in files_under(image_dir, (".png",)) if f.endswith("_leftImg8bit.png")]
    pairs = [(f, os.path.join(root, "gtFine", split, os.path.relpath(f, image_dir))
              .replace("_leftImg8bit.png", "_gtFine_labelIds.png")) for f in images]
    return existing_pairs(pairs)


ISIC_FOLDERS = {"train": ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
                "val": ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
                "test": ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth")}


def isic2017_pairs(root, split):
    """ISIC 2017 Part 1, the official archives unpacked anywhere under the root: ISIC_nnnnnnn.jpg in
    ISIC-2017_{Training,Validation,Test_v2}_Data (the *_superpixels.png beside them are not images of the task)
    and ISIC_nnnnnnn_segmentation.png in the matching *_Part1_GroundTruth folder."""
    image_name, mask_name = ISIC_FOLDERS[split]
    image_dir = find_folder(root, (image_name,), "ISIC 2017 layout, see README_finetune.md")
    mask_dir = find_folder(root, (mask_name,), "ISIC 2017 layout, see README_finetune.md")
    return pair_by_stem(files_under(image_dir, (".jpg", ".jpeg")), files_under(mask_dir, (".png",)),
                        lambda stem: stem + "_segmentation", mask_dir)


REFUGE_FOLDERS = {"train": (("Training400", "REFUGE-Training400"), ("Annotation-Training400",)),
                  "val": (("REFUGE-Validation400",), ("REFUGE-Validation400-GT",)),
                  "test": (("Test400", "REFUGE-Test400"), ("REFUGE-Test-GT",))}


def refuge_pairs(root, split):
    """REFUGE (2018), the six official archives unpacked under the root: fundus .jpg files under Training400
    (Glaucoma/, Non-Glaucoma/), REFUGE-Validation400, Test400; the Disc_Cup_Masks .bmp of the same stem under
    Annotation-Training400, REFUGE-Validation400-GT, REFUGE-Test-GT."""
    image_names, mask_names = REFUGE_FOLDERS[split]
    image_dir = find_folder(root, image_names, "REFUGE layout, see README_finetune.md")
    mask_dir = find_folder(root, mask_names, "REFUGE layout, see README_finetune.md")
    return pair_by_stem(files_under(image_dir, (".jpg", ".jpeg", ".png")), files_under(mask_dir, (".bmp", ".png")),
                        lambda stem: stem, mask_dir)


def folder_pairs(root, split):
    """Any dataset as images/{split}/NAME.ext (any image type, sub-folders allowed) + masks/{split}/NAME.png
    holding class ids 0..K-1 (255 = ignore)."""
    image_dir, mask_dir = os.path.join(root, "images", split), os.path.join(root, "masks", split)
    if not os.path.isdir(image_dir):
        raise DataError(f"--data-root {root}: no folder {image_dir} (images/ + masks/ layout, see README_finetune.md)")
    images = files_under(image_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"--data-root {root}: no images in {image_dir}")
    pairs = [(f, os.path.join(mask_dir, os.path.splitext(os.path.relpath(f, image_dir))[0] + ".png")) for f in images]
    return existing_pairs(pairs)


def build_dataset(name, split, root=None, num_classes=None, synthetic_lengths=(256, 32, 64), synthetic_size=128):
    """The `split` ('train', 'val' or 'test') of dataset `name`, untransformed: items are (PIL image, mask ids).
    Raises DataError (one line, naming the flag or file) for a missing root, folder, image or mask."""
    if name == "synthetic":
        length = dict(zip(("train", "val", "test"), synthetic_lengths))[split]
        return SyntheticSegmentation(length, synthetic_size, SYNTHETIC_SPLIT_SEEDS[split])
    if root is None:
        raise DataError(f"--data-root is required for --dataset {name}")
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root}: no such folder")
    if name == "folder":
        if num_classes is None:
            raise DataError("--num-classes is required for --dataset folder")
        return LabelledImages(folder_pairs(root, split), [f"class{k}" for k in range(num_classes)],
                              class_id_lut(num_classes))
    lister, lut, grey = {"voc": (voc_pairs, class_id_lut(len(VOC_CLASSES)), False),
                         "cityscapes": (cityscapes_pairs, cityscapes_lut(), False),
                         "isic2017": (isic2017_pairs, isic_lut(), True),
                         "refuge": (refuge_pairs, refuge_lut(), True)}[name]
    pairs = lister(root, split)
    if not pairs:
        raise DataError(f"--data-root {root}: no {split} images found for --dataset {name}")
    return LabelledImages(pairs, DATASETS[name]["classes"], lut, grey)


def check_dataset(dataset, indices=None, threads=8):
    """Decode every mask among `indices` (default all; sharded over ranks) and compare its size with the image's,
    so a bad file stops the run before training rather than hours in. Raises the first DataError in index order."""
    indices = list(range(len(dataset)) if indices is None else indices)[du.rank()::du.world_size()]
    with ThreadPoolExecutor(max(1, threads)) as pool:  # PIL decodes with the GIL released
        for _ in pool.map(dataset.check, indices):
            pass


class Transformed(torch.utils.data.Dataset):
    """dataset[indices[i]] passed through transform(image, mask)."""

    def __init__(self, dataset, transform, indices=None):
        self.dataset, self.transform = dataset, transform
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.transform(*self.dataset[self.indices[i]])


def to_tensor(image):
    """PIL RGB -> (3, H, W) float, ImageNet-normalized (what the encoder was pre-trained on)."""
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


class EvalTransform:
    """Test pipeline: image resized so its short side is `base_size` (None: kept), normalized -> (3, h, w); the
    mask stays at native size -> (H, W) int64, as mmseg scores predictions resized back to the original."""

    def __init__(self, base_size=None):
        self.base_size = base_size

    def __call__(self, image, mask):
        if self.base_size:
            w, h = image.size
            s = self.base_size / min(w, h)
            image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        return to_tensor(image), torch.from_numpy(np.asarray(mask, dtype=np.int64))


# ---------------------------------------------------------------- network

class FCNHead(FCNDecoder):
    """mmseg's FCNHead as the paper fine-tunes it: the pre-trainable body (two 3x3 convs, 256 ch, dilation 6,
    `convs.*`) + a dropout-free 1x1 classifier `conv_seg`. mmseg's names, so a `decode_head.*` file loads as is.
    (c2, c3, c4, c5) -> (B, K, h5, w5)."""

    def __init__(self, in_channels, num_classes, channels=256):
        super().__init__(in_channels, channels)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        return self.conv_seg(super().forward(feats)["fcn"])


class FPNHead(FPNDecoder):
    """The pre-trainable FPN with all four outputs (`fpn_lateral*`, `fpn_output*`) + a light Semantic-FPN merge:
    each p_s through a 3x3 conv-BN-ReLU to `merge_channels`, upsampled bilinearly to p2's size, summed, then the
    1x1 classifier `conv_seg`. The merge convs put a non-linearity after the FPN's linear conv+BN outputs.
    (c2, c3, c4, c5) -> (B, K, H/4, W/4)."""

    def __init__(self, in_channels, num_classes, channels=256, merge_channels=128):
        super().__init__(in_channels, channels, deep_supervision=True)
        self.scale_heads = nn.ModuleList(ConvModule(channels, merge_channels, 3) for _ in range(4))
        self.conv_seg = nn.Conv2d(merge_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        p = super().forward(feats)
        size = p["p2"].shape[-2:]
        merged = sum(F.interpolate(head(p[f"p{s}"]), size=size, mode="bilinear", align_corners=False)
                     for s, head in zip((2, 3, 4, 5), self.scale_heads))
        return self.conv_seg(merged)


class Segmenter(nn.Module):
    """ResNet encoder + FCN or FPN head: (B, 3, H, W) -> logits (B, K, H, W), upsampled bilinearly.

    FCN on ResNet-50 runs on a dilated c5 (output stride 16), as mmseg's fcn_d6_r50-d16 configs of MoCo and SlotCon;
    torchvision's BasicBlock cannot dilate, so ResNet-18/34 keep stride 32. Dilation changes no parameter shape,
    so the pre-trained (stride-32) weights load unchanged.
    """

    def __init__(self, arch="resnet50", decoder="fcn", num_classes=21):
        super().__init__()
        if arch not in ARCH_CHANNELS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CHANNELS)}")
        if decoder not in ("fcn", "fpn"):
            raise ValueError(f"unknown decoder {decoder!r}; choose fcn or fpn")
        dilate = decoder == "fcn" and arch == "resnet50"
        self.arch, self.decoder, self.num_classes = arch, decoder, num_classes
        self.output_stride = 16 if dilate else 32
        self.backbone = Backbone(arch, dilate_c5=dilate)
        c = self.backbone.channels
        self.decode_head = FCNHead(c[3], num_classes) if decoder == "fcn" else FPNHead(c, num_classes)

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h % 32, -w % 32) if self.decoder == "fpn" else (0, 0)
        if pad_h or pad_w:  # the FPN's x2 top-down upsampling needs sides that are multiples of 32
            x = F.pad(x, (0, pad_w, 0, pad_h))
        logits = self.decode_head(self.backbone(x))
        logits = F.interpolate(logits.float(), size=(h + pad_h, w + pad_w), mode="bilinear", align_corners=False)
        return logits[..., :h, :w]


# ---------------------------------------------------------------- metrics

def confusion_matrix(pred, target, num_classes, ignore_index=IGNORE_INDEX):
    """pred, target: int tensors of the same shape -> (K, K) int64 counts, rows = ground truth, columns =
    prediction; pixels whose target is `ignore_index` are left out."""
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and int(t.max()) >= num_classes:
        raise ValueError(f"target holds class {int(t.max())} but there are {num_classes} classes")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_scores(cm):
    """(K, K) confusion matrix (rows = ground truth) -> {"iou": (K,) array, "miou", "pixel_acc"}, as fractions.
    IoU_k = TP / (TP + FP + FN); a class absent from both ground truth and prediction has IoU NaN and is left out of
    mIoU (a class predicted but absent from the ground truth scores 0). pixel_acc = trace / total."""
    cm = cm.double().cpu().numpy() if torch.is_tensor(cm) else np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    total = cm.sum()
    miou = float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")
    return {"iou": iou, "miou": miou, "pixel_acc": float(tp.sum() / total) if total else float("nan")}


# ---------------------------------------------------------------- inference

def window_starts(size, crop, stride):
    """Top-left offsets of the sliding windows along one side: every `stride` px, the last flush with the border
    (mmseg's slide mode). A side shorter than the crop gets one window (the whole side)."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


def slide_logits(model, image, crop, stride):
    """(B, 3, H, W) -> (B, K, H, W): the average of the logits of crop x crop windows, every `stride` px."""
    b, _, h, w = image.shape
    logits = image.new_zeros(b, model.num_classes, h, w, dtype=torch.float32)
    count = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    for y in window_starts(h, crop, stride):
        for x in window_starts(w, crop, stride):
            logits[..., y:y + crop, x:x + crop] += model(image[..., y:y + crop, x:x + crop]).float()
            count[..., y:y + crop, x:x + crop] += 1
    return logits / count


@torch.no_grad()
def predict(model, image, mode="whole", crop=512, stride=341, out_size=None):
    """(B, 3, h, w) normalized image -> (B, K, H, W) float logits, resized to `out_size` (default (h, w)).
    mode 'whole': one forward pass; 'slide': crop x crop windows every `stride` px (Cityscapes-size images)."""
    image = image.contiguous(memory_format=torch.channels_last)
    logits = model(image).float() if mode == "whole" else slide_logits(model, image, crop, stride)
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=False)
    return logits


@torch.no_grad()
def evaluate(model, dataset, mode="whole", crop=512, stride=341, device="cpu", workers=0, ctx=None, desc=None):
    """Score `model` on `dataset` (items: image (3, h, w) at test scale, mask (H, W) at native size), sharded over
    ranks with the confusion matrices summed. Returns segmentation_scores plus the confusion matrix "cm"."""
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(du.rank(), len(dataset), du.world_size()))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers)
    k = model.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    for image, mask in tqdm(loader, desc=desc, leave=False, disable=desc is None or not du.is_main()):
        mask = mask.to(device)
        with ctx or nullcontext():
            logits = predict(model, image.to(device), mode, crop, stride, out_size=mask.shape[-2:])
        cm += confusion_matrix(logits.argmax(1), mask, k)
    model.train(was_training)
    cm = du.all_reduce_sum(cm)
    return {**segmentation_scores(cm), "cm": cm.cpu()}


# ---------------------------------------------------------------- reports

def as_percent(x):
    """Fraction(s) -> percent, NaN -> None (JSON has no NaN)."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [as_percent(float(v)) for v in x]
    return None if x is None or math.isnan(x) else round(100.0 * float(x), 4)


def score_table(scores, classes):
    """Per-class IoU, mIoU and pixel accuracy as aligned text, in percent."""
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  {'IoU':>7}"]
    for name, v in zip(classes, scores["iou"]):
        lines.append(f"{name:<{width}}  {'n/a' if math.isnan(v) else f'{100 * v:.2f}':>7}")
    lines.append(f"{'mIoU':<{width}}  {100 * scores['miou']:>7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * scores['pixel_acc']:>7.2f}")
    return "\n".join(lines)


def load_checkpoint(path):
    """A finetune_seg.py checkpoint -> (Segmenter with its weights, the fine-tuning args dict)."""
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "num_classes" in ckpt["args"]):
        raise ValueError(f"--checkpoint {path}: not a finetune_seg.py checkpoint (expected 'model' and 'args' "
                         "with num_classes)")
    a = ckpt["args"]
    model = Segmenter(a["arch"], a["decoder"], a["num_classes"])
    model.load_state_dict(ckpt["model"])
    return model, a


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = argparse.ArgumentParser("DeCon segmentation evaluation", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="mIoU of a finetune_seg.py checkpoint. Unset flags take the values "
                                            "the checkpoint was fine-tuned with.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a seedN.pt written by finetune_seg.py")
    a("--dataset", choices=sorted(DATASETS), default=None, help="default: the checkpoint's")
    a("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    a("--split", choices=["train", "val", "test"], default="test", help="voc and cityscapes: test = val")
    a("--mode", choices=["whole", "slide"], default=None, help="whole-image or sliding-window inference")
    a("--crop-size", type=int, default=None, help="slide window side (default: the fine-tuning crop)")
    a("--stride", type=int, default=None, help="slide window stride (default: the dataset's, or 2/3 crop)")
    a("--base-size", type=int, default=None, help="short side images are resized to (0: native size)")
    a("--workers", type=int, default=None, help="data-loading processes (0 = in-process)")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (bf16 on CUDA, fp32 on CPU)")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--output", default=None, help="JSON file (default: the checkpoint's path with .<dataset>-<split>.json)")
    return p


def eval_geometry(dataset, crop_size, mode=None, stride=None, base_size=None):
    """(mode, crop, stride, base_size) for `dataset`: explicit values win, then the dataset's defaults. The
    default stride is the dataset's (Cityscapes: 513 for 769 crops) when it fits the crop, else 2/3 of the crop."""
    spec = DATASETS[dataset]
    mode = mode or spec["mode"]
    if stride is None:
        stride = spec["stride"] if spec["stride"] and spec["stride"] <= crop_size else max(1, crop_size * 2 // 3)
    if stride > crop_size:
        raise ValueError(f"--stride {stride} is larger than the {crop_size} px window: pixels would be skipped")
    base_size = spec["base_size"] if base_size is None else (base_size or None)
    return mode, crop_size, stride, base_size


def main(args):
    try:
        model, ft = load_checkpoint(args.checkpoint)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    dataset = args.dataset or ft["dataset"]
    root = args.data_root or (ft["data_root"] if dataset == ft["dataset"] else None)
    num_classes = ft["num_classes"] if dataset == "folder" else len(DATASETS[dataset]["classes"])
    if num_classes != model.num_classes:
        raise SystemExit(f"error: --dataset {dataset} has {num_classes} classes but {args.checkpoint} predicts "
                         f"{model.num_classes}")
    try:
        mode, crop, stride, base_size = eval_geometry(
            dataset, args.crop_size or ft["crop_size"], args.mode or (ft["mode"] if dataset == ft["dataset"] else None),
            args.stride, args.base_size)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    device = du.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        data = build_dataset(dataset, args.split, root, num_classes,
                             (ft["synthetic_train"], ft["synthetic_val"], ft["synthetic_test"]), ft["synthetic_size"])
        check_dataset(data, threads=max(1, workers))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    model = model.to(device).to(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    scores = evaluate(model, Transformed(data, EvalTransform(base_size)), mode, crop, stride, device, workers, ctx,
                      desc=f"eval {dataset}/{args.split}")
    if du.is_main():
        print(f"{args.checkpoint} on {dataset} {args.split} ({len(data)} images, {mode} inference"
              f"{f', {crop} px windows every {stride} px' if mode == 'slide' else ''})")
        print(score_table(scores, data.classes))
        out = args.output or f"{os.path.splitext(args.checkpoint)[0]}.{dataset}-{args.split}.json"
        report = {"command": shlex.join(["python"] + sys.argv), "checkpoint": args.checkpoint, "dataset": dataset,
                  "split": args.split, "images": len(data), "mode": mode, "crop_size": crop, "stride": stride,
                  "base_size": base_size, "miou": as_percent(scores["miou"]),
                  "pixel_acc": as_percent(scores["pixel_acc"]),
                  "iou_per_class": dict(zip(data.classes, as_percent(scores["iou"]))), "units": "percent"}
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    if du.is_dist():
        torch.distributed.destroy_process_group()
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
