"""Helpers every script shares: one code path for 1 and N processes (each distributed helper is the identity
without a process group), and the file I/O of checkpoints and output folders.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` reads them (NCCL on CUDA, gloo on CPU).
"""
import argparse
import errno
import fcntl
import gc
import glob
import inspect
import json
import math
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------- processes

def is_dist():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_dist() else 1


def rank():
    return dist.get_rank() if is_dist() else 0


def is_main():
    return rank() == 0


def init_distributed(device_type=None):
    """Start the process group if torchrun launched us; returns the device to use (default: CUDA if present)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device(device_type)
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def shutdown():
    """The end of a job: release its output folder (lock_output_dir), then end the process group: collect what
    still holds it (a DistributedDataParallel wrapper: callers drop theirs first), wait for every rank, then
    destroy it. A DDP wrapper alive at exit with one rank leaving first can abort the interpreter at exit
    ("terminate called without an active exception")."""
    while _held:
        _held.popitem()[1].close()  # closing the file drops the flock
    if is_dist():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def ddp_without_buffer_sync(model, device):
    """DistributedDataParallel that does not broadcast rank 0's buffers before each forward: every rank keeps its
    own BatchNorm running statistics, and the centers and queues stay equal through the all-gathers. torch 2.14
    calls the switch `forward_sync_buffers`, older versions `broadcast_buffers`."""
    new = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        **{"forward_sync_buffers" if new else "broadcast_buffers": False})


@torch.no_grad()
def all_gather(x):
    """(N, ...) on each rank -> (world * N, ...), rank-major. No gradient flows (keys only)."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def all_reduce_sum(x):
    """Sum of `x` over ranks, in place and returned."""
    if is_dist():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_mean(x):
    """Mean of `x` over ranks, in place and returned."""
    if is_dist():
        dist.all_reduce(x)
        x.div_(world_size())
    return x


def all_gather_objects(obj):
    """[rank 0's obj, rank 1's, ...] on every rank; [obj] in one process. Pickled: for evaluation results, not for
    the tensors of a training step."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------- precision and memory layout

def cpu_has_native_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether this CPU computes bf16 in hardware, read from the flags Linux reports in /proc/cpuinfo: AVX512-BF16
    or AMX-BF16 on x86, the BF16 extension on ARM (Neoverse V1 / N2, Graviton 3 and later). False where the file
    does not exist (macOS, Windows): without those instructions PyTorch emulates bf16, and a backward is tens of
    times slower than in fp32."""
    try:
        with open(cpuinfo) as f:
            words = set(f.read().split())
    except OSError:
        return False
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def choose_precision(device_type, asked=None):
    """The autocast dtype of every script: what the user asked for, else bf16 on CUDA and on CPUs with native
    bf16, fp32 on other CPUs. Asking for bf16 on a CPU that would emulate it warns (one line) and is obeyed."""
    native = device_type == "cuda" or cpu_has_native_bf16()
    if asked == "bf16" and not native and is_main():
        print("warning: --precision bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX or ARM BF16): "
              "PyTorch emulates it, many times slower than fp32", file=sys.stderr, flush=True)
    return asked or ("bf16" if native else "fp32")


def memory_format(device_type):
    """channels_last (NHWC) on CUDA, where cuDNN's tensor-core convolutions want it; NCHW on a CPU, where NHWC did
    not pay in bf16 with AMX nor in fp32 (docs/PERFORMANCE.md)."""
    return torch.channels_last if device_type == "cuda" else torch.contiguous_format


def layout_of(model):
    """The memory format a model was put in (by memory_format), read off its first 4-D weight (the stem's 7x7):
    inputs in the same layout run without conversions."""
    w = next(p for p in model.parameters() if p.dim() == 4)
    return torch.channels_last if not w.is_contiguous() else torch.contiguous_format


# ---------------------------------------------------------------- one job per output folder

_held = {}  # folder -> the open lock file of this process: the flock lasts as long as the file stays open


