"""Fine-tune torchvision's Faster R-CNN or Mask R-CNN (v2: FPN with BatchNorm, 4conv1fc heads) for object detection
and instance segmentation, from random init, a pre-trained encoder, or a pre-trained encoder and FPN, and report
COCO or VOC AP over seeds (paper Sec. 3.4: Faster R-CNN on VOC 07+12, Mask R-CNN on COCO).

    python finetune_det.py --pretrained runs/demo/last.pt --transfer encoder+decoder    # built-in scenes
    torchrun --nproc_per_node 8 finetune_det.py --dataset coco --data-root data/coco \
        --pretrained runs/decon-ml/last.pt --transfer encoder+decoder --seeds 0 1 2
    torchrun --nproc_per_node 8 finetune_det.py --dataset voc --data-root data/VOCdevkit \
        --pretrained runs/decon-ml/last.pt --transfer encoder+decoder --seeds 0 1 2

Training is Detectron2's, which the paper used, with the recipes of MoCo's and SlotCon's configs as each dataset's
defaults (docs/DETECTION.md): SGD (momentum 0.9, weight decay 1e-4, none on BatchNorm), linear warm-up from 0.001 x
lr, x0.1 steps; a short side drawn per image from the training sizes, a long side bound, horizontal flips. The
detector, its metrics and inference are in detection.py, the datasets in det_data.py, the transfer in weights.py.
"""
import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import utils
from data import SeededAugment, seed_worker
from det_data import DetectionTrainTransform, build_detection_dataset, collate_lists
from detection import build_detector, detect, detection_scores, detection_table
from seg_data import IterationSampler, Transformed, check_dataset, fraction_indices
from weights import pretrained_for, transfer_detector

# Each dataset's recipe. VOC: MoCo's detection/configs/pascal_voc_R_50_C4_24k_moco.yaml (trainval 07+12, test2007,
# 24k iterations, steps 18k / 22k, warm-up 100, short side 480..800 step 32, test 800; Faster R-CNN). COCO:
# SlotCon's transfer/detection/configs/COCO_R_50_FPN_1x_SlotCon.yaml (Detectron2's 1x: 90k iterations, steps 60k /
# 80k, warm-up 1000, short side 640..800 step 32, test 800; Mask R-CNN with BatchNorm in the FPN and both heads).
# Both: batch 16, lr 0.02, long side at most 1333, 512 RoIs per image, 1000 test proposals. The steps are fractions of
# --iters (so that a longer schedule keeps their place, as Detectron2's 2x does). The built-in scenes: a Mask R-CNN
# that trains in minutes on a CPU. A flag left unset takes these.
DATASET_DEFAULTS = {
    "synthetic": dict(model="mask", iters=100, batch_size=4, lr=0.02, step_fractions=(0.7, 0.9), warmup_iters=20,
                      min_size=(96, 112, 128, 144, 160), max_size=1333, test_size=128, roi_batch_size=32,
                      test_proposals=100, eval_every=0),
    "voc": dict(model="faster", iters=24000, batch_size=16, lr=0.02, step_fractions=(18 / 24, 22 / 24),
                warmup_iters=100, min_size=tuple(range(480, 801, 32)), max_size=1333, test_size=800,
                roi_batch_size=512, test_proposals=1000, eval_every=0),
    "coco": dict(model="mask", iters=90000, batch_size=16, lr=0.02, step_fractions=(60 / 90, 80 / 90),
                 warmup_iters=1000, min_size=tuple(range(640, 801, 32)), max_size=1333, test_size=800,
                 roi_batch_size=512, test_proposals=1000, eval_every=0),
}
EVAL_SPLIT = {"synthetic": "test", "voc": "test", "coco": "val"}  # VOC test2007, COCO val2017, as the paper


