"""Reproduce the shape of the paper's Table 7 on the built-in synthetic scenes, and measure what pre-training learned:
pre-train (none, SlotCon, DeCon-SL, DeCon-ML) once per seed, probe every pre-training level by level (probe.py:
frozen linear probe, k-means, SlotCon's prototypes, each beside random init and the pre-trained encoder with a
random decoder), fine-tune with 5 / 25 / 100 % of the labels, transfer the encoder or the encoder and decoder, and
write `results.md` and `results.json` to --output-dir. Seed s pre-trains, probes and fine-tunes with seed s; the
tables give mean +- std over the seeds.

Every stage is a subprocess (`pretrain.py`, `probe.py`, `finetune_seg.py`) whose exact command, runtime and log are
kept in its folder; a stage whose output exists is reused, so an interrupted run continues where it stopped (a
pre-training cut mid-way resumes from its `last.pt`). The defaults fit about 2 hours on 2 CPU cores; flags scale
them up:

    python reproduce.py                                   # ResNet-18, 64 px, 3 seeds, ~2 h on 2 CPU cores
    python reproduce.py --quick --output-dir /tmp/rq      # tiny everything, a smoke test
    python reproduce.py --device cuda --arch resnet50 --image-size 224 --pretrain-epochs 100 --finetune-iters 2000 \
        --finetune-decoder fcn --pretrain-batch 256 --finetune-batch 16 --densecl
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import torch

import utils
from pretrain import variant_argv

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK = dict(arch="resnet18", image_size=32, pretrain_steps=2, pretrain_batch=4, pretrain_epochs=1, pretrain_images=8,
             dim_hidden=32, num_prototypes=4, finetune_iters=3, finetune_batch=2, synthetic_train=40,
             synthetic_test=4, seeds=[0], workers=0, jobs=2,
             probe_flags="--synthetic-train 8 --synthetic-test 4 --synthetic-size 64 --size 64 --probe-epochs 1 "
                         "--kmeans-restarts 1 --kmeans-iters 3 --batch-size 8")


def get_args_parser():
    p = argparse.ArgumentParser("DeCon: Table 7 at small scale", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--output-dir", default="runs/reproduce", help="stages, results.md and results.json go here")
    a("--quick", action="store_true", help="tiny everything and one seed: a smoke test of the pipeline")
    a("--arch", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    a("--image-size", type=int, default=64, help="pre-training crops, fine-tuning scenes and crops (multiple of 32)")
    a("--pretrain-epochs", type=int, default=8, help="passes over the scenes; the schedules span them")
    a("--pretrain-images", type=int, default=512, help="built-in scenes of each pre-training")
    a("--pretrain-steps", type=int, default=None, help="stop each pre-training after this many steps (schedules "
      "unchanged; default: all epochs)")
    a("--pretrain-batch", type=int, default=16)
    a("--pretrain-lr", type=float, default=32.0, help="LARS base lr per 256 images: peak 2.0 at batch 16, SlotCon's "
      "peak at batch 512 (a short run at 1.0 x 16 / 256 learns nothing visible)")
    a("--pretrain-warmup", type=float, default=0.5, help="warm-up epochs")
    a("--teacher-momentum", type=float, default=0.95, help="start of the teacher EMA's cosine to 1 (paper 0.99, "
      "for hundreds of epochs)")
    a("--min-scale", type=float, default=0.2, help="smallest crop area fraction (paper 0.08)")
    a("--dim-hidden", type=int, default=512, help="projector / predictor hidden width (paper 4096)")
    a("--num-prototypes", type=int, default=16, help="SlotCon prototypes (paper 256; the scenes have 9 classes)")
    a("--probe", action=argparse.BooleanOptionalAction, default=True, help="probe every pre-training (probe.py)")
    a("--alpha", type=float, default=0.5, help="DeCon-SL encoder loss weight (Table 7 uses 0.5)")
    a("--densecl", action="store_true", help="also DenseCL and DeCon-SL-DenseCL")
    a("--finetune-decoder", default="fpn", choices=["fcn", "fpn"],
      help="segmentation head; also the DeCon-SL decoder, so that encoder+decoder transfer applies. The paper "
           "fine-tunes an FCN on a dilated ResNet-50; ResNet-18 cannot dilate and its stride-32 FCN learns only "
           "the background at 64 px, hence fpn by default")
    a("--finetune-iters", type=int, default=360,
      help="at 120, random init scored 26.2 at 5 %% and 28.8 at 100 %%: too short for labels to matter")
    a("--finetune-batch", type=int, default=8)
    a("--finetune-lr", type=float, default=0.02)
    a("--synthetic-train", type=int, default=256, help="labelled training scenes (5 %% = 13)")
    a("--synthetic-test", type=int, default=64)
    a("--fractions", type=float, nargs="+", default=[0.05, 0.25, 1.0])
    a("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a("--workers", type=int, default=1, help="data-loading processes of each stage (fine-tuning uses 0 below 2)")
    a("--jobs", type=int, default=2, help="stages run at once (a fine-tune starts once its pre-training is done)")
    a("--threads", type=int, default=1,
      help="OMP_NUM_THREADS of each stage (0: inherit); on a shared 2-core machine 1 thread ran 3x faster than 2, "
           "so the default uses the 2 cores as 2 jobs of 1 thread")
    a("--probe-flags", default="", help="extra probe.py flags, as one quoted string")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype of every stage (default the "
      "scripts': bf16 on CUDA and on CPUs with bf16 instructions, else fp32)")
    a("--device", default=None, choices=["cuda", "cpu"])
    return p


def finalize(args):
    """--quick overrides the sizes; the rest is validated before any work starts."""
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.image_size % 32:
        raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of 32 (the FPN needs it)")
    if not all(0 < f <= 1 for f in args.fractions):
        raise SystemExit(f"error: --fractions {args.fractions}: each must be in (0, 1]")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: must be at least 1")
    if not 0 < args.alpha < 1:
        raise SystemExit(f"error: --alpha {args.alpha}: DeCon-SL needs 0 < alpha < 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = utils.choose_precision(device, args.precision)  # resolved once: it is part of each stage's key
    return args


def pretrainings(args):
    """(name, decoder pre-trained or None, pretrain.py flags); name 'none' is random init (no stage)."""
    dec = args.finetune_decoder
    sl = dict(decoder=dec, alpha=args.alpha, deep_supervision=False if dec == "fpn" else None)
    out = [("Random init", None, None),
           ("SlotCon", None, variant_argv("slotcon")),
           (f"DeCon-SL-SlotCon-{dec.upper()}", dec, variant_argv("sl-" + dec, **sl)),
           ("DeCon-ML-SlotCon-FPN", "fpn", variant_argv("ml-fpn"))]
    if args.densecl:
        out += [("DenseCL", None, variant_argv("densecl")),
                (f"DeCon-SL-DenseCL-{dec.upper()}", dec, variant_argv("densecl-sl-" + dec, **sl))]
    return out


def rows(args):
    """Table rows: (pre-training name, its decoder, transfer). Encoder+decoder only where the decoders match."""
    out = []
    for name, decoder, _ in pretrainings(args):
        out.append((name, decoder, "encoder" if decoder or name != "Random init" else "none"))
        if decoder == args.finetune_decoder:
            out.append((name, decoder, "encoder+decoder"))
    return out


def slug(name):
    return name.lower().replace(" ", "-")


def pretrain_command(args, flags, seed, out_dir):
    cmd = [sys.executable, os.path.join(HERE, "pretrain.py"), *flags, "--arch", args.arch,
           "--image-size", str(args.image_size), "--batch-size", str(args.pretrain_batch),
           "--epochs", str(args.pretrain_epochs), "--synthetic-images", str(args.pretrain_images),
           "--base-lr", str(args.pretrain_lr),
           "--warmup-epochs", str(min(args.pretrain_warmup, args.pretrain_epochs / 4)),
           "--teacher-momentum", str(args.teacher_momentum), "--min-scale", str(args.min_scale),
           "--dim-hidden", str(args.dim_hidden), "--num-prototypes", str(args.num_prototypes), "--seed", str(seed),
           "--workers", str(args.workers), "--log-every", "4", "--precision", args.precision, "--output-dir", out_dir]
    cmd += ["--max-steps", str(args.pretrain_steps)] if args.pretrain_steps else []
    if flags[flags.index("--framework") + 1] == "densecl":  # the dictionary must not outgrow what a short run fills
        cmd += ["--queue-size", str(max(args.pretrain_batch, 8 * args.pretrain_batch))]
    return cmd + (["--device", args.device] if args.device else [])


def probe_command(args, checkpoint, decoder, seed, out_dir):
    cmd = [sys.executable, os.path.join(HERE, "probe.py"), "--pretrained", checkpoint, "--seed", str(seed),
           "--output-dir", out_dir, *shlex.split(args.probe_flags)]
    cmd += [] if decoder else ["--decoder", args.finetune_decoder]  # an encoder-only run: probe its random decoder
    return cmd + (["--device", args.device] if args.device else [])


def finetune_command(args, pretrained, transfer, fraction, seed, out_dir):
    cmd = [sys.executable, os.path.join(HERE, "finetune_seg.py"), "--dataset", "synthetic",
           "--decoder", args.finetune_decoder, "--arch", args.arch, "--fraction", str(fraction),
           "--seed", str(seed), "--iters", str(args.finetune_iters),
           "--batch-size", str(args.finetune_batch), "--lr", str(args.finetune_lr),
           "--synthetic-size", str(args.image_size), "--crop-size", str(args.image_size),
           "--synthetic-train", str(args.synthetic_train), "--synthetic-test", str(args.synthetic_test),
           "--eval-every", "0", "--workers", str(args.workers if args.workers >= 2 else 0),
           "--precision", args.precision, "--output-dir", out_dir, "--overwrite"]  # a redone stage replaces its run
    if pretrained:
        cmd += ["--pretrained", pretrained, "--transfer", transfer]
    return cmd + (["--device", args.device] if args.device else [])


def shown(cmd):
    """The command as recorded: `python` and paths relative to this folder."""
    return shlex.join(["python"] + [os.path.relpath(c, HERE) if c.startswith(HERE) else c for c in cmd[1:]])


def stage_key(cmd):
    """What must match for a finished stage to be reused: its command, less a --resume added after a cut."""
    cmd = list(cmd)
    if "--resume" in cmd:
        i = cmd.index("--resume")
        del cmd[i:i + 2]
    return shown(cmd)


def check_reusable(specs):
    """Before any work: a finished stage made by another command (other flags, an older version) is an error, so
    that a table never mixes settings."""
    for label, cmd, out_dir, done_file, *_ in specs:
        stage_file = os.path.join(out_dir, "stage.json")
        if os.path.exists(done_file) and os.path.exists(stage_file):
            with open(stage_file) as f:
                recorded = json.load(f)
            if recorded.get("key", recorded["command"]) != stage_key(cmd):
                raise SystemExit(f"error: {out_dir} holds '{label}' run with other settings "
                                 f"({recorded['command']}); use another --output-dir or delete it")


def run_stage(label, cmd, out_dir, done_file, threads, progress, inputs=()):
    """Run `cmd` unless `done_file` exists and is newer than every file in `inputs` (a pre-training that was redone
    invalidates its fine-tunes); log to out_dir/stdout.log; record command and runtime in stage.json."""
    stage_file = os.path.join(out_dir, "stage.json")
    if (os.path.exists(done_file) and os.path.exists(stage_file)
            and all(os.path.getmtime(i) <= os.path.getmtime(done_file) for i in inputs)):
        with open(stage_file) as f:
            stage = json.load(f)
        progress(f"{label}: reused ({stage['seconds']:.0f} s when run)")
        return {k: stage[k] for k in ("command", "seconds")}
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t = time.perf_counter()
    with open(os.path.join(out_dir, "stdout.log"), "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE).returncode
    seconds = time.perf_counter() - t
    if rc != 0 or not os.path.exists(done_file):
        raise SystemExit(f"error: {label} failed (exit {rc}); see {os.path.join(out_dir, 'stdout.log')}")
    stage = {"command": shown(cmd), "seconds": round(seconds, 1)}
    with open(stage_file, "w") as f:
        json.dump({**stage, "key": stage_key(cmd)}, f, indent=2)
    progress(f"{label}: done in {seconds:.0f} s")
    return stage


PROBE_LEVELS = ("c5", "p2", "p3", "p4", "p5", "fcn")
PROBE_MEASURES = (("linear", "linear"), ("kmeans", "k-means"), ("prototypes", "prototypes"),
                  ("linear_fgbg", "fg/bg linear"), ("kmeans_fgbg", "fg/bg k-means"))


def mean_std(values):
    values = [v for v in values if v is not None]
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values} if values else None


def probe_table(plan, probes, seeds):
    """Rows of the probe table: random init (the DeCon-ML runs' random networks: ResNet + FPN), each pre-training,
    and each pre-trained encoder under a random decoder; cells: {level: {measure: mean_std over seeds}}."""
    def cells(name, init):
        runs = [probes[(name, s)] for s in seeds]
        levels = [lvl for lvl in PROBE_LEVELS if all(init in r["levels"].get(lvl, {}) for r in runs)]
        return {lvl: {m: mean_std([r["levels"][lvl][init].get(m, {}).get("miou") for r in runs])
                      for m, _ in PROBE_MEASURES} for lvl in levels}
    rows = [("Random init", cells("DeCon-ML-SlotCon-FPN", "random"))]
    for name, decoder, _ in plan:
        rows.append((name, cells(name, "checkpoint")))
        if decoder:  # an encoder-only run is its own control: its decoder levels are a random decoder already
            rows.append((f"{name} encoder + random decoder", cells(name, "enc+rand-dec")))
    return [{"network": n, "levels": c} for n, c in rows]


def markdown(args, table, probe_rows, stages, total_seconds):
    fr = [f"{100 * f:g} %" for f in args.fractions]
    show = lambda c: f"{c['mean']:.2f} +- {c['std']:.2f}" if c else "-"
    lines = [f"# DeCon, Table 7 at small scale (synthetic scenes, {args.arch}, {args.image_size} px)", "",
             f"Seeds {args.seeds}: seed s pre-trains, probes and fine-tunes with s; mean +- std (population).", ""]
    if probe_rows:
        lines += ["## Probes of the frozen teacher (probe.py, test mIoU %)", "",
                  "| network | level | " + " | ".join(label for _, label in PROBE_MEASURES) + " |",
                  "|---|---|" + "---|" * len(PROBE_MEASURES)]
        for row in probe_rows:
            for lvl, measures in row["levels"].items():
                lines.append(f"| {row['network']} | {lvl} | " +
                             " | ".join(show(measures[m]) for m, _ in PROBE_MEASURES) + " |")
        lines.append("")
    lines += ["## Fine-tuning (test mIoU %)", "",
              f"{args.finetune_decoder.upper()} head, {args.finetune_iters} iterations, batch {args.finetune_batch}, "
              f"on {args.synthetic_train} labelled scenes x fraction.", "",
              "| pre-training | transfer | " + " | ".join(fr) + " |", "|---|---|" + "---|" * len(fr)]
    for row in table:
        lines.append(f"| {row['pretraining']} | {row['transfer']} | " + " | ".join(map(show, row["cells"])) + " |")
    lines += ["", f"Total runtime {total_seconds / 60:.1f} min (stages reused from an earlier run count their "
              "original runtime).", "", "## Commands and runtimes", "", "| stage | seconds | command |",
              "|---|---|---|"]
    lines += [f"| {s['label']} | {s['seconds']:.0f} | `{s['command']}` |" for s in stages]
    lines += ["", "Reproduce: `" + shlex.join(["python", "reproduce.py"] + sys.argv[1:]) + "`", ""]
    return "\n".join(lines)


def run_all(specs, args, progress):
    """Run stages (label, cmd, out_dir, done_file[, inputs]), --jobs at a time and in list order (threads only
    wait on subprocesses). A stage whose inputs include another stage's done_file starts once that stage is done:
    a fine-tune as soon as its own pre-training is, not after all of them. A failed stage raises, and nothing
    more is started. Returns the stages in input order."""
    def one(spec):
        return {"label": spec[0], **run_stage(*spec[:4], args.threads, progress, *spec[4:])}
    made_by = {spec[3]: i for i, spec in enumerate(specs)}  # done_file -> the stage that writes it
    waits_on = [[made_by[f] for f in (spec[4] if len(spec) > 4 else ()) if f in made_by] for spec in specs]
    todo, results, running = list(range(len(specs))), {}, {}
    with ThreadPoolExecutor(args.jobs) as pool:
        while todo or running:
            ready = [i for i in todo if all(j in results for j in waits_on[i])]
            for i in ready[:args.jobs - len(running)]:
                todo.remove(i)
                running[pool.submit(one, specs[i])] = i
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                results[running.pop(f)] = f.result()
    return [results[i] for i in range(len(specs))]


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    plan = [p for p in pretrainings(args) if p[2]]
    table_rows = rows(args)
    n = len(args.seeds) * ((1 + args.probe) * len(plan) + len(table_rows) * len(args.fractions))
    count, lock = iter(range(1, n + 1)), threading.Lock()

    def progress(message):
        with lock:
            print(f"[{next(count)}/{n}] {message}", flush=True)

    t0, checkpoints, pretrain_specs, probe_specs = time.perf_counter(), {}, [], []
    for seed in args.seeds:
        for name, decoder, flags in plan:
            out = os.path.join(args.output_dir, "pretrain", f"{slug(name)}-seed{seed}")
            last = checkpoints[(name, seed)] = os.path.join(out, "last.pt")
            cmd = pretrain_command(args, flags, seed, out)
            if os.path.exists(last) and not os.path.exists(os.path.join(out, "stage.json")):
                cmd += ["--resume", last]  # an interrupted pre-training continues from its last epoch
            pretrain_specs.append((f"pretrain {name} / seed {seed}", cmd, out, last))
            if args.probe:
                out = os.path.join(args.output_dir, "probe", f"{slug(name)}-seed{seed}")
                probe_specs.append((f"probe {name} / seed {seed}", probe_command(args, last, decoder, seed, out), out,
                                    os.path.join(out, "probe.json"), [last]))

    specs, cells = [], []
    for fraction in args.fractions:  # the scarcest labels first: a cut run still answers the main question
        for seed in args.seeds:
            for name, _, transfer in table_rows:
                out = os.path.join(args.output_dir, "finetune",
                                   f"{slug(name)}-{transfer.replace('+', '-')}-{fraction:g}-seed{seed}")
                pre = checkpoints.get((name, seed))
                cmd = finetune_command(args, pre, transfer, fraction, seed, out)
                specs.append((f"finetune {name} / {transfer} / {100 * fraction:g} % / seed {seed}", cmd, out,
                              os.path.join(out, "results.json"), [pre] if pre else []))
                cells.append((name, transfer, fraction, seed))
    check_reusable(pretrain_specs + probe_specs + specs)
    stages = run_all(pretrain_specs + probe_specs + specs, args, progress)

    results = {}
    for (name, transfer, fraction, seed), spec in zip(cells, specs):
        with open(spec[3]) as f:
            results.setdefault((name, transfer, fraction), {})[seed] = json.load(f)["seeds"][0]["miou"]
    table = [{"pretraining": name, "decoder": decoder, "transfer": transfer,
              "cells": [{**mean_std(list(results[(name, transfer, f)].values())),
                         "per_seed": results[(name, transfer, f)]} for f in args.fractions]}
             for name, decoder, transfer in table_rows]
    probes = {}
    for spec in probe_specs:
        name, seed = spec[0][len("probe "):].rsplit(" / seed ", 1)
        with open(spec[3]) as f:
            probes[(name, int(seed))] = json.load(f)
    probe_rows = probe_table(plan, probes, args.seeds) if args.probe else []
    total = sum(s["seconds"] for s in stages)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(markdown(args, table, probe_rows, stages, total))
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"fractions": args.fractions, "seeds": args.seeds, "units": "percent mIoU", "table": table,
                   "probes": probe_rows, "stages": stages, "stage_seconds": round(total, 1),
                   "wall_seconds": round(time.perf_counter() - t0, 1), "args": vars(args)}, f, indent=2)
    print(f"wrote {os.path.join(args.output_dir, 'results.md')} ({total / 60:.1f} min of stages, "
          f"{(time.perf_counter() - t0) / 60:.1f} min wall)", flush=True)
    return table


if __name__ == "__main__":
    main(finalize(get_args_parser().parse_args()))
