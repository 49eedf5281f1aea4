"""Networks: ResNet taps, FCN and FPN decoders, SlotCon / DenseCL heads and objectives, the DeCon module, and the
downstream segmentation network (Segmenter).

Parameter names follow the libraries users export to: torchvision for the ResNet (`conv1`, `layer1.0.conv1`),
mmseg's FCNHead for the FCN (`convs.0.conv`, `convs.0.bn`), Detectron2's FPN (`fpn_lateral2`, `fpn_output2.norm`).

Every variant is one code path: a list of supervised levels ("c5" for the encoder; "fcn" or "p2".."p5" for the
decoder), one framework head per level in each branch, one objective per level, and Eq. 1-3 to combine them.
"""
import copy
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from data import DenseCLTwoView, SlotConTwoView
from losses import decon_loss, deep_supervision_loss, densecl_loss, slotcon_loss
from utils import all_gather, all_reduce_mean

ARCH_CHANNELS = {  # output channels of c2..c5
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}


# ---------------------------------------------------------------- encoder

class Backbone(nn.Module):
    """torchvision ResNet (weights=None, never downloaded) whose forward returns (c2, c3, c4, c5).

    Strides 4, 8, 16, 32. With `dilate_c5`, c5 stays at stride 16 (the output-stride-16 backbone of the FCN configs
    the paper fine-tunes with): torchvision's replace_stride_with_dilation gives layer4's first block dilation 1
    and the others dilation 2, exactly mmseg's ResNet with dilations (1, 1, 1, 2) and contract_dilation=True.
    `zero_init_residual`: zero-gamma on the last BN of each residual block, as SlotCon's ResNet (DenseCL's has
    none). No `fc`, no pooling.
    """

    def __init__(self, arch="resnet50", dilate_c5=False, zero_init_residual=True):
        super().__init__()
        if arch not in ARCH_CHANNELS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CHANNELS)}")
        net = getattr(torchvision.models, arch)(weights=None, zero_init_residual=zero_init_residual,
                                                replace_stride_with_dilation=[False, False, dilate_c5])
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.channels = ARCH_CHANNELS[arch]

    def stem(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)

    def forward(self, x):
        c2 = self.layer1(self.stem(x))  # (B,  256, H/4,  W/4) for ResNet-50
        c3 = self.layer2(c2)            # (B,  512, H/8,  W/8)
        c4 = self.layer3(c3)            # (B, 1024, H/16, W/16)
        c5 = self.layer4(c4)            # (B, 2048, H/32, W/32)
        return c2, c3, c4, c5


# ---------------------------------------------------------------- decoders

class ConvModule(nn.Module):
    """conv (no bias) -> BN -> ReLU (`act=False`: no ReLU), named like mmcv's ConvModule (`conv`, `bn`), with its
    init: Kaiming normal (fan_out) conv, BN weight 1 and bias 0."""

    def __init__(self, cin, cout, kernel_size=3, dilation=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation,
                              bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True) if act else nn.Identity()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class FCNDecoder(nn.Module):
    """mmseg FCNHead body (num_convs=2, concat_input=False, no classifier): two 3x3 convs, 256 ch, dilation 6.

    Runs on c5 only and returns {"fcn": (B, 256, h5, w5)}. 5.31M parameters on ResNet-50.
    """

    def __init__(self, in_channels, channels=256, dilation=6):
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3, dilation),
                                   ConvModule(channels, channels, 3, dilation))

    def forward(self, feats):
        return {"fcn": self.convs(feats[-1])}


