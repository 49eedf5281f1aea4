"""Labelled segmentation datasets of finetune_seg.py, eval.py and probe.py (the built-in scenes with their masks,
Pascal VOC + SBD, Cityscapes, ISIC 2017, REFUGE, any images/ + masks/ folder), their mask decoding, and the
fine-tuning pipeline: label fractions, iteration sampling, training and test transforms (docs/DATASETS.md).
"""
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import utils
from data import IMAGE_EXTENSIONS, SYNTHETIC_CLASS_NAMES, DataError, SyntheticScenes, find_files, load_rgb, to_tensor


# ---------------------------------------------------------------- labelled segmentation datasets
# (finetune_seg.py and eval.py)

IGNORE_INDEX = 255  # mmseg's: VOC's object borders, Cityscapes' unused classes, crop padding

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
# labelIds of the 19 evaluated classes, in trainId order (cityscapesScripts' labels.py); every other id -> ignore
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# Classes and geometry of each dataset (docs/DATASETS.md names the source of every value). `scale` and
# `test_scale` are mmseg's `scale` pairs for the training rescale (before its random ratio) and the test rescale:
# with `keep_ratio` an image is scaled by min(max(scale) / long side, min(scale) / short side), without it it becomes
# scale[0] x scale[1]; None: native size. The metric is computed at native size. `regions`: class unions reported
# with IoU and Dice (REFUGE's optic disc is rim + cup).
NATIVE = dict(scale=None, test_scale=None, keep_ratio=True, mode="whole", stride=None)
DATASETS = {
    "synthetic": dict(classes=SYNTHETIC_CLASS_NAMES, **NATIVE),
    "voc": dict(classes=VOC_CLASSES, scale=(2049, 513), test_scale=(2049, 513), keep_ratio=True, mode="whole",
                stride=None),
    "cityscapes": dict(classes=CITYSCAPES_CLASSES, scale=(2049, 1025), test_scale=(2049, 1025), keep_ratio=True,
                       mode="slide", stride=513),
    "isic2017": dict(classes=("background", "lesion"), scale=(512, 512), test_scale=(512, 512), keep_ratio=False,
                     mode="whole", stride=None),
    "refuge": dict(classes=("background", "optic disc rim", "optic cup"), scale=(2056, 2124),
                   test_scale=(1634, 1634), keep_ratio=True, mode="whole", stride=None,
                   regions={"optic disc": (1, 2), "optic cup": (2,)}),
    "folder": dict(classes=None, **NATIVE),
}
SYNTHETIC_SPLIT_SEEDS = {"train": 100, "val": 101, "test": 102}  # pretrain.py's scenes use --seed (0)
TEST_IS_VAL = ("voc", "cityscapes")  # no public test labels: the paper reports val2012 and val.fine


LAYOUTS = "see docs/DATASETS.md, 'Dataset layouts'"  # where the error messages send the reader


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
    """REFUGE Disc_Cup_Masks grey levels: 255 background -> 0, 128 optic disc rim -> 1, 0 optic cup -> 2;
    other levels go to the nearest of the three (the .bmp files are lossless, but copies may not be)."""
    v = np.arange(256)
    return np.where(v >= 192, 0, np.where(v >= 64, 1, 2)).astype(np.int16)


def refuge_mmseg_lut():
    """mmseg's converted REFUGE annotations (tools/dataset_converters/refuge.py): 0 background, 1 optic cup,
    2 optic disc rim -> our order (0 background, 1 rim, 2 cup)."""
    lut = np.full(256, -1, np.int16)
    lut[[0, 1, 2, IGNORE_INDEX]] = [0, 2, 1, IGNORE_INDEX]
    return lut


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
    warnings = ()

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
    warnings = ()

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
    """Every file under `folder` (recursive, sorted, each real file once) whose name ends in one of `extensions`."""
    return find_files(folder, extensions)[0]


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


VOC_AUG_LISTS = (("aug.txt", "SBD's images that are not in VOC train or val (mmseg)"),
                 ("trainaug.txt", "VOC train + SBD (mmseg)"), ("train_aug.txt", "VOC train + SBD (DeepLab)"))


