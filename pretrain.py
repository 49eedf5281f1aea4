"""DeCon pre-training: every variant of the paper from one script, on CPU, one GPU, or N GPUs under torchrun.

    python pretrain.py --framework slotcon --decoder fpn --alpha 0 --dropout 0.5            # built-in scenes
    torchrun --nproc_per_node 8 pretrain.py --framework slotcon --decoder fpn --alpha 0 --dropout 0.5 --data coco/train2017
"""
import argparse
import errno
import glob
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

import distributed as du
from data import DataError, DenseCLTwoView, ImageFolder, SlotConTwoView, SyntheticScenes, list_images, seed_worker
from models import DeCon

# The two frameworks' own recipes (paper Sec. 3.3; SlotCon COCO script; DenseCL COCO config). A flag left
# unset takes its framework's value.
FRAMEWORK_DEFAULTS = {
    "slotcon": dict(batch_size=512, optimizer="lars", base_lr=1.0, weight_decay=1e-5, warmup_epochs=5,
                    final_lr=1e-6, teacher_momentum=0.99, momentum_schedule="cosine", dim_hidden=4096, dim_out=256),
    "densecl": dict(batch_size=256, optimizer="sgd", base_lr=0.3, weight_decay=1e-4, warmup_epochs=0,
                    final_lr=0.0, teacher_momentum=0.999, momentum_schedule="constant", dim_hidden=2048, dim_out=128),
}
# flags that define the model's shapes: a --resume checkpoint must agree on them
MODEL_FLAGS = ("framework", "decoder", "alpha", "dropout", "deep_supervision", "arch", "num_prototypes",
               "num_prototypes_dec", "dim_hidden", "dim_out", "queue_size")


def get_args_parser():
    p = argparse.ArgumentParser("DeCon pre-training", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Decoder-aware contrastive pre-training (DeCon-SL / DeCon-ML) of SlotCon "
                                            "or DenseCL. Defaults are the paper's; 'None' means the framework's value.")
    a = p.add_argument
    a("--framework", choices=["slotcon", "densecl"], default="slotcon", help="SSL framework to adapt")
    a("--decoder", choices=["none", "fcn", "fpn"], default="none", help="decoder pre-trained with the encoder "
      "(none = the encoder-only baseline)")
    a("--alpha", type=float, default=None, help="encoder loss weight in Eq. 1: alpha*L_enc + (1-alpha)*L_dec "
      "(0.5 with a decoder; 1 without)")
    a("--dropout", type=float, default=0.0, help="channel dropout on the FPN skip connections (DeCon-ML: 0.5)")
    a("--deep-supervision", action=argparse.BooleanOptionalAction, default=None,
      help="a loss at every FPN level, L_dds = mean (Eq. 3); on by default for fpn, FPN only")
    a("--arch", choices=["resnet18", "resnet34", "resnet50"], default="resnet50", help="encoder")
    a("--data", default=None, help="folder of unlabeled images, searched recursively (default: built-in "
      "synthetic scenes)")
    a("--synthetic-images", type=int, default=2048, help="number of built-in scenes when --data is not given")
    a("--image-size", type=int, default=224, help="crop size of each view")
    a("--min-scale", type=float, default=None, help="smallest crop area fraction (SlotCon 0.08, DenseCL 0.2)")
    a("--batch-size", type=int, default=None, help="global batch over all processes (SlotCon 512, DenseCL 256)")
    a("--epochs", type=int, default=800, help="epochs; the schedules span all of them")
    a("--max-steps", type=int, default=None, help="stop after this many optimizer steps (schedules unchanged)")
    a("--optimizer", choices=["lars", "sgd"], default=None, help="SlotCon: lars, DenseCL: sgd")
    a("--base-lr", type=float, default=None, help="lr per 256 images: lr = base_lr * batch / 256 (SlotCon 1.0, "
      "DenseCL 0.3)")
    a("--weight-decay", type=float, default=None, help="SlotCon 1e-5, DenseCL 1e-4")
    a("--warmup-epochs", type=float, default=None, help="linear warm-up from lr/100 (SlotCon 5, DenseCL 0)")
    a("--num-prototypes", type=int, default=256, help="SlotCon prototypes of the encoder level")
    a("--num-prototypes-dec", type=int, default=None, help="SlotCon prototypes of decoder levels (default: "
      "--num-prototypes)")
    a("--dim-hidden", type=int, default=None, help="hidden width of the projector / predictor (SlotCon 4096, "
      "DenseCL 2048)")
    a("--dim-out", type=int, default=None, help="output width of the projector (SlotCon 256, DenseCL 128)")
    a("--queue-size", type=int, default=16384, help="DenseCL dictionary size per level")
    a("--teacher-momentum", type=float, default=None, help="EMA momentum: SlotCon 0.99 cosine to 1, DenseCL 0.999 "
      "constant")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (bf16 on CUDA, fp32 on CPU)")
    a("--checkpoint-heads", action="store_true", help="recompute the decoder-level heads and predictors in "
      "backward instead of storing their activations: same numbers, less memory, ~25%% more FLOPs (ML-FPN)")
    a("--checkpoint-encoder", action="store_true", help="recompute the student's ResNet stages in backward: same "
      "numbers, less memory, ~1/3 more student-encoder FLOPs")
    a("--checkpoint-decoder", action="store_true", help="recompute the student's decoder in backward: same numbers "
      "(the skip dropout masks too), less memory, ~1/3 more student-decoder FLOPs")
    a("--batch-views", action="store_true", help="run each branch once on both views (2B images): BatchNorm "
      "statistics then span both views instead of one, unlike the paper")
    a("--compile", action="store_true", help="torch.compile the student and teacher branches (the first steps "
      "compile, which takes minutes; slower than eager for SlotCon on an H200, see the README)")
    a("--workers", type=int, default=None, help="data-loading processes per GPU (default min(8, cores))")
    a("--output-dir", default="output", help="where last.pt and metrics.jsonl go")
    a("--resume", default=None, help="a last.pt to continue from")
    a("--auto-resume", action="store_true", help="resume from --output-dir's last.pt when there is one, else "
      "start fresh (for requeued scheduler jobs)")
    a("--overwrite", action="store_true", help="start a new run in an --output-dir that holds one, deleting its "
      "last.pt and metrics.jsonl")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (0: end of each epoch only)")
    a("--log-every", type=int, default=10, help="write metrics.jsonl every N steps")
    a("--max-bad-steps", type=int, default=3, help="stop after this many non-finite steps in a row (each is "
      "skipped; read at log steps and checkpoints, so the run stops up to --log-every steps later)")
    a("--seed", type=int, default=0)
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    return p