class ConvNorm(nn.Conv2d):
    """Detectron2's Conv2d(norm=BN): a bias-free conv whose BatchNorm is the submodule `norm`."""

    def __init__(self, cin, cout, kernel_size, padding=0):
        super().__init__(cin, cout, kernel_size, padding=padding, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        nn.init.kaiming_uniform_(self.weight, a=1)  # Detectron2's c2_xavier_fill

    def forward(self, x):
        return self.norm(super().forward(x))


class FPNDecoder(nn.Module):
    """Detectron2 FPN without top block: lateral 1x1 conv+BN to 256 for c2..c5, top-down nearest upsampling to the
    next level's size and sum (x2 where the sides are multiples of 32, as Detectron2 pads them; other sides as mmseg
    and torchvision round them), 3x3 conv+BN outputs. Returns {"p2": (B,256,H/4,W/4), ..., "p5": (B,256,H/32,W/32)},
    or only p2 when `deep_supervision` is off (DeCon-SL keeps only `fpn_output2`, like the authors' code).

    Skip channel dropout (DeCon-ML, paper Sec. 3.2 "Channel dropout"): Dropout2d(p) on the skip paths of levels
    2, 3, 4, never on c5 (the main path). As in the authors' code it drops channels of the lateral-conv outputs,
    just before the sum with the top-down path: the paper's "encoder outputs passed to the decoder" is the same
    skip path, taken after the 1x1 projection that makes it 256 wide. The teacher copy has it removed (see
    DeCon.__init__).
    """

    def __init__(self, in_channels=(256, 512, 1024, 2048), out_channels=256, deep_supervision=True, dropout=0.0):
        super().__init__()
        self.levels = (2, 3, 4, 5) if deep_supervision else (2,)
        for s, cin in zip((2, 3, 4, 5), in_channels):
            setattr(self, f"fpn_lateral{s}", ConvNorm(cin, out_channels, 1))
        for s in self.levels:
            setattr(self, f"fpn_output{s}", ConvNorm(out_channels, out_channels, 3, padding=1))
        self.skip_dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def lateral(self, s):  # the 1x1 conv + BN of level s
        return getattr(self, f"fpn_lateral{s}")

    def output(self, s):  # the 3x3 conv + BN of level s
        return getattr(self, f"fpn_output{s}")

    def forward(self, feats):
        prev = self.lateral(5)(feats[3])
        out = {"p5": self.output(5)(prev)} if 5 in self.levels else {}
        for s in (4, 3, 2):  # top-down: nearest upsampling to the skip's size (x2 on sides that are multiples of 32)
            skip = self.skip_dropout(self.lateral(s)(feats[s - 2]))
            prev = skip + F.interpolate(prev, size=skip.shape[-2:], mode="nearest")
            if s in self.levels:
                out[f"p{s}"] = self.output(s)(prev)
        return out


# ---------------------------------------------------------------- framework heads (student and teacher)

class MLPHead(nn.Module):
    """SlotCon's DINOHead (Linear) / DINOHead2d (1x1 conv): in -> hidden -> BN -> GELU -> hidden -> BN -> GELU
    -> out. State-dict indices mlp.0, mlp.1, mlp.3, mlp.4, mlp.6 as in SlotCon."""

    def __init__(self, in_dim, hidden_dim=4096, out_dim=256, spatial=True):
        super().__init__()
        layer = partial(nn.Conv2d, kernel_size=1) if spatial else nn.Linear
        norm = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        self.mlp = nn.Sequential(layer(in_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
                                 layer(hidden_dim, hidden_dim), norm(hidden_dim), nn.GELU(),
                                 layer(hidden_dim, out_dim))
        for m in self.mlp:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.mlp(x)


class Slots(NamedTuple):
    slots: torch.Tensor   # (B, K, D) attention-weighted means of the projections, one per prototype
    scores: torch.Tensor  # (B, K, h, w) cosine similarity of each position's projection to each prototype


class SlotConHead(nn.Module):
    """Projector + semantic grouping of one level: feature (B, C, h, w) -> Slots.

    scores = cos(prototype_k, projection(b, :, i, j)); attention = softmax over K at temperature `temp`
    (+eps); slot_k = attention-weighted mean of the (unnormalized) projections over positions.
    """

    def __init__(self, in_dim, hidden_dim, out_dim, num_prototypes, temp=0.07, eps=1e-6):
        super().__init__()
        self.projector = MLPHead(in_dim, hidden_dim, out_dim, spatial=True)
        self.prototypes = nn.Embedding(num_prototypes, out_dim)  # N(0, 1) init, as SlotCon
        self.temp, self.eps = temp, eps

    def forward(self, feat):
        x = self.projector(feat)                                                    # (B, D, h, w)
        scores = torch.einsum("kd,bdhw->bkhw", F.normalize(self.prototypes.weight, dim=1), F.normalize(x, dim=1))
        attn = F.softmax(scores / self.temp, dim=1) + self.eps                      # (B, K, h, w)
        slots = torch.einsum("bdhw,bkhw->bkd", x, attn / attn.sum((2, 3), keepdim=True))
        return Slots(slots, scores)


class DenseProjections(NamedTuple):  # all L2-normalized along the channel axis; S = h * w positions
    q: torch.Tensor       # (N, D) global projection of the pooled feature
    grid: torch.Tensor    # (N, D, S) dense projections
    feat: torch.Tensor    # (N, C, S) the level's own features, used only to match positions across views
    pooled: torch.Tensor  # (N, D) the dense projections pooled: what the dense queue stores


class DenseCLHead(nn.Module):
    """DenseCL neck of one level (mmselfsup names `mlp`, `mlp2`): feature (N, C, h, w) -> DenseProjections."""

    def __init__(self, in_dim, hidden_dim=2048, out_dim=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        self.mlp2 = nn.Sequential(nn.Conv2d(in_dim, hidden_dim, 1), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden_dim, out_dim, 1))

    def forward(self, feat):
        q = F.normalize(self.mlp(feat.mean((2, 3))), dim=1)
        grid = self.mlp2(feat).flatten(2)
        return DenseProjections(q, F.normalize(grid, dim=1), F.normalize(feat.flatten(2), dim=1),
                                F.normalize(grid.mean(2), dim=1))


class Branch(nn.Module):
    """Encoder + optional decoder + one framework head per supervised level. Student and teacher are two."""

    def __init__(self, encoder, decoder, heads):
        super().__init__()
        self.encoder, self.decoder, self.heads = encoder, decoder, nn.ModuleDict(heads)

    def features(self, x):
        """(B, 3, H, W) -> {"c5": ..., "fcn" | "p2".."p5": ...}"""
        feats = self.encoder(x)
        return {"c5": feats[-1], **(self.decoder(feats) if self.decoder is not None else {})}

    def forward(self, views):
        """A list of (B, 3, H, W) crops -> one {level: head output} per crop, each crop run on its own (BatchNorm
        statistics per view, as the authors)."""
        return [{lvl: head(feats[lvl]) for lvl, head in self.heads.items()} for feats in map(self.features, views)]


# ---------------------------------------------------------------- framework objectives (per level, with state)

class SlotConObjective(nn.Module):
    """SlotCon's loss at one level and the state it keeps: the student-only slot predictor and the center of the
    teacher's scores, updated after each loss (as DINO's loss updates its center). Both branches see both views."""
    views = ((0, 1), (0, 1))  # (student's views, teacher's views)

    def __init__(self, num_prototypes, dim_out=256, dim_hidden=4096, group_weight=0.5, student_temp=0.1,
                 teacher_temp=0.07, tau=0.2, center_momentum=0.9):
        super().__init__()
        self.predictor = MLPHead(dim_out, dim_hidden, dim_out, spatial=False)
        self.register_buffer("center", torch.zeros(1, num_prototypes))
        self.group_weight, self.student_temp, self.teacher_temp = group_weight, student_temp, teacher_temp
        self.tau, self.center_momentum = tau, center_momentum

    def forward(self, student, teacher, coords, flags):
        """student, teacher: Slots of views 1 and 2; coords (2, B, 4), flags (2, B). Returns the level's loss."""
        loss = slotcon_loss(student, teacher, coords, flags, self.predictor, self.center, self.group_weight,
                            self.student_temp, self.teacher_temp, self.tau)
        self.update_center([t.scores for t in teacher])
        return loss

    @torch.no_grad()
    def update_center(self, teacher_scores):
        """center <- m * center + (1 - m) * mean over ranks and positions of the raw teacher scores (B, K, h, w)."""
        batch = torch.cat([s.float().permute(0, 2, 3, 1).flatten(0, 2) for s in teacher_scores]).mean(0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(all_reduce_mean(batch), alpha=1 - self.center_momentum)


class DenseCLObjective(nn.Module):
    """DenseCL's loss at one level and its two dictionaries (queues of past teacher keys): `queue` for the global
    keys, `queue2` for the pooled dense keys. The student sees view 1, the teacher view 2."""
    views = ((0,), (1,))

    def __init__(self, dim_out=128, queue_size=16384, lam=0.5, tau=0.2):
        super().__init__()
        self.register_buffer("queue", F.normalize(torch.randn(dim_out, queue_size), dim=0))
        self.register_buffer("queue2", F.normalize(torch.randn(dim_out, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.lam, self.tau = lam, tau

    def forward(self, student, teacher, coords=None, flags=None):
        """student, teacher: one DenseProjections each. Returns the level's loss, then enqueues the teacher keys."""
        (s,), (t,) = student, teacher
        # the loss keeps the queues for backward: it gets copies, the originals are updated in place below
        loss = densecl_loss(s[:3], t[:3], self.queue.clone(), self.queue2.clone(), self.lam, self.tau)
        self.enqueue(t.q, t.pooled)
        return loss

    @torch.no_grad()
    def enqueue(self, keys, keys2):
        """Write the keys (N, D), gathered over ranks, into the ring buffers (D, L), without a host sync."""
        keys, keys2 = all_gather(keys.float()), all_gather(keys2.float())
        idx = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % self.queue.shape[1]
        self.queue[:, idx] = keys.T
        self.queue2[:, idx] = keys2.T
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % self.queue.shape[1])


# ---------------------------------------------------------------- the two frameworks

class Framework(NamedTuple):
    """What differs between SlotCon and DenseCL. Every place that depends on the framework reads it here."""
    name: str                 # as the paper writes it
    two_view: type            # data.py's augmentation: PIL image -> (views, coords, flags)
    head: Callable            # head(input width, prototypes, hyper-parameters) -> one level's projection head
    objective: Callable       # objective(prototypes, hyper-parameters) -> one level's loss and its state
    views: tuple              # (student views, teacher views) of each branch: both views each for SlotCon
    zero_init_residual: bool  # the framework's own ResNet initialization
    export_branch: str        # the branch the authors transfer downstream
    picture: str              # visualize.py: "prototypes" (argmax, one colour each) or "pca" (dense projections)
    recipe: dict              # pretrain.py's defaults: paper Sec. 3.3, SlotCon's COCO script, DenseCL's COCO config


FRAMEWORKS = {
    "slotcon": Framework(
        "SlotCon", SlotConTwoView,
        head=lambda width, k, h: SlotConHead(width, h["dim_hidden"], h["dim_out"], k, h["teacher_temp"]),
        objective=lambda k, h: SlotConObjective(k, h["dim_out"], h["dim_hidden"], h["group_weight"],
                                                h["student_temp"], h["teacher_temp"], h["tau"], h["center_momentum"]),
        views=SlotConObjective.views, zero_init_residual=True, export_branch="teacher", picture="prototypes",
        recipe=dict(batch_size=512, optimizer="lars", base_lr=1.0, weight_decay=1e-5, warmup_epochs=5, final_lr=1e-6,
                    teacher_momentum=0.99, momentum_schedule="cosine", dim_hidden=4096, dim_out=256, min_scale=0.08)),
    "densecl": Framework(
        "DenseCL", DenseCLTwoView,
        head=lambda width, k, h: DenseCLHead(width, h["dim_hidden"], h["dim_out"]),
        objective=lambda k, h: DenseCLObjective(h["dim_out"], h["queue_size"], h["densecl_lambda"], h["tau"]),
        views=DenseCLObjective.views, zero_init_residual=False, export_branch="student", picture="pca",
        recipe=dict(batch_size=256, optimizer="sgd", base_lr=0.3, weight_decay=1e-4, warmup_epochs=0, final_lr=0.0,
                    teacher_momentum=0.999, momentum_schedule="constant", dim_hidden=2048, dim_out=128, min_scale=0.2)),
}


def decoder_levels(decoder, deep_supervision):
    return {"none": [], "fcn": ["fcn"], "fpn": ["p2", "p3", "p4", "p5"] if deep_supervision else ["p2"]}[decoder]


# ---------------------------------------------------------------- DeCon

class DeCon(nn.Module):
    """Student and EMA teacher (encoder, decoder, heads) and one objective per supervised level.
    forward(crops, coords, flags, momentum) -> (loss, logs).

    Levels: "c5" (L_enc) when alpha > 0, plus the decoder levels (L_dec, or L_dds over p2..p5). A level with
    weight 0 builds nothing, so alpha = 0 has no encoder projector, exactly as the authors' code.
    """

    def __init__(self, framework="slotcon", arch="resnet50", decoder="none", alpha=1.0, dropout=0.0,
                 deep_supervision=False, dim_hidden=4096, dim_out=256, num_prototypes=256, num_prototypes_dec=None,
                 queue_size=16384, group_weight=0.5, student_temp=0.1, teacher_temp=0.07, center_momentum=0.9,
                 densecl_lambda=0.5, tau=0.2):
        super().__init__()
        if framework not in FRAMEWORKS:
            raise ValueError(f"unknown framework {framework!r}; choose from {', '.join(FRAMEWORKS)}")
        fw = FRAMEWORKS[framework]
        self.framework, self.alpha = framework, alpha
        self.dec_levels = decoder_levels(decoder, deep_supervision)
        self.levels = (["c5"] if alpha > 0 else []) + self.dec_levels
        encoder = Backbone(arch, zero_init_residual=fw.zero_init_residual)  # each framework's own ResNet init
        c = encoder.channels
        dec = {"none": lambda: None, "fcn": lambda: FCNDecoder(c[3]),
               "fpn": lambda: FPNDecoder(c, 256, deep_supervision, dropout)}[decoder]()
        width = {lvl: c[3] if lvl == "c5" else 256 for lvl in self.levels}  # input width of each level's head
        prototypes = {lvl: num_prototypes if lvl == "c5" else (num_prototypes_dec or num_prototypes)
                      for lvl in self.levels}
        h = dict(dim_hidden=dim_hidden, dim_out=dim_out, queue_size=queue_size, group_weight=group_weight,
                 student_temp=student_temp, teacher_temp=teacher_temp, center_momentum=center_momentum,
                 densecl_lambda=densecl_lambda, tau=tau)
        self.student = Branch(encoder, dec, {lvl: fw.head(width[lvl], prototypes[lvl], h) for lvl in self.levels})
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        if dropout > 0:
            self.teacher.decoder.skip_dropout = nn.Identity()  # skip dropout is a student-only regularizer
        self.objectives = nn.ModuleDict({lvl: fw.objective(prototypes[lvl], h) for lvl in self.levels})
        self.student_views, self.teacher_views = fw.views

    @torch.no_grad()
    def update_teacher(self, momentum):
        """teacher <- momentum * teacher + (1 - momentum) * student, for every parameter of the branch
        (encoder, decoder, projectors, prototypes), in one multi-tensor op. BN running statistics are the teacher's
        own."""
        torch._foreach_lerp_(list(self.teacher.parameters()), list(self.student.parameters()), 1.0 - float(momentum))

    def forward(self, crops, coords, flags, momentum):
        """crops: two (B, 3, H, W) views; coords: (2, B, 4) overlap boxes; flags: (2, B) flips;
        momentum: the teacher EMA momentum for this step (applied before the teacher runs, as SlotCon).
        Returns (loss, logs) with detached per-level losses in logs."""
        self.update_teacher(momentum)
        student = self.student([crops[v] for v in self.student_views])  # per view: {level: head output}
        with torch.no_grad():
            teacher = self.teacher([crops[v] for v in self.teacher_views])
        losses = {lvl: objective([s[lvl] for s in student], [t[lvl] for t in teacher], coords, flags)
                  for lvl, objective in self.objectives.items()}
        l_enc = losses.get("c5")
        l_dec = deep_supervision_loss([losses[lvl] for lvl in self.dec_levels]) if self.dec_levels else None  # Eq. 3
        loss = decon_loss(l_enc, l_dec, self.alpha)  # Eq. 1 / Eq. 2
        logs = {"loss": loss, "loss_enc": l_enc, "loss_dec": l_dec, **{f"loss_{lvl}": losses[lvl] for lvl in losses}}
        return loss, {k: v.detach() for k, v in logs.items() if v is not None}


# ---------------------------------------------------------------- downstream segmentation network
# (finetune_seg.py and eval.py)

class FCNHead(FCNDecoder):
    """mmseg's FCNHead as the paper fine-tunes it: the pre-trainable body (two 3x3 convs, 256 ch, dilation 6,
    `convs.*`) + a dropout-free 1x1 classifier `conv_seg`. mmseg's names, so a `decode_head.*` file loads as is.
    (c2, c3, c4, c5) -> (B, K, h5, w5)."""

    def __init__(self, in_channels, num_classes, channels=256):
        super().__init__(in_channels, channels)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats):
        return self.conv_seg(super().forward(feats)["fcn"])


class FPNNeck(FPNDecoder):
    """mmseg's FPN neck as convert.py's printed config builds it (`norm_cfg` BN, `num_outs=4`): FPNDecoder's function
    under mmseg's names, `lateral_convs.{s-2}` and `fpn_convs.{s-2}` (ConvModules without activation: `conv`,
    `bn`), with the neck's Xavier-uniform init of the convs where nothing is transferred. weights.mmseg_neck_key
    renames a pre-trained FPNDecoder onto it. (c2, c3, c4, c5) -> {"p2": ..., "p5": ...}."""

    def __init__(self, in_channels, out_channels=256):
        nn.Module.__init__(self)  # FPNDecoder's forward, not its Detectron2-named modules
        self.levels = (2, 3, 4, 5)
        self.lateral_convs = nn.ModuleList(ConvModule(cin, out_channels, 1, act=False) for cin in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, act=False) for _ in in_channels)
        self.skip_dropout = nn.Identity()
        for m in (*self.lateral_convs, *self.fpn_convs):
            nn.init.xavier_uniform_(m.conv.weight)

    def lateral(self, s):
        return self.lateral_convs[s - 2]

    def output(self, s):
        return self.fpn_convs[s - 2]


class Upsample2x(nn.Module):
    """mmseg's Upsample(scale_factor=2, mode='bilinear'): bilinear to twice the input's sides."""

    def __init__(self, align_corners=False):
        super().__init__()
        self.align_corners = align_corners

    def forward(self, x):
        return F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear",
                             align_corners=self.align_corners)


class FPNHead(nn.Module):
    """mmseg's FPNHead (Semantic FPN, Kirillov et al. 2019) as mmseg's fpn_r50.py sets it: per level a chain of
    3x3 conv-BN-ReLU (128 channels) stages, each followed by a bilinear x2 upsampling except at p2: one stage for
    p2 and p3, two for p4, three for p5, so that every chain ends at p2's stride; the chains' outputs are summed
    (each resized bilinearly to p2's size first), then Dropout2d(0.1) and the 1x1 classifier `conv_seg`. mmseg's
    names: `scale_heads.{level}.{index}` (the Upsample2x modules take the odd indices), `conv_seg`.
    [p2, p3, p4, p5] -> (B, K, H/4, W/4)."""

    def __init__(self, num_classes, in_channels=256, channels=128, dropout=0.1, align_corners=False):
        super().__init__()
        self.align_corners = align_corners
        self.scale_heads = nn.ModuleList()
        for level in range(4):  # strides 4, 8, 16, 32: max(1, log2(stride / 4)) stages
            stages = []
            for k in range(max(1, level)):
                stages.append(ConvModule(in_channels if k == 0 else channels, channels, 3))
                if level > 0:
                    stages.append(Upsample2x(align_corners))
            self.scale_heads.append(nn.Sequential(*stages))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)  # mmseg's classifier init
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, p):
        out = self.scale_heads[0](p[0])
        for head, x in zip(self.scale_heads[1:], p[1:]):
            x = head(x)
            if x.shape[-2:] != out.shape[-2:]:  # sides that are not multiples of 32
                x = F.interpolate(x, size=out.shape[-2:], mode="bilinear", align_corners=self.align_corners)
            out = out + x
        return self.conv_seg(self.dropout(out))