def get_args_parser():
    p = utils.ArgumentParser("finetune_det.py", description="Fine-tune Faster / Mask R-CNN (torchvision v2) for "
                                                            "detection and instance segmentation and report AP "
                                                            "averaged over seeds. 'None' means the dataset's value.")
    a = p.add_argument
    a("--dataset", choices=sorted(DATASET_DEFAULTS), default="synthetic", help="docs/DETECTION.md, 'Dataset "
      "layouts', shows each layout")
    a("--data-root", default=None, help="dataset folder (voc: holding VOCdevkit/VOC2007 and VOC2012; coco: holding "
      "train2017/, val2017/, annotations/)")
    a("--synthetic-size", type=int, default=128, help="side of the built-in scenes")
    a("--synthetic-train", type=int, default=256, help="built-in training scenes")
    a("--synthetic-val", type=int, default=32, help="built-in validation scenes (--eval-every)")
    a("--synthetic-test", type=int, default=64, help="built-in test scenes")
    a("--model", choices=["faster", "mask"], default=None, help="Faster R-CNN (boxes) or Mask R-CNN (boxes and "
      "masks); voc: faster, coco and synthetic: mask")
    a("--pretrained", nargs="+", default=None, metavar="PATH",
      help="a pretrain.py last.pt, or files exported by convert.py --to mmseg (backbone, neck); None: random init")
    a("--transfer", choices=["encoder", "encoder+decoder"], default="encoder", help="what to initialize from "
      "--pretrained: the encoder (backbone.body), or the encoder and the FPN (backbone.fpn); an FCN has no "
      "counterpart in the detector")
    a("--fraction", type=float, default=1.0, help="fraction of the training images, a fixed subset per seed "
      "(label scarcity, beyond the paper)")
    a("--iters", type=int, default=None, help="iterations (VOC 24k, COCO 90k)")
    a("--batch-size", type=int, default=None, help="global batch of images over all processes (VOC, COCO: 16)")
    a("--lr", type=float, default=None, help="base learning rate (VOC, COCO: 0.02 at batch 16)")
    a("--lr-steps", type=int, nargs="+", default=None, help="iterations where the lr is multiplied by 0.1 "
      "(default: VOC 3/4 and 11/12 of --iters, 18000 22000; COCO 2/3 and 8/9, 60000 80000)")
    a("--warmup-iters", type=int, default=None, help="linear warm-up from 0.001 x lr (VOC 100, COCO 1000)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--weight-decay", type=float, default=1e-4, help="SGD weight decay, not on BatchNorm parameters "
      "(Detectron2's WEIGHT_DECAY_NORM 0)")
    a("--min-size", type=int, nargs="+", default=None, help="training short sides, one drawn per image "
      "(VOC 480..800, COCO 640..800, step 32)")
    a("--max-size", type=int, default=None, help="long side bound, training and test (1333)")
    a("--test-size", type=int, default=None, help="test short side (800)")
    a("--roi-batch-size", type=int, default=None, help="RoIs sampled per image for the box head in training "
      "(512; the built-in scenes: 64)")
    a("--test-proposals", type=int, default=None, help="RPN proposals per image at test time (1000; the built-in "
      "scenes: 100)")
    a("--eval-every", type=int, default=None, help="evaluate every N iterations (0: only at the end); on val for "
      "the built-in scenes, on the reported split for voc and coco (no selection: the last checkpoint is reported)")
    utils.add_finetune_flags(a, "output/det")
    return p