def finalize_args(args, parser):
    """Fill framework defaults and reject impossible settings with one line, before any work."""
    for k, v in FRAMEWORK_DEFAULTS[args.framework].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.min_scale is None:
        args.min_scale = 0.08 if args.framework == "slotcon" else 0.2
    has_dec = args.decoder != "none"
    if args.alpha is None:
        args.alpha = 0.5 if has_dec else 1.0
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha {args.alpha}: the encoder loss weight must be in [0, 1]")
    if has_dec and args.alpha == 1.0:
        parser.error(f"--alpha 1 with --decoder {args.decoder}: the decoder loss would have weight 0; "
                     "use --decoder none for the encoder-only baseline")
    if not has_dec and args.alpha != 1.0:
        parser.error(f"--alpha {args.alpha} with --decoder none: there is no decoder loss to weigh, so alpha "
                     "is 1; add --decoder fcn or fpn")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout {args.dropout}: the channel dropout probability must be in [0, 1)")
    if args.dropout > 0 and args.decoder != "fpn":
        parser.error(f"--dropout {args.dropout} with --decoder {args.decoder}: channel dropout acts on skip "
                     "connections, which only the FPN decoder has")
    if args.checkpoint_decoder and args.decoder == "none":
        parser.error("--checkpoint-decoder with --decoder none: there is no decoder to recompute")
    if conflict := compile_conflict(args):
        parser.error(conflict)
    if args.deep_supervision is None:
        args.deep_supervision = args.decoder == "fpn"
    elif args.deep_supervision and args.decoder != "fpn":
        parser.error(f"--deep-supervision with --decoder {args.decoder}: deep supervision needs the FPN's "
                     "several levels")
    if args.image_size < 32:
        parser.error(f"--image-size {args.image_size}: the ResNet needs at least 32 px")
    if args.decoder == "fpn" and args.image_size % 32:
        parser.error(f"--image-size {args.image_size}: the FPN's top-down x2 upsampling needs a multiple of 32 "
                     f"(e.g. {max(32, args.image_size // 32 * 32)})")
    for name in ("epochs", "batch_size", "num_prototypes", "queue_size", "dim_hidden", "dim_out"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if args.data is not None:
        try:
            list_images(args.data)
        except FileNotFoundError as e:
            parser.error(str(e))
    if problem := run_folder_conflict(args):
        parser.error(problem)
    if args.resume is not None and not os.path.isfile(args.resume):
        parser.error(f"--resume {args.resume}: no such file")
    if problem := du.unwritable(args.output_dir):  # now, not at the first checkpoint hours later
        parser.error(f"--output-dir {problem}")
    if args.precision is None:
        args.precision = "bf16" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda" else "fp32"
    if args.workers is None:
        args.workers = min(8, os.cpu_count() or 1)
    return args


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


def compile_conflict(args):
    """The error for --compile with a --checkpoint-* flag, or None: torch.compile cannot trace the recompute's
    guard of the BatchNorm running statistics (a checkpoint context_fn)."""
    flags = [f"--checkpoint-{part}" for part in ("heads", "encoder", "decoder") if getattr(args, f"checkpoint_{part}")]
    if args.compile and flags:
        return f"--compile with {flags[0]}: torch.compile cannot trace the checkpointed recompute; use one or the other"
    return None


# ---------------------------------------------------------------- schedules (arrays indexed by the global step)

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


class LARS(torch.optim.Optimizer):
    """LARS as SlotCon uses it: for a parameter with ndim > 1, d = g + wd * p, scaled by the trust ratio
    eta * |p| / |d|; 1-D parameters (biases, BN) get neither weight decay nor scaling. Then heavy-ball momentum:
    mu = momentum * mu + d, p = p - lr * mu.

    step(found_inf): a device scalar, 1.0 to leave every weight and buffer as it is (non-finite gradients). The
    decision is taken on the device, so the training loop needs no host sync to skip a step."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self, found_inf=None):
        # torch._foreach ops: a few multi-tensor kernels per group instead of ~10 launches per parameter
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            mats = [p for p in params if p.ndim > 1]
            d = {p: p.grad for p in params}
            if mats:
                dm = torch._foreach_add([p.grad for p in mats], mats, alpha=g["weight_decay"])
                p_norm, d_norm = torch.stack(torch._foreach_norm(mats)), torch.stack(torch._foreach_norm(dm))
                trust = torch.where((p_norm > 0) & (d_norm > 0), g["eta"] * p_norm / d_norm, 1.0)
                torch._foreach_mul_(dm, list(trust.unbind()))
                d.update(zip(mats, dm))
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            # the momentum update in one fused kernel (torch's fused SGD without weight decay: d already has it),
            # which returns at once on the device when found_inf is 1
            torch._fused_sgd_(params, [d[p] for p in params], [self.state[p]["mu"] for p in params],
                              weight_decay=0.0, momentum=g["momentum"], lr=g["lr"], dampening=0.0, nesterov=False,
                              maximize=False, is_first_step=False, found_inf=found_inf)


class SGD(torch.optim.SGD):
    """torch's fused momentum SGD (DenseCL's optimizer), with LARS's step(found_inf). The fused kernel reads
    `found_inf` as it does under a GradScaler."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=True)

    def step(self, found_inf=None):
        if found_inf is None:
            return super().step()
        self.found_inf = found_inf
        try:
            return super().step()
        finally:
            del self.found_inf

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for g in self.param_groups:  # a checkpoint of the earlier, unfused SGD says fused=False
            g["fused"], g["foreach"] = True, None


