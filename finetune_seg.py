"""Fine-tune a ResNet + FCN or FPN for semantic segmentation, from random init, a pre-trained encoder, or a
pre-trained encoder and decoder, on a fraction of the labels, and report mIoU over seeds (paper Sec. 3.4).

    python finetune_seg.py                                                  # built-in scenes, random init
    python finetune_seg.py --pretrained output/last.pt --transfer encoder+decoder \
        --dataset voc --data-root data/VOCdevkit/VOC2012
    torchrun --nproc_per_node 4 finetune_seg.py --pretrained output/last.pt --dataset refuge \
        --data-root data/REFUGE --fraction 0.05 --seeds 0 1 2

Training is mmseg's, with each dataset's recipe as the default (docs/DATASETS.md): VOC and Cityscapes as SlotCon's
mmseg 0.30 fcn_d6_r50-d16 configs (SGD lr 0.003 / 0.01, weight decay 1e-4, step decay x0.1 at 70 % and 90 % of the
iterations, 513 / 769 px crops, align_corners), ISIC and REFUGE with the paper's schedule (lr 0.01, poly decay with
power 0.9, mmseg's weight decay 5e-4) and mmseg 1.x's pipelines for them (REFUGE: random rescale, crop with
cat_max_ratio, PhotoMetricDistortion; ISIC: a fixed 512 x 512 resize). Pixel cross-entropy with ignore index 255.
The segmentation network (mmseg's, parameter names included) is in models.py, the datasets and the training pipeline
in seg_data.py, the transfer in weights.py; the metric and inference in eval.py.
"""
import argparse
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import utils
from data import DataError, SeededAugment, seed_worker
from seg_data import (DATASETS, IGNORE_INDEX, TEST_IS_VAL, EvalTransform, IterationSampler, TrainTransform, Transformed,
                      build_dataset, check_dataset, folder_classes, fraction_indices)
from eval import eval_geometry, evaluate, region_scores, score_table
from models import Segmenter
from weights import pretrained_for, transfer_segmenter

# Each dataset's fine-tuning recipe: VOC and Cityscapes from SlotCon's mmseg configs
# fcn_d6_r50-d16_513x513_30k_voc12aug_moco.py and fcn_d6_r50-d16_769x769_90k_cityscapes_moco.py (schedule_30k_moco.py,
# schedule_90k_moco.py: step decay at 21k/27k and 63k/81k, i.e. 70 % and 90 %); ISIC and REFUGE: the schedule from
# the paper (Sec. 3.4: 80k / 24k iterations, batch 16, lr 0.01, poly, power 0.9) with mmseg's schedule defaults, the
# pipeline as mmseg 1.x's configs set it (REFUGE: configs/_base_/datasets/refuge.py; ISIC 2017: the project config
# isic2017-task1_512x512.py). The rescale scales are seg_data.DATASETS'. A flag left unset takes these.
POLY = dict(lr=0.01, schedule="poly", weight_decay=5e-4, align_corners=False)
STEP = dict(schedule="step", step_fractions=(0.7, 0.9), weight_decay=1e-4, align_corners=True)
PLAIN = dict(scale_range=(0.5, 2.0), cat_max_ratio=1.0, photometric=False)  # the VOC / Cityscapes configs' pipeline
DATASET_DEFAULTS = {
    "synthetic": dict(iters=300, crop_size=128, select="last", eval_every=100, **POLY, **PLAIN),
    "voc": dict(iters=30000, crop_size=513, select="last", eval_every=0, lr=0.003, **STEP, **PLAIN),
    "cityscapes": dict(iters=90000, crop_size=769, select="last", eval_every=0, lr=0.01, **STEP, **PLAIN),
    "isic2017": dict(iters=24000, crop_size=512, select="best", eval_every=500, **POLY,  # best on val, on test
                     scale_range=(1.0, 1.0), cat_max_ratio=1.0, photometric=True),   # a fixed 512 x 512 resize
    "refuge": dict(iters=80000, crop_size=512, select="last", eval_every=0, **POLY,     # last checkpoint on test
                   scale_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True),
    "folder": dict(iters=20000, crop_size=512, select="last", eval_every=0, **POLY, **PLAIN),
}


