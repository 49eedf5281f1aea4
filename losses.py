"""Every loss of the paper as one function, with shapes and the equation it implements.

DeCon (this paper):           decon_loss (Eq. 1, 2), deep_supervision_loss (Eq. 3).
SlotCon (Wen et al. 2022):    invaug, self_distillation_loss (group loss), slot_contrastive_loss, slotcon_loss.
DenseCL (Wang et al. 2021):   info_nce_loss (global), dense_contrastive_loss (dense), densecl_loss.

Precision under autocast: softmax, cross-entropy and normalization run in fp32 (inputs are cast with .float()),
whatever the dtype of the network's outputs. The similarity matmuls (`q @ keys.T`, `q @ queue`) run in the autocast
dtype, as the authors' do in fp16: computed in bf16, the slot-contrastive loss of 3000 queries x 4000 keys moved by
6e-6 (relative) and its gradient by 0.4%, against fp32 on CPU.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.ops import roi_align

from utils import all_gather, all_reduce_sum, rank, world_size


# ---------------------------------------------------------------- DeCon (Eq. 1-3)

def decon_loss(l_enc, l_dec, alpha):
    """Eq. 1 (and Eq. 2 with l_dec = L_dds): Loss = alpha * L_enc + (1 - alpha) * L_dec.

    A term whose weight is 0 may be None, because its heads are not built: alpha = 1 is encoder-only
    pre-training (the SlotCon / DenseCL baseline), alpha = 0 trains through the decoder loss only.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 1.0:
        return l_enc
    if alpha == 0.0:
        return l_dec
    return alpha * l_enc + (1.0 - alpha) * l_dec


def deep_supervision_loss(level_losses):
    """Eq. 3: L_dds = (1 / j) * sum_i L_dec_i, the mean of the per-level decoder losses (j levels)."""
    if len(level_losses) == 0:
        raise ValueError("deep_supervision_loss needs at least one level loss")
    return torch.stack([l.float() for l in level_losses]).mean()


# ---------------------------------------------------------------- SlotCon

def invaug(scores, coords, flags):
    """Undo the geometric augmentation: crop each view's map to the two views' overlap, in image orientation.

    scores: (B, K, H, W) maps of one view. coords: (B, 4) overlap box x1, y1, x2, y2 normalized to this
    view's crop as the network sees it (after its flip). flags: (B,) bool, True where this view was flipped.
    Returns (B, K, H, W): the overlap region resampled to the full map size (roi_align, aligned=True), then
    flipped back where flags is true, so that position (i, j) of both views shows the same image point.
    """
    B, K, H, W = scores.shape
    c = coords.float()  # scaled with Python numbers: a tensor made from host data would cost a host sync on CUDA
    boxes = torch.stack([torch.arange(B, device=c.device, dtype=torch.float32),
                         c[:, 0] * W, c[:, 1] * H, c[:, 2] * W, c[:, 3] * H], dim=1)  # (B, 5): index, x1, y1, x2, y2
    out = roi_align(scores.float(), boxes, output_size=(H, W), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flags.view(B, 1, 1, 1), out.flip(-1), out)


def self_distillation_loss(student_scores, teacher_scores, center, student_temp=0.1, teacher_temp=0.07):
    """SlotCon group loss: cross-entropy from the centered, sharpened teacher to the student over prototypes.

    student_scores, teacher_scores: (N, K) cosine similarities of N aligned positions to K prototypes.
    center: (1, K). Returns mean_n [ -sum_k softmax((t - c) / tau_t)_k * log_softmax(s / tau_s)_k ].
    """
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2:
        raise ValueError(f"expected two (N, K) score tensors, got {tuple(student_scores.shape)} and "
                         f"{tuple(teacher_scores.shape)}")
    t = F.softmax((teacher_scores.float() - center.float()) / teacher_temp, dim=-1)
    return -(t * F.log_softmax(student_scores.float() / student_temp, dim=-1)).sum(-1).mean()


def _present_prototypes(scores):
    """(B, K, H, W) -> (B, K) bool: prototype k is the argmax of at least one position of image b."""
    B, K = scores.shape[:2]
    hits = scores.argmax(1).flatten(1)  # (B, H*W)
    return torch.zeros(B, K, dtype=torch.bool, device=scores.device).scatter_(1, hits, True)


def slot_contrastive_loss(q_slots, k_slots, q_scores, k_scores, predictor, tau=0.2):
    """SlotCon slot-level InfoNCE between student slots of one view and teacher slots of the other.

    q_slots: (B, K, D) student slots; k_slots: (B, K, D) teacher slots; q_scores, k_scores: (B, K, H, W) the
    un-aligned scores that say which prototypes are present in each image. predictor: any callable on (M, D).
    A query is slot (b, k) when prototype k is present in both views of image b; the keys are all teacher
    slots present in their view, gathered over ranks; the positive is the key of the same (b, k).
    Returns CE(logits / tau, positive) * 2 * tau, the scaling SlotCon uses. The CE is the mean over the queries
    of all ranks (each rank returns its sum / global count * world, so DDP's gradient average is that mean);
    SlotCon averages per rank, which differs only when ranks hold different numbers of queries.
    """
    B, K, D = q_slots.shape
    mask_q, mask_k = _present_prototypes(q_scores), _present_prototypes(k_scores)
    mask_k_all = all_gather(mask_k).flatten()                          # (world * B * K,)
    k_all = all_gather(F.normalize(k_slots.float().flatten(0, 1), dim=1))  # (world * B * K, D)
    valid_q = (mask_q & mask_k).flatten()
    n_total = all_reduce_sum(valid_q.sum().float())                   # queries over all ranks
    idx_q = valid_q.nonzero().squeeze(1)
    q = q_slots.flatten(0, 1)
    if idx_q.numel() < 2:  # rare at real sizes; BatchNorm1d in the predictor needs two rows. Keep the graph.
        return predictor(q).sum() * 0.0
    idx_k = mask_k_all.nonzero().squeeze(1)
    labels = mask_k_all.long().cumsum(0)[idx_q + B * K * rank()] - 1  # position of key (b, k) among valid keys
    ce = cross_entropy_sum(F.normalize(predictor(q[idx_q]).float(), dim=1), k_all[idx_k], labels, tau)
    return ce / n_total * world_size() * 2 * tau