def voc_pairs(root, split):
    """Pascal VOC 2012 with SBD, the voc12aug layout under VOCdevkit/VOC2012: train = train.txt (masks in
    SegmentationClass) + the SBD images of the first aug list found, aug.txt, trainaug.txt or train_aug.txt (masks in
    SegmentationClassAug) = 10582 images; val and test = val.txt (1449; the test labels are not public and the paper
    reports val2012). Returns (pairs, warning or None): without an aug list, train.txt alone and a warning."""
    if not os.path.isdir(os.path.join(root, "JPEGImages")) and os.path.isdir(os.path.join(root, "VOC2012")):
        root = os.path.join(root, "VOC2012")
    lists = os.path.join(root, "ImageSets", "Segmentation")
    warning = None
    sources = [("train.txt" if split == "train" else "val.txt", "SegmentationClass")]
    if split == "train":
        aug = next((name for name, _ in VOC_AUG_LISTS if os.path.isfile(os.path.join(lists, name))), None)
        if aug:
            sources.append((aug, "SegmentationClassAug"))
        else:
            warning = (f"no aug.txt, trainaug.txt or train_aug.txt in {lists}: training on VOC train.txt only (1464 "
                       f"images, not the paper's 10582; {LAYOUTS})")
    pairs = {}
    for list_name, mask_dir in sources:
        path = os.path.join(lists, list_name)
        if not os.path.isfile(path):
            raise DataError(f"--data-root {root}: no list file {path} (VOC 2012 layout, {LAYOUTS})")
        with open(path) as f:
            for name in (line.split()[0] for line in f if line.strip()):
                mask = os.path.join(root, mask_dir, name + ".png")
                if mask_dir == "SegmentationClassAug" and not os.path.isfile(mask):  # a VOC train id in trainaug
                    mask = os.path.join(root, "SegmentationClass", name + ".png")
                pairs.setdefault(name, (os.path.join(root, "JPEGImages", name + ".jpg"), mask))
    return existing_pairs(list(pairs.values())), warning


def cityscapes_pairs(root, split):
    """Cityscapes fine annotations: leftImg8bit/{split}/CITY/*_leftImg8bit.png with
    gtFine/{split}/CITY/*_gtFine_labelIds.png; test = val (the test labels are not public; the paper reports
    val.fine)."""
    split = "val" if split == "test" else split
    image_dir = os.path.join(root, "leftImg8bit", split)
    if not os.path.isdir(image_dir):
        raise DataError(f"--data-root {root}: no folder {image_dir} (Cityscapes layout, {LAYOUTS})")
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
    image_dir = find_folder(root, (image_name,), f"ISIC 2017 layout, {LAYOUTS}")
    mask_dir = find_folder(root, (mask_name,), f"ISIC 2017 layout, {LAYOUTS}")
    return pair_by_stem(files_under(image_dir, (".jpg", ".jpeg")), files_under(mask_dir, (".png",)),
                        lambda stem: stem + "_segmentation", mask_dir)


REFUGE_FOLDERS = {"train": (("Training400", "REFUGE-Training400"), ("Annotation-Training400",)),
                  "val": (("REFUGE-Validation400",), ("REFUGE-Validation400-GT",)),
                  "test": (("Test400", "REFUGE-Test400"), ("REFUGE-Test-GT",))}


SPLIT_ALIASES = {"train": ("train", "training"), "val": ("val", "validation"), "test": ("test",)}


def split_folder(parent, split):
    """PARENT/split, or PARENT/training (validation) for train (val) when that is the one that exists."""
    for name in SPLIT_ALIASES[split]:
        if os.path.isdir(os.path.join(parent, name)):
            return os.path.join(parent, name)
    return os.path.join(parent, split)


