"""DeCon pre-training: every variant of the paper from one script, on CPU, one GPU, or N GPUs under torchrun.

    python pretrain.py --framework slotcon --decoder fpn --alpha 0 --dropout 0.5            # built-in scenes
    torchrun --nproc_per_node 8 pretrain.py --framework slotcon --decoder fpn --alpha 0 --dropout 0.5 \
        --data coco/train2017
"""
import argparse
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import speed
import utils
from data import DataError, EpochSampler, data_fingerprint, pretraining_dataset, seed_worker
from models import FRAMEWORKS, DeCon, decoder_levels

# The paper's variants (README, "The variants"): name -> pretrain.py flags. bench.py, reproduce.py and the tests
# take them from here.
VARIANTS = {
    "slotcon": dict(framework="slotcon", decoder="none"),
    "sl-fcn": dict(framework="slotcon", decoder="fcn", alpha=0.5),
    "sl-fpn": dict(framework="slotcon", decoder="fpn", deep_supervision=False),
    "ml-fpn": dict(framework="slotcon", decoder="fpn", alpha=0.0, dropout=0.5),
    "densecl": dict(framework="densecl", decoder="none"),
    "densecl-sl-fcn": dict(framework="densecl", decoder="fcn"),
    "densecl-sl-fpn": dict(framework="densecl", decoder="fpn", deep_supervision=False),
    "densecl-ml-fpn": dict(framework="densecl", decoder="fpn", dropout=0.5),
}
# flags that define the model's shapes: a --resume checkpoint must agree on them
MODEL_FLAGS = ("framework", "decoder", "alpha", "dropout", "deep_supervision", "arch", "num_prototypes",
               "num_prototypes_dec", "dim_hidden", "dim_out", "queue_size")


