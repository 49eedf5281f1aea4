"""Semantic segmentation, evaluation side: mIoU from a confusion matrix, whole-image / sliding-window inference,
prediction pictures, and the command that scores a fine-tuned checkpoint (paper Sec. 3.4). The labelled datasets are
in seg_data.py, the segmentation network (ResNet encoder + FCN or FPN head) in models.py; detectors are scored by
detection.py.

    python eval.py --checkpoint output/seg/seed0.pt --split test
    python eval.py --checkpoint output/seg/seed0.pt --dataset cityscapes --data-root data/cityscapes --mode slide

finetune_seg.py imports the metric and the inference from here, so a number printed by either script comes from
one implementation. `--save-predictions DIR` draws image | ground truth | prediction for each image. A checkpoint
(written by finetune_seg.py) is a plain dict {"model": state dict, "args": the fine-tuning flags, ...} that
torch.load(weights_only=True) reads.
"""
import argparse
import json
import math
import os
import shlex
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import utils
from data import IMAGENET_MEAN, IMAGENET_STD, DataError
from models import Segmenter
from seg_data import DATASETS, IGNORE_INDEX, EvalTransform, Transformed, build_dataset, check_dataset


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


def region_scores(cm, regions):
    """IoU and Dice of unions of classes, e.g. REFUGE's optic disc = rim + cup: {name: {"iou", "dice"}} in percent
    (None without `regions`). Pixels are counted from the (K, K) confusion matrix: TP = ground truth and prediction
    both in the region, FP / FN = only the prediction / only the ground truth; Dice = 2 TP / (2 TP + FP + FN)."""
    if not regions:
        return None
    cm = cm.double().cpu().numpy() if torch.is_tensor(cm) else np.asarray(cm, dtype=np.float64)
    out = {}
    for name, classes in regions.items():
        inside = np.isin(np.arange(len(cm)), classes)
        tp, gt, pred = cm[np.ix_(inside, inside)].sum(), cm[inside].sum(), cm[:, inside].sum()
        out[name] = {"iou": utils.as_percent(tp / (gt + pred - tp)) if gt + pred else None,
                     "dice": utils.as_percent(2 * tp / (gt + pred)) if gt + pred else None}
    return out


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
    image = image.contiguous(memory_format=utils.layout_of(model))
    logits = model(image).float() if mode == "whole" else slide_logits(model, image, crop, stride)
    if out_size is not None and tuple(out_size) != tuple(logits.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(out_size), mode="bilinear",
                               align_corners=getattr(model, "align_corners", False))
    return logits


@torch.no_grad()
def evaluate(model, dataset, mode="whole", crop=512, stride=341, device="cpu", workers=0, ctx=None, desc=None,
             save_predictions=None, palette=None):
    """Score `model` on `dataset` (items: image (3, h, w) at test scale, mask (H, W) at native size), sharded over
    ranks with the confusion matrices summed. Returns segmentation_scores plus the confusion matrix "cm".
    With `save_predictions` (a folder), each rank also writes the prediction_picture of its items, coloured with
    `palette`, as NNNNN.png (the item's index in `dataset`)."""
    was_training = model.training
    model.eval()
    shard = torch.utils.data.Subset(dataset, range(utils.rank(), len(dataset), utils.world_size()))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers)
    k = model.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    bar = tqdm(loader, desc=desc, leave=False, disable=desc is None or not utils.is_main())
    for i, (image, mask) in enumerate(bar):
        mask = mask.to(device)
        with ctx or nullcontext():
            logits = predict(model, image.to(device), mode, crop, stride, out_size=mask.shape[-2:])
        pred = logits.argmax(1)
        cm += confusion_matrix(pred, mask, k)
        if save_predictions:
            name = f"{utils.rank() + i * utils.world_size():05d}.png"  # the shard's i-th item
            prediction_picture(image[0], mask[0], pred[0], palette).save(os.path.join(save_predictions, name))
    model.train(was_training)
    cm = utils.all_reduce_sum(cm)
    return {**segmentation_scores(cm), "cm": cm.cpu()}


# ---------------------------------------------------------------- pictures (--save-predictions)

CITYSCAPES_PALETTE = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
                      (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
                      (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32))
IGNORE_GREY = (224, 224, 224)  # the ignore index 255: a grey that neither palette gives a class