def get_args_parser():
    p = utils.ArgumentParser("finetune_seg.py", description="Fine-tune ResNet + FCN/FPN for semantic segmentation "
                                                            "and report test mIoU averaged over seeds. 'None' means "
                                                            "the dataset's value.")
    a = p.add_argument
    a("--dataset", choices=sorted(DATASETS), default="synthetic", help="docs/DATASETS.md, 'Dataset layouts', shows "
      "each layout")
    a("--data-root", default=None, help="dataset folder (all but synthetic)")
    a("--num-classes", type=int, default=None, help="classes of --dataset folder (mask ids 0..K-1, 255 = ignore)")
    a("--synthetic-size", type=int, default=128, help="side of the built-in scenes")
    a("--synthetic-train", type=int, default=256, help="built-in training scenes")
    a("--synthetic-val", type=int, default=32, help="built-in validation scenes")
    a("--synthetic-test", type=int, default=64, help="built-in test scenes")
    a("--decoder", choices=["fcn", "fpn"], default="fcn", help="segmentation head (the paper: fcn)")
    a("--pretrained", nargs="+", default=None, metavar="PATH",
      help="a pretrain.py last.pt, or files exported by convert.py (mmseg backbone / decode_head / neck / full, "
           "torchvision); several files are merged (e.g. a backbone and a decode_head file). None: random init")
    a("--transfer", choices=["encoder", "encoder+decoder"], default="encoder", help="what to initialize from "
      "--pretrained; a decoder of another kind than --decoder is not transferred")
    a("--fraction", type=float, default=1.0, help="fraction of the training images, a fixed subset per seed "
      "(paper: 0.05, 0.25, 1)")
    a("--iters", type=int, default=None, help="iterations (VOC 30k, Cityscapes 90k, ISIC 24k, REFUGE 80k)")
    a("--batch-size", type=int, default=16, help="global batch over all processes")
    a("--lr", type=float, default=None, help="initial learning rate (VOC 0.003, else 0.01)")
    a("--schedule", choices=["poly", "step"], default=None, help="lr decay per iteration (VOC, Cityscapes: step)")
    a("--lr-steps", type=int, nargs="+", default=None, help="iterations where the step schedule multiplies the lr "
      "by 0.1 (default: 70 %% and 90 %% of --iters)")
    a("--min-lr", type=float, default=1e-4, help="floor of the poly decay (mmseg's)")
    a("--power", type=float, default=0.9, help="poly decay power")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=None, help="SGD weight decay on all parameters (VOC, Cityscapes: 1e-4; "
      "else mmseg's schedule default 5e-4)")
    a("--align-corners", action=argparse.BooleanOptionalAction, default=None, help="of the logits' bilinear "
      "upsampling (VOC, Cityscapes: on)")
    a("--crop-size", type=int, default=None, help="training crop side; also the slide-inference window")
    a("--scale", type=int, nargs=2, default=None, metavar=("A", "B"), help="mmseg's training `scale` before the "
      "random ratio: with --keep-ratio, long side <= max(A, B) and short side <= min(A, B); without, A x B "
      "(0 0: native size; default: the dataset's)")
    a("--test-scale", type=int, nargs=2, default=None, metavar=("A", "B"), help="the same at test time "
      "(REFUGE: 1634 1634)")
    a("--keep-ratio", action=argparse.BooleanOptionalAction, default=None, help="keep the aspect ratio when "
      "rescaling (ISIC: off, a 512 x 512 resize)")
    a("--scale-range", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="ratio range of the random "
      "rescaling (ISIC: 1 1; else 0.5 2)")
    a("--cat-max-ratio", type=float, default=None, help="redraw a crop (up to 10 times) while one class covers this "
      "fraction of it or more (REFUGE: 0.75; 1: off)")
    a("--photometric", action=argparse.BooleanOptionalAction, default=None, help="mmseg's PhotoMetricDistortion "
      "(REFUGE, ISIC: on)")
    a("--eval-every", type=int, default=None, help="evaluate on val every N iterations (0: never)")
    a("--select", choices=["last", "best"], default=None, help="checkpoint reported on test: the last, or the best "
      "on val (ISIC: best; REFUGE, VOC, Cityscapes: last)")
    a("--mode", choices=["whole", "slide"], default=None, help="test-time inference (Cityscapes: slide)")
    a("--stride", type=int, default=None, help="slide-inference stride (default: the dataset's, or 2/3 crop)")
    utils.add_finetune_flags(a, "output/seg")
    return p