def get_args_parser():
    p = utils.ArgumentParser("pretrain.py", description="Decoder-aware contrastive pre-training (DeCon-SL / "
                                                        "DeCon-ML) of SlotCon or DenseCL. Defaults are the paper's; "
                                                        "'None' means the framework's value.")
    g = p.add_argument_group("method (paper Sec. 3)").add_argument
    g("--framework", choices=list(FRAMEWORKS), default="slotcon", help="SSL framework to adapt")
    g("--decoder", choices=["none", "fcn", "fpn"], default="none", help="decoder pre-trained with the encoder "
      "(none = the encoder-only baseline)")
    g("--alpha", type=float, default=None, help="encoder loss weight in Eq. 1: alpha*L_enc + (1-alpha)*L_dec "
      "(0.5 with a decoder; 1 without)")
    g("--dropout", type=float, default=0.0, help="channel dropout on the FPN skip connections (DeCon-ML: 0.5)")
    g("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
      help="a loss at every FPN level, L_dds = mean (Eq. 3); on by default for fpn, FPN only")

    g = p.add_argument_group("architecture").add_argument
    g("--arch", choices=["resnet18", "resnet34", "resnet50"], default="resnet50", help="encoder")
    g("--num-prototypes", type=int, default=256, help="SlotCon prototypes of the encoder level")
    g("--num-prototypes-dec", type=int, default=None, help="SlotCon prototypes of decoder levels (default: "
      "--num-prototypes)")
    g("--dim-hidden", type=int, default=None, help="hidden width of the heads (SlotCon 4096, DenseCL 2048)")
    g("--dim-out", type=int, default=None, help="output width of the heads (SlotCon 256, DenseCL 128)")
    g("--queue-size", type=int, default=16384, help="DenseCL dictionary size per level")

    g = p.add_argument_group("data").add_argument
    g("--data", default=None, help="folder of unlabeled images, searched recursively (default: built-in "
      "synthetic scenes)")
    g("--synthetic-images", type=int, default=2048, help="number of built-in scenes when --data is not given")
    g("--image-size", type=int, default=224, help="crop size of each view")
    g("--min-scale", type=float, default=None, help="smallest crop area fraction (SlotCon 0.08, DenseCL 0.2)")
    g("--workers", type=int, default=None, help="data-loading processes per GPU (default min(8, cores))")

    g = p.add_argument_group("optimization").add_argument
    g("--batch-size", type=int, default=None, help="global batch over all processes (SlotCon 512, DenseCL 256)")
    g("--epochs", type=int, default=800, help="epochs; the schedules span all of them")
    g("--max-steps", type=int, default=None, help="stop after this many optimizer steps (schedules unchanged)")
    g("--optimizer", choices=["lars", "sgd"], default=None, help="SlotCon: lars, DenseCL: sgd")
    g("--base-lr", type=float, default=None, help="lr per 256 images: lr = base_lr * batch / 256 (SlotCon 1.0, "
      "DenseCL 0.3)")
    g("--weight-decay", type=float, default=None, help="SlotCon 1e-5, DenseCL 1e-4")
    g("--warmup-epochs", type=float, default=None, help="linear warm-up from lr/100 (SlotCon 5, DenseCL 0)")
    g("--teacher-momentum", type=float, default=None, help="EMA momentum: SlotCon 0.99 cosine to 1, DenseCL 0.999 "
      "constant")
    g("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on CUDA and on "
      "CPUs with bf16 instructions, else fp32)")

    g = p.add_argument_group("memory and speed (speed.py; same numbers unless said)").add_argument
    g("--checkpoint-heads", action="store_true", help="recompute the decoder levels' heads and predictors in "
      "backward: less memory, ~25%% more FLOPs (ML-FPN)")
    g("--checkpoint-encoder", action="store_true", help="recompute the student's ResNet in backward")
    g("--checkpoint-decoder", action="store_true", help="recompute the student's decoder in backward (the skip "
      "dropout masks too)")
    g("--batch-views", action="store_true", help="run each branch once on both views (2B images): faster, but "
      "BatchNorm statistics span both views, unlike the paper")

    g = p.add_argument_group("run").add_argument
    g("--output-dir", default="output", help="where last.pt and metrics.jsonl go")
    g("--resume", default=None, help="a last.pt to continue from")
    g("--auto-resume", action="store_true", help="resume from --output-dir's last.pt when there is one, else "
      "start fresh (for requeued scheduler jobs)")
    g("--overwrite", action="store_true", help="start a new run in an --output-dir that holds one, deleting its "
      "last.pt and metrics.jsonl")
    g("--save-every", type=int, default=0, help="also checkpoint every N steps (0: end of each epoch only)")
    g("--log-every", type=int, default=10, help="write metrics.jsonl every N steps")
    g("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row (each is "
      "skipped)")
    g("--seed", type=int, default=0)
    g("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    return p


def finalize_args(args, parser):
    """Fill framework defaults and reject impossible settings with one line, before any work."""
    warmup_typed = args.warmup_epochs is not None
    recipe = FRAMEWORKS[args.framework].recipe
    for k, v in recipe.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not warmup_typed and args.warmup_epochs > args.epochs / 10:  # the recipe's 5 of 800 epochs fit any --epochs
        args.warmup_epochs = args.epochs / 10
        print(f"note: warm-up {args.warmup_epochs:g} epochs (a tenth of --epochs {args.epochs}; the "
              f"{recipe['warmup_epochs']}-epoch recipe would not fit)", flush=True)
    has_dec = args.decoder != "none"
    args.alpha = (0.5 if has_dec else 1.0) if args.alpha is None else args.alpha
    args.deep_supervision = args.decoder == "fpn" if args.deep_supervision is None else args.deep_supervision
    problems = [
        (not 0.0 <= args.alpha <= 1.0, f"--alpha {args.alpha}: the encoder loss weight must be in [0, 1]"),
        (has_dec and args.alpha == 1.0, f"--alpha 1 with --decoder {args.decoder}: the decoder loss would have "
                                        "weight 0; use --decoder none for the encoder-only baseline"),
        (not has_dec and args.alpha != 1.0, f"--alpha {args.alpha} with --decoder none: there is no decoder loss "
                                            "to weigh, so alpha is 1; add --decoder fcn or fpn"),
        (not 0.0 <= args.dropout < 1.0, f"--dropout {args.dropout}: the channel dropout probability must be in "
                                        "[0, 1)"),
        (args.dropout > 0 and args.decoder != "fpn", f"--dropout {args.dropout} with --decoder {args.decoder}: "
                                                     "channel dropout acts on skip connections, which only the FPN "
                                                     "decoder has"),
        (args.deep_supervision and args.decoder != "fpn", f"--deep-supervision with --decoder {args.decoder}: "
                                                          "deep supervision needs the FPN's several levels"),
        (args.checkpoint_decoder and not has_dec, "--checkpoint-decoder with --decoder none: there is no decoder "
                                                  "to recompute"),
        (args.image_size < 32, f"--image-size {args.image_size}: the ResNet needs at least 32 px"),
        (args.decoder == "fpn" and args.image_size % 32, f"--image-size {args.image_size}: the FPN's top-down x2 "
                                                         "upsampling needs a multiple of 32 (e.g. "
                                                         f"{max(32, args.image_size // 32 * 32)})"),
        (args.max_steps is not None and args.max_steps < 1, "--max-steps must be at least 1"),
        (warmup_typed and not 0 <= args.warmup_epochs < args.epochs, f"--warmup-epochs {args.warmup_epochs:g}: must "
                                                                     f"be in [0, --epochs {args.epochs})"),
        (args.data is not None and not os.path.isdir(args.data or ""), f"--data {args.data}: no such folder"),
    ] + [(getattr(args, k) < 1, f"--{k.replace('_', '-')} must be at least 1")
         for k in ("epochs", "batch_size", "num_prototypes", "queue_size", "dim_hidden", "dim_out")]
    for bad, message in problems:
        if bad:
            parser.error(message)
    if problem := run_folder_conflict(args):
        parser.error(problem)
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    if problem := utils.unwritable(args.output_dir):  # now, not at the first checkpoint hours later
        parser.error(f"--output-dir {problem}")
    args.variant, args.variant_warning = variant_name(args)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.precision = utils.choose_precision(args.device, args.precision)
    args.workers = min(8, os.cpu_count() or 1) if args.workers is None else args.workers
    return args


def variant_argv(name, **extra):
    """VARIANTS[name] with `extra` flags (None: the flag's default) -> pretrain.py's command line."""
    out = []
    for k, v in {**VARIANTS[name], **extra}.items():
        flag = "--" + k.replace("_", "-")
        out += [] if v is None else [flag] if v is True else ["--no-" + flag[2:]] if v is False else [flag, str(v)]
    return out


def variant_name(args):
    """The variant as the paper names it, its levels and weights, e.g. "DeCon-ML-SlotCon-FPN: levels p2..p5, alpha 0,
    skip dropout 0.5"; and a warning (or None) when the paper ran no such combination."""
    framework = FRAMEWORKS[args.framework].name
    levels = (["c5"] if args.alpha > 0 else []) + decoder_levels(args.decoder, args.deep_supervision)
    levels = ", ".join(levels).replace("p2, p3, p4, p5", "p2..p5")
    if args.decoder == "none":
        return f"{framework}: level {levels}", None
    kind = "ML" if args.deep_supervision else "SL"
    name = f"DeCon-{kind}-{framework}-{args.decoder.upper()}: levels {levels}, alpha {args.alpha:g}"
    name += f", skip dropout {args.dropout:g}" if args.decoder == "fpn" else ""
    if args.framework == "densecl" and (args.deep_supervision or args.dropout > 0):
        return name, "the paper ran DenseCL with DeCon-SL only: no deep supervision, no skip dropout"
    if kind == "ML" and args.dropout == 0:
        return name, ("not the paper's DeCon-ML, which adds --dropout 0.5 (best with --alpha 0); without dropout it "
                      "is an ablation of its Table 3")
    return name, None


def run_folder_conflict(args):
    """Never replace a run by accident: an --output-dir holding a last.pt is continued (--resume it, or
    --auto-resume) or explicitly started over (--overwrite). Sets args.resume for --auto-resume. Returns the
    one-line error, or None."""
    last = os.path.join(args.output_dir, "last.pt")
    if args.auto_resume:
        if args.resume or args.overwrite:
            return f"--auto-resume with {'--resume' if args.resume else '--overwrite'}: choose one"
        args.resume = last if os.path.isfile(last) else None
        return None
    continues = args.resume is not None and os.path.isfile(args.resume) and os.path.samefile(args.resume, last)
    if os.path.isfile(last) and not (args.overwrite or continues):
        return (f"--output-dir {args.output_dir} already holds a run ({last}); continue it with --resume {last} "
                "(or --auto-resume), start over with --overwrite, or choose another --output-dir")
    return None


# ---------------------------------------------------------------- model, optimizer, schedules

def build_model(args):
    """DeCon for these flags, with the memory and speed options applied (speed.py)."""
    model = DeCon(args.framework, args.arch, args.decoder, args.alpha, args.dropout, args.deep_supervision,
                  args.dim_hidden, args.dim_out, args.num_prototypes, args.num_prototypes_dec, args.queue_size)
    return speed.apply(model, args.checkpoint_heads, args.checkpoint_encoder, args.checkpoint_decoder,
                       args.batch_views)


class LARS(torch.optim.Optimizer):
    """LARS as SlotCon uses it: for a parameter with ndim > 1, d = g + wd * p, scaled by the trust ratio
    eta * |p| / |d|; 1-D parameters (biases, BN) get neither weight decay nor scaling. Then heavy-ball momentum:
    mu = momentum * mu + d, p = p - lr * mu. Written with torch's multi-tensor ops: a few kernels per step
    whatever the number of parameters (a per-parameter loop launches ~8 per parameter on a GPU)."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            d = [p.grad for p in params]
            mat = [i for i, p in enumerate(params) if p.ndim > 1]
            if mat:
                w = [params[i] for i in mat]
                dw = torch._foreach_add([d[i] for i in mat], w, alpha=g["weight_decay"])
                p_norm, d_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(dw))
                trust = torch.where((p_norm > 0) & (d_norm > 0), g["eta"] * p_norm / d_norm, 1.0)
                torch._foreach_mul_(dw, trust.tolist())  # one read of the ratios: a scalar list is one kernel
                for i, t in zip(mat, dw):
                    d[i] = t
            for p in params:
                if "mu" not in self.state[p]:  # the first step (setdefault would make a tensor at every step)
                    self.state[p]["mu"] = torch.zeros_like(p)
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, g["momentum"])
            torch._foreach_add_(mu, d)
            torch._foreach_add_(params, mu, alpha=-g["lr"])


def build_optimizer(args, params):
    if args.optimizer == "lars":
        return LARS(params, weight_decay=args.weight_decay)
    # foreach: torch picks it on CUDA by itself; asked for here so that a CPU runs (and bench.py counts) the same ops
    return torch.optim.SGD(params, lr=0.0, momentum=0.9, weight_decay=args.weight_decay, foreach=True)


def lr_schedule(peak, final, total_steps, warmup_steps):
    """Linear warm-up from peak/100 (lr_t = peak/100 * (99 t / warmup + 1)), then cosine from peak to `final`."""
    warm = peak / 100 * (99 * np.arange(warmup_steps) / max(warmup_steps, 1) + 1)
    t = np.arange(total_steps - warmup_steps)
    cos = final + (peak - final) * (1 + np.cos(np.pi * t / max(len(t), 1))) / 2
    return np.concatenate([warm, cos])


def momentum_schedule(base, total_steps, kind="cosine"):
    """Teacher EMA momentum per step: m(k) = 1 - (1 - base) * (cos(pi k / K) + 1) / 2 (0.99 -> 1), counted
    once per step; or constant (DenseCL)."""
    if kind == "constant":
        return np.full(total_steps, base)
    return 1 - (1 - base) * (np.cos(np.pi * np.arange(total_steps) / total_steps) + 1) / 2


# ---------------------------------------------------------------- the steps of main

def make_loader(args, dataset, device):
    """Per-rank batches of whole global batches, in a seeded order per epoch that can start mid-epoch."""
    batch = args.batch_size // utils.world_size()
    sampler = EpochSampler(len(dataset), batch, args.seed)
    # the loader gets its own generator: creating an epoch's iterator must not consume the training RNG
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0,  # no restart at every epoch
                                         generator=torch.Generator(), worker_init_fn=seed_worker)
    return loader, sampler


def load_resume(args):
    """Read --resume and refuse a checkpoint of another variant, naming the flags that differ."""
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as e:
        utils.fail(f"--resume {args.resume}: cannot be read as a checkpoint ({type(e).__name__})")
    if not (isinstance(ckpt, dict) and {"model", "optimizer", "step", "args"} <= set(ckpt)):
        utils.fail(f"--resume {args.resume}: not a pretrain.py checkpoint (needs model, optimizer, step, args)")
    diff = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (checkpoint) vs {getattr(args, k)} (now)"
            for k in MODEL_FLAGS if ckpt["args"].get(k) != getattr(args, k)]
    if diff:
        utils.fail(f"--resume {args.resume} is from another variant: " + "; ".join(diff))
    for k in ("batch_size", "epochs", "seed", "image_size", "data", "base_lr", "optimizer"):
        if ckpt["args"].get(k) != getattr(args, k) and utils.is_main():
            print(f"warning: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                  f"{ckpt['args'].get(k)}: the run will not continue the same trajectory", file=sys.stderr)
    return ckpt


def rng_state(device):
    """Every rank's torch (and CUDA) RNG state, gathered so that rank r resumes with its own stream."""
    cpu = utils.all_gather(torch.get_rng_state().to(device)[None]).cpu()
    cuda = utils.all_gather(torch.cuda.get_rng_state().to(device)[None]).cpu() if device.type == "cuda" else None
    return {"torch": cpu, "cuda": cuda, "python": random.getstate()}


def set_rng_state(state, device):
    if state["torch"].shape[0] != utils.world_size():
        print("warning: resuming with another number of processes: RNG streams restart", file=sys.stderr)
        return
    # a row of the gathered (world, n) tensor is a view into it: each setter needs its own contiguous copy
    torch.set_rng_state(state["torch"][utils.rank()].clone())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"][utils.rank()].clone())
    random.setstate(state["python"])


@dataclass
class Progress:
    """Where the run is: the optimizer step, the non-finite steps skipped, and the last checkpoint written."""
    step: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    last_good: str = "none written yet"

    def count(self, finite, max_bad_steps):
        """After each step: a skipped step is warned about; too many in a row stop the run (status 1)."""
        self.step += 1
        if finite:
            self.bad_in_a_row = 0
            return
        self.skipped, self.bad_in_a_row = self.skipped + 1, self.bad_in_a_row + 1
        tqdm.write(f"warning: non-finite loss or gradients at step {self.step}: step skipped", file=sys.stderr)
        if self.bad_in_a_row >= max_bad_steps:
            tqdm.write(f"error: {self.bad_in_a_row} non-finite steps in a row (last at step {self.step}). Last good "
                       f"checkpoint: {self.last_good}", file=sys.stderr)
            raise SystemExit(1)


def load_dataset(args, ckpt):
    """The pre-training set and its fingerprint; bad data is one line; a resume on other data warns."""
    try:
        dataset = pretraining_dataset(FRAMEWORKS[args.framework].two_view, args.image_size, args.min_scale, args.seed,
                                      args.data, args.synthetic_images)
    except (FileNotFoundError, DataError) as e:
        utils.fail(str(e))
    if len(dataset) < args.batch_size:
        utils.fail(f"{len(dataset)} images is fewer than one batch of {args.batch_size}; lower --batch-size")
    fingerprint = data_fingerprint(dataset)
    saved = ckpt.get("data") if ckpt else None
    if saved is not None and saved != fingerprint and utils.is_main():
        print(f"warning: the data differ from the checkpoint's ({saved['images']} images, file list "
              f"{saved['files_sha1'][:12]} then; {fingerprint['images']} images, {fingerprint['files_sha1'][:12]} "
              "now): epochs and schedules shift, the run will not continue the same trajectory", file=sys.stderr)
    return dataset, fingerprint


def build_training(args, device):
    """Model (identical initial weights on every rank; SyncBatchNorm on several GPUs; channels_last where it pays)
    and optimizer."""
    torch.manual_seed(args.seed)
    model = build_model(args).to(device)
    if device.type == "cuda" and utils.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=utils.memory_format(device.type))
    return model, build_optimizer(args, [p for p in model.parameters() if p.requires_grad])


