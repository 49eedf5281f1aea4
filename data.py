"""Data: robust image decoding, an unlabeled image folder, the built-in synthetic scenes, the two-view
augmentations of SlotCon (with the overlap box each view needs for invaug) and DenseCL, and the labelled
segmentation datasets of the downstream scripts (synthetic, VOC, Cityscapes, ISIC 2017, REFUGE, folder), and the
detection datasets with COCO's mask format (synthetic scenes with their objects, Pascal VOC, COCO).

A pre-training sample is (views (2, 3, H, W), coords (2, 4), flags (2,)): coords[v] is the two crops' overlap in
view v's normalized coordinates (after its flip), flags[v] whether view v was flipped.
"""
import hashlib
import json
import math
import os
import pickle
import random
import signal
import sys
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import utils

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error we report, not a grey half-image


# ---------------------------------------------------------------- decoding

class DataError(ValueError):
    """A dataset that cannot be used as given: the message is one line naming the file or flag."""


def load_rgb(path):
    """Open any image as 8-bit RGB: EXIF orientation applied; grayscale, palette, RGBA/LA (on black),
    CMYK and 16-bit / 32-bit integer images converted. Raises OSError naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
    except Exception as e:  # PIL raises many types for bad files
        raise OSError(f"cannot decode image {path}: {e}") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGB", im.size)
        background.paste(im, mask=im.getchannel("A"))
        im = background
    return im.convert("RGB")


_reported = set()


def warn_once(message):
    if message not in _reported:
        _reported.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


def find_files(root, extensions):
    """Every file under `root` whose name ends in one of `extensions` (lower case), recursive, sorted, and the
    number of paths left out as duplicates. Symbolic links are followed, but each real directory is visited once
    and each real file listed once, so a link loop neither repeats the images nor hangs the listing. macOS archive
    leftovers (`__MACOSX/` folders, `._*` files) are skipped."""
    seen_dirs, seen_files, files, dropped = set(), set(), [], 0
    for d, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(d)
        if real in seen_dirs:  # reached again through a link: its files are listed already
            dirs[:] = []
            dropped += sum(n.lower().endswith(extensions) for n in names)
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(x for x in dirs if x != "__MACOSX")
        for name in names:
            if name.startswith("._") or not name.lower().endswith(extensions):
                continue
            path = os.path.join(d, name)
            key = os.path.realpath(path) if os.path.islink(path) else os.path.join(real, name)
            if key in seen_files:
                dropped += 1
            else:
                seen_files.add(key)
                files.append(path)
    return sorted(files), dropped


def list_images(root):
    """Every image file under `root`, recursively, sorted (COCO's train2017/ works as is); see find_files."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data {root}: no such folder")
    files, dropped = find_files(root, IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"--data {root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
    if dropped and utils.is_main():
        print(f"note: --data {root}: {dropped} paths reached again through symbolic links were left out "
              f"({len(files)} distinct images)", flush=True)
    return files


class ImageFolder(torch.utils.data.Dataset):
    """Unlabeled images under `root` (recursive). A file that cannot be decoded is reported once by path and
    replaced by the next readable one, so a bad file never stops a run hours in."""

    def __init__(self, root, transform=None):
        self.root, self.files, self.transform = root, list_images(root), transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, idx):
        for k in range(len(self.files)):
            path = self.files[(idx + k) % len(self.files)]
            try:
                img = load_rgb(path)
            except OSError as e:
                warn_once(f"{e} (skipped)")
                continue
            return self.transform(img) if self.transform else img
        raise RuntimeError(f"no readable image among the {len(self.files)} files")

    def check(self):
        """Before training: decode files in order until one works; none working is an error naming the folder."""
        errors = []
        for path in self.files:
            try:
                load_rgb(path)
                return
            except OSError as e:
                errors.append(e)
        raise DataError(f"--data {self.root}: none of its {len(self.files)} image files can be decoded ({errors[0]})")


# ---------------------------------------------------------------- synthetic scenes

NUM_SYNTHETIC_CLASSES = 8  # objects; the masks use 0 for background and 1..8 for the objects
_SHAPES = ("disc", "square", "triangle", "diamond", "ring", "cross", "ellipse", "hexagon")
SYNTHETIC_CLASS_NAMES = ("background",) + _SHAPES  # class id -> name, as the masks number them
_TEXTURES = ("plain", "stripes", "checker", "dots")
_HUES = (0.0, 0.12, 0.33, 0.6)  # red, orange-yellow, green, blue families; each shared by two classes


def _shape_mask(name, u, v):
    """Inside-test of a unit shape on rotated, scaled coordinates u, v (arrays)."""
    r = np.hypot(u, v)
    if name == "disc":
        return r < 1
    if name == "square":
        return np.maximum(abs(u), abs(v)) < 0.85
    if name == "triangle":
        return (v > -0.6) & (v < 1.6 * (0.75 - abs(u)) - 0.6)
    if name == "diamond":
        return abs(u) + abs(v) < 1
    if name == "ring":
        return (r < 1) & (r > 0.55)
    if name == "cross":
        return (np.minimum(abs(u), abs(v)) < 0.3) & (np.maximum(abs(u), abs(v)) < 1)
    if name == "ellipse":
        return u ** 2 + (2 * v) ** 2 < 1
    if name == "hexagon":
        return np.maximum(abs(v) * 1.1547 + abs(u) * 0.5774, abs(u)) < 0.9
    raise ValueError(name)


def _texture(name, u, v, rng):
    """Texture pattern in [0, 1] in object coordinates (it rotates and scales with the object)."""
    f = rng.uniform(2.5, 4.0)
    if name == "plain":
        return 0.5 + 0.15 * u
    if name == "stripes":
        return (np.sin(f * math.pi * u) > 0).astype(np.float64)
    if name == "checker":
        return ((np.floor(f * u) + np.floor(f * v)) % 2).astype(np.float64)
    if name == "dots":
        return (np.hypot((f * u) % 1 - 0.5, (f * v) % 1 - 0.5) < 0.3).astype(np.float64)
    raise ValueError(name)


def _hsv_to_rgb(h, s, v):
    """Vectorized HSV -> RGB, all arrays in [0, 1]."""
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [c[k] for c in choices]) for k in range(3)], -1)