def voc_palette(n):
    """(n, 3) uint8: the Pascal VOC colour map (the devkit's labelcolormap), bit 3j + c of the class id setting bit
    7 - j of channel c. The fixed palette of every dataset but Cityscapes."""
    ids, rgb = np.arange(n), np.zeros((n, 3), np.int64)
    for j in range(8):
        for c in range(3):
            rgb[:, c] |= ((ids >> (3 * j + c)) & 1) << (7 - j)
    return rgb.astype(np.uint8)


def class_palette(dataset, num_classes):
    """(256, 3) uint8 lookup table, class id -> colour: Cityscapes' own colours for cityscapes, the VOC colour map
    for every other dataset; the ignore index 255 grey."""
    lut = np.zeros((256, 3), np.uint8)
    lut[:num_classes] = CITYSCAPES_PALETTE if dataset == "cityscapes" else voc_palette(num_classes)
    lut[IGNORE_INDEX] = IGNORE_GREY
    return lut


def prediction_picture(image, mask, pred, palette):
    """image (3, h, w) ImageNet-normalized at test scale; mask, pred (H, W) class ids at native size; palette (256, 3)
    uint8 -> PIL RGB (3 W, H): the image resized to the mask's size | ground truth | prediction."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = ((image.float().cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    h, w = mask.shape
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    return Image.fromarray(np.concatenate([rgb, palette[mask.cpu().numpy()], palette[pred.cpu().numpy()]], 1))


# ---------------------------------------------------------------- reports

def score_table(scores, classes, regions=None):
    """Per-class IoU, mIoU and pixel accuracy as aligned text, in percent; then the regions' IoU and Dice."""
    width = max(12, *(len(c) for c in classes))
    lines = [f"{'class':<{width}}  {'IoU':>7}"]
    for name, v in zip(classes, scores["iou"]):
        lines.append(f"{name:<{width}}  {'n/a' if math.isnan(v) else f'{100 * v:.2f}':>7}")
    lines.append(f"{'mIoU':<{width}}  {100 * scores['miou']:>7.2f}")
    lines.append(f"{'pixel acc':<{width}}  {100 * scores['pixel_acc']:>7.2f}")
    for name, r in (regions or {}).items():
        lines.append(f"{name:<{width}}  IoU {r['iou']:.2f}  Dice {r['dice']:.2f}" if r["iou"] is not None else
                     f"{name:<{width}}  n/a")
    return "\n".join(lines)