def restore(ckpt, model, optimizer, progress, device, args):
    """Continue where a checkpoint stopped: weights and state, optimizer, step, each rank's RNG stream."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    progress.step, progress.skipped = ckpt["step"], ckpt.get("skipped", 0)
    progress.last_good = f"{args.resume} (step {progress.step})"
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"], device)
    if utils.is_main():
        print(f"resumed from {args.resume} at step {progress.step}", flush=True)


def start_files(args, resumed_step):
    """The output folder at start: partial checkpoints of a kill mid-save removed, a run replaced with --overwrite
    deleted, and metrics.jsonl started over, or, on resume, kept up to the checkpoint's step (the steps after it
    are run again). Returns the metrics file, open for appending (rank 0; None elsewhere)."""
    os.makedirs(args.output_dir, exist_ok=True)
    last, path = os.path.join(args.output_dir, "last.pt"), os.path.join(args.output_dir, "metrics.jsonl")
    if not utils.is_main():
        return None
    utils.remove_stale_temporaries(last)
    if args.overwrite and os.path.isfile(last) and not (args.resume and os.path.samefile(args.resume, last)):
        os.remove(last)
    kept = []
    if resumed_step is not None and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= resumed_step:
                        kept.append(line)
                except (ValueError, KeyError):  # a line cut by a kill
                    pass
    with open(path, "w") as f:
        f.writelines(kept)
    return open(path, "a")


def train_step(model, optimizer, ctx, crops, coords, flags, lr, momentum):
    """One optimizer step, as bench.py times it. Returns (logs, finite): the detached logs, and False when the
    loss or the gradients were not finite and the update was skipped (weights and momentum untouched)."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)  # before the forward: the last step's gradients are not held beside
    with ctx:                              # this step's activations (a lower peak)
        loss, logs = model(crops, coords, flags, momentum)
    loss.backward()
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    # one host sync per step; after DDP's all-reduce every rank has the same gradients and decides the same
    finite = bool(torch.isfinite(loss.detach() + torch.nn.utils.get_total_norm(grads)))
    if finite:
        optimizer.step()
    return logs, finite


