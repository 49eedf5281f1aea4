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

# Classes and geometry of each dataset, as in the mmseg pipelines the paper follows (docs/DATASETS.md): images are
# rescaled by min(base_size / short side, max_size / long side) (mmcv's keep-ratio rule; None: no bound), at training
# before the random ratio, at test before inference; the metric is computed at native size. `regions`: class unions
# reported with IoU and Dice (REFUGE's optic disc is rim + cup).
DATASETS = {
    "synthetic": dict(classes=SYNTHETIC_CLASS_NAMES, base_size=None, max_size=None, mode="whole", stride=None),
    "voc": dict(classes=VOC_CLASSES, base_size=513, max_size=2049, mode="whole", stride=None),
    "cityscapes": dict(classes=CITYSCAPES_CLASSES, base_size=1025, max_size=2049, mode="slide", stride=513),
    "isic2017": dict(classes=("background", "lesion"), base_size=512, max_size=None, mode="whole", stride=None),
    "refuge": dict(classes=("background", "optic disc rim", "optic cup"), base_size=512, max_size=None, mode="whole",
                   stride=None, regions={"optic disc": (1, 2), "optic cup": (2,)}),
    "folder": dict(classes=None, base_size=None, max_size=None, mode="whole", stride=None),
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


def rescaled_size(w, h, base_size=None, max_size=None, ratio=1.0):
    """(w, h) scaled by ratio * min(base_size / short side, max_size / long side), mmcv's keep-ratio rule (a bound
    that is None is no bound), sides rounded as mmcv does."""
    bounds = [b / side for b, side in ((base_size, min(w, h)), (max_size, max(w, h))) if b]
    s = ratio * (min(bounds) if bounds else 1.0)
    return max(1, int(w * s + 0.5)), max(1, int(h * s + 0.5))


class EvalTransform:
    """Test pipeline: image rescaled (`rescale`: short side to `base_size`, long side at most `max_size`),
    normalized -> (3, h, w); the mask stays at native size -> (H, W) int64, as mmseg scores predictions resized
    back to the original."""

    def __init__(self, base_size=None, max_size=None):
        self.base_size, self.max_size = base_size, max_size

    def __call__(self, image, mask):
        size = rescaled_size(*image.size, self.base_size, self.max_size)
        image = image.resize(size, Image.BILINEAR) if size != image.size else image
        return to_tensor(image), torch.from_numpy(np.asarray(mask, dtype=np.int64))


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


class TrainTransform:
    """mmseg's training pipeline as the paper's configs set it (no photometric distortion, no cat_max_ratio):
    rescale (`rescaled_size` with a ratio ~ U(scale_range)), a random crop x crop window, horizontal flip with
    p = 0.5, then padding bottom-right where the image is smaller than the crop (image with 0 = the mean colour
    after normalization, mask with 255).
    (PIL image, (H, W) ids) -> (3, crop, crop) float, (crop, crop) int64. Draws from python `random`."""

    def __init__(self, crop_size, base_size=None, scale_range=(0.5, 2.0), max_size=None):
        self.crop, self.base_size, self.max_size, self.scale_range = crop_size, base_size, max_size, scale_range

    def __call__(self, image, mask):
        w, h = rescaled_size(*image.size, self.base_size, self.max_size, random.uniform(*self.scale_range))
        image, mask = image.resize((w, h), Image.BILINEAR), Image.fromarray(mask).resize((w, h), Image.NEAREST)
        left, top = random.randint(0, max(w - self.crop, 0)), random.randint(0, max(h - self.crop, 0))
        box = (left, top, left + min(self.crop, w), top + min(self.crop, h))  # inside the image: PIL pads with 0
        x = to_tensor(image.crop(box))
        y = torch.from_numpy(np.asarray(mask.crop(box), dtype=np.int64))
        if random.random() < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        pad = (0, self.crop - x.shape[2], 0, self.crop - x.shape[1])  # after the flip, as mmseg's Pad comes last
        return F.pad(x, pad).contiguous(), F.pad(y, pad, value=IGNORE_INDEX).contiguous()