def load_checkpoint(path):
    """A finetune_seg.py checkpoint -> (Segmenter with its weights, the fine-tuning args dict)."""
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--checkpoint {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and ckpt.get("task") == "detection":
        raise ValueError(f"--checkpoint {path}: a finetune_det.py detector; score it with python detection.py "
                         f"--checkpoint {path}")
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "num_classes" in ckpt["args"]):
        raise ValueError(f"--checkpoint {path}: not a finetune_seg.py checkpoint (expected 'model' and 'args' "
                         "with num_classes)")
    a = ckpt["args"]
    model = Segmenter(a["arch"], a["decoder"], a["num_classes"], a.get("align_corners", False))
    model.load_state_dict(ckpt["model"])
    return model, a


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = utils.ArgumentParser("eval.py", description="mIoU of a finetune_seg.py checkpoint. Unset flags take the "
                                                    "values the checkpoint was fine-tuned with.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a seedN.pt written by finetune_seg.py")
    a("--dataset", choices=sorted(DATASETS), default=None, help="default: the checkpoint's")
    a("--data-root", default=None, help="dataset folder (default: the checkpoint's)")
    a("--split", choices=["train", "val", "test"], default="test", help="voc and cityscapes: test = val")
    a("--mode", choices=["whole", "slide"], default=None, help="whole-image or sliding-window inference")
    a("--crop-size", type=int, default=None, help="slide window side (default: the fine-tuning crop)")
    a("--stride", type=int, default=None, help="slide window stride (default: the dataset's, or 2/3 crop)")
    a("--test-scale", type=int, nargs=2, default=None, metavar=("A", "B"), help="mmseg's test `scale`: with "
      "--keep-ratio, long side <= max(A, B) and short side <= min(A, B); without, A x B (0 0: native size; "
      "default: the fine-tuning's)")
    a("--keep-ratio", action=argparse.BooleanOptionalAction, default=None, help="keep the aspect ratio when "
      "rescaling (default: the fine-tuning's)")
    a("--workers", type=int, default=None, help="data-loading processes (0 = in-process)")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on CUDA and on "
      "CPUs with bf16 instructions, else fp32)")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--output", default=None, help="JSON file (default: the checkpoint's path with .<dataset>-<split>.json)")
    a("--save-predictions", default=None, metavar="DIR", help="also write image | ground truth | prediction, one PNG "
      "per image, named by its index in the split")
    return p


def scale_pair(value, flag):
    """The value of --scale / --test-scale -> a pair, or None for 0 0 (native size)."""
    if value is None or not any(value):
        return None
    if min(value) < 1:
        raise ValueError(f"{flag} {value[0]} {value[1]}: two positive sides, or 0 0 for native size")
    return tuple(value)


def eval_geometry(dataset, crop_size, mode=None, stride=None, scale=None, test_scale=None, keep_ratio=None):
    """(mode, stride, scale, test_scale, keep_ratio) for `dataset`: explicit values win (0 0 for a scale: native
    size), then the dataset's. The default stride is the dataset's (Cityscapes: 513 for 769 crops) when it fits the
    crop, else 2/3 of the crop."""
    spec = DATASETS[dataset]
    mode = mode or spec["mode"]
    if stride is None:
        stride = spec["stride"] if spec["stride"] and spec["stride"] <= crop_size else max(1, crop_size * 2 // 3)
    if stride > crop_size:
        raise ValueError(f"--stride {stride} is larger than the {crop_size} px window: pixels would be skipped")
    scale = spec["scale"] if scale is None else scale_pair(scale, "--scale")
    test_scale = spec["test_scale"] if test_scale is None else scale_pair(test_scale, "--test-scale")
    keep_ratio = spec["keep_ratio"] if keep_ratio is None else keep_ratio
    return mode, stride, scale, test_scale, keep_ratio


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
        same = dataset == ft["dataset"]  # the fine-tuning's geometry, else the dataset's
        test_scale = args.test_scale
        if test_scale is None and same and "test_scale" in ft:
            test_scale = ft["test_scale"] or (0, 0)
        keep_ratio = ft.get("keep_ratio") if same and args.keep_ratio is None else args.keep_ratio
        crop = args.crop_size or ft["crop_size"]
        mode, stride, _, test_scale, keep_ratio = eval_geometry(
            dataset, crop, args.mode or (ft["mode"] if same else None), args.stride, None, test_scale, keep_ratio)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = args.output or f"{os.path.splitext(args.checkpoint)[0]}.{dataset}-{args.split}.json"
    if problem := utils.unwritable(os.path.dirname(os.path.abspath(out))):  # before the evaluation, not after it
        raise SystemExit(f"error: cannot write {out}: {problem}")
    if args.save_predictions and (problem := utils.unwritable(args.save_predictions)):
        raise SystemExit(f"error: --save-predictions {problem}")
    device = utils.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = utils.choose_precision(device.type, args.precision)
    workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    try:
        data = build_dataset(dataset, args.split, root, num_classes,
                             (ft["synthetic_train"], ft["synthetic_val"], ft["synthetic_test"]), ft["synthetic_size"])
        check_dataset(data, threads=max(1, workers))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None

    model = model.to(device).to(memory_format=utils.memory_format(device.type))
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if args.save_predictions:
        os.makedirs(args.save_predictions, exist_ok=True)
    scores = evaluate(model, Transformed(data, EvalTransform(test_scale, keep_ratio)), mode, crop, stride, device,
                      workers, ctx, desc=f"eval {dataset}/{args.split}", save_predictions=args.save_predictions,
                      palette=class_palette(dataset, num_classes))
    if utils.is_main():
        print(f"{args.checkpoint} on {dataset} {args.split} ({len(data)} images, {mode} inference"
              f"{f', {crop} px windows every {stride} px' if mode == 'slide' else ''})")
        regions = region_scores(scores["cm"], DATASETS[dataset].get("regions"))
        print(score_table(scores, data.classes, regions))
        report = {"command": shlex.join(["python"] + sys.argv), "checkpoint": args.checkpoint, "dataset": dataset,
                  "split": args.split, "images": len(data), "mode": mode, "crop_size": crop, "stride": stride,
                  "test_scale": test_scale, "keep_ratio": keep_ratio, "miou": utils.as_percent(scores["miou"]),
                  "pixel_acc": utils.as_percent(scores["pixel_acc"]),
                  "iou_per_class": dict(zip(data.classes, utils.as_percent(scores["iou"]))), "regions": regions,
                  "units": "percent"}
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}" + (f", {len(data)} pictures in {args.save_predictions}" if args.save_predictions else ""))
    utils.shutdown()
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