class MetricsLog:
    """metrics.jsonl (rank 0) and the progress bar: one record every --log-every steps, with images/s since the
    previous record."""

    def __init__(self, file, args, progress, last_step):
        self.file, self.args = file, args
        self.bar = tqdm(total=last_step, initial=progress.step, desc="pretrain", disable=not utils.is_main(),
                        dynamic_ncols=True)
        self.t, self.step, self.last_step = time.perf_counter(), progress.step, last_step

    def after_step(self, logs, progress, lr, momentum):
        self.bar.update(1)
        if progress.step % self.args.log_every and progress.step != self.last_step:
            return
        now = time.perf_counter()
        images_per_s = (progress.step - self.step) * self.args.batch_size / (now - self.t)
        self.t, self.step = now, progress.step
        logs = {k: v.item() for k, v in logs.items()}
        rec = {"step": progress.step, "epoch": (progress.step - 1) // self.args.iters, "variant": self.args.variant,
               "loss_enc": None,
               "loss_dec": None, **logs, "lr": float(lr), "momentum": float(momentum), "img_per_s": images_per_s,
               "skipped_steps": progress.skipped}
        if self.file:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{images_per_s:.1f}")


class StopFlag:
    """SIGTERM (what a scheduler sends before pre-emption) asks the loop to checkpoint and exit after this step.
    Under DDP the ranks agree at log steps (one all-reduce there, none elsewhere)."""

    def __init__(self, device, log_every):
        self.requested, self.agreed, self.device, self.log_every = False, False, device, log_every
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def now(self, step):
        if utils.world_size() == 1:
            self.agreed = self.requested
        elif step % self.log_every == 0:
            self.agreed = bool(utils.all_reduce_sum(torch.tensor(float(self.requested), device=self.device)) > 0)
        return self.agreed


