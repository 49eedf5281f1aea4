"""One code path for 1 and N processes: every helper is the identity without a process group.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; `init_distributed` reads them (NCCL on CUDA, gloo on CPU).
"""
import gc
import inspect
import os
import tempfile

import torch
import torch.distributed as dist


def is_dist():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_dist() else 1


def rank():
    return dist.get_rank() if is_dist() else 0


def is_main():
    return rank() == 0


def init_distributed(device_type):
    """Start the process group if torchrun launched us; returns the device to use."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return torch.device("cuda" if device_type == "cuda" else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def shutdown():
    """End the process group: collect what still holds it (a DistributedDataParallel wrapper: callers drop theirs
    first), wait for every rank, then destroy it. With a DDP wrapper alive at exit and one rank leaving first, 6 of
    150 two-process gloo runs aborted at interpreter exit ("terminate called without an active exception", torch
    2.14); with either the barrier or the collection, 0 of 120."""
    if is_dist():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def ddp_without_buffer_sync(model, device):
    """DistributedDataParallel that does not broadcast rank 0's buffers before each forward: every rank keeps its
    own BatchNorm running statistics, and the centers and queues stay equal through the all-gathers. torch 2.14
    renamed the switch (`broadcast_buffers` -> `forward_sync_buffers`, which still syncs once at construction:
    harmless, every rank starts from the same seed or checkpoint); older versions only know the first."""
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
