"""Semantic segmentation, evaluation side: mIoU from a confusion matrix, whole-image / sliding-window inference,
and the command that scores a fine-tuned checkpoint (paper Sec. 3.4). The labelled datasets are in data.py, the
segmentation network (ResNet encoder + FCN or FPN head) in models.py.

    python eval.py --checkpoint output/seg/seed0.pt --split test
    python eval.py --checkpoint output/seg/seed0.pt --dataset cityscapes --data-root data/cityscapes --mode slide

finetune_seg.py imports the metric and the inference from here, so a number printed by either script comes from
one implementation. A checkpoint (written by finetune_seg.py) is a plain dict
{"model": state dict, "args": the fine-tuning flags, ...} that torch.load(weights_only=True) reads.
"""
import json
import math
import os
import shlex
import sys
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import utils
from data import DATASETS, IGNORE_INDEX, DataError, EvalTransform, Transformed, build_dataset, check_dataset
from models import Segmenter


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
    shard = torch.utils.data.Subset(dataset, range(utils.rank(), len(dataset), utils.world_size()))
    loader = torch.utils.data.DataLoader(shard, batch_size=1, num_workers=workers)
    k = model.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=device)
    for image, mask in tqdm(loader, desc=desc, leave=False, disable=desc is None or not utils.is_main()):
        mask = mask.to(device)
        with ctx or nullcontext():
            logits = predict(model, image.to(device), mode, crop, stride, out_size=mask.shape[-2:])
        cm += confusion_matrix(logits.argmax(1), mask, k)
    model.train(was_training)
    cm = utils.all_reduce_sum(cm)
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
    out = args.output or f"{os.path.splitext(args.checkpoint)[0]}.{dataset}-{args.split}.json"
    if problem := utils.unwritable(os.path.dirname(os.path.abspath(out))):  # before the evaluation, not after it
        raise SystemExit(f"error: cannot write {out}: {problem}")
    device = utils.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
    if utils.is_main():
        print(f"{args.checkpoint} on {dataset} {args.split} ({len(data)} images, {mode} inference"
              f"{f', {crop} px windows every {stride} px' if mode == 'slide' else ''})")
        print(score_table(scores, data.classes))
        report = {"command": shlex.join(["python"] + sys.argv), "checkpoint": args.checkpoint, "dataset": dataset,
                  "split": args.split, "images": len(data), "mode": mode, "crop_size": crop, "stride": stride,
                  "base_size": base_size, "miou": as_percent(scores["miou"]),
                  "pixel_acc": as_percent(scores["pixel_acc"]),
                  "iou_per_class": dict(zip(data.classes, as_percent(scores["iou"]))), "units": "percent"}
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {out}")
    utils.shutdown()
    return scores


if __name__ == "__main__":
    main(get_args_parser().parse_args())
