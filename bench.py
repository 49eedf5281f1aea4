"""Speed, memory and FLOPs of full DeCon training steps on synthetic tensors, and of the two-view data pipeline.

    python bench.py --variants slotcon,sl-fcn,sl-fpn,ml-fpn,densecl,densecl-sl-fcn --arch resnet50 \\
        --image-size 224 --batch-size 64 --steps 20 --json out.json
    python bench.py --variants ml-fpn --arch resnet50 --image-size 96 --batch-size 8 --steps 5 --baseline
    python bench.py --data --workers 4                       # augmentation pipeline alone
    python bench.py --variants ml-fpn --batch-size 512 --checkpoint-heads --checkpoint-encoder --checkpoint-decoder \\
        --estimate-memory

A step is what pretrain.main runs per batch: EMA update and student + teacher forward (inside DeCon.forward),
zero_grad, backward, optimizer step. Models, optimizers and schedules come from pretrain.py, so the benchmark
measures the training code. `--baseline` runs, interleaved with ours in the same process, the authors' setup:
fp16 autocast with a GradScaler on CUDA (fp32 on CPU), no channels_last, every module called once per view,
no checkpointing. `--estimate-memory` runs the same step on fake tensors (shapes, no data) and counts the bytes
alive at its peak: a GPU's memory need at any batch size, on a CPU, in seconds.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

import data
import pretrain
import utils
from models import FRAMEWORKS
from pretrain import VARIANTS

PARTS = ("encoder", "decoder", "heads", "other")


def get_args_parser():
    p = utils.ArgumentParser("bench.py")
    a = p.add_argument
    a("--variants", default="ml-fpn", help=f"comma-separated, from {', '.join(VARIANTS)}")
    a("--arch", choices=["resnet18", "resnet34", "resnet50"], default="resnet50")
    a("--image-size", type=int, default=224)
    a("--batch-size", type=int, default=64, help="images per step (each gives two views)")
    a("--steps", type=int, default=20, help="timed steps per configuration (data mode: timed batches)")
    a("--warmup", type=int, default=1, help="untimed steps per configuration before timing, after the "
      "FLOP-count step")
    a("--block", type=int, default=None, help="steps per timed block; configurations alternate block by block "
      "(default 1 on CPU, 5 on CUDA)")
    a("--dim-hidden", type=int, default=None, help="projector / predictor width (default: the framework's)")
    a("--num-prototypes", type=int, default=256)
    a("--precision", choices=["bf16", "fp32"], default=None, help="autocast dtype of our configuration (default "
      "pretrain.py's: bf16 on CUDA and on CPUs with bf16 instructions, else fp32)")
    a("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC model and inputs "
      "(default pretrain.py's: on CUDA only)")
    a("--checkpoint-heads", action="store_true", help="activation checkpointing of the decoder-level heads")
    a("--checkpoint-encoder", action="store_true", help="activation checkpointing of the student's ResNet stages")
    a("--checkpoint-decoder", action="store_true", help="activation checkpointing of the student's decoder")
    a("--batch-views", action="store_true", help="both views as one batch (changes BatchNorm statistics)")
    a("--baseline", action="store_true", help="also run the authors' configuration, interleaved, and report ratios")
    a("--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs on one step")
    a("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core); on a CPU "
      "shared with other jobs, 1 avoids threads waiting on each other at every op")
    a("--seed", type=int, default=0)
    a("--json", default=None, help="write the records to this file")
    a("--estimate-memory", action="store_true", help="instead of timing, count the peak memory of a training step "
      "run on fake tensors (no data, no compute, seconds at any batch size), assuming every prototype present "
      "in every view (the upper bound)")
    a("--data", action="store_true", help="measure the two-view augmentation pipeline instead of training steps")
    a("--data-dir", default=None, help="data mode: image folder (decoding included); default: pre-rendered "
      "synthetic scenes (decoding excluded)")
    a("--workers", type=int, default=0, help="data mode: DataLoader workers (0: in this process)")
    return p


# ---------------------------------------------------------------- one configuration of one variant

def config_name(c):
    if c["baseline"]:
        return f"authors ({c['precision']})"
    return "+".join([c["precision"]] + [n for n, on in (("channels_last", c["channels_last"]),
                                                         ("ckpt_heads", c["checkpoint_heads"]),
                                                         ("ckpt_enc", c["checkpoint_encoder"]),
                                                         ("ckpt_dec", c["checkpoint_decoder"]),
                                                         ("batch_views", c["batch_views"])) if on])


def tensor_mb(tensors):
    """Megabytes of distinct storages among `tensors` (a storage is one Python object while alive, fake or not)."""
    storages = {id(s): s for s in (t.untyped_storage() for t in tensors if t is not None)}
    return sum(s.nbytes() for s in storages.values()) / 2 ** 20


def variant_args(variant, a, precision="fp32"):
    """pretrain.py's arguments for one variant at the benchmark's size, validated by pretrain.finalize_args."""
    parser = pretrain.get_args_parser()
    argv = pretrain.variant_argv(variant) + ["--arch", a.arch, "--image-size", str(a.image_size), "--batch-size",
                                str(a.batch_size), "--num-prototypes", str(a.num_prototypes), "--precision", precision,
                                "--output-dir", tempfile.gettempdir()]  # finalize_args probes it for writing
    if a.dim_hidden is not None:
        argv += ["--dim-hidden", str(a.dim_hidden)]
    if a.device:
        argv += ["--device", a.device]
    return pretrain.finalize_args(parser.parse_args(argv), parser)


class Run:
    """Model, optimizer, schedules and a fixed synthetic batch for one (variant, configuration)."""

    def __init__(self, variant, cfg, a, device):
        self.variant, self.cfg, self.device = variant, cfg, device
        self.args = args = variant_args(variant, a, "bf16" if cfg["precision"] == "bf16" else "fp32")
        torch.manual_seed(a.seed)
        args.checkpoint_heads, args.batch_views = cfg["checkpoint_heads"], cfg["batch_views"]
        args.checkpoint_encoder, args.checkpoint_decoder = cfg["checkpoint_encoder"], cfg["checkpoint_decoder"]
        model = pretrain.build_model(args).to(device)
        fmt = torch.channels_last if cfg["channels_last"] else torch.contiguous_format
        self.model = model.to(memory_format=fmt).train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = pretrain.build_optimizer(args, self.params)
        total = 1 + a.warmup + a.steps
        self.lrs = pretrain.lr_schedule(args.base_lr * args.batch_size / 256, args.final_lr, total, total)
        self.moms = pretrain.momentum_schedule(args.teacher_momentum, total, args.momentum_schedule)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg["precision"])
        self.ctx = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
        self.scaler = torch.amp.GradScaler(device.type) if cfg["precision"] == "fp16" else None
        g = torch.Generator().manual_seed(a.seed)
        B, S = a.batch_size, a.image_size
        lo, hi = torch.rand(2, B, 2, generator=g) * 0.5, 0.5 + torch.rand(2, B, 2, generator=g) * 0.5
        self.crops = [torch.randn(B, 3, S, S, generator=g).to(device).contiguous(memory_format=fmt) for _ in (0, 1)]
        self.coords = torch.cat([lo, hi], 2).to(device)          # (2, B, 4) overlap boxes x1, y1, x2, y2
        self.flags = (torch.rand(2, B, generator=g) < 0.5).to(device)
        self.step_idx, self.times, self.peak_mb = 0, [], 0.0
        self.flops, self.flop_share, self.head_share, self.saved_mb, self.loss = None, None, None, None, None
        self.ops = None

    def step(self):
        """One training step: pretrain.train_step for ours; the authors' loop body for the baseline."""
        lr, momentum = float(self.lrs[self.step_idx]), self.moms[self.step_idx]
        self.step_idx += 1
        if not self.cfg["baseline"]:
            logs, _ = pretrain.train_step(self.model, self.optimizer, self.ctx, self.crops, self.coords, self.flags,
                                          lr, momentum)
            self.loss = logs["loss"]
            return
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with self.ctx:
            loss, _ = self.model(self.crops, self.coords, self.flags, momentum)
        self.optimizer.zero_grad(set_to_none=True)  # after the forward, as the authors
        if self.scaler is None:  # fp32
            loss.backward()
            self.optimizer.step()
        else:  # fp16 AMP: scale, unscale, skip steps with inf / nan gradients
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.loss = loss.detach()

    def count(self):
        """One step under FlopCounterMode: exact total FLOPs (forward + backward, recompute included), and the
        bytes autograd saves for backward. The per-part shares come from the forward's per-module counts,
        weighted 3x for the student (forward + backward ~ 2x forward), 4x for checkpointed parts, 1x for the
        teacher: FlopCounterMode's backward attribution is unreliable for modules called several times."""
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        saved = {}  # storage -> bytes, for tensors saved for backward (alive until backward: no address reuse)

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        counts = {}  # per-module forward FLOPs, read when DeCon.forward returns
        hook = self.model.register_forward_hook(
            lambda *_: counts.update((k, sum(v.values())) for k, v in counter.get_flop_counts().items()))
        with FlopCounterMode(display=False) as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.step()  # the optimizer step and the checkpoint recompute save nothing through `pack`
        hook.remove()
        self.saved_mb = sum(saved.values()) / 2 ** 20
        self.flops = counter.get_total_flops()
        m, share, counted = self.model, dict.fromkeys(PARTS, 0.0), 0
        levels = {f"{lvl} {kind}": 0.0 for lvl in m.levels for kind in ("head", "predictor")}
        ckpt = {"encoder": self.cfg["checkpoint_encoder"], "decoder": self.cfg["checkpoint_decoder"]}
        heads = {lvl: self.cfg["checkpoint_heads"] and lvl in m.dec_levels for lvl in m.levels}
        roots = [(f"DeCon.{b}.{part}", part, 1 if b == "teacher" else 4 if ckpt[part] else 3)
                 for b in ("student", "teacher") for part in ("encoder", "decoder")]
        roots += [(f"DeCon.{b}.heads.{lvl}", f"{lvl} head", 1 if b == "teacher" else 4 if heads[lvl] else 3)
                  for b in ("student", "teacher") for lvl in m.levels]
        roots += [(f"DeCon.objectives.{lvl}.predictor", f"{lvl} predictor", 4 if heads[lvl] else 3)
                  for lvl in m.levels if hasattr(m.objectives[lvl], "predictor")]
        for name, part, weight in roots:
            (share if part in share else levels)[part] += weight * counts.get(name, 0)
            counted += counts.get(name, 0)
        share["heads"] = sum(levels.values())
        share["other"] = 3 * (counts.get("Global", 0) - counted)  # the losses, outside any part
        est = sum(share.values()) or 1
        self.flop_share = {k: v / est for k, v in share.items()}
        self.head_share = {k: v / est for k, v in levels.items() if v}  # "p2 head" (both branches), "p2 predictor"

    def count_dispatch(self):
        """Aten ops dispatched by one optimizer step and one teacher EMA update (after a training step, so that
        gradients and momentum exist): on a GPU each is at least one kernel launch."""
        with OpCount() as opt:
            self.optimizer.step()
        with OpCount() as ema:
            self.model.update_teacher(0.99)
        self.ops = {"optimizer_step": opt.n, "ema_update": ema.n, "parameters": len(self.params)}

    def timed(self, n):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        if cuda:
            torch.cuda.synchronize()
        self.times.append((time.perf_counter() - t0) / n)
        if cuda:  # this configuration's own peak: what it added over the block start, plus its resident state
            self.peak_mb = max(self.peak_mb, (torch.cuda.max_memory_allocated() - before) / 2 ** 20 + self.state_mb())
        else:
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process-wide, KiB on Linux

    def state_mb(self):
        """Parameters, buffers, gradients and optimizer state of this configuration."""
        m = self.model
        opt = [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensor_mb(list(m.parameters()) + list(m.buffers()) + [p.grad for p in m.parameters()] + opt)

    def record(self, a):
        ms = statistics.median(self.times) * 1e3
        ips = a.batch_size / ms * 1e3
        gflop = self.flops / a.batch_size / 1e9 if self.flops else None
        state = self.state_mb()
        return {"variant": self.variant, "config": config_name(self.cfg), "img_per_s": ips, "ms_per_step": ms,
                "peak_mem_mb": self.peak_mb,
                "peak_mem_kind": "cuda max allocated" if self.device.type == "cuda" else "process peak RSS",
                "gflop_per_img": gflop, "tflop_per_s": gflop * ips / 1e3 if gflop else None,
                "flop_share": self.flop_share, "head_flop_share": self.head_share, "state_mb": state,
                "saved_act_mb": self.saved_mb,
                "est_mem_mb": state + self.saved_mb if self.saved_mb is not None else None,
                "ms_per_step_blocks": [t * 1e3 for t in self.times], "device": str(self.device),
                "arch": a.arch, "image_size": a.image_size, "batch_size": a.batch_size, "torch": torch.__version__,
                "threads": torch.get_num_threads(), "loadavg_1min": os.getloadavg()[0],
                "final_loss": float(self.loss), "dispatched_ops": self.ops}


def ours_config(a, device_type):
    precision = utils.choose_precision(device_type, a.precision)
    channels_last = device_type == "cuda" if a.channels_last is None else a.channels_last  # pretrain.py's default
    return dict(baseline=False, precision=precision, channels_last=channels_last,
                checkpoint_heads=a.checkpoint_heads, checkpoint_encoder=a.checkpoint_encoder,
                checkpoint_decoder=a.checkpoint_decoder, batch_views=a.batch_views)


def bench_steps(a, device):
    ours = ours_config(a, device.type)
    authors = dict(baseline=True, precision="fp16" if device.type == "cuda" else "fp32", channels_last=False,
                   checkpoint_heads=False, checkpoint_encoder=False, checkpoint_decoder=False, batch_views=False)
    block = a.block or (5 if device.type == "cuda" else 1)
    records = []
    for variant in a.variants.split(","):
        runs = [Run(variant, c, a, device) for c in [authors] * a.baseline + [ours]]
        for r in runs:
            r.count() if a.flops else r.step()
            r.count_dispatch()
            for _ in range(a.warmup):
                r.step()
        done = 0
        while done < a.steps:  # alternate configurations block by block so that machine noise hits all of them
            n = min(block, a.steps - done)
            for r in runs:
                r.timed(n)
            done += n
        recs = [r.record(a) for r in runs]
        for rec in recs:
            if rec["final_loss"] != rec["final_loss"] or abs(rec["final_loss"]) == float("inf"):
                raise SystemExit(f"error: {variant} / {rec['config']}: non-finite loss")
        if a.baseline:
            base, mine = recs[:2]
            mem = "peak_mem_mb" if device.type == "cuda" else "est_mem_mb"
            mine["speedup_vs_baseline"] = mine["img_per_s"] / base["img_per_s"]
            if base.get(mem) and mine.get(mem):
                mine["memory_ratio_vs_baseline"] = mine[mem] / base[mem]
                mine["memory_ratio_kind"] = mem
        records += recs
        del runs
    return records


class OpCount(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (`n`)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------- peak memory without a GPU

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an op creates, while it is alive. `peak` is the most alive at once: what
    CUDA's max_memory_allocated reports for the same ops, less its rounding and the cuBLAS / cuDNN workspaces.
    Tensors made before entering (weights, inputs) are not counted. On fake tensors, which hold no data, the
    step's data-dependent ops get stand-ins: nonzero keeps every position (every prototype present in every
    view, the most memory), and the NaN guard's scalar read says "finite"."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.peak_op = None
        self.counted = WeakIdKeyDictionary()  # storage -> bytes

    def _freed(self, nbytes):
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        fake = any(isinstance(t, FakeTensor) for t in tree_flatten((args, kwargs))[0])
        if fake and func is torch.ops.aten.nonzero.default:
            out = torch.zeros(args[0].numel(), args[0].dim(), dtype=torch.long, device=args[0].device)
        elif fake and func in (torch.ops.aten.is_nonzero.default, torch.ops.aten._local_scalar_dense.default):
            return True
        else:
            out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.counted:
                storage = t.untyped_storage()
                self.counted[storage] = storage.nbytes()
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, storage.nbytes())
        if self.live > self.peak:
            self.peak, self.peak_op = self.live, func.__name__
        return out