def refuge_pairs(root, split):
    """REFUGE (2018), as the six official archives unpack under the root: fundus .jpg files under Training400
    (Glaucoma/, Non-Glaucoma/), REFUGE-Validation400, Test400; the Disc_Cup_Masks .bmp of the same stem under
    Annotation-Training400, REFUGE-Validation400-GT, REFUGE-Test-GT. Or mmseg's converted layout,
    images/{training,validation,test}/*.png + annotations/{...}/*.png. Returns (pairs, the masks' lookup table)."""
    if os.path.isdir(os.path.join(root, "images")) and os.path.isdir(os.path.join(root, "annotations")):
        image_dir, mask_dir = split_folder(os.path.join(root, "images"), split), \
            split_folder(os.path.join(root, "annotations"), split)
        if not os.path.isdir(image_dir):
            raise DataError(f"--data-root {root}: no folder {image_dir} (mmseg's REFUGE layout, {LAYOUTS})")
        return pair_by_stem(files_under(image_dir, (".png", ".jpg")), files_under(mask_dir, (".png",)),
                            lambda stem: stem, mask_dir), refuge_mmseg_lut()
    image_names, mask_names = REFUGE_FOLDERS[split]
    image_dir = find_folder(root, image_names, f"REFUGE layout, {LAYOUTS}")
    mask_dir = find_folder(root, mask_names, f"REFUGE layout, {LAYOUTS}")
    return pair_by_stem(files_under(image_dir, (".jpg", ".jpeg", ".png")), files_under(mask_dir, (".bmp", ".png")),
                        lambda stem: stem, mask_dir), refuge_lut()


def folder_pairs(root, split):
    """Any dataset as images/{split}/NAME.ext (any image type, sub-folders allowed) + masks/{split}/NAME.png
    holding class ids 0..K-1 (255 = ignore); `training` and `validation` are read as `train` and `val`."""
    image_dir = split_folder(os.path.join(root, "images"), split)
    mask_dir = os.path.join(root, "masks", os.path.basename(image_dir))
    if not os.path.isdir(image_dir):
        raise DataError(f"--data-root {root}: no folder {image_dir} (images/ + masks/ layout, {LAYOUTS})")
    images = files_under(image_dir, IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"--data-root {root}: no images in {image_dir}")
    pairs = [(f, os.path.join(mask_dir, os.path.splitext(os.path.relpath(f, image_dir))[0] + ".png")) for f in images]
    return existing_pairs(pairs)


def folder_classes(root, num_classes=None):
    """Class names of --dataset folder: the lines of ROOT/classes.txt when there is one (the count must agree with
    `num_classes` when both are given), else class0..class{K-1}."""
    path = os.path.join(root, "classes.txt")
    if not os.path.isfile(path):
        if num_classes is None:
            raise DataError(f"--dataset folder needs --num-classes, or a classes.txt in {root} (one name per line)")
        return tuple(f"class{k}" for k in range(num_classes))
    with open(path) as f:
        names = tuple(line.strip() for line in f if line.strip())
    if not 2 <= len(names) <= 255 or (num_classes is not None and len(names) != num_classes):
        raise DataError(f"{path}: {len(names)} class names" + (f", but --num-classes {num_classes}"
                                                               if num_classes is not None else " (need 2 to 255)"))
    return names


def build_dataset(name, split, root=None, num_classes=None, synthetic_lengths=(256, 32, 64), synthetic_size=128):
    """The `split` ('train', 'val' or 'test') of dataset `name`, untransformed: items are (PIL image, mask ids);
    `.warnings` lists what the run summary repeats (a VOC training set without SBD). Raises DataError (one line,
    naming the flag or file) for a missing root, folder, image or mask."""
    if name == "synthetic":
        length = dict(zip(("train", "val", "test"), synthetic_lengths))[split]
        return SyntheticSegmentation(length, synthetic_size, SYNTHETIC_SPLIT_SEEDS[split])
    if root is None:
        raise DataError(f"--data-root is required for --dataset {name}")
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root}: no such folder")
    warning = None
    if name == "folder":
        classes = folder_classes(root, num_classes)
        pairs, lut, grey = folder_pairs(root, split), class_id_lut(len(classes)), False
    elif name == "voc":
        (pairs, warning), lut, grey = voc_pairs(root, split), class_id_lut(len(VOC_CLASSES)), False
    elif name == "refuge":
        (pairs, lut), grey = refuge_pairs(root, split), True
    else:
        lister, lut, grey = {"cityscapes": (cityscapes_pairs, cityscapes_lut(), False),
                             "isic2017": (isic2017_pairs, isic_lut(), True)}[name]
        pairs = lister(root, split)
    if not pairs:
        raise DataError(f"--data-root {root}: no {split} images found for --dataset {name}")
    dataset = LabelledImages(pairs, classes if name == "folder" else DATASETS[name]["classes"], lut, grey)
    dataset.warnings = [warning] if warning else []
    if warning and utils.is_main():
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    return dataset