def synthetic_scene(idx, size=128, seed=0, instances=False):
    """One procedural scene: (image uint8 (size, size, 3), mask uint8 (size, size)), deterministic in
    (seed, idx). A textured, shaded background with 3-6 occluding objects; class c in 1..8 is a shape with a
    texture and a colour family that each class shares with others (shape alone identifies it), with random
    pose, scale, brightness and hue jitter, so that telling classes apart needs shape, not colour alone.
    With `instances`: (image, mask, masks (N, size, size) bool, classes (N,) int64 in 1..8), each object as it is
    seen after the later ones occlude it, in drawing order; an object hidden entirely is left out. The image and
    the mask are the same either way (the same draws)."""
    rng = np.random.default_rng([seed, idx])
    yy, xx = np.mgrid[0:size, 0:size] / size * 2 - 1  # [-1, 1)
    # background: low-frequency colour field + its own texture, in a random hue
    bg_h = rng.uniform(0, 1) + 0.08 * np.sin(rng.uniform(1, 3) * xx + rng.uniform(0, 6))
    bg_v = 0.45 + 0.2 * np.sin(rng.uniform(1, 4) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 4) * yy)
    bg_v = bg_v + 0.08 * (np.sin(rng.uniform(8, 20) * (xx * math.cos(rng.uniform(0, 3)) + yy)) > 0)
    img = _hsv_to_rgb(bg_h % 1, np.full_like(xx, rng.uniform(0.1, 0.5)), np.clip(bg_v, 0, 1))
    mask = np.zeros((size, size), np.uint8)
    owner, classes = np.zeros((size, size), np.int64), []  # owner: 1 + index of the object on top, 0 = none
    for _ in range(rng.integers(3, 7)):
        c = int(rng.integers(NUM_SYNTHETIC_CLASSES))
        scale = rng.uniform(0.18, 0.42)
        cx, cy, theta = rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), rng.uniform(0, 2 * math.pi)
        aspect = rng.uniform(0.8, 1.25)
        dx, dy = (xx - cx) / scale, (yy - cy) / scale
        u = (dx * math.cos(theta) + dy * math.sin(theta)) * aspect
        v = (-dx * math.sin(theta) + dy * math.cos(theta)) / aspect
        inside = _shape_mask(_SHAPES[c], u, v)
        pattern = _texture(_TEXTURES[c % 4], u, v, rng)
        hue = (_HUES[(c // 2) % 4] + rng.uniform(-0.04, 0.04)) % 1
        value = rng.uniform(0.55, 0.95) * (0.65 + 0.35 * pattern)
        sat = rng.uniform(0.55, 0.95) * (0.8 + 0.2 * pattern)
        obj = _hsv_to_rgb(np.full_like(u, hue), sat, value)
        img[inside] = obj[inside]
        mask[inside] = c + 1
        classes.append(c + 1)
        owner[inside] = len(classes)
    img = img + rng.normal(0, 0.02, img.shape)
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if not instances:
        return image, mask
    masks = owner == np.arange(1, len(classes) + 1)[:, None, None]
    seen = masks.any((1, 2))
    return image, mask, masks[seen], np.array(classes, np.int64)[seen]


class SyntheticScenes(torch.utils.data.Dataset):
    """`length` synthetic scenes (the default pre-training data): returns transform(PIL image), or
    (PIL image, mask) with `with_mask`. Different `seed`s give disjoint, reproducible sets."""

    def __init__(self, length=2048, size=128, seed=0, transform=None, with_mask=False):
        self.length, self.size, self.seed, self.transform, self.with_mask = length, size, seed, transform, with_mask

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        image, mask = synthetic_scene(idx, self.size, self.seed)
        img = Image.fromarray(image)
        if self.with_mask:
            return img, mask
        return self.transform(img) if self.transform else img


# ---------------------------------------------------------------- pre-training: two views, seeded per sample

class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(0.1, 2), applied with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        if random.random() < self.p:
            return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        return img


class Solarize:
    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img, 128) if random.random() < self.p else img


def _colour(blur_p, solarize_p, jitter=(0.4, 0.4, 0.2, 0.1)):
    return T.Compose([T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(0.2), GaussianBlur(blur_p),
                      Solarize(solarize_p), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def overlap_coords(box, other):
    """Overlap of two boxes (x1, y1, x2, y2 in image pixels), normalized to `box`."""
    x1, y1 = max(box[0], other[0]), max(box[1], other[1])
    x2, y2 = min(box[2], other[2]), min(box[3], other[3])
    w, h = box[2] - box[0], box[3] - box[1]
    return [(x1 - box[0]) / w, (y1 - box[1]) / h, (x2 - box[0]) / w, (y2 - box[1]) / h]


class SlotConTwoView:
    """SlotCon's two crops: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3), bicubic); the second crop
    must cover at least 1% of its own area with the first (10 tries; if all fail we reuse the first box,
    where SlotCon falls back to a crop that may not overlap at all). Independent flips; view 1 always blurred,
    view 2 blurred with p=0.1 and solarized with p=0.2."""

    def __init__(self, size=224, min_scale=0.08):
        self.size, self.scale, self.ratio = size, (min_scale, 1.0), (3 / 4, 4 / 3)
        self.colour = (_colour(1.0, 0.0), _colour(0.1, 0.2))

    def __call__(self, img):
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        boxes = [(j, i, j + w, i + h)]
        for _ in range(10):
            i2, j2, h2, w2 = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
            ix = max(0, min(j + w, j2 + w2) - max(j, j2))
            iy = max(0, min(i + h, i2 + h2) - max(i, i2))
            if ix * iy >= 0.01 * w2 * h2:
                boxes.append((j2, i2, j2 + w2, i2 + h2))
                break
        else:
            boxes.append(boxes[0])
        views, coords, flags = [], [], []
        for v, box in enumerate(boxes):
            crop = TF.resized_crop(img, box[1], box[0], box[3] - box[1], box[2] - box[0], [self.size, self.size],
                                   T.InterpolationMode.BICUBIC)
            c = overlap_coords(box, boxes[1 - v])
            flip = random.random() < 0.5
            if flip:
                crop, c = TF.hflip(crop), [1 - c[2], c[1], 1 - c[0], c[3]]
            views.append(self.colour[v](crop))
            coords.append(c)
            flags.append(flip)
        return torch.stack(views), torch.tensor(coords, dtype=torch.float32), torch.tensor(flags)


class DenseCLTwoView:
    """DenseCL's two independent views: RandomResizedCrop (scale (0.2, 1)), ColorJitter(0.4, 0.4, 0.4, 0.1)
    p=0.8, grayscale p=0.2, blur p=0.5, flip. DenseCL needs no boxes: coords are the full view, flags False."""

    def __init__(self, size=224, min_scale=0.2):
        self.view = T.Compose([T.RandomResizedCrop(size, scale=(min_scale, 1.0)), T.RandomHorizontalFlip(),
                               T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
                               GaussianBlur(0.5), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __call__(self, img):
        return (torch.stack([self.view(img), self.view(img)]), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2),
                torch.zeros(2, dtype=torch.bool))


def pretraining_dataset(framework, image_size, min_scale, seed, folder=None, synthetic_images=2048):
    """The two-view pre-training set: --data `folder` (checked: at least one image decodes), or the built-in scenes;
    each sample's augmentation drawn from its own seed (SeededAugment)."""
    view = SlotConTwoView if framework == "slotcon" else DenseCLTwoView
    transform = view(image_size, min_scale)
    if folder is None:
        base = SyntheticScenes(synthetic_images, size=max(128, image_size), seed=seed, transform=transform)
    else:
        base = ImageFolder(folder, transform)
        base.check()
    return SeededAugment(base, seed)


def data_fingerprint(dataset):
    """{"images": n, "files_sha1": hash of the sorted file list (or of the scenes' definition)}, kept in last.pt
    so that a resume on other data can say so."""
    base = dataset.dataset
    if isinstance(base, ImageFolder):
        names = "\n".join(os.path.relpath(f, base.root) for f in base.files)
    else:
        names = f"synthetic scenes {base.length} size {base.size} seed {base.seed}"
    return {"images": len(base), "files_sha1": hashlib.sha1(names.encode()).hexdigest()}


class SeededAugment(torch.utils.data.Dataset):
    """Makes the random augmentation of sample i in epoch e a function of (seed, e, i) alone, whatever the
    number of workers or processes: the sampler yields e * n + i, and each draw runs under its own RNG state."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, idx = divmod(key, len(self.dataset))
        s = (self.seed * 1_000_003 + epoch) * 10_000_019 + idx
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            torch.manual_seed(s % 2 ** 63)
            out = self.dataset[idx]
        random.setstate(state)
        return out


class EpochSampler(torch.utils.data.Sampler):
    """Per-rank sampler over a seeded permutation per epoch, trimmed to whole global batches, that can start
    mid-epoch (`start_batch`) so a resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, n, batch_per_rank, seed):
        self.n, self.batch, self.seed = n, batch_per_rank, seed
        self.rank, self.world = utils.rank(), utils.world_size()
        self.batches = n // (batch_per_rank * self.world)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return (self.batches - self.start_batch) * self.batch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: self.batches * self.batch * self.world]
        mine = order.view(self.batches, self.world, self.batch)[self.start_batch:, self.rank].flatten()
        return iter((mine + self.epoch * self.n).tolist())


def seed_worker(worker_id):
    """DataLoader worker start: python `random` (the augmentations) follows torch's per-worker seed, and SIGTERM
    is ignored. A scheduler signals the whole process group; the main process decides (it saves and exits, and
    the workers exit with it): a worker killed by the signal would make the main process fail before saving.
    The worker closes its copy of the output folder's lock file (utils.lock_output_dir)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    utils.close_locks_in_child()
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


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


def to_tensor(image):
    """PIL RGB -> (3, H, W) float, ImageNet-normalized (what the encoder was pre-trained on)."""
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)


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


# ---------------------------------------------------------------- detection datasets
# (finetune_det.py and eval.py): COCO's mask format, the synthetic scenes with their objects, Pascal VOC, COCO.
#
# An item is (PIL RGB image, annotations): a list of {"id", "bbox": [x, y, w, h] in continuous pixel coordinates
# (COCO's convention: pixel (i, j) covers [j, j + 1) x [i, i + 1)), "label": 1..K (0 is the detector's background),
# "iscrowd", "area", "segmentation": COCO polygons, an RLE dict or an (h, w) bool array, or None} and, for VOC,
# "difficult" and "xml_box" (the file's 1-based [xmin, ymin, xmax, ymax], which the VOC metric compares with).

# COCO masks. A mask is read column by column ("Fortran" order: pixel (y, x) is number x * h + y); its run-length
# encoding (RLE) lists the lengths of the alternating runs of 0s and 1s, starting with 0s. COCO files store the
# lengths as a compressed string, and polygons as flat [x0, y0, x1, y1, ...] lists rasterised by pycocotools' rule.

def ranks_in_groups(group):
    """Position of each element inside its run of equal values. group: (N,) sorted ids -> (N,) int."""
    group = np.asarray(group)
    return np.arange(group.size) - np.searchsorted(group, group, side="left")


def segment_cumsum(values, segment):
    """Inclusive cumulative sum that restarts at each new segment. values (N,), segment (N,) sorted -> (N,)."""
    values = np.asarray(values)
    if values.size == 0:
        return values.copy()
    total = np.cumsum(values)
    new = np.ones(values.size, bool)
    new[1:] = segment[1:] != segment[:-1]
    start = np.flatnonzero(new)
    return total - (total[start] - values[start])[np.cumsum(new) - 1]


def counts_to_string(counts):
    """Run lengths (m,) -> COCO's compressed string. Each number from index 3 on is replaced by its difference to
    the number two places before; then each is written in 5-bit groups, least significant first, one character
    per group: 48 + group + 32 if more groups follow; the last group's 0x10 bit is the sign (two's complement)."""
    counts = np.asarray(counts, np.int64).ravel()
    x = counts.copy()
    x[3:] -= counts[1:-2]
    nchar = np.ones(x.size, np.int64)
    for bits in range(5, 64, 5):  # one more character while x does not fit in `bits` signed bits
        nchar += (x >= (1 << (bits - 1))) | (x < -(1 << (bits - 1)))
    owner = np.repeat(np.arange(x.size), nchar)
    k = ranks_in_groups(owner)
    chars = ((x[owner] >> (5 * k)) & 0x1F) + 48 + 32 * (k < nchar[owner] - 1)
    return chars.astype(np.uint8).tobytes().decode("ascii")


def strings_to_counts(strings):
    """Many compressed strings (str or bytes) at once, the inverse of counts_to_string -> (counts (M,) int64,
    bounds (n + 1,)): the run lengths of string i are counts[bounds[i]:bounds[i + 1]]."""
    raw = [s.encode("ascii") if isinstance(s, str) else bytes(s) for s in strings]
    char_bounds = np.concatenate(([0], np.cumsum([len(r) for r in raw]))).astype(np.int64)
    c = np.frombuffer(b"".join(raw), np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64), np.zeros(len(raw) + 1, np.int64)
    last = (c & 0x20) == 0  # the character ends a number
    if not last[char_bounds[1:][np.diff(char_bounds) > 0] - 1].all():
        raise ValueError("truncated RLE string")
    first = np.flatnonzero(np.concatenate(([True], last[:-1])))
    number = np.cumsum(last) - last
    value = np.add.reduceat((c & 0x1F) << (5 * (np.arange(c.size) - first[number])), first)
    nchar = np.diff(np.append(first, c.size))
    value -= ((c[last] & 0x10) != 0).astype(np.int64) << (5 * nchar)  # sign extension
    bounds = np.concatenate(([0], np.cumsum(last)))[char_bounds]
    owner = np.repeat(np.arange(len(raw)), np.diff(bounds))
    j = np.arange(value.size) - bounds[owner]
    for chain in (j % 2 == 1, (j % 2 == 0) & (j >= 2)):  # undo the differences to the number two places before
        idx = np.flatnonzero(chain)
        value[idx] = segment_cumsum(value[idx], owner[idx])
    return value, bounds


def rle_counts_many(rles):
    """Run lengths of many RLE dicts (compressed or list counts) -> (counts, bounds) as strings_to_counts."""
    if all(isinstance(r["counts"], (str, bytes)) for r in rles):
        return strings_to_counts([r["counts"] for r in rles])
    pieces = [strings_to_counts([r["counts"]])[0] if isinstance(r["counts"], (str, bytes))
              else np.asarray(r["counts"], np.int64).ravel() for r in rles]
    bounds = np.concatenate(([0], np.cumsum([p.size for p in pieces]))).astype(np.int64)
    return (np.concatenate(pieces) if pieces else np.zeros(0, np.int64)), bounds


def runs_of_ones(counts, bounds):
    """The runs of 1s of many masks: (starts, ends, owner), run r covering flat pixels [starts, ends) of mask
    owner[r], sorted by (owner, start), empty runs dropped."""
    owner = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    j = np.arange(counts.size) - bounds[owner]
    ends = segment_cumsum(counts, owner)
    keep = (j % 2 == 1) & (counts > 0)
    return ends[keep] - counts[keep], ends[keep], owner[keep]


def union_runs(starts, ends):
    """Union of possibly overlapping runs -> sorted, disjoint, non-touching (starts, ends)."""
    order = np.argsort(starts, kind="stable")
    starts, ends = starts[order], ends[order]
    if starts.size == 0:
        return starts, ends
    reach = np.maximum.accumulate(ends)
    new = np.ones(starts.size, bool)
    new[1:] = starts[1:] > reach[:-1]
    return starts[new], reach[np.append(np.flatnonzero(new)[1:] - 1, starts.size - 1)]


def polygon_toggles(xy, h, w):
    """Flat pixel numbers (sorted) where one polygon's mask switches on or off, pycocotools' rasteriser: vertices
    snap to a 5x finer grid with C's (int)(5 * v + 0.5) (truncation toward 0); each closed edge is walked one grid
    step at a time along its longer axis from its lower end, the other coordinate (int)(start + slope * t + 0.5);
    where the walk enters another column whose centre line it crosses at a column x in [0, w - 1], the row is
    ceil of its y mapped back to pixels, clamped to [0, h]. Pixels below an odd number of crossings in their
    column are inside. xy: flat [x0, y0, x1, y1, ...] (an odd trailing value is ignored)."""
    xy = np.asarray(xy, np.float64).ravel()
    k = xy.size // 2
    if k == 0:
        return np.zeros(0, np.int64)
    x0 = np.trunc(5.0 * xy[0:2 * k:2] + 0.5).astype(np.int64)
    y0 = np.trunc(5.0 * xy[1:2 * k:2] + 0.5).astype(np.int64)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    dx, dy = np.abs(x1 - x0), np.abs(y1 - y0)
    flat = dx >= dy  # walk along x, else along y
    flip = np.where(flat, x0 > x1, y0 > y1)  # walk from the lower end
    xs, xe = np.where(flip, x1, x0), np.where(flip, x0, x1)
    ys, ye = np.where(flip, y1, y0), np.where(flip, y0, y1)
    steps = np.maximum(dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(steps == 0, 0.0, np.where(flat, (ye - ys) / dx, (xe - xs) / dy))
    edge = np.repeat(np.arange(k), steps + 1)
    d = ranks_in_groups(edge)
    t = np.where(flip[edge], steps[edge] - d, d)  # the points keep the polygon's own order
    along_x = flat[edge]
    stepped = t + np.where(along_x, xs[edge], ys[edge])
    other = np.trunc(np.where(along_x, ys[edge], xs[edge]) + slope[edge] * t + 0.5).astype(np.int64)
    u, v = np.where(along_x, stepped, other), np.where(along_x, other, stepped)
    ua, ub, va, vb = u[:-1], u[1:], v[:-1], v[1:]
    xd = (np.where(ub < ua, ub, ub - 1) + 0.5) / 5.0 - 0.5
    keep = (ua != ub) & (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.ceil(np.clip((np.minimum(va, vb) + 0.5) / 5.0 - 0.5, 0, h))
    values, mult = np.unique(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), return_counts=True)
    return values[(mult % 2 == 1) & (values < h * w)]


def polygon_runs(polygons, h, w):
    """COCO polygons (a list of flat lists; the parts of one object are OR-ed) -> the runs of 1s (starts, ends)."""
    if len(polygons) and np.isscalar(polygons[0]):
        polygons = [polygons]
    starts, ends = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for xy in polygons:
        toggles = polygon_toggles(xy, h, w)
        toggles = np.append(toggles, h * w) if toggles.size % 2 else toggles
        starts.append(toggles[0::2])
        ends.append(toggles[1::2])
    return union_runs(np.concatenate(starts), np.concatenate(ends))


def segmentation_runs(segm, h, w):
    """Any segmentation (polygons, RLE dict, (h, w) bool array) of an h x w image -> runs of 1s (starts, ends)."""
    if isinstance(segm, dict):
        if tuple(segm["size"]) != (h, w):
            raise ValueError(f"RLE of size {segm['size']} on a {h}x{w} image")
        return runs_of_ones(*rle_counts_many([segm]))[:2]
    if isinstance(segm, np.ndarray):
        flat = np.concatenate(([False], segm.T.ravel(), [False]))
        change = np.flatnonzero(flat[1:] != flat[:-1])
        return change[0::2], change[1::2]
    return polygon_runs(segm, h, w)


def segmentation_to_mask(segm, h, w):
    """Any segmentation (polygons, RLE dict with compressed or list counts, bool array) -> (h, w) bool mask."""
    starts, ends = segmentation_runs(segm, h, w)
    flat = np.zeros(h * w + 1, np.int8)
    np.add.at(flat, starts, 1)
    np.add.at(flat, ends, -1)
    return np.cumsum(flat[:-1]).astype(bool).reshape(w, h).T


def masks_to_rles(masks):
    """(N, h, w) bool masks (tensor or array) -> N RLE dicts {"size": [h, w], "counts": compressed str}, the
    strings pycocotools' encode writes. The runs of all masks are found in one pass on the masks' device."""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    n, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(n, h * w)
    pad = flat.new_zeros(n, 1)
    change = (torch.cat([pad, flat], 1) != torch.cat([flat, pad], 1)).nonzero().cpu().numpy()  # (mask, position)
    per_mask = np.bincount(change[:, 0], minlength=n)
    rles = []
    for i, edges in enumerate(np.split(change[:, 1], np.cumsum(per_mask)[:-1])):
        counts = np.diff(np.concatenate(([0], edges, [h * w])))
        rles.append({"size": [h, w], "counts": counts_to_string(counts[:-1] if edges.size and edges[-1] == h * w
                                                                else counts)})
    return rles


def mask_box(mask):
    """Tight box [x, y, w, h] of a non-empty (h, w) bool mask, each pixel a unit square (pycocotools' toBbox)."""
    ys, xs = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return [float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0])]


# Datasets: the synthetic scenes (COCO metric), Pascal VOC 07+12 (VOC07 metric on test2007), COCO 2017.

VOC_DETECTION_SPLITS = {"train": (("VOC2007", "trainval"), ("VOC2012", "trainval")), "test": (("VOC2007", "test"),),
                        "val": (("VOC2007", "test"),)}  # no VOC val set: it is test2007, as the paper reports
COCO_DETECTION_SPLITS = {"train": "train2017", "val": "val2017", "test": "val2017"}  # test-dev has no public labels
DETECTION_LAYOUTS = "see docs/DETECTION.md, 'Dataset layouts'"


class SyntheticDetection(torch.utils.data.Dataset):
    """data.py's procedural scenes with one annotation per visible object (its mask after occlusion, the mask's
    tight box, its shape class 1..8); one seed per split, the segmentation splits' scenes."""
    metric = "coco"

    def __init__(self, length, size, seed):
        self.length, self.size, self.seed = length, size, seed
        self.classes, self.category_ids = SYNTHETIC_CLASS_NAMES, list(range(1, NUM_SYNTHETIC_CLASSES + 1))
        self.image_ids = list(range(length))

    def __len__(self):
        return self.length

    def __getitem__(self, idx):
        image, _, masks, classes = synthetic_scene(idx, self.size, self.seed, instances=True)
        annotations = [{"id": idx * 100 + k + 1, "bbox": mask_box(m), "label": int(c), "iscrowd": 0,
                        "area": float(m.sum()), "segmentation": m} for k, (m, c) in enumerate(zip(masks, classes))]
        return Image.fromarray(image), annotations

    def check(self, idx):
        pass  # generated, valid by construction


class DetectionImages(torch.utils.data.Dataset):
    """Image files with annotations read from VOC XML or a COCO JSON file: records of
    (image path, image id, (width, height), annotations). item -> (PIL RGB image, annotations).
    The records are kept pickled in one byte array, as Detectron2 keeps its dataset: COCO's are a million Python
    objects, and a DataLoader worker that reads an object writes its reference count, so each worker process would
    end up with its own copy of all of them (gigabytes per worker)."""

    def __init__(self, records, classes, category_ids, metric):
        self.classes, self.category_ids, self.metric = tuple(classes), category_ids, metric
        self.image_ids = [r[1] for r in records]
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self.offsets = np.cumsum([0] + [len(b) for b in blobs])
        self.blob = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self):
        return len(self.image_ids)

    def record(self, idx):
        """(image path, image id, (width, height), annotations) of image `idx`."""
        return pickle.loads(self.blob[self.offsets[idx]:self.offsets[idx + 1]])

    def __getitem__(self, idx):
        path, _, size, annotations = self.record(idx)
        image = load_rgb(path)
        if image.size != size:
            raise DataError(f"image {path}: {image.size[0]}x{image.size[1]} px, but its annotations say "
                            f"{size[0]}x{size[1]}")
        return image, annotations

    def check(self, idx):
        """Read the image's header and compare its size with the annotations': before training, not hours in."""
        path, _, size, _ = self.record(idx)
        try:
            with Image.open(path) as im:  # load_rgb applies the EXIF orientation: 5..8 swap the sides
                real = im.size[::-1] if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else im.size
        except Exception as e:  # PIL raises many types for bad files
            raise DataError(f"cannot decode image {path}: {e}") from None
        if real != size:
            raise DataError(f"image {path}: {real[0]}x{real[1]} px, but its annotations say {size[0]}x{size[1]}")


def checked_box(box, width, height, where, margin=1.0):
    """[x, y, w, h] clamped to the image, after checking that it lies inside it up to `margin` px (annotation
    tools round); one that points elsewhere is a DataError naming `where`."""
    x, y, w, h = (float(v) for v in box)
    if not (w >= 0 and h >= 0 and x >= -margin and y >= -margin and x + w <= width + margin
            and y + h <= height + margin):
        raise DataError(f"{where}: box [x {x:g}, y {y:g}, w {w:g}, h {h:g}] is not inside its {width}x{height} image")
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    return [x1, y1, min(x + w, width) - x1, min(y + h, height) - y1]


def voc_detection_records(root, split):
    """Pascal VOC detection as the official tars unpack (VOCdevkit/VOC2007 from VOCtrainval_06-Nov-2007.tar and
    VOCtest_06-Nov-2007.tar, VOCdevkit/VOC2012 from VOCtrainval_11-May-2012.tar): the ids of
    ImageSets/Main/{trainval,test}.txt, JPEGImages/ID.jpg, Annotations/ID.xml. train = trainval 2007 + 2012 (16551
    images), test = test 2007 (4952). Boxes become Detectron2's: [xmin - 1, ymin - 1, xmax, ymax]; "difficult"
    objects are kept (Detectron2 trains on them; the metric ignores them)."""
    records = []
    for year, image_set in VOC_DETECTION_SPLITS[split]:
        base = find_folder(root, (year,), f"Pascal VOC layout, {DETECTION_LAYOUTS}")
        listing = os.path.join(base, "ImageSets", "Main", f"{image_set}.txt")
        if not os.path.isfile(listing):
            raise DataError(f"--data-root {root}: no list file {listing} (Pascal VOC layout, {DETECTION_LAYOUTS})")
        with open(listing) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        for image_id in ids:
            image = os.path.join(base, "JPEGImages", image_id + ".jpg")
            if not os.path.isfile(image):
                raise DataError(f"image {image} is listed in {listing} but missing")
            records.append((image, image_id, *voc_annotations(os.path.join(base, "Annotations", image_id + ".xml"))))
    return records


def voc_annotations(path):
    """One VOC XML file -> ((width, height), annotations). A missing or unreadable file, an unknown class or a box
    outside the image is a DataError naming the file."""
    try:
        tree = ET.parse(path).getroot()
        width, height = (int(tree.find("size").find(k).text) for k in ("width", "height"))
        objects = [(o.find("name").text.strip(), int(o.findtext("difficult", "0") or 0),
                    [float(o.find("bndbox").find(k).text) for k in ("xmin", "ymin", "xmax", "ymax")])
                   for o in tree.findall("object")]
    except (OSError, ET.ParseError, AttributeError, TypeError, ValueError) as e:
        raise DataError(f"cannot read the annotation {path}: {e or type(e).__name__}") from None
    annotations = []
    for k, (name, difficult, (x1, y1, x2, y2)) in enumerate(objects):
        if name not in VOC_CLASSES[1:]:
            raise DataError(f"{path}: unknown class {name!r} (Pascal VOC has {', '.join(VOC_CLASSES[1:])})")
        box = checked_box([x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], width, height, path)
        annotations.append({"id": k + 1, "bbox": box, "label": VOC_CLASSES.index(name), "iscrowd": 0,
                            "area": box[2] * box[3], "segmentation": None, "difficult": difficult,
                            "xml_box": [x1, y1, x2, y2]})
    return (width, height), annotations


def coco_detection_records(root, split):
    """COCO 2017 as its archives unpack under the root: train2017/ and val2017/ (train2017.zip, val2017.zip) and
    annotations/instances_{train,val}2017.json (annotations_trainval2017.zip). Category ids (1..90 with gaps)
    become labels 1..80 in id order. Training skips the images without an annotation that is not a crowd region
    (as Detectron2 does); evaluation keeps every image. Returns (records, classes, category ids)."""
    folder = os.path.join(root, COCO_DETECTION_SPLITS[split])
    path = os.path.join(root, "annotations", f"instances_{COCO_DETECTION_SPLITS[split]}.json")
    for p in (folder, path):
        if not os.path.exists(p):
            raise DataError(f"--data-root {root}: no {p} (COCO layout, {DETECTION_LAYOUTS})")
    try:
        with open(path) as f:
            coco = json.load(f)
        images = {im["id"]: (im["file_name"], int(im["width"]), int(im["height"])) for im in coco["images"]}
        categories = sorted(c["id"] for c in coco["categories"])
        names = {c["id"]: c["name"] for c in coco["categories"]}
        annotations = coco["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read the annotation file {path}: {type(e).__name__} {e}") from None
    label = {c: k + 1 for k, c in enumerate(categories)}
    per_image = {i: [] for i in images}
    for a in annotations:
        where = f"{path}, annotation {a.get('id')}"
        if a.get("image_id") not in images:
            raise DataError(f"{where}: unknown image_id {a.get('image_id')!r}")
        if a.get("category_id") not in label:
            raise DataError(f"{where}: unknown category_id {a.get('category_id')!r}")
        _, width, height = images[a["image_id"]]
        per_image[a["image_id"]].append({"id": a["id"], "bbox": checked_box(a["bbox"], width, height, where),
                                         "label": label[a["category_id"]], "iscrowd": int(a.get("iscrowd", 0)),
                                         "area": float(a["area"]), "segmentation": a.get("segmentation")})
    records = [(os.path.join(folder, name), i, (width, height), per_image[i])
               for i, (name, width, height) in sorted(images.items())
               if split != "train" or any(not a["iscrowd"] for a in per_image[i])]
    return records, ("background",) + tuple(names[c] for c in categories), categories


def build_detection_dataset(name, split, root=None, synthetic_lengths=(256, 32, 64), synthetic_size=128):
    """The `split` ('train', 'val' or 'test') of detection dataset `name` ('synthetic', 'voc', 'coco'),
    untransformed: items are (PIL image, annotations). Raises DataError (one line, naming the flag or file) for a
    missing root, folder, list, image or annotation file, an unknown class or a box outside its image."""
    if name == "synthetic":
        length = dict(zip(("train", "val", "test"), synthetic_lengths))[split]
        return SyntheticDetection(length, synthetic_size, SYNTHETIC_SPLIT_SEEDS[split])
    if root is None:
        raise DataError(f"--data-root is required for --dataset {name}")
    if not os.path.isdir(root):
        raise DataError(f"--data-root {root}: no such folder")
    if name == "voc":
        records, classes, category_ids = voc_detection_records(root, split), VOC_CLASSES, list(range(1, 21))
    else:
        records, classes, category_ids = coco_detection_records(root, split)
    if not records:
        raise DataError(f"--data-root {root}: no {split} images found for --dataset {name}")
    return DetectionImages(records, classes, category_ids, "voc" if name == "voc" else "coco")


class DetectionTrainTransform:
    """Detectron2's training augmentation: ResizeShortestEdge (short side drawn from `min_sizes`, long side at
    most `max_size`) and a horizontal flip with p = 0.5. Crowd regions are dropped (the metric ignores them; they
    are not objects to learn), and so are boxes that end up thinner than 1e-5 px (Detectron2's rule).
    (PIL image, annotations) -> (image (3, h, w) float in [0, 1], the detector normalizes; target {"boxes": (N, 4)
    float x1 y1 x2 y2, "labels": (N,) int64, with `with_masks` "masks": (N, h, w) uint8}). Draws from `random`."""

    def __init__(self, min_sizes, max_size, with_masks):
        self.min_sizes, self.max_size, self.with_masks = list(min_sizes), max_size, with_masks

    def __call__(self, image, annotations):
        annotations = [a for a in annotations if not a["iscrowd"]]
        w, h = image.size
        size = random.choice(self.min_sizes)
        s = min(size / min(w, h), self.max_size / max(w, h))
        nw, nh = int(w * s + 0.5), int(h * s + 0.5)
        x = TF.to_tensor(image.resize((nw, nh), Image.BILINEAR))
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) * torch.tensor([nw / w, nh / h] * 2)
        target = {"boxes": boxes, "labels": torch.tensor([a["label"] for a in annotations], dtype=torch.int64)}
        if self.with_masks:
            masks = [torch.from_numpy(segmentation_to_mask(a["segmentation"], h, w)) for a in annotations]
            target["masks"] = torch.zeros((0, nh, nw), dtype=torch.uint8) if not masks else \
                F.interpolate(torch.stack(masks)[None].to(torch.uint8), size=(nh, nw), mode="nearest")[0]
        if random.random() < 0.5:
            x = x.flip(-1)
            target["boxes"] = torch.stack([nw - boxes[:, 2], boxes[:, 1], nw - boxes[:, 0], boxes[:, 3]], 1)
            if self.with_masks:
                target["masks"] = target["masks"].flip(-1)
        wide = ((target["boxes"][:, 2:] - target["boxes"][:, :2]) > 1e-5).all(1)
        return x.contiguous(), {k: v[wide].contiguous() for k, v in target.items()}


def detection_eval_item(image, annotations):
    """Test pipeline: (PIL image, annotations) -> (image (3, H, W) float in [0, 1] at native size, annotations);
    the detector resizes to its test size and maps its boxes and masks back to native size."""
    return TF.to_tensor(image), annotations


def collate_lists(batch):
    """[(image, target), ...] -> ([images], [targets]): detection images differ in size; the detector pads."""
    return tuple(map(list, zip(*batch)))