def build_optimizer(args, params):
    if args.optimizer == "lars":
        return LARS(params, weight_decay=args.weight_decay)
    return SGD(params, weight_decay=args.weight_decay)


def build_model(args):
    return DeCon(args.framework, args.arch, args.decoder, args.alpha, args.dropout, args.deep_supervision,
                 args.dim_hidden, args.dim_out, args.num_prototypes, args.num_prototypes_dec, args.queue_size,
                 checkpoint_heads=args.checkpoint_heads, checkpoint_encoder=args.checkpoint_encoder,
                 checkpoint_decoder=args.checkpoint_decoder, batch_views=args.batch_views)


# ---------------------------------------------------------------- data

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
        self.rank, self.world = du.rank(), du.world_size()
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


def build_dataset(args):
    view = SlotConTwoView if args.framework == "slotcon" else DenseCLTwoView
    transform = view(args.image_size, args.min_scale)
    if args.data is None:
        base = SyntheticScenes(args.synthetic_images, size=max(128, args.image_size), seed=args.seed,
                               transform=transform)
    else:
        base = ImageFolder(args.data, transform)
    return SeededAugment(base, args.seed)


def data_fingerprint(dataset):
    """{"images": n, "files_sha1": hash of the sorted file list (of the scenes' definition)}, kept in last.pt."""
    base = dataset.dataset
    if isinstance(base, ImageFolder):
        names = "\n".join(os.path.relpath(f, base.root) for f in base.files)
    else:
        names = f"synthetic scenes {base.length} size {base.size} seed {base.seed}"
    return {"images": len(base), "files_sha1": hashlib.sha1(names.encode()).hexdigest()}