def check_dataset(dataset, indices=None, threads=8):
    """Decode every mask among `indices` (default all; sharded over ranks) and compare its size with the image's,
    so a bad file stops the run before training rather than hours in. Raises the first DataError in index order."""
    indices = list(range(len(dataset)) if indices is None else indices)[utils.rank()::utils.world_size()]
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


# ---------------------------------------------------------------- mmcv's resizing, with cv2's rules, in numpy

def rescaled_size(w, h, scale=None, ratio=1.0, keep_ratio=True):
    """(w, h) after mmcv's RandomResize + Resize: the `scale` pair times `ratio`, each side truncated; with
    `keep_ratio` the image is scaled by f = min(max(pair) / long side, min(pair) / short side) and its sides
    rounded, int(side * f + 0.5) (mmcv's rescale_size); without it, it becomes pair[0] x pair[1]. `scale` None:
    the native size times `ratio`."""
    if scale is None:
        return max(1, int(w * ratio + 0.5)), max(1, int(h * ratio + 0.5))
    a, b = int(scale[0] * ratio), int(scale[1] * ratio)
    if not keep_ratio:
        return max(1, a), max(1, b)
    f = min(max(a, b) / max(w, h), min(a, b) / min(w, h))
    return max(1, int(w * f + 0.5)), max(1, int(h * f + 0.5))


def nearest_taps(n_in, n_out, start, stop):
    """Source indices of outputs start..stop-1 of a side resized n_in -> n_out, cv2's INTER_NEAREST:
    floor(i / (n_out / n_in)), at most n_in - 1."""
    return np.minimum(np.floor(np.arange(start, stop) * (1.0 / (n_out / n_in))).astype(np.int64), n_in - 1)


