"""Detection datasets of finetune_det.py and detection.py: COCO's mask format (run-length encoding and polygons, as
pycocotools reads them), the built-in scenes with their objects, Pascal VOC and COCO, and the detection transforms
(docs/DETECTION.md).
"""
import json
import os
import pickle
import random
import xml.etree.ElementTree as ET

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import functional as TF

from data import NUM_SYNTHETIC_CLASSES, SYNTHETIC_CLASS_NAMES, DataError, load_rgb, synthetic_scene
from seg_data import SYNTHETIC_SPLIT_SEEDS, VOC_CLASSES, find_folder


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