# ---------------------------------------------------------------- checkpoints

def fail(message):
    """Bad input or settings: one line on stderr, exit status 2 (as argparse), before any work."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class DiskFull(OSError):
    """No room for a checkpoint: the message names the space needed and what is free."""


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, rename. A kill or a full disk mid-save leaves the previous file
    intact (a kill may leave PATH.tmp.PID behind: remove_stale_temporaries cleans those at the next start)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        need = sum(t.nbytes for t in tree_tensors(state)) / 2 ** 20
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        raise DiskFull(e.errno, f"no space left on the device to write {path}: it needs about {need:.0f} MB, "
                                f"{free:.0f} MB are free") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def tree_tensors(obj):
    """Every tensor in nested dicts, lists and tuples."""
    if torch.is_tensor(obj):
        return [obj]
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for v in values for t in tree_tensors(v)]


def start_metrics(path, resumed_step):
    """A new run starts metrics.jsonl over; a resumed one keeps the records up to its checkpoint's step (the
    steps after it are run again)."""
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


def remove_stale_temporaries(path):
    """Partial checkpoints (PATH.tmp.PID) left by a run killed while saving: checkpoint-sized, never read."""
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        size = os.path.getsize(tmp) / 2 ** 20
        os.remove(tmp)
        print(f"note: removed {tmp} ({size:.0f} MB), left by a run interrupted while saving", flush=True)


def load_resume(args):
    """Read --resume and refuse a checkpoint of another variant, naming the flags that differ."""
    try:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"--resume {args.resume}: cannot be read as a checkpoint ({type(e).__name__})")
    if not (isinstance(ckpt, dict) and {"model", "optimizer", "step", "args"} <= set(ckpt)):
        fail(f"--resume {args.resume}: not a pretrain.py checkpoint (needs model, optimizer, step, args)")
    diff = [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} (checkpoint) vs {getattr(args, k)} (now)"
            for k in MODEL_FLAGS if ckpt["args"].get(k) != getattr(args, k)]
    if diff:
        fail(f"--resume {args.resume} is from another variant: " + "; ".join(diff))
    for k in ("batch_size", "epochs", "seed", "image_size", "data", "base_lr", "optimizer"):
        if ckpt["args"].get(k) != getattr(args, k) and du.is_main():
            print(f"warning: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                  f"{ckpt['args'].get(k)}: the run will not continue the same trajectory", file=sys.stderr)
    return ckpt


def warn_if_data_changed(saved, now):
    """The dataset defines the epochs and the schedules' length: say so when a resume sees other images."""
    if saved is not None and saved != now and du.is_main():
        print(f"warning: the data differ from the checkpoint's ({saved['images']} images, file list "
              f"{saved['files_sha1'][:12]} then; {now['images']} images, {now['files_sha1'][:12]} now): epochs and "
              "schedules shift, the run will not continue the same trajectory", file=sys.stderr)


def rng_state(device):
    """Every rank's torch (and CUDA) RNG state, gathered so that rank r resumes with its own stream."""
    cpu = du.all_gather(torch.get_rng_state().to(device)[None]).cpu()
    cuda = du.all_gather(torch.cuda.get_rng_state().to(device)[None]).cpu() if device.type == "cuda" else None
    return {"torch": cpu, "cuda": cuda, "python": random.getstate()}