def finalize_args(args, parser):
    """Fill the dataset's defaults and reject impossible settings with one line, before any work."""
    defaults = DATASET_DEFAULTS[args.dataset]
    typed = {k for k in ("lr_steps", "warmup_iters") if getattr(args, k) is not None}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.min_size = list(args.min_size)
    if args.iters >= 1:
        derived_schedule(args, typed, defaults)
    if args.dataset != "synthetic":
        if args.data_root is None:
            parser.error(f"--data-root is required for --dataset {args.dataset}")
        if not os.path.isdir(args.data_root):
            parser.error(f"--data-root {args.data_root}: no such folder")
    if not 0.0 < args.fraction <= 1.0:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1]")
    args.seeds = args.seeds or [args.seed]
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: repeated seed")
    for name in ("iters", "batch_size", "log_every", "max_size", "test_size", "roi_batch_size", "test_proposals",
                 "synthetic_size", "synthetic_train", "synthetic_val", "synthetic_test"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.min_size + [args.test_size]) < 32:
        parser.error(f"--min-size / --test-size {min(args.min_size + [args.test_size])}: the ResNet needs at least "
                     "32 px")
    if args.lr_steps and (args.lr_steps != sorted(args.lr_steps) or args.lr_steps[0] < 1 or
                          args.lr_steps[-1] >= args.iters):
        parser.error(f"--lr-steps {' '.join(map(str, args.lr_steps))}: increasing iterations within "
                     f"(0, --iters {args.iters})")
    if not 0 <= args.warmup_iters < args.iters:
        parser.error(f"--warmup-iters {args.warmup_iters}: must be in [0, --iters {args.iters})")
    if args.eval_every < 0:
        parser.error("--eval-every must be 0 (only at the end) or positive")
    for path in args.pretrained or []:
        if not os.path.isfile(path):
            parser.error(f"--pretrained {path}: no such file")
    if args.transfer == "encoder+decoder" and not args.pretrained:
        parser.error("--transfer encoder+decoder needs --pretrained")
    if args.branch is not None and not args.pretrained:
        parser.error("--branch needs --pretrained")
    if problem := utils.finetune_folder_problem(args.output_dir, args.overwrite):
        parser.error(problem)
    args.precision = utils.choose_precision(args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                                            args.precision)
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    return args


def derived_schedule(args, typed, defaults):
    """The schedule values a user did not type fit any --iters: lr steps at the recipe's fractions of --iters,
    within (0, --iters) (none when --iters is too short for them); the warm-up at most a fifth of --iters. Says
    what it used when it departs from the recipe."""
    notes = []
    if "lr_steps" not in typed:
        args.lr_steps = [s for s in (round(f * args.iters) for f in defaults["step_fractions"]) if 0 < s < args.iters]
        if len(args.lr_steps) < len(defaults["step_fractions"]):
            notes.append(f"lr steps {args.lr_steps or 'none'}")
    if "warmup_iters" not in typed and args.warmup_iters > args.iters // 5:
        args.warmup_iters = args.iters // 5
        notes.append(f"warm-up {args.warmup_iters} iterations")
    if notes:
        print(f"note: --iters {args.iters}: {', '.join(notes)} (the recipe's would not fit)", flush=True)


# ---------------------------------------------------------------- optimization

def warmup_multistep_schedule(base_lr, iters, steps, warmup_iters, warmup_factor=0.001, gamma=0.1):
    """Learning rate of iterations t = 0..iters-1, Detectron2's WarmupMultiStepLR: base_lr * gamma ** (number of
    steps <= t), times the linear warm-up factor warmup_factor * (1 - t / warmup_iters) + t / warmup_iters for
    t < warmup_iters."""
    t = np.arange(iters)
    alpha = np.minimum(t / max(warmup_iters, 1), 1.0)
    return base_lr * gamma ** np.searchsorted(np.asarray(steps), t, side="right") * \
        np.where(t < warmup_iters, warmup_factor * (1 - alpha) + alpha, 1.0)


