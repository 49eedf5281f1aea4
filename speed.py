"""Memory and speed options, applied to a built DeCon from outside the method. The modules keep their parameters
and state-dict keys; only how they run changes (an instance attribute replaces a method).

- recompute (activation checkpointing): a module keeps only its input for backward and runs again in backward.
  Same numbers (the BatchNorm running statistics are not updated twice, the dropout masks are drawn again), less
  memory, more FLOPs. It is what fits DeCon-ML-FPN at batch 512 on one 80 GB GPU (docs/PERFORMANCE.md).
- batch_views: each branch runs once on both views (2B images) instead of once per view. Faster on CPU (2.39x
  instead of 2.05x the authors' step, docs/PERFORMANCE.md), but BatchNorm statistics then span both views, unlike
  the paper.
"""
import contextlib

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


@contextlib.contextmanager
def kept_bn_stats(module):
    """On exit, put back the BatchNorm running statistics and counters of `module` as they were on entry, so that
    a recompute in backward does not apply the running-stat update a second time with the same batch. (Switching
    tracking off instead changes what batch_norm saves for backward, which checkpoint rejects.)"""
    saved = [(b, b.clone()) for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for b in m.buffers(recurse=False)]
    try:
        yield
    finally:
        for b, value in saved:
            b.copy_(value)


def checkpointed(fn, x, owner):
    """fn(x), saving only x for backward and running fn again there; `owner` holds every BatchNorm fn runs. Plain
    fn(x) where grad is off (the teacher)."""
    if not torch.is_grad_enabled():
        return fn(x)
    keep_stats = lambda: (contextlib.nullcontext(), kept_bn_stats(owner))  # (forward, recompute) contexts
    return checkpoint(fn, x, use_reentrant=False, context_fn=keep_stats)


def recompute(owner, name="forward"):
    """Replace `owner.<name>` (a method of a module holding every BatchNorm it runs) by its checkpointed self.
    The method looks its submodules up at each call, so a later swap of them (SyncBatchNorm) is followed."""
    fn = getattr(owner, name)
    setattr(owner, name, lambda x: checkpointed(fn, x, owner))


def recompute_hidden_layers(head):
    """An MLPHead recomputed as a whole would keep, while recomputed, all six hidden maps for its backward (at p2,
    batch 512: 12.25 GB each in bf16). Inside that recompute, recompute two pieces once more: the first layer
    (conv, BN, GELU) from the head's narrow input, the second BN + GELU from its conv output. At most five maps are
    then alive at a time, for one more first-layer conv and one more BN + GELU pass."""
    m = head.mlp

    def forward(x):  # sliced at each call, so that modules swapped after this (SyncBatchNorm) are the ones run
        first, second = m[:3], m[4:6]
        return m[6](checkpointed(second, m[3](checkpointed(first, x, first)), second))
    head.forward = forward


def split_batch(out, n):
    """Split every tensor of a dict / NamedTuple along dim 0 into n equal parts -> a list of n structures."""
    if isinstance(out, dict):
        parts = {k: split_batch(v, n) for k, v in out.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(n)]
    if isinstance(out, tuple):
        parts = [split_batch(v, n) for v in out]
        return [out._make(p[i] for p in parts) for i in range(n)]
    return list(out.chunk(n))


def batch_views(branch):
    """Run `branch` once on its views concatenated, then split its outputs back per view."""
    per_view = branch.forward
    branch.forward = lambda views: split_batch(per_view([torch.cat(views)])[0], len(views))


def apply(model, checkpoint_heads=False, checkpoint_encoder=False, checkpoint_decoder=False, views_batched=False):
    """The options of pretrain.py / bench.py on a DeCon. Recompute applies to the student (the teacher runs without
    grad): the decoder levels' heads and predictors, the encoder's stem and stages, the decoder."""
    s = model.student
    if checkpoint_heads:
        for lvl in model.dec_levels:
            if hasattr(model.objectives[lvl], "predictor"):  # SlotCon: MLPs with BatchNorm / GELU hidden layers
                recompute_hidden_layers(s.heads[lvl].projector)
                recompute(model.objectives[lvl].predictor)  # 4096-wide hidden rows of every slot
            recompute(s.heads[lvl])
    if checkpoint_encoder:
        recompute(s.encoder, "stem")
        for stage in (s.encoder.layer1, s.encoder.layer2, s.encoder.layer3, s.encoder.layer4):
            recompute(stage)
    if checkpoint_decoder and s.decoder is not None:
        recompute(s.decoder)
    if views_batched:
        batch_views(model.student)
        batch_views(model.teacher)
    return model