def set_rng_state(state, device):
    if state["torch"].shape[0] != du.world_size():
        print("warning: resuming with another number of processes: RNG streams restart", file=sys.stderr)
        return
    # a row of the gathered (world, n) tensor is a view into it: each setter needs its own contiguous copy
    torch.set_rng_state(state["torch"][du.rank()].clone())
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"][du.rank()].clone())
    random.setstate(state["python"])


class StopFlag:
    """SIGTERM (what SLURM sends before pre-emption) asks the loop to checkpoint and exit after this step."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True


# ---------------------------------------------------------------- training

def train_step(model, optimizer, params, ctx, crops, coords, flags, lr, momentum):
    """One step, as bench.py times it. Returns (logs, ok): the detached logs and a bool device scalar, False when
    the loss or the gradients were not finite and the update was skipped (weights untouched). Nothing here
    waits for the device: the loop reads `ok` at log steps, so the host can queue the next step's work while
    the device still runs this step's backward."""
    for g in optimizer.param_groups:
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)  # before the forward: the last step's gradients are not held beside
    with ctx:                              # this step's activations (-380 MB peak, R50 ML-FPN 96 px batch 8)
        loss, logs = model(crops, coords, flags, momentum)
    loss.backward()
    # NaN guard, on the device. Gradients are identical on every rank after DDP's all-reduce, so all ranks
    # take the same decision.
    grads = [p.grad for p in params if p.grad is not None]
    ok = torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
    optimizer.step(found_inf=(~ok).float())
    return logs, ok