def parameter_groups(model, weight_decay):
    """SGD groups as Detectron2 builds them: weight decay on every parameter but BatchNorm's weights and biases."""
    norm = {id(p) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


# ---------------------------------------------------------------- one fine-tune

def build_model(args, pretrained, num_classes, device):
    """The detector initialized from `pretrained` (or randomly), on `device`; returns (model, log lines)."""
    model = build_detector(args.arch, num_classes, args.model, args.test_size, args.max_size, args.roi_batch_size,
                           args.test_proposals)
    name = {"faster": "Faster R-CNN", "mask": "Mask R-CNN"}[args.model]
    notes = [f"model: {name} v2, {args.arch} + FPN (BatchNorm), {num_classes - 1} classes"]
    notes += transfer_detector(model, pretrained, args.transfer) if pretrained else ["random init (no --pretrained)"]
    model = model.to(device)
    if device.type == "cuda" and utils.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # SyncBN everywhere, as the paper's configs
    return model.to(memory_format=utils.memory_format(device.type)), notes


def scores_as_percent(scores):
    """detection_scores' fractions -> percent, NaN -> None (JSON has no NaN)."""
    return {kind: {k: utils.as_percent(v) for k, v in s.items()} for kind, s in scores.items()}


def finetune(args, seed, datasets, pretrained, device, log):
    """Train one detector for `seed` and score the last checkpoint on the evaluation split.
    datasets: {"train", "val" (or None), "test"}, untransformed. Returns the record that goes into results.json."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    random.seed(seed)
    np.random.seed(seed)
    model, notes = build_model(args, pretrained, len(datasets["train"].classes), device)
    if utils.is_main():
        print("\n".join(f"[seed {seed}] {n}" for n in notes), flush=True)
    world = utils.world_size()
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum,
                                foreach=True)
    lrs = warmup_multistep_schedule(args.lr, args.iters, args.lr_steps, args.warmup_iters)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    indices = fraction_indices(len(datasets["train"]), args.fraction, seed)
    augment = DetectionTrainTransform(args.min_size, args.max_size, with_masks=args.model == "mask")
    train = SeededAugment(Transformed(datasets["train"], augment, indices), seed)
    batch = args.batch_size // world
    loader = torch.utils.data.DataLoader(train, batch_size=batch, num_workers=args.workers, collate_fn=collate_lists,
                                         sampler=IterationSampler(len(indices), args.iters, batch, seed),
                                         worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    bar = tqdm(total=args.iters, disable=not utils.is_main(), dynamic_ncols=True, desc=f"seed {seed}")
    model.train()
    since = (0, time.perf_counter())  # (iteration, time) of the last log: the speed between logs, data included
    for it, (images, targets) in enumerate(loader, 1):
        images = [x.to(device, non_blocking=True) for x in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        for g in optimizer.param_groups:
            g["lr"] = float(lrs[it - 1])
        with ctx:
            losses = ddp(images, targets)  # {"loss_classifier", "loss_box_reg", ["loss_mask"], "loss_objectness", ...}
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        if it % args.log_every == 0 or it == args.iters:
            values = utils.all_reduce_mean(torch.stack([loss.detach(), *losses.values()]).float()).tolist()
            if not math.isfinite(values[0]):
                raise SystemExit(f"error: non-finite loss {values[0]} at iteration {it} (seed {seed})")
            bar.set_postfix(loss=f"{values[0]:.4f}", lr=f"{lrs[it - 1]:.2e}")
            speed = (it - since[0]) / (time.perf_counter() - since[1])
            log({"seed": seed, "iter": it, "loss": values[0], **dict(zip(losses, values[1:])),
                 "lr": float(lrs[it - 1]), "it_per_s": round(speed, 4)})
            since = (it, time.perf_counter())
        if args.eval_every and it % args.eval_every == 0 and it < args.iters:
            split = "val" if datasets["val"] is not None else "test"
            scores = detection_scores(datasets[split], detect(model, datasets[split], device, args.workers, ctx),
                                      args.model == "mask")
            log({"seed": seed, "iter": it, **{f"{split}_{kind}": s for kind, s in scores_as_percent(scores).items()}})
            since = (it, time.perf_counter())  # the evaluation is not training time
            if utils.is_main():
                bar.write(f"[seed {seed}] iter {it}: {split} " + ", ".join(
                    f"{kind} AP {100 * s['AP']:.2f}" for kind, s in scores.items()))
    bar.close()

    results = detect(model, datasets["test"], device, args.workers, ctx, desc=f"test (seed {seed})")
    scores = scores_as_percent(detection_scores(datasets["test"], results, args.model == "mask"))
    path = os.path.join(args.output_dir, f"seed{seed}.pt")
    if utils.is_main():
        print(f"[seed {seed}] {args.dataset} {EVAL_SPLIT[args.dataset]}, last checkpoint (iteration {args.iters}):",
              flush=True)
        print(detection_table(scores), flush=True)
        utils.save_checkpoint(path, {"model": {k: v.contiguous() for k, v in model.state_dict().items()},
                                     "args": {**vars(args), "num_classes": len(datasets["train"].classes)},
                                     "task": "detection", "seed": seed, "iter": args.iters, "scores": scores})
    return {"seed": seed, **scores, "iter": args.iters, "train_images": len(indices), "checkpoint": path,
            "transfer": notes}


def summarize(records):
    """Per-seed records -> {"bbox": {"AP": {"mean", "std"}, ...}, "segm": ...}: population std (ddof=0) over seeds."""
    return {kind: {k: {"mean": round(float(np.mean([r[kind][k] for r in records])), 4),
                       "std": round(float(np.std([r[kind][k] for r in records])), 4)}
                   for k in records[0][kind] if all(r[kind][k] is not None for r in records)}
            for kind in ("bbox", "segm") if kind in records[0]}


# ---------------------------------------------------------------- main

def prepare(args):
    """Everything that can fail on bad input, before training: the pre-trained weights, the --arch they imply,
    every split's annotations (unknown class, box outside its image) and the header of every image that will be
    read (missing, broken, not the annotated size). Returns (pretrained or None, datasets)."""
    pretrained = pretrained_for(args)
    lengths = (args.synthetic_train, args.synthetic_val, args.synthetic_test)
    build = lambda split: build_detection_dataset(args.dataset, split, args.data_root, lengths, args.synthetic_size)
    datasets = {"train": build("train"), "test": build(EVAL_SPLIT[args.dataset]),
                "val": build("val") if args.eval_every and args.dataset == "synthetic" else None}
    used = sorted(set().union(*(fraction_indices(len(datasets["train"]), args.fraction, s) for s in args.seeds)))
    t = time.perf_counter()
    check_dataset(datasets["train"], used, threads=max(1, args.workers))
    check_dataset(datasets["test"], threads=max(1, args.workers))
    if utils.is_main() and args.dataset != "synthetic":
        print(f"checked {len(used)} training and {len(datasets['test'])} evaluation images "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    return pretrained, datasets


def main(args):
    device, pretrained, datasets, command, log = utils.start_finetune(args, prepare)

    records = [finetune(args, seed, datasets, pretrained, device, log) for seed in args.seeds]
    results = {"command": command, "task": "detection", **summarize(records), "units": "percent",
               "dataset": args.dataset, "split": EVAL_SPLIT[args.dataset], "model": args.model, "arch": args.arch,
               "pretrained": args.pretrained, "transfer": args.transfer, "fraction": args.fraction,
               "seeds": records, "classes": list(datasets["train"].classes), "args": vars(args)}
    if utils.is_main():
        log.close()
        with open(os.path.join(args.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        per_seed = {kind: ", ".join(f"{r[kind]['AP']:.2f}" for r in records) for kind in ("bbox", "segm")
                    if kind in results}
        line = "; ".join(f"{kind} AP {results[kind]['AP']['mean']:.2f} +- {results[kind]['AP']['std']:.2f} "
                         f"({values})" for kind, values in per_seed.items())
        print(f"{EVAL_SPLIT[args.dataset]} over seeds {args.seeds}: {line}; wrote "
              f"{os.path.join(args.output_dir, 'results.json')}", flush=True)
    utils.shutdown()
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    main(finalize_args(parser.parse_args(), parser))
