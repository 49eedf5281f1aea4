"""Weights in and out: every key mapping between our modules and torchvision, Detectron2 and mmsegmentation, reading a
pretrain.py checkpoint's branch, reading any --pretrained file (ours or exported), loading it into the fine-tuning
networks, and the exports that convert.py writes (docs/EXPORT.md).

Our names: the encoder is a torchvision ResNet (`conv1`, `bn1`, `layer1..4`), the FCN decoder is mmseg's FCNHead body
(`convs.*`), the FPN decoder uses Detectron2's names (`fpn_lateral{2..5}`, `fpn_output{2..5}`, `.norm`).
"""
import os
import re

import torch

from models import FRAMEWORKS, DeCon


# ---------------------------------------------------------------- a pretrain.py checkpoint

def load_pretrained(path, branch=None):
    """Read a pretrain.py checkpoint (weights_only). Returns (encoder state dict, decoder state dict or None,
    info) with torchvision / mmseg / Detectron2 names and no prefixes. `branch` defaults to what the authors
    export: the teacher (EMA) for SlotCon, the student for DenseCL."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: skip the optimizer
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("args"), dict)
            and "framework" in ckpt["args"]):
        raise ValueError(f"{path}: not a DeCon pretrain.py checkpoint (expected a dict with 'model' and 'args')")
    args = ckpt["args"]
    if args["framework"] not in FRAMEWORKS:
        raise ValueError(f"{path}: framework {args['framework']!r} is not one of {', '.join(FRAMEWORKS)}")
    branch = branch or FRAMEWORKS[args["framework"]].export_branch
    if branch not in ("teacher", "student"):
        raise ValueError(f"branch must be 'teacher' or 'student', got {branch!r}")
    part = lambda prefix: {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    encoder, decoder = part(f"{branch}.encoder."), part(f"{branch}.decoder.")
    info = {k: args.get(k) for k in ("framework", "arch", "decoder", "deep_supervision", "alpha", "dropout")}
    info.update(branch=branch, step=ckpt.get("step"))
    return encoder, (decoder or None), info


def read_checkpoint(path, flag="--checkpoint"):
    """A pretrain.py last.pt -> (its model state dict, the pre-training args dict). Raises ValueError (one line
    naming `flag` and the file) for anything else."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: skip the optimizer
    except Exception as e:
        raise ValueError(f"{flag} {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__})") from None
    a = ckpt.get("args") if isinstance(ckpt, dict) else None
    if not (isinstance(a, dict) and "framework" in a and isinstance(ckpt.get("model"), dict)):
        what = " (a fine-tuned seedN.pt: eval.py scores and draws it)" if "num_classes" in (a or {}) else ""
        raise ValueError(f"{flag} {path}: not a pretrain.py checkpoint{what}")
    return ckpt["model"], a


def build_decon(state, a):
    """The DeCon of pre-training args `a`, with the weights `state`, in eval mode."""
    model = DeCon(a["framework"], a["arch"], a["decoder"], a["alpha"], a["dropout"], a["deep_supervision"],
                  a["dim_hidden"], a["dim_out"], a["num_prototypes"], a.get("num_prototypes_dec"), a["queue_size"])
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------- key mappings

def torchvision_fpn_key(name):
    """Our FPN key (Detectron2's) -> the key of torchvision's FeaturePyramidNetwork built with norm_layer, levels
    numbered from c2: fpn_lateral{s}.weight -> inner_blocks.{s-2}.0.weight, fpn_lateral{s}.norm.X ->
    inner_blocks.{s-2}.1.X, and fpn_output{s} -> layer_blocks.{s-2}.{0,1} alike. The two networks compute the same
    p2..p5 (1x1 lateral conv + BN, nearest top-down upsampling to the next level's size and sum, 3x3 output conv +
    BN); torchvision adds the parameter-free p6 (max-pool)."""
    m = re.fullmatch(r"fpn_(lateral|output)([2-5])\.(weight|norm\.\w+)", name)
    if m is None:
        raise ValueError(f"unexpected FPN decoder key {name!r}")
    kind, level, rest = m.groups()
    block = "inner_blocks" if kind == "lateral" else "layer_blocks"
    return f"{block}.{int(level) - 2}." + ("0.weight" if rest == "weight" else "1." + rest[len("norm."):])