def estimate_memory(variant, cfg, a):
    """Peak memory of our training step at this size without running it: the Run's weights, buffers and inputs
    become fake tensors, and two steps (the second with the optimizer state) run under LiveBytes."""
    run = Run(variant, cfg, a, torch.device("cpu"))
    fake = FakeTensorMode()
    for m in run.model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(fake.from_tensor(p.detach()), p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = fake.from_tensor(b)
    run.crops = [fake.from_tensor(c) for c in run.crops]
    run.coords, run.flags = fake.from_tensor(run.coords), fake.from_tensor(run.flags)
    resident = tensor_mb([*run.model.parameters(), *run.model.buffers(), *run.crops, run.coords, run.flags])
    with fake, LiveBytes() as count:
        run.params = [p for p in run.model.parameters() if p.requires_grad]
        run.optimizer = pretrain.build_optimizer(run.args, run.params)
        run.step()
        run.step()
    return {"variant": variant, "config": config_name(cfg), "est_peak_mb": resident + count.peak / 2 ** 20,
            "resident_mb": resident, "state_mb": run.state_mb(), "peak_op": count.peak_op,
            "kind": "fake-tensor count", "arch": a.arch, "image_size": a.image_size, "batch_size": a.batch_size,
            "torch": torch.__version__}


# ---------------------------------------------------------------- data pipeline

class Cycle(torch.utils.data.Dataset):
    """`images` (PIL images, or a dataset that decodes them) repeated without end, through `transform`."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return 1 << 30

    def __getitem__(self, idx):
        return self.transform(self.images[idx % len(self.images)])


def bench_data(a, device):
    """Two-view samples per second through a DataLoader (augmentation, ToTensor, collation; decoding too
    with --data-dir). Synthetic scenes are rendered once beforehand: rendering them is not what training pays
    on real data."""
    if a.data_dir:
        images = data.ImageFolder(a.data_dir)
    else:
        scenes = data.SyntheticScenes(16, size=max(320, a.image_size))
        images = [scenes[i] for i in range(len(scenes))]
    if a.workers == 0:
        torch.set_num_threads(1)  # as in a DataLoader worker
    records = []
    for name, framework in FRAMEWORKS.items():
        loader = torch.utils.data.DataLoader(Cycle(images, framework.two_view(a.image_size)), batch_size=a.batch_size,
                                             num_workers=a.workers, pin_memory=device.type == "cuda",
                                             persistent_workers=a.workers > 0, worker_init_fn=data.seed_worker)
        it = iter(loader)
        for _ in range(max(1, 2 * a.workers)):  # start the workers and fill their prefetch queues
            next(it)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            next(it)
        dt = (time.perf_counter() - t0) / a.steps
        ips = a.batch_size / dt
        records.append({"variant": f"data-{name}", "config": f"workers={a.workers}", "img_per_s": ips,
                        "img_per_s_per_worker": ips / max(1, a.workers), "ms_per_step": dt * 1e3,
                        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        "peak_mem_kind": "main-process peak RSS", "gflop_per_img": None,
                        "source": a.data_dir or "pre-rendered synthetic scenes", "image_size": a.image_size,
                        "batch_size": a.batch_size, "loadavg_1min": os.getloadavg()[0]})
        del it, loader
    return records


# ---------------------------------------------------------------- report

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown_estimates(records):
    lines = ["| variant | config | batch | estimated peak GB | weights, gradients, optimizer GB | peak reached in |",
             "|" + "---|" * 6]
    lines += [f"| {r['variant']} | {r['config']} | {r['batch_size']} | {r['est_peak_mb'] / 1024:.1f} "
              f"| {r['state_mb'] / 1024:.2f} | {r['peak_op']} |" for r in records]
    return "\n".join(lines)


def markdown(records):
    lines = ["| variant | config | img/s | ms/step | peak mem MB | state + saved act. MB | GFLOP/img "
             "| enc / dec / heads / other % | TFLOP/s |", "|" + "---|" * 9]
    for r in records:
        share = r.get("flop_share")
        shares = " / ".join(f"{100 * share[k]:.0f}" for k in PARTS) if share else "-"
        lines.append(f"| {r['variant']} | {r['config']} | {r['img_per_s']:.2f} | {r['ms_per_step']:.0f} "
                     f"| {r['peak_mem_mb']:.0f} | {fmt(r.get('est_mem_mb'), '.0f')} "
                     f"| {fmt(r['gflop_per_img'], '.1f')} | {shares} | {fmt(r.get('tflop_per_s'), '.3f')} |")
    ops = [r for r in records if r.get("dispatched_ops")]
    if ops:
        lines += ["", "| variant | config | parameter tensors | aten ops per optimizer step | per EMA update |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['config']} | {r['dispatched_ops']['parameters']} "
                  f"| {r['dispatched_ops']['optimizer_step']} | {r['dispatched_ops']['ema_update']} |" for r in ops]
    ratios = [r for r in records if "speedup_vs_baseline" in r]
    if ratios:
        lines += ["", "| variant | ours | speed vs authors | memory vs authors |", "|---|---|---|---|"]
        for r in ratios:
            mem = r.get("memory_ratio_vs_baseline")
            kind = {"est_mem_mb": " (state + saved act.)", "peak_mem_mb": " (peak)"}.get(r.get("memory_ratio_kind"))
            lines.append(f"| {r['variant']} | {r['config']} | {r['speedup_vs_baseline']:.2f}x "
                         f"| {fmt(mem, '.2f')}x{kind or ''} |")
    return "\n".join(lines)


def main(a):
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cudnn.benchmark = True  # as pretrain.py
    if a.threads:
        torch.set_num_threads(a.threads)
    elif device.type == "cpu" and not a.estimate_memory and os.getloadavg()[0] > 1 and torch.get_num_threads() > 1:
        print(f"warning: the CPU is busy (1-min load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): "
              f"{torch.get_num_threads()} threads wait for each other at every op; --threads 1 is steadier",
              file=sys.stderr, flush=True)
    if a.estimate_memory:
        # a GPU's memory need: the precision and layout pretrain.py takes on CUDA
        records = [estimate_memory(v, ours_config(a, "cuda"), a) for v in a.variants.split(",")]
        print(markdown_estimates(records), flush=True)
    else:
        records = bench_data(a, device) if a.data else bench_steps(a, device)
        print(markdown(records), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)


def check_args(a, parser):
    """Reject impossible settings with one line, before any work."""
    counts = (a.steps, a.batch_size, 1 if a.block is None else a.block, 1 if a.threads is None else a.threads)
    if min(counts) < 1 or a.warmup < 0 or a.workers < 0:
        parser.error("--steps, --batch-size, --block and --threads must be at least 1; --warmup and --workers "
                     "at least 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    if a.estimate_memory and (a.data or a.baseline):
        parser.error("--estimate-memory counts our training step only: drop --data and --baseline")
    if a.data:
        if a.data_dir is not None:
            try:
                data.list_images(a.data_dir)
            except FileNotFoundError as e:
                parser.error(str(e).replace("--data ", "--data-dir "))
        return a
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    for variant in a.variants.split(","):
        variant_args(variant, a)  # pretrain.py's own checks (image size, widths), one line each
    return a


if __name__ == "__main__":
    parser = get_args_parser()
    main(check_args(parser.parse_args(), parser))
