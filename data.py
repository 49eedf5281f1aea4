"""Pre-training data: robust image decoding, an unlabeled image folder, the built-in synthetic scenes, the two-view
augmentations of SlotCon (with the overlap box each view needs for invaug) and DenseCL, per-sample seeding and the
epoch sampler. The labelled datasets of the downstream scripts are in seg_data.py and det_data.py.

A pre-training sample is (views (2, 3, H, W), coords (2, 4), flags (2,)): coords[v] is the two crops' overlap in
view v's normalized coordinates (after its flip), flags[v] whether view v was flipped.
"""
import hashlib
import math
import os
import random
import signal
import sys

import numpy as np
import torch
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


def pretraining_dataset(two_view, image_size, min_scale, seed, folder=None, synthetic_images=2048):
    """The two-view pre-training set of a framework's augmentation `two_view` (SlotConTwoView, DenseCLTwoView):
    --data `folder` (checked: at least one image decodes), or the built-in scenes; each sample's augmentation drawn
    from its own seed (SeededAugment)."""
    transform = two_view(image_size, min_scale)
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


def to_tensor(image):
    """PIL RGB image or (H, W, 3) uint8 array -> (3, H, W) float, ImageNet-normalized (as in pre-training)."""
    return TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