def detectron2_resnet_key(name):
    """torchvision ResNet key -> Detectron2 ResNet key, the renames of MoCo's detection converter:
    conv1/bn1 -> stem.conv1/stem.conv1.norm, layer{t} -> res{t+1}, bn{i} -> conv{i}.norm,
    downsample.0 -> shortcut, downsample.1 -> shortcut.norm."""
    if not name.startswith("layer"):
        name = "stem." + name
    name = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", name)
    name = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", name)
    return name.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def mmseg_neck_key(name):
    """Detectron2 FPN key -> mmseg FPN neck key. mmcv's ConvModule calls its BatchNorm `bn`, and mmseg numbers
    the levels from c2: fpn_lateral{s}.weight -> lateral_convs.{s-2}.conv.weight,
    fpn_output{s}.norm.X -> fpn_convs.{s-2}.bn.X."""
    m = re.fullmatch(r"fpn_(lateral|output)([2-5])\.(weight|norm\.\w+)", name)
    if m is None:
        raise ValueError(f"unexpected FPN decoder key {name!r} in the checkpoint")
    kind, level, rest = m.groups()
    module = "lateral_convs" if kind == "lateral" else "fpn_convs"
    rest = "conv.weight" if rest == "weight" else "bn." + rest[len("norm."):]
    return f"{module}.{int(level) - 2}.{rest}"


def without_fc(encoder):
    # no classifier is ever pre-trained; dropping fc keeps strict=False loads free of "unexpected" keys
    return {k: v for k, v in encoder.items() if not k.startswith("fc.")}


def to_numpy(t):
    # pretrain.py saves channels_last weights: hand Detectron2 C-contiguous arrays. (np.ascontiguousarray would
    # turn the 0-d num_batches_tracked into shape (1,), which Detectron2 skips as a shape mismatch.)
    return t.detach().cpu().contiguous().numpy()


# ---------------------------------------------------------------- --pretrained files, into the fine-tuning networks

ENCODER_KEY = re.compile(r"(conv1|bn1|layer[1-4])\.")
# the FPN names of convert.py's exports: mmseg's neck (lateral_convs.{s-2}.conv / .bn, fpn_convs...) and
# torchvision's FeaturePyramidNetwork (inner_blocks.{s-2}.0 / .1, layer_blocks...)
EXPORTED_FPN_KEY = re.compile(r"(lateral_convs|fpn_convs|inner_blocks|layer_blocks)\.([0-3])\.(conv|bn|0|1)\.(\w+)")


def fpn_key(match):
    """An exported FPN key -> our Detectron2 name: lateral_convs.{s-2}.conv.weight (inner_blocks.{s-2}.0.weight)
    -> fpn_lateral{s}.weight, fpn_convs.{s-2}.bn.X (layer_blocks.{s-2}.1.X) -> fpn_output{s}.norm.X."""
    module, index, layer, param = match.groups()
    name = f"fpn_{'lateral' if module in ('lateral_convs', 'inner_blocks') else 'output'}{int(index) + 2}"
    return f"{name}.{param}" if layer in ("conv", "0") else f"{name}.norm.{param}"


def split_state_dict(sd):
    """{name: tensor} -> (encoder, fcn, fpn, ignored names). Strips `module.`, the mmseg prefixes `backbone.`,
    `decode_head.`, `neck.` and torchvision's detection-backbone prefixes `body.`, `fpn.`, then sorts by name:
    torchvision ResNet (`conv1`, `bn1`, `layer*`), FCN body (`convs.*`), FPN (`fpn_lateral*`, `fpn_output*`, or the
    exported mmseg / torchvision names). `fc.*`, `conv_seg.*` and the like are ignored: no classifier is
    transferred."""
    encoder, fcn, fpn, ignored = {}, {}, {}, []
    for name, tensor in sd.items():
        key = name[len("module."):] if name.startswith("module.") else name
        key = re.sub(r"^(backbone|decode_head|neck|body|fpn)\.", "", key)
        neck = EXPORTED_FPN_KEY.fullmatch(key)
        key = fpn_key(neck) if neck else key
        if ENCODER_KEY.match(key):
            encoder[key] = tensor
        elif key.startswith("convs."):
            fcn[key] = tensor
        elif key.startswith(("fpn_lateral", "fpn_output")):
            fpn[key] = tensor
        else:
            ignored.append(name)
    return encoder, fcn, fpn, ignored