def finalize_args(args, parser):
    """Fill the dataset's defaults and reject impossible settings with one line, before any work."""
    for k, v in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.dataset != "synthetic":
        if args.data_root is None:
            parser.error(f"--data-root is required for --dataset {args.dataset}")
        if not os.path.isdir(args.data_root):
            parser.error(f"--data-root {args.data_root}: no such folder")
    if args.dataset == "folder":
        if args.num_classes is not None and not 2 <= args.num_classes <= 255:
            parser.error(f"--dataset folder needs --num-classes between 2 and 255 (255 is the ignore index), "
                         f"got {args.num_classes}")
        try:
            args.num_classes = len(folder_classes(args.data_root, args.num_classes))
        except DataError as e:
            parser.error(str(e))
    elif args.num_classes is not None:
        parser.error(f"--num-classes is for --dataset folder; {args.dataset} has a fixed class list")
    else:
        args.num_classes = len(DATASETS[args.dataset]["classes"])
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1]")
    args.seeds = args.seeds or [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: repeated seed")
    for name in ("iters", "batch_size", "log_every", "synthetic_size", "synthetic_train", "synthetic_val",
                 "synthetic_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.crop_size < 32:
        parser.error(f"--crop-size {args.crop_size}: the ResNet needs at least 32 px")
    if args.eval_every < 0:
        parser.error("--eval-every must be 0 (never) or positive")
    if args.select == "best" and args.eval_every == 0:
        parser.error("--select best needs --eval-every N > 0 to evaluate on val")
    if not 0 < args.scale_range[0] <= args.scale_range[1]:
        parser.error(f"--scale-range {args.scale_range[0]} {args.scale_range[1]}: need 0 < MIN <= MAX")
    if not 0 < args.cat_max_ratio <= 1:
        parser.error(f"--cat-max-ratio {args.cat_max_ratio}: must be in (0, 1] (1: off)")
    if args.schedule == "poly" and not 0 <= args.min_lr < args.lr:
        parser.error(f"--min-lr {args.min_lr} must be in [0, --lr {args.lr})")
    if args.schedule == "step" and args.lr_steps:
        if args.lr_steps != sorted(args.lr_steps) or not 0 < args.lr_steps[0] or args.lr_steps[-1] >= args.iters:
            parser.error(f"--lr-steps {' '.join(map(str, args.lr_steps))}: increasing iterations within "
                         f"(0, --iters {args.iters})")
    elif args.schedule == "step":
        args.lr_steps = [round(f * args.iters) for f in getattr(args, "step_fractions", (0.7, 0.9))]
    elif args.lr_steps:
        parser.error("--lr-steps is for --schedule step")
    for path in args.pretrained or []:
        if not os.path.isfile(path):
            parser.error(f"--pretrained {path}: no such file")
    if problem := utils.finetune_folder_problem(args.output_dir, args.overwrite):
        parser.error(problem)
    if args.transfer == "encoder+decoder" and not args.pretrained:
        parser.error("--transfer encoder+decoder needs --pretrained")
    if args.branch is not None and not args.pretrained:
        parser.error("--branch needs --pretrained")
    try:
        args.mode, args.stride, args.scale, args.test_scale, args.keep_ratio = eval_geometry(
            args.dataset, args.crop_size, args.mode, args.stride, args.scale, args.test_scale, args.keep_ratio)
    except ValueError as e:
        parser.error(str(e))
    args.precision = utils.choose_precision(args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                            args.precision)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    return args


# ---------------------------------------------------------------- optimization

def poly_schedule(base_lr, iters, power=0.9, min_lr=1e-4):
    """Learning rate of iterations t = 0..iters-1, mmseg's poly policy:
    lr_t = (base_lr - min_lr) * (1 - t / iters) ** power + min_lr."""
    return (base_lr - min_lr) * (1 - np.arange(iters) / iters) ** power + min_lr


def step_schedule(base_lr, iters, steps, gamma=0.1):
    """Learning rate of iterations t = 0..iters-1, mmcv's step policy: base_lr * gamma ** (number of steps <= t)."""
    return base_lr * gamma ** np.searchsorted(np.asarray(steps), np.arange(iters), side="right")


def lr_schedule(args):
    if args.schedule == "step":
        return step_schedule(args.lr, args.iters, args.lr_steps)
    return poly_schedule(args.lr, args.iters, args.power, args.min_lr)


def seg_loss(logits, target):
    """Pixel cross-entropy as mmseg 0.30 computes it (avg_non_ignore=False): ignored pixels contribute 0 but count
    in the mean. logits (B, K, H, W), target (B, H, W) int64 with 255 = ignore."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX, reduction="sum") / target.numel()


# ---------------------------------------------------------------- one fine-tune

def build_model(args, pretrained, device):
    """Segmenter initialized from `pretrained` (or randomly), on `device`; returns (model, log lines)."""
    model = Segmenter(args.arch, args.decoder, args.num_classes, args.align_corners)
    notes = [f"model: {args.arch} + {args.decoder.upper()} head, {args.num_classes} classes, encoder output "
             f"stride {model.output_stride}" + (" (torchvision's BasicBlock cannot dilate c5)"
                                                if args.decoder == "fcn" and model.output_stride == 32 else "")]
    notes += transfer_segmenter(model, pretrained, args.transfer) if pretrained else ["random init (no --pretrained)"]
    model = model.to(device)
    if device.type == "cuda" and utils.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # mmseg's configs use SyncBN
    return model.to(memory_format=utils.memory_format(device.type)), notes


def finetune(args, seed, datasets, pretrained, device, log):
    """Train one model for `seed` and score the selected checkpoint on the test split.
    datasets: {"train": untransformed train set, "val": eval set or None, "test": eval set}. Returns the record
    that goes into results.json."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    random.seed(seed)
    np.random.seed(seed)
    model, notes = build_model(args, pretrained, device)
    if utils.is_main():
        print("\n".join(f"[seed {seed}] {n}" for n in notes), flush=True)
    world = utils.world_size()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                foreach=True)  # one fused update on CPU too (torch picks it only on CUDA)
    lrs = lr_schedule(args)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    layout = utils.memory_format(device.type)

    indices = fraction_indices(len(datasets["train"]), args.fraction, seed)
    crops = TrainTransform(args.crop_size, args.scale, args.scale_range, args.keep_ratio, args.cat_max_ratio,
                           args.photometric)
    train = SeededAugment(Transformed(datasets["train"], crops, indices), seed)
    batch = args.batch_size // world
    loader = torch.utils.data.DataLoader(train, batch_size=batch, num_workers=args.workers, drop_last=True,
                                         sampler=IterationSampler(len(indices), args.iters, batch, seed),
                                         worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    geometry = (args.mode, args.crop_size, args.stride)
    best = {"miou": -1.0, "iter": None, "state": None}
    last_val = None
    bar = tqdm(total=args.iters, disable=not utils.is_main(), dynamic_ncols=True, desc=f"seed {seed}")
    model.train()
    for it, (images, masks) in enumerate(loader, 1):
        images = images.to(device, non_blocking=True).contiguous(memory_format=layout)
        masks = masks.to(device, non_blocking=True)
        for g in optimizer.param_groups:
            g["lr"] = float(lrs[it - 1])
        with ctx:
            logits = ddp(images)
        loss = seg_loss(logits, masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if it % args.log_every == 0 or it == args.iters:
            value = utils.all_reduce_mean(loss.detach()).item()  # the only host sync of a training step
            if not math.isfinite(value):
                raise SystemExit(f"error: non-finite loss {value} at iteration {it} (seed {seed})")
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lrs[it - 1]:.2e}")
            log({"seed": seed, "iter": it, "loss": value, "lr": float(lrs[it - 1])})
        if args.eval_every and (it % args.eval_every == 0 or it == args.iters):
            scores = evaluate(model, datasets["val"], *geometry, device, args.workers, ctx)
            last_val = scores["miou"]
            log({"seed": seed, "iter": it, "val_miou": utils.as_percent(last_val)})
            if utils.is_main():
                bar.write(f"[seed {seed}] iter {it}: val mIoU {100 * scores['miou']:.2f}")
            if args.select == "best" and scores["miou"] > best["miou"]:
                best = {"miou": scores["miou"], "iter": it,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    bar.close()

    if args.select == "best":
        model.load_state_dict(best["state"])
    selected_iter = best["iter"] if args.select == "best" else args.iters
    scores = evaluate(model, datasets["test"], *geometry, device, args.workers, ctx, desc=f"test (seed {seed})")
    path = os.path.join(args.output_dir, f"seed{seed}.pt")
    regions = region_scores(scores["cm"], DATASETS[args.dataset].get("regions"))
    if utils.is_main():
        print(f"[seed {seed}] test, {args.select} checkpoint (iteration {selected_iter}):", flush=True)
        print(score_table(scores, datasets["train"].classes, regions), flush=True)
        utils.save_checkpoint(path, {"model": {k: v.contiguous() for k, v in model.state_dict().items()},
                               "args": vars(args), "seed": seed, "iter": selected_iter, "select": args.select,
                               "test_miou": utils.as_percent(scores["miou"])})
    return {"seed": seed, "miou": utils.as_percent(scores["miou"]), "pixel_acc": utils.as_percent(scores["pixel_acc"]),
            "iou_per_class": dict(zip(datasets["train"].classes, utils.as_percent(scores["iou"]))), "regions": regions,
            "val_miou": utils.as_percent(best["miou"] if args.select == "best" else last_val), "iter": selected_iter,
            "train_images": len(indices), "checkpoint": path, "transfer": notes}


def summarize(records, classes):
    """Per-seed records -> mean and std (population, ddof=0) of test mIoU over seeds, the per-class mean, and the
    regions' (REFUGE's optic disc and cup) IoU and Dice means and stds."""
    mean_std = lambda values: {"mean": round(float(np.mean(values)), 4), "std": round(float(np.std(values)), 4)}
    mious = np.array([r["miou"] for r in records], dtype=np.float64)
    per_class = {}
    for name in classes:
        values = [r["iou_per_class"][name] for r in records if r["iou_per_class"][name] is not None]
        per_class[name] = round(float(np.mean(values)), 4) if values else None
    regions = {name: {k: mean_std([r["regions"][name][k] for r in records]) for k in ("iou", "dice")}
               for name in (records[0]["regions"] or {})}
    return {"miou_mean": round(float(mious.mean()), 4), "miou_std": round(float(mious.std()), 4),
            "iou_per_class_mean": per_class, **({"regions": regions} if regions else {})}


# ---------------------------------------------------------------- main

def prepare(args):
    """Everything that can fail on bad input, before training: the pre-trained weights, the --arch they imply,
    every dataset split and every mask that will be read. Returns (pretrained or None, datasets)."""
    pretrained = pretrained_for(args)

    lengths = (args.synthetic_train, args.synthetic_val, args.synthetic_test)
    splits = ["train", "test"] + ["val"] * bool(args.eval_every)
    data = {s: build_dataset(args.dataset, s, args.data_root, args.num_classes, lengths, args.synthetic_size)
            for s in splits}
    used = sorted(set().union(*(fraction_indices(len(data["train"]), args.fraction, s) for s in args.seeds)))
    t = time.perf_counter()
    check_dataset(data["train"], used, threads=max(1, args.workers))
    evaluated = ["test"] + ["val"] * ("val" in data and args.dataset not in TEST_IS_VAL)
    for s in evaluated:
        check_dataset(data[s], threads=max(1, args.workers))
    if utils.is_main() and args.dataset != "synthetic":
        print(f"checked {len(used)} training and {sum(len(data[s]) for s in evaluated)} evaluation masks "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    if args.select == "best" and args.dataset in TEST_IS_VAL and utils.is_main():
        print(f"note: {args.dataset} has no labelled test split, so test = val and --select best picks the "
              "checkpoint on the images it is scored on", flush=True)
    evaluation = EvalTransform(args.test_scale, args.keep_ratio)
    return pretrained, {"train": data["train"], "test": Transformed(data["test"], evaluation),
                        "val": Transformed(data["val"], evaluation) if "val" in data else None}


def main(args):
    device, pretrained, datasets, command, log = utils.start_finetune(args, prepare)

    records = [finetune(args, seed, datasets, pretrained, device, log) for seed in args.seeds]
    classes = datasets["train"].classes
    results = {"command": command, **summarize(records, classes), "units": "percent",
               "dataset": args.dataset, "split": "test", "decoder": args.decoder, "arch": args.arch,
               "pretrained": args.pretrained, "transfer": args.transfer, "fraction": args.fraction,
               "select": args.select, "seeds": records, "classes": list(classes),
               "warnings": list(datasets["train"].warnings), "args": vars(args)}
    if utils.is_main():
        log.close()
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        per_seed = ", ".join(f"{r['miou']:.2f}" for r in records)
        regions = "".join(f"; {name} IoU {v['iou']['mean']:.2f}, Dice {v['dice']['mean']:.2f}"
                          for name, v in results.get("regions", {}).items())
        warnings = "".join(f" (warning: {w})" for w in datasets["train"].warnings)  # repeated where it is read last
        print(f"test mIoU over seeds {args.seeds}: {results['miou_mean']:.2f} +- {results['miou_std']:.2f} "
              f"({per_seed}){regions}; wrote {os.path.join(args.output_dir, 'results.json')}{warnings}", flush=True)
    utils.shutdown()
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    main(finalize_args(parser.parse_args(), parser))