def save(args, model, optimizer, progress, device, fingerprint):
    """Write last.pt (rank 0, atomically) with everything a resume needs; a full disk stops the run with one line."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": progress.step // args.iters,
             "step": progress.step, "skipped": progress.skipped, "args": vars(args), "rng": rng_state(device),
             "data": fingerprint}
    path = os.path.join(args.output_dir, "last.pt")
    if utils.is_main():
        try:
            utils.save_checkpoint(path, state)
        except utils.DiskFull as e:
            tqdm.write(f"error: {e.strerror}. Last good checkpoint, intact: {progress.last_good}", file=sys.stderr)
            raise SystemExit(1)
    progress.last_good = f"{path} (step {progress.step})"


def train_epoch(args, loader, model, optimizer, ctx, schedules, progress, log, stop, last_step, save_now):
    """The epoch's remaining batches; returns at its end, at `last_step`, or when asked to stop."""
    lrs, moms = schedules
    device = next(model.parameters()).device
    layout = utils.memory_format(device.type)
    for views, coords, flags in loader:
        crops = [views[:, v].to(device, non_blocking=True).contiguous(memory_format=layout) for v in (0, 1)]
        coords, flags = coords.to(device).transpose(0, 1), flags.to(device).T  # (2, B, 4), (2, B)
        lr, momentum = float(lrs[progress.step]), moms[progress.step]
        logs, finite = train_step(model, optimizer, ctx, crops, coords, flags, lr, momentum)
        progress.count(finite, args.max_bad_steps)
        log.after_step(logs, progress, lr, momentum)
        if stop.now(progress.step) or progress.step >= last_step:
            return
        if args.save_every and progress.step % args.save_every == 0 and progress.step % args.iters:
            save_now()  # the epoch's end saves anyway