def main(args):
    device = du.init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True  # fixed crop size: let cuDNN pick the fastest convolution kernels
    world, rank = du.world_size(), du.rank()
    if args.batch_size % world:
        fail(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    ckpt = load_resume(args) if args.resume else None
    os.makedirs(args.output_dir, exist_ok=True)

    dataset = build_dataset(args)
    if isinstance(dataset.dataset, ImageFolder):
        try:
            dataset.dataset.check()
        except DataError as e:
            fail(str(e))
    fingerprint = data_fingerprint(dataset)
    if ckpt is not None:
        warn_if_data_changed(ckpt.get("data"), fingerprint)
    batch = args.batch_size // world
    if len(dataset) < args.batch_size:
        fail(f"{len(dataset)} images is fewer than one batch of {args.batch_size}; lower --batch-size")
    sampler = EpochSampler(len(dataset), batch, args.seed)
    # the loader gets its own generator: creating an epoch's iterator must not consume the training RNG
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True,
                                         persistent_workers=args.workers > 0,  # no restart at every epoch
                                         generator=torch.Generator(), worker_init_fn=seed_worker)
    iters = sampler.batches
    total = args.epochs * iters
    last_step = min(total, args.max_steps or total)

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = build_model(args).to(device)
    if device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(memory_format=torch.channels_last)
    if args.compile:  # in place: the state-dict keys stay those of the eager modules
        model.student.compile()
        model.teacher.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(args, params)
    lrs = lr_schedule(args.base_lr * args.batch_size / 256, args.final_lr, total, int(args.warmup_epochs * iters))
    moms = momentum_schedule(args.teacher_momentum, total, args.momentum_schedule)
    torch.manual_seed(args.seed * 1000 + rank)  # the training RNG (dropout): one stream per rank
    random.seed(args.seed * 1000 + rank)

    step, skipped, bad_in_a_row, last_good = 0, 0, 0, None
    pending = []  # (step, ok) for the steps whose NaN-guard flag the host has not read yet
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, skipped = ckpt["step"], ckpt.get("skipped", 0)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"], device)
        last_good = f"{args.resume} (step {step})"
        if du.is_main():
            print(f"resumed from {args.resume} at step {step}", flush=True)
        del ckpt
    ddp = du.ddp_without_buffer_sync(model, device) if world > 1 else model
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    last_pt = os.path.join(args.output_dir, "last.pt")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if du.is_main():
        remove_stale_temporaries(last_pt)
        if args.overwrite and os.path.isfile(last_pt) and not (args.resume and os.path.samefile(args.resume, last_pt)):
            os.remove(last_pt)
        start_metrics(metrics_path, step if args.resume else None)

    def read_flags():
        """Read the NaN-guard flags of the steps since the last read, in one host sync (at log steps and before
        a checkpoint, not every step): warn about each skipped step; stop after --max-bad-steps in a row."""
        nonlocal skipped, bad_in_a_row
        oks = torch.stack([ok for _, ok in pending]).tolist() if pending else []
        for (n, _), ok in zip(pending, oks):
            if ok:
                bad_in_a_row = 0
                continue
            skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
            print(f"warning: non-finite loss or gradients at step {n}: step skipped", file=sys.stderr)
            if bad_in_a_row >= args.max_bad_steps:
                print(f"error: {bad_in_a_row} non-finite steps in a row (last at step {n}); stopping at step {step}. "
                      f"Last good checkpoint: {last_good or 'none written yet'}", file=sys.stderr, flush=True)
                raise SystemExit(1)
        pending.clear()

    def checkpoint(epoch):
        nonlocal last_good
        read_flags()  # first: the checkpoint saves the skipped count; a run that must stop writes none
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                 "skipped": skipped, "args": vars(args), "rng": rng_state(device), "data": fingerprint}
        if du.is_main():
            try:
                save_checkpoint(last_pt, state)
            except DiskFull as e:
                print(f"error: {e.strerror}. Last good checkpoint, intact: {last_good or 'none written yet'}",
                      file=sys.stderr, flush=True)
                raise SystemExit(1)
        last_good = f"{last_pt} (step {step})"

    stop = StopFlag()
    metrics = open(metrics_path, "a") if du.is_main() else None
    bar = tqdm(total=last_step, initial=step, disable=not du.is_main(), dynamic_ncols=True, desc="pretrain")
    model.train()
    t_log, step_log = time.perf_counter(), step
    while step < last_step:
        epoch, start_batch = divmod(step, iters)
        sampler.set_epoch(epoch, start_batch)
        for views, coords, flags in loader:
            views = views.to(device, non_blocking=True)
            crops = [views[:, v].contiguous(memory_format=torch.channels_last) for v in (0, 1)]
            coords = coords.to(device, non_blocking=True).transpose(0, 1)  # pinned by the loader on CUDA: no sync
            flags = flags.to(device, non_blocking=True).T
            logs, ok = train_step(ddp, optimizer, params, ctx, crops, coords, flags, float(lrs[step]), moms[step])
            step += 1
            pending.append((step, ok))
            bar.update(1)
            if step % args.log_every == 0 or step == last_step:
                read_flags()
                logs = {k: v.item() for k, v in logs.items()}  # the log step's host sync
                now = time.perf_counter()
                ips = (step - step_log) * args.batch_size / (now - t_log)
                t_log, step_log = now, step
                rec = {"step": step, "epoch": epoch, **logs, "lr": float(lrs[step - 1]),
                       "momentum": float(moms[step - 1]), "img_per_s": ips, "skipped_steps": skipped}
                rec.setdefault("loss_enc", None)
                rec.setdefault("loss_dec", None)
                if metrics:
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{ips:.1f}")
            # under DDP every rank must agree to stop: the flag is all-reduced at log steps only
            stopping = stop.requested if world == 1 else (step % args.log_every == 0 and bool(
                du.all_reduce_sum(torch.tensor(float(stop.requested), device=device)) > 0))
            if stopping:
                checkpoint(epoch + 1 if step % iters == 0 else epoch)
                if du.is_main():
                    print(f"SIGTERM: saved {last_pt} at step {step}; continue with --resume {last_pt} or --auto-resume",
                          file=sys.stderr, flush=True)
                ddp = None
                du.shutdown()
                return
            if args.save_every and step % args.save_every == 0 and step % iters:
                checkpoint(epoch)
            if step >= last_step:
                break
        checkpoint(epoch + 1 if step % iters == 0 else epoch)
    bar.close()
    if du.is_main():
        print(f"done: {step} steps ({skipped} skipped), checkpoint {last_pt}", flush=True)
    ddp = None
    du.shutdown()


if __name__ == "__main__":
    parser = get_args_parser()
    main(finalize_args(parser.parse_args(), parser))