def cross_entropy_sum(queries, keys, labels, tau, chunk=4096):
    """sum_n CE(queries[n] . keys^T / tau, labels[n]) for queries (N, D), keys (M, D), labels (N,).

    The same number as F.cross_entropy(queries @ keys.T / tau, labels, reduction="sum"), but computed in
    chunks of `chunk` queries whose logits are recomputed in backward instead of stored: memory O(chunk * M)
    instead of O(N * M). SlotCon's N and M grow with the batch (up to B * K each): at B = 256 on one GPU with
    ~170 slots per image (as at random init), one fp32 (N, M) matrix is 7.6 GB, and without chunks each level
    and direction would keep one for backward.
    """
    part = lambda q, y: F.cross_entropy(q @ keys.T / tau, y, reduction="sum")
    chunks = zip(queries.split(chunk), labels.split(chunk))
    return sum(checkpoint(part, q, y, use_reentrant=False) for q, y in chunks)


def slotcon_loss(student, teacher, coords, flags, predictor, center, group_weight=0.5,
                 student_temp=0.1, teacher_temp=0.07, tau=0.2):
    """The SlotCon objective at one level, both directions summed (as SlotCon and DeCon do):

        L = w * [SD(s1, t2) + SD(s2, t1)] + (1 - w) * [ctr(q1, k2) + ctr(q2, k1)],   w = group_weight

    student, teacher: per view v in (0, 1), a pair (slots (B, K, D), scores (B, K, h, w)).
    coords: (2, B, 4), flags: (2, B). SD runs on invaug-aligned scores, one row per position.
    """
    (q1, sq1), (q2, sq2) = student
    (k1, sk1), (k2, sk2) = teacher
    rows = lambda scores, v: invaug(scores, coords[v], flags[v]).permute(0, 2, 3, 1).flatten(0, 2)  # (B*h*w, K)
    sd = lambda s, t, vs, vt: self_distillation_loss(rows(s, vs), rows(t, vt), center, student_temp, teacher_temp)
    group = sd(sq1, sk2, 0, 1) + sd(sq2, sk1, 1, 0)
    ctr = slot_contrastive_loss(q1, k2, sq1, sk2, predictor, tau) \
        + slot_contrastive_loss(q2, k1, sq2, sk1, predictor, tau)
    return group_weight * group + (1 - group_weight) * ctr


# ---------------------------------------------------------------- DenseCL

def info_nce_loss(q, k, queue, tau=0.2):
    """MoCo / DenseCL global loss. q, k: (N, C) L2-normalized; queue: (C, L) normalized negatives.

    logits = [q.k, q @ queue] / tau, shape (N, 1 + L); the positive is index 0; returns mean CE.
    """
    q, k, queue = q.float(), k.float(), queue.float()
    l_pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ queue], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def dense_contrastive_loss(q_grid, k_grid, q_feat, k_feat, queue, tau=0.2):
    """DenseCL dense loss. q_grid, k_grid: (N, C, S) normalized projections of S positions; q_feat, k_feat:
    (N, C', S) normalized backbone (or decoder) features used only to match each query position s to the key
    position argmax_t q_feat[:, s] . k_feat[:, t]. queue: (C, L).

    Every query position is one row (n-major, N * S rows): positive = its matched key, negatives = queue.
    """
    q_grid, k_grid, queue = q_grid.float(), k_grid.float(), queue.float()
    N, C, S = q_grid.shape
    match = (q_feat.float().transpose(1, 2) @ k_feat.float()).argmax(2)      # (N, S) key index per query
    k_matched = k_grid.gather(2, match.unsqueeze(1).expand(-1, C, -1))        # (N, C, S)
    l_pos = (q_grid * k_matched).sum(1).reshape(-1, 1)                        # (N * S, 1)
    l_neg = q_grid.transpose(1, 2).reshape(-1, C) @ queue                     # (N * S, L)
    logits = torch.cat([l_pos, l_neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(N * S, dtype=torch.long, device=q_grid.device))


def densecl_loss(student, teacher, queue, queue2, lam=0.5, tau=0.2):
    """The DenseCL objective at one level: L = (1 - lambda) * L_global + lambda * L_dense (lambda = 0.5).

    student: (q (N, C), q_grid (N, C, S), q_feat (N, C', S)) from view 1; teacher: the same from view 2.
    queue is for the global keys, queue2 for the pooled dense keys (DenseCL's two dictionaries).
    """
    q, q_grid, q_feat = student
    k, k_grid, k_feat = teacher
    return (1 - lam) * info_nce_loss(q, k, queue, tau) + lam * dense_contrastive_loss(q_grid, k_grid, q_feat, k_feat,
                                                                                        queue2, tau)