def infer_arch(encoder):
    """The torchvision ResNet a state dict belongs to, from its block names (None if it holds no encoder)."""
    if "conv1.weight" not in encoder:
        return None
    if "layer1.0.conv3.weight" in encoder:
        if "layer3.6.conv1.weight" in encoder:
            raise ValueError("the encoder is deeper than ResNet-50, which is not supported")
        return "resnet50"
    return "resnet34" if "layer3.5.conv1.weight" in encoder else "resnet18"


def read_weights(path, branch=None, allow_finetuned=False):
    """One --pretrained file -> (encoder or None, decoder or None, decoder kind or None, arch, log line)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: peek without a full read
    except Exception as e:
        raise ValueError(f"--pretrained {path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}; "
                         "Detectron2 .pkl files are not supported)") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "num_classes" in ckpt["args"] \
            and not allow_finetuned:
        raise ValueError(f"--pretrained {path}: a fine-tuned checkpoint (trained with the labels of "
                         f"--dataset {ckpt['args'].get('dataset')}), not pre-trained weights; pass "
                         "--allow-finetuned to start from it anyway")
    if isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "framework" in ckpt["args"]:
        encoder, decoder, info = load_pretrained(path, branch)
        who = "the authors' choice for" if branch is None else "chosen by --branch, of"
        kind = info["decoder"] if decoder else None
        ds = f", deep supervision {'on' if info['deep_supervision'] else 'off'}" if kind == "fpn" else ""
        note = (f"{path}: {info['branch']} branch ({who} {info['framework']}) of a {info['arch']} pre-training with "
                f"decoder {info['decoder']}{ds}, step {info['step']}")
        return encoder or None, decoder, kind, info["arch"], note
    if branch is not None:
        raise ValueError(f"--branch {branch}: {path} is not a pretrain.py checkpoint (converted files hold one "
                         "branch already)")
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ValueError(f"--pretrained {path}: neither a pretrain.py checkpoint nor a state dict of tensors")
    encoder, fcn, fpn, ignored = split_state_dict(sd)
    if fcn and fpn:
        raise ValueError(f"--pretrained {path}: holds both FCN (convs.*) and FPN (fpn_*) weights")
    if not (encoder or fcn or fpn):
        raise ValueError(f"--pretrained {path}: no ResNet, FCN or FPN weights among its keys "
                         f"(e.g. {', '.join(list(sd)[:3])})")
    kind = "fcn" if fcn else "fpn" if fpn else None
    parts = [f"{len(encoder)} encoder"] * bool(encoder) + [f"{len(fcn or fpn)} {kind} decoder"] * bool(kind)
    note = f"{path}: converted weights, {' + '.join(parts)} tensors"
    if ignored:
        note += f"; ignored {len(ignored)} ({', '.join(ignored[:3])}{', ...' if len(ignored) > 3 else ''})"
    return encoder or None, fcn or fpn or None, kind, infer_arch(encoder), note


def read_pretrained(paths, branch=None, allow_finetuned=False):
    """Every --pretrained file merged -> {"encoder", "decoder", "decoder_kind", "arch", "notes"}: a last.pt gives
    both parts of one branch, converted files what they hold (a backbone file and a head file can be combined)."""
    out = {"encoder": None, "decoder": None, "decoder_kind": None, "arch": None, "notes": []}
    for path in paths:
        encoder, decoder, kind, arch, note = read_weights(path, branch, allow_finetuned)
        for part, value in (("encoder", encoder), ("decoder", decoder)):
            if value is not None and out[part] is not None:
                raise ValueError(f"--pretrained: two files hold {part} weights ({path} is the second)")
            if value is not None:
                out[part] = value
        out["decoder_kind"] = out["decoder_kind"] or kind
        out["arch"] = out["arch"] or arch
        out["notes"].append(note)
    if out["encoder"] is None:
        raise ValueError(f"--pretrained {' '.join(paths)}: no encoder weights (add the backbone file)")
    return out


def load_into(module, state, what):
    """load_state_dict(strict=False) that turns a shape mismatch into a one-line ValueError; returns the missing
    keys (BatchNorm's num_batches_tracked aside) after checking that nothing unexpected came along."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{what}: tensor shapes do not fit ({str(e).splitlines()[-1].strip()})") from None
    if unexpected:
        raise ValueError(f"{what}: unexpected tensors {', '.join(unexpected[:3])}")
    return [k for k in missing if not k.endswith("num_batches_tracked")]


def transfer_segmenter(model, pretrained, mode="encoder"):
    """Copy pre-trained tensors into a Segmenter: the encoder always; with mode 'encoder+decoder' the decoder too,
    when its kind is the model's (heterogeneous decoders, Table 5, transfer the encoder only): the FCN body into
    `decode_head.convs`, the FPN into `neck` (renamed by mmseg_neck_key). The classifier and the Semantic-FPN head
    always start from scratch. Returns log lines saying what was loaded and what was not."""
    missing = load_into(model.backbone, pretrained["encoder"], f"encoder weights for {model.arch}")
    if missing:
        raise ValueError(f"encoder weights for {model.arch}: missing {', '.join(missing[:3])}")
    notes = [f"encoder: {len(pretrained['encoder'])} pre-trained tensors"]
    kind = pretrained["decoder_kind"]
    if mode == "encoder":
        return notes + ["decoder: random init (--transfer encoder)"]
    if kind != model.decoder:
        return notes + [f"decoder: random init; heterogeneous decoders (pre-trained {kind}, fine-tuned "
                        f"{model.decoder}) transfer the encoder only"]
    if kind == "fpn":
        missing = load_into(model.neck, {mmseg_neck_key(k): v for k, v in pretrained["decoder"].items()},
                            "fpn decoder weights")
        fresh = sorted({"neck." + ".".join(k.split(".")[:2]) for k in missing}) + ["decode_head"]  # neck.fpn_convs.1
        where = "neck"
    else:
        missing = load_into(model.decode_head, pretrained["decoder"], "fcn decoder weights")
        fresh = sorted({"decode_head." + k.split(".")[0] for k in missing})  # decode_head.conv_seg
        where = "decode_head.convs"
    note = f"decoder -> {where}: {len(pretrained['decoder'])} pre-trained tensors; random init: {', '.join(fresh)}"
    if any(name.startswith("neck.fpn_convs") for name in fresh):
        note += " (FPN pre-trained without deep supervision: only fpn_output2 exists)"
    return notes + [note]


FPN_MODULES = [f"fpn_{kind}{s}" for kind in ("lateral", "output") for s in (2, 3, 4, 5)]


def transfer_detector(model, pretrained, mode="encoder"):
    """Copy pre-trained tensors into a torchvision detector: the encoder into backbone.body always; with mode
    'encoder+decoder' our FPN into backbone.fpn, renamed (models.torchvision_fpn_key). The RPN and the box and mask
    heads always start from scratch. Returns log lines saying what was loaded and what stays random."""
    body = model.backbone.body
    missing = load_into(body, pretrained["encoder"], f"encoder weights for {model.arch}")
    if missing:
        raise ValueError(f"encoder weights for {model.arch}: missing {', '.join(missing[:3])}")
    notes = [f"encoder -> backbone.body: {len(pretrained['encoder'])} pre-trained tensors"]
    heads = "RPN, box head" + (", mask head" if model.kind == "mask" else "")
    kind = pretrained["decoder_kind"]
    if mode == "encoder":
        return notes + [f"random init: FPN (--transfer encoder), {heads}"]
    if kind != "fpn":
        return notes + [f"random init: FPN (the pre-trained decoder is an {kind.upper()}, which has no counterpart "
                        f"in the detector), {heads}"]
    load_into(model.backbone.fpn, {torchvision_fpn_key(k): v for k, v in pretrained["decoder"].items()},
              "FPN decoder weights")
    loaded = sorted({k.split(".")[0] for k in pretrained["decoder"]}, key=FPN_MODULES.index)
    fresh = [m for m in FPN_MODULES if m not in loaded]
    notes.append(f"FPN -> backbone.fpn: {len(pretrained['decoder'])} pre-trained tensors ({', '.join(loaded)})")
    why = " (pre-trained without deep supervision: only fpn_output2 exists)" if fresh else ""
    return notes + [f"random init: {', '.join(fresh + [heads])}{why}"]


def pretrained_for(args):
    """The --pretrained weights merged (or None), checked against --arch and --transfer; sets --arch to the
    encoder's when it is not given (else resnet50)."""
    pretrained = read_pretrained(args.pretrained, args.branch, args.allow_finetuned) if args.pretrained else None
    if pretrained:
        if args.arch and pretrained["arch"] and args.arch != pretrained["arch"]:
            raise ValueError(f"--arch {args.arch}: --pretrained holds a {pretrained['arch']} encoder")
        if args.transfer == "encoder+decoder" and pretrained["decoder"] is None:
            raise ValueError(f"--transfer encoder+decoder: {' '.join(args.pretrained)} has no decoder weights; "
                             "use --transfer encoder")
    args.arch = args.arch or (pretrained or {}).get("arch") or "resnet50"
    return pretrained


# ---------------------------------------------------------------- exports (convert.py)

def export_detectron2(encoder, decoder):
    """{name: numpy array}: ResNet keys renamed for Detectron2, FPN keys verbatim (suffix matching resolves
    them to backbone.fpn_*)."""
    model = {}
    if encoder is not None:
        model.update({detectron2_resnet_key(k): to_numpy(v) for k, v in encoder.items()})
    if decoder is not None:
        model.update({k: to_numpy(v) for k, v in decoder.items()})
    return {"model": model, "__author__": "DeCon", "matching_heuristics": True}


def export_mmseg(encoder, decoder, info):
    """{file label: {"state_dict": state dict}}. The per-module files are for that module's
    `init_cfg=dict(type='Pretrained')`, so they carry no prefix; `full` is the segmentor's, for `load_from`."""
    files, full = {}, {}
    if encoder is not None:
        files["backbone"] = {k: v.contiguous() for k, v in encoder.items()}  # mmseg ResNet = torchvision names
        full.update({f"backbone.{k}": v for k, v in files["backbone"].items()})
    if decoder is not None and info["decoder"] == "fcn":
        files["decode_head"] = {k: v.contiguous() for k, v in decoder.items()}  # already FCNHead names
        full.update({f"decode_head.{k}": v for k, v in files["decode_head"].items()})
    elif decoder is not None:
        files["neck"] = {mmseg_neck_key(k): v.contiguous() for k, v in decoder.items()}
        full.update({f"neck.{k}": v for k, v in files["neck"].items()})
    files["full"] = full
    return {label: {"state_dict": sd} for label, sd in files.items()}  # mmengine's checkpoint layout


def export_torchvision(encoder, decoder=None, fold_bn=False):
    """The keys of the torchvision module the weights load into: a ResNet for the encoder alone; the detection
    backbone (`body.` + the ResNet's keys, `fpn.` + FeaturePyramidNetwork's) for the encoder and the FPN; the
    FeaturePyramidNetwork's for the FPN alone. `fold_bn`: the FPN without norm layers (fold_fpn_bn)."""
    if decoder is None:
        return {k: v.contiguous() for k, v in encoder.items()}
    fpn = fold_fpn_bn(decoder) if fold_bn else {torchvision_fpn_key(k): v.contiguous() for k, v in decoder.items()}
    if encoder is None:
        return fpn
    return {**{f"body.{k}": v.contiguous() for k, v in encoder.items()}, **{f"fpn.{k}": v for k, v in fpn.items()}}


def fold_fpn_bn(decoder, eps=1e-5):
    """Our FPN (bias-free convs, each followed by BatchNorm with eps 1e-5) -> torchvision's FPN without norm layers
    (`inner_blocks.{s-2}.0` / `layer_blocks.{s-2}.0`, weight and bias), the same function in eval mode: per output
    channel, scale = gamma / sqrt(running_var + eps), W' = W * scale, b' = beta - running_mean * scale."""
    out = {}
    for name in sorted({k.split(".")[0] for k in decoder}):
        bn = {p: decoder[f"{name}.norm.{p}"].double() for p in ("weight", "bias", "running_mean", "running_var")}
        scale = bn["weight"] / torch.sqrt(bn["running_var"] + eps)
        key = torchvision_fpn_key(f"{name}.weight")  # e.g. inner_blocks.0.0.weight
        out[key] = (decoder[f"{name}.weight"].double() * scale[:, None, None, None]).float().contiguous()
        out[key[:-len("weight")] + "bias"] = (bn["bias"] - bn["running_mean"] * scale).float()
    return out