class Segmenter(nn.Module):
    """mmseg's EncoderDecoder as the paper fine-tunes it: (B, 3, H, W) -> logits (B, K, H, W), upsampled bilinearly.

    `fcn`: ResNet `backbone` + FCNHead `decode_head`. On ResNet-50 it runs on a dilated c5 (output stride 16), as
    the fcn_d6_r50-d16 configs of MoCo and SlotCon; torchvision's BasicBlock cannot dilate, so ResNet-18/34 keep
    stride 32. Dilation changes no parameter shape, so the pre-trained (stride-32) weights load unchanged.
    `fpn`: ResNet `backbone` + FPN `neck` + Semantic-FPN `decode_head` (mmseg's fpn_r50.py with a BN neck).
    The parameter names are mmseg's, so a fine-tuned state dict is the one convert.py's printed config loads.
    `align_corners` is that of every bilinear resize (mmseg's decode_head.align_corners; VOC and Cityscapes: True).
    """

    def __init__(self, arch="resnet50", decoder="fcn", num_classes=21, align_corners=False):
        super().__init__()
        if arch not in ARCH_CHANNELS:
            raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCH_CHANNELS)}")
        if decoder not in ("fcn", "fpn"):
            raise ValueError(f"unknown decoder {decoder!r}; choose fcn or fpn")
        dilate = decoder == "fcn" and arch == "resnet50"
        self.arch, self.decoder, self.num_classes, self.align_corners = arch, decoder, num_classes, align_corners
        self.output_stride = 16 if dilate else 32
        self.backbone = Backbone(arch, dilate_c5=dilate)
        c = self.backbone.channels
        if decoder == "fcn":
            self.decode_head = FCNHead(c[3], num_classes)
        else:
            self.neck = FPNNeck(c)
            self.decode_head = FPNHead(num_classes, align_corners=align_corners)

    def forward(self, x):
        feats = self.backbone(x)
        if self.decoder == "fpn":
            p = self.neck(feats)
            logits = self.decode_head([p["p2"], p["p3"], p["p4"], p["p5"]])
        else:
            logits = self.decode_head(feats)
        return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def parameter_table(model):
    """The supplement's Table 3 columns, in parameters: encoder, decoder (one branch), encoder auxiliary layers
    (both branches' heads + the objective's predictor), decoder auxiliary layers (the same, summed over decoder
    levels), full."""
    aux = lambda lvls: sum(count_parameters(b.heads[lvl]) for b in (model.student, model.teacher) for lvl in lvls) \
        + sum(count_parameters(model.objectives[lvl]) for lvl in lvls)  # SlotCon's predictors
    return {
        "enc": count_parameters(model.student.encoder),
        "dec": count_parameters(model.student.decoder) if model.student.decoder is not None else 0,
        "enc_aux": aux([lvl for lvl in model.levels if lvl == "c5"]),
        "dec_aux": aux(model.dec_levels),
        "full": count_parameters(model),
    }