def lock_output_dir(folder):
    """Make `folder` this job's for the whole life of the process: an exclusive flock on FOLDER/.lock, taken by
    rank 0 (the other ranks wait for its answer). The kernel drops the lock whenever the process ends, kill -9
    and node loss included, so a lock can never be left behind; the file records host, PID and start time for the
    message of a second job, which stops here (status 2, one line) having written nothing. On a file system
    without flock (some network mounts) the record decides instead: a live PID on this host holds the folder."""
    problem, key = None, os.path.realpath(folder)
    if is_main() and key not in _held:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ".lock")
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = f"--output-dir {folder} is in use by another job ({holder(f) or 'unknown'}): wait for it to " \
                      "end or choose another --output-dir"
        except OSError as e:  # ENOLCK / EOPNOTSUPP: no flock on this file system, check the record
            mine = re.fullmatch(rf"host {re.escape(socket.gethostname())}, PID (\d+), .*", holder(f))
            if mine and pid_alive(int(mine[1])):
                problem = f"--output-dir {folder} is in use by another job ({holder(f)})"
            else:
                print(f"warning: --output-dir {folder}: no file locks on this file system ({e.strerror}); two jobs "
                      "on other hosts could share it", file=sys.stderr, flush=True)
        if problem:
            f.close()
        else:
            f.truncate(0)
            f.write(f"host {socket.gethostname()}, PID {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            _held[key] = f
    problem = all_gather_objects(problem)[0]
    if problem:
        if is_main():
            print(f"error: {problem}", file=sys.stderr, flush=True)
        raise SystemExit(2)


def holder(f):
    """The record of the job holding a lock file ('host H, PID P, since T'), or ''."""
    f.seek(0)
    return f.read().strip()


def pid_alive(pid):
    """Whether process `pid` of this host exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def close_locks_in_child():
    """In a forked DataLoader worker: close the inherited lock files, so that a worker outliving a killed main
    process does not keep its folder locked (closing a copy releases nothing while the parent holds it)."""
    for f in _held.values():
        f.close()
    _held.clear()


# ---------------------------------------------------------------- errors and files

def fail(message):
    """Bad input or settings: one line on stderr, exit status 2 (as argparse), before any work."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: ...`, status 2), without the usage block (--help shows it),
    and whose --help gives every flag's default."""

    def __init__(self, prog, description=None):
        super().__init__(prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def error(self, message):
        fail(message)


class DiskFull(OSError):
    """No room for a checkpoint: the message names the space needed and what is free."""


def save_checkpoint(path, state):
    """torch.save, atomically: write PATH.tmp.PID, fsync, rename. A kill or a full disk mid-save leaves the previous
    file intact (a kill may leave PATH.tmp.PID behind: remove_stale_temporaries cleans it at the next start)."""
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


def remove_stale_temporaries(path):
    """Partial checkpoints (PATH.tmp.PID) of a run killed while saving: checkpoint-sized, never read."""
    for tmp in glob.glob(glob.escape(path) + ".tmp.*"):
        size = os.path.getsize(tmp) / 2 ** 20
        os.remove(tmp)
        print(f"note: removed {tmp} ({size:.0f} MB), left by a run interrupted while saving", flush=True)


def unwritable(folder):
    """None if files can be written in `folder`, else 'FOLDER ...why not'. Probed where it exists, else in its
    nearest existing parent (nothing is created), with a real write: os.access answers yes to root on a
    read-only mount."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{folder} cannot be created: {probe} is a file"
    try:
        with tempfile.TemporaryFile(dir=probe) as f:
            f.write(b"0")
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return f"{folder} is not writable ({e.strerror})"


def finetune_folder_problem(folder, overwrite):
    """The one-line error for a fine-tuning --output-dir, or None: it must be writable, and an earlier run's
    results (results.json, log.jsonl, seedN.pt) are replaced only with --overwrite."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    earlier = [n for n in ("results.json", "log.jsonl") if n in names] + \
        sorted(n for n in names if re.fullmatch(r"seed\d+\.pt", n))
    if earlier and not overwrite:
        return (f"--output-dir {folder} holds an earlier run ({', '.join(earlier[:3])}); use --overwrite to replace "
                "it, or another --output-dir")
    problem = unwritable(folder)
    return f"--output-dir {problem}" if problem else None


# ---------------------------------------------------------------- fine-tuning runs (finetune_seg.py, finetune_det.py)

def add_finetune_flags(a, output_dir):
    """The flags of a fine-tuning run's machinery, the same in finetune_seg.py and finetune_det.py."""
    a("--arch", choices=["resnet18", "resnet34", "resnet50"], default=None,
      help="encoder (default: the pre-trained checkpoint's, else resnet50)")
    a("--branch", choices=["teacher", "student"], default=None, help="branch of a last.pt (default: teacher for "
      "SlotCon, student for DenseCL, as the authors export)")
    a("--seed", type=int, default=0, help="seed of the subset, the initialization and the augmentations")
    a("--seeds", type=int, nargs="+", default=None, help="one fine-tune per seed; report mean and std "
      "(overrides --seed; the paper averages 3)")
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype (default bf16 on CUDA and on "
      "CPUs with bf16 instructions, else fp32)")
    a("--workers", type=int, default=None, help="data-loading processes per GPU (0 = in-process; default "
      "min(8, cores))")
    a("--output-dir", default=output_dir, help="results.json, log.jsonl and seedN.pt go here")
    a("--overwrite", action="store_true", help="replace the results of an earlier run in --output-dir")
    a("--allow-finetuned", action="store_true", help="accept a fine-tuned seedN.pt as --pretrained (its weights "
      "have seen labels, which a label-fraction experiment must not)")
    a("--log-every", type=int, default=20, help="write the training losses to log.jsonl every N iterations")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")


def start_finetune(args, prepare):
    """The beginning of a fine-tuning run (finetune_seg.py, finetune_det.py): processes, every input checked by
    `prepare` (one line on a problem), the output folder, the pre-trained files' notes, the log.
    Returns (device, pretrained, datasets, command line, log)."""
    device = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.batch_size % world_size():
        fail(f"--batch-size {args.batch_size} is not divisible by the {world_size()} processes")
    try:
        pretrained, datasets = prepare(args)
    except ValueError as e:  # data.DataError included
        raise SystemExit(f"error: {e}") from None
    lock_output_dir(args.output_dir)  # one job per folder, until this process ends
    if is_main():
        for note in (pretrained or {}).get("notes", []):
            print(note, flush=True)
    log = JsonLines(os.path.join(args.output_dir, "log.jsonl"))
    return device, pretrained, datasets, command_line(), log


def command_line():
    """How this run was started, to keep beside its results: `python SCRIPT ...` or `torchrun ... SCRIPT ...`."""
    if world_size() == 1:
        return shlex.join(["python"] + sys.argv)
    return shlex.join(["torchrun", f"--nproc_per_node={world_size()}"] + sys.argv)


def as_percent(x):
    """Fraction(s) -> percent, NaN -> None (JSON has no NaN)."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [as_percent(float(v)) for v in x]
    return None if x is None or math.isnan(x) else round(100.0 * float(x), 4)


class JsonLines:
    """A log of one JSON record per line, written by rank 0 (a no-op elsewhere) and flushed at once. A new run
    starts the file over, as its results.json and seedN.pt do."""

    def __init__(self, path):
        self.file = open(path, "w") if is_main() else None

    def __call__(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()