# ---------------------------------------------------------------- main

def main(args):
    device = utils.init_distributed(args.device)
    torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest convolution kernels
    if args.batch_size % utils.world_size():
        utils.fail(f"--batch-size {args.batch_size} is not divisible by the {utils.world_size()} processes")
    utils.lock_output_dir(args.output_dir)  # one job per folder, until this process ends
    if utils.is_main():
        print(f"pre-training {args.variant}", flush=True)
        if args.variant_warning:
            print(f"warning: {args.variant_warning}", file=sys.stderr, flush=True)
    ckpt = load_resume(args) if args.resume else None
    dataset, fingerprint = load_dataset(args, ckpt)
    loader, sampler = make_loader(args, dataset, device)
    args.iters = sampler.batches  # steps per epoch
    total = args.epochs * args.iters
    last_step = min(total, args.max_steps or total)

    model, optimizer = build_training(args, device)
    schedules = (lr_schedule(args.base_lr * args.batch_size / 256, args.final_lr, total,
                             int(args.warmup_epochs * args.iters)),
                 momentum_schedule(args.teacher_momentum, total, args.momentum_schedule))
    torch.manual_seed(args.seed * 1000 + utils.rank())  # the training RNG (dropout): one stream per rank
    random.seed(args.seed * 1000 + utils.rank())
    progress = Progress()
    if ckpt is not None:
        restore(ckpt, model, optimizer, progress, device, args)
        del ckpt
    log = MetricsLog(start_files(args, progress.step if args.resume else None), args, progress, last_step)
    ddp = utils.ddp_without_buffer_sync(model, device) if utils.world_size() > 1 else model
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    stop = StopFlag(device, args.log_every)
    save_now = partial(save, args, model, optimizer, progress, device, fingerprint)

    model.train()
    while progress.step < last_step and not stop.agreed:
        sampler.set_epoch(*divmod(progress.step, args.iters))  # (epoch, first batch): resumes mid-epoch
        train_epoch(args, loader, ddp, optimizer, ctx, schedules, progress, log, stop, last_step, save_now)
        save_now()
    log.bar.close()
    last = os.path.join(args.output_dir, "last.pt")
    if stop.agreed and utils.is_main():
        print(f"SIGTERM: saved {last} at step {progress.step}; continue with --resume {last} or --auto-resume",
              file=sys.stderr, flush=True)
    elif utils.is_main():
        print(f"done: {progress.step} steps ({progress.skipped} skipped), checkpoint {last}", flush=True)
    ddp = None
    utils.shutdown()


if __name__ == "__main__":
    parser = get_args_parser()
    main(finalize_args(parser.parse_args(), parser))