def linear_taps(n_in, n_out, start, stop):
    """(i0, i1, w0, w1) of outputs start..stop-1 of a side resized n_in -> n_out, cv2's INTER_LINEAR: the source
    position (i + 0.5) * n_in / n_out - 0.5 in float32, clamped to the first and last pixel, weights in 1/2048."""
    f = ((np.arange(start, stop) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = f - i0.astype(np.float32)
    f[i0 < 0], i0[i0 < 0] = 0, 0
    f[i0 >= n_in - 1], i0[i0 >= n_in - 1] = 0, n_in - 1
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    return i0, np.minimum(i0 + 1, n_in - 1), w0, w1


def resize_window(array, size, box=None, mode="bilinear"):
    """The window `box` = (left, top, right, bottom) (default: all) of the (H, W[, C]) uint8 `array` resized to
    `size` = (w, h) as mmcv resizes with cv2: 'nearest' (masks) or 'bilinear' (images: a horizontal pass in
    integers, then the vertical pass in cv2's fixed point, ((r0 >> 4) * w0 >> 16) + ((r1 >> 4) * w1 >> 16) + 2 >> 2).
    Only the window is computed, so a crop of a large rescale costs what the crop costs."""
    h_in, w_in = array.shape[:2]
    left, top, right, bottom = box or (0, 0, *size)
    if (w_in, h_in) == tuple(size):
        return array[top:bottom, left:right].copy()
    if mode == "nearest":
        rows, cols = nearest_taps(h_in, size[1], top, bottom), nearest_taps(w_in, size[0], left, right)
        return array[rows[:, None], cols]
    y0, y1, v0, v1 = linear_taps(h_in, size[1], top, bottom)
    x0, x1, u0, u1 = linear_taps(w_in, size[0], left, right)
    extra = (None,) * (array.ndim - 2)
    u0, u1 = u0[(slice(None), *extra)], u1[(slice(None), *extra)]
    rows = lambda y: array[y][:, x0].astype(np.int32) * u0 + array[y][:, x1].astype(np.int32) * u1
    v0, v1 = v0[(slice(None), None, *extra)], v1[(slice(None), None, *extra)]
    out = (((rows(y0) >> 4) * v0 >> 16) + ((rows(y1) >> 4) * v1 >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


class EvalTransform:
    """Test pipeline (mmseg's Resize(test_scale, keep_ratio)): the image rescaled, normalized -> (3, h, w); the mask
    stays at native size -> (H, W) int64, as mmseg scores predictions resized back to the original."""

    def __init__(self, scale=None, keep_ratio=True):
        self.scale, self.keep_ratio = scale, keep_ratio

    def __call__(self, image, mask):
        size = rescaled_size(*image.size, self.scale, 1.0, self.keep_ratio)
        x = resize_window(np.asarray(image), size)
        return to_tensor(x), torch.from_numpy(np.asarray(mask, dtype=np.int64))


# ---------------------------------------------------------------- fine-tuning: label fractions, sampling, crops

def fraction_indices(n, fraction, seed):
    """Training subset for (fraction, seed): the first max(1, round(fraction * n)) of a seeded permutation of
    range(n), sorted. A seed's subsets are nested (its 5% lies inside its 25%)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return sorted(perm[:max(1, round(fraction * n))].tolist())


class IterationSampler(torch.utils.data.Sampler):
    """This rank's samples of `iters` global batches, drawn from seeded permutations of the n training images
    concatenated as often as needed (a 5% subset may hold fewer images than a batch). Yields epoch * n + index,
    the key SeededAugment turns into the sample's own RNG state, so the batches and their augmentations depend on
    the seed alone, not on the number of processes or workers."""

    def __init__(self, n, iters, batch_per_rank, seed):
        self.n, self.iters, self.batch, self.seed = n, iters, batch_per_rank, seed
        self.rank, self.world = utils.rank(), utils.world_size()

    def __len__(self):
        return self.iters * self.batch

    def __iter__(self):
        total = self.iters * self.batch * self.world
        g = torch.Generator().manual_seed(self.seed)
        epochs = -(-total // self.n)
        stream = torch.cat([torch.randperm(self.n, generator=g) + e * self.n for e in range(epochs)])[:total]
        return iter(stream.view(self.iters, self.world, self.batch)[:, self.rank].flatten().tolist())


# ---------------------------------------------------------------- the training pipeline

def crop_box(w, h, crop, rng, window_ids=None, cat_max_ratio=1.0):
    """mmseg's RandomCrop window (left, top, right, bottom) in a w x h image: top ~ randint(0, h - crop + 1), then
    left alike (0 where the side is shorter than the crop). With cat_max_ratio < 1 the window is drawn again, up to
    10 times, until its labels (`window_ids(box)`, 255 left out) hold two classes or more and none of them covers
    `cat_max_ratio` of it or more; the 11th draw is kept unchecked."""
    def draw():
        top, left = rng.randint(0, max(h - crop, 0) + 1), rng.randint(0, max(w - crop, 0) + 1)
        return left, top, min(left + crop, w), min(top + crop, h)
    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            ids, counts = np.unique(window_ids(box), return_counts=True)
            counts = counts[ids != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


def rgb_to_hsv(rgb):
    """(..., 3) uint8 RGB -> uint8 HSV with H in 0..179, OpenCV's COLOR_RGB2HSV (12-bit fixed point)."""
    r, g, b = (rgb[..., i].astype(np.int64) for i in range(3))
    v, diff = np.maximum(np.maximum(r, g), b), np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    table = lambda num, den: np.where(den > 0, np.rint(num / np.maximum(den, 1)), 0).astype(np.int64)
    s = (diff * table(255 << 12, v.astype(np.float64)) + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * table(180 << 12, 6.0 * diff) + (1 << 11)) >> 12
    return np.stack([h + 180 * (h < 0), s, v], -1).astype(np.uint8)


def hsv_to_rgb(hsv):
    """(..., 3) uint8 HSV (H in 0..179) -> uint8 RGB, OpenCV's COLOR_HSV2RGB as its vector code computes it:
    float32, 1 - s * f fused (one rounding, as an FMA instruction does; the exact float64 product rounded once),
    truncated to uint8. OpenCV's scalar code, which converts the last pixels of a row whose width is not a multiple
    of the vector width (16, 32 or 64 pixels, by CPU), rounds instead."""
    f32, one = np.float32, np.float32(1)
    h = hsv[..., 0].astype(f32) * (f32(6) / f32(180))
    s, v = (hsv[..., i].astype(f32) * (one / f32(255)) for i in (1, 2))
    sector = np.floor(h).astype(np.int64)
    f = h - sector.astype(f32)
    fused = lambda a, b: (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)  # fma(-a, b, 1)
    tab = np.stack([v, v * (one - s), v * fused(s, f), v * fused(s, one - f)], -1)
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])  # (r, g, b) per sector
    rgb = np.take_along_axis(tab, order[sector], -1)
    return np.clip(rgb * f32(255), 0, 255).astype(np.uint8)


def photometric_distortion(image, rng, brightness=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=18):
    """mmseg's PhotoMetricDistortion on an (H, W, 3) uint8 RGB array, with its draws in its order: each step
    applies with p = 0.5: brightness + U(-32, 32); contrast x U(0.5, 1.5), either second or last (p = 0.5);
    saturation x U(0.5, 1.5) in HSV; hue + randint(-18, 18) (mod 180). Each step clips to 0..255 and truncates to
    uint8, as mmseg does."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def adjust_contrast(x):
        return convert(x, alpha=rng.uniform(*contrast)) if rng.randint(2) else x

    if rng.randint(2):
        image = convert(image, beta=rng.uniform(-brightness, brightness))
    contrast_first = rng.randint(2)
    if contrast_first:
        image = adjust_contrast(image)
    if rng.randint(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        image = hsv_to_rgb(hsv)
    if rng.randint(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.randint(-hue, hue)) % 180
        image = hsv_to_rgb(hsv)
    if not contrast_first:
        image = adjust_contrast(image)
    return image


class TrainTransform:
    """mmseg's training pipeline, its steps and random draws in its order: RandomResize(scale, ratio_range,
    keep_ratio) (`rescaled_size`, cv2's bilinear / nearest), RandomCrop(crop, cat_max_ratio) (`crop_box`),
    RandomFlip(0.5), PhotoMetricDistortion when `photometric`, then the SegDataPreProcessor's padding bottom-right
    to crop x crop where the image is smaller (image 0 after normalization, i.e. the mean colour; mask 255).
    (PIL image, (H, W) ids) -> (3, crop, crop) float, (crop, crop) int64. The draws come from `rng`, by default a
    numpy RandomState seeded by python `random` (which SeededAugment seeds per sample)."""

    def __init__(self, crop_size, scale=None, scale_range=(0.5, 2.0), keep_ratio=True, cat_max_ratio=1.0,
                 photometric=False):
        self.crop, self.scale, self.scale_range, self.keep_ratio = crop_size, scale, scale_range, keep_ratio
        self.cat_max_ratio, self.photometric = cat_max_ratio, photometric

    def __call__(self, image, mask, rng=None):
        rng = rng or np.random.RandomState(random.getrandbits(32))
        lo, hi = self.scale_range
        size = rescaled_size(*image.size, self.scale, rng.random_sample() * (hi - lo) + lo, self.keep_ratio)
        mask = np.asarray(mask)
        window = lambda box: resize_window(mask, size, box, "nearest")
        box = crop_box(*size, self.crop, rng, window, self.cat_max_ratio)
        x, y = resize_window(np.asarray(image), size, box), window(box)
        if rng.random_sample() < 0.5:
            x, y = x[:, ::-1], y[:, ::-1]
        if self.photometric:
            x = photometric_distortion(np.ascontiguousarray(x), rng)
        x, y = to_tensor(np.ascontiguousarray(x)), torch.from_numpy(y.astype(np.int64))
        pad = (0, self.crop - x.shape[2], 0, self.crop - x.shape[1])
        return F.pad(x, pad).contiguous(), F.pad(y, pad, value=IGNORE_INDEX).contiguous()
