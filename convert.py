"""Export a pretrain.py checkpoint to Detectron2, mmsegmentation or torchvision, without hand-editing keys.

    python convert.py --checkpoint output/last.pt --to detectron2 --output decon_r50.pkl
    python convert.py --checkpoint output/last.pt --to mmseg --output export/decon_r50
    python convert.py --checkpoint output/last.pt --to torchvision --output decon_r50_tv.pth

detectron2:  one pickle {"model": {name: numpy array}, "__author__": "DeCon", "matching_heuristics": True}.
             ResNet keys get the MoCo renames (stem.conv1, res2.0.conv1.norm, res2.0.shortcut, ...); FPN keys
             stay `fpn_lateral{2..5}.*` / `fpn_output{2..5}.*`, which Detectron2's suffix matching puts on
             `backbone.bottom_up.*` and `backbone.fpn_*`. The config lines to use are printed.
mmseg:       PREFIX_backbone.pth (ResNet, torchvision names), PREFIX_decode_head.pth (FCNHead `convs.*`) or
             PREFIX_neck.pth (FPN neck `lateral_convs.*` / `fpn_convs.*`), and PREFIX_full.pth with the
             `backbone.` / `decode_head.` / `neck.` prefixes for `load_from`. With a directory as --output:
             DIR/backbone.pth, DIR/decode_head.pth or DIR/neck.pth, DIR/full.pth.
torchvision: a plain ResNet state dict; `resnet50().load_state_dict(sd, strict=False)` misses only fc.*.

The branch defaults to what the authors export: the EMA teacher for SlotCon, the student for DenseCL.
"""
import os
import pickle
import re
import sys

import torch

import utils
from models import load_pretrained

# Our encoders saw RGB in [0, 1] normalized with the ImageNet statistics; Detectron2 takes 0-255 input.
PIXEL_MEAN = [123.675, 116.28, 103.53]
PIXEL_STD = [58.395, 57.12, 57.375]
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
C5_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
FPN_IN_CHANNELS = {"resnet18": [64, 128, 256, 512], "resnet34": [64, 128, 256, 512],
                   "resnet50": [256, 512, 1024, 2048]}


def get_args_parser():
    p = utils.ArgumentParser("convert.py", description="Export pre-trained DeCon weights (encoder and FCN/FPN "
                                                       "decoder) to Detectron2, mmsegmentation or torchvision.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a last.pt written by pretrain.py")
    a("--to", required=True, choices=["detectron2", "mmseg", "torchvision"], help="target library")
    a("--output", required=True, help="detectron2: a .pkl file; mmseg: a file prefix or a directory; "
      "torchvision: a .pth file")
    a("--branch", choices=["teacher", "student"], default=None, help="which branch to export (None: the "
      "framework's, teacher for SlotCon, student for DenseCL)")
    a("--part", choices=["encoder", "decoder", "both"], default="both", help="what to export")
    return p


# ---------------------------------------------------------------- key renames

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


# ---------------------------------------------------------------- what to export

def select(args):
    """Load the checkpoint and decide what to export, before anything is written.
    Returns (encoder state dict or None, decoder state dict or None, info, notes); raises ValueError
    with a one-line message for every input that cannot be exported."""
    if not os.path.isfile(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint}: no such file")
    if args.to == "detectron2" and not args.output.endswith(".pkl"):
        # Detectron2's checkpointer reads a pickle only when the name ends in .pkl; anything else goes to torch.load
        raise ValueError(f"--output {args.output}: Detectron2 needs a file name ending in .pkl")
    encoder, decoder, info = load_pretrained(args.checkpoint, args.branch)
    if info["arch"] not in DEPTHS:
        raise ValueError(f"{args.checkpoint}: arch {info['arch']!r} is not one of {sorted(DEPTHS)}")
    if "conv1.weight" not in encoder:
        raise ValueError(f"{args.checkpoint}: no {info['branch']}.encoder ResNet weights in the checkpoint")
    if decoder is not None and info["decoder"] not in ("fcn", "fpn"):
        raise ValueError(f"{args.checkpoint}: decoder weights with unknown --decoder {info['decoder']!r}")

    notes = []
    want_enc, want_dec = args.part in ("encoder", "both"), args.part in ("decoder", "both")
    if want_dec and decoder is None:
        if args.part == "decoder":
            raise ValueError(f"--part decoder: {args.checkpoint} was pre-trained without a decoder "
                             f"(--decoder {info['decoder']}); export --part encoder")
        if args.to != "torchvision":  # torchvision never takes a decoder: nothing to tell
            notes.append("note: the checkpoint has no decoder (--decoder none); exported the encoder only")
        want_dec = False
    unsupported = {"torchvision": "torchvision has no counterpart of the DeCon decoders",
                   "detectron2": "Detectron2 has no counterpart of the FCN decoder"}
    if want_dec and (args.to == "torchvision" or (args.to == "detectron2" and info["decoder"] == "fcn")):
        if args.part == "decoder":
            raise ValueError(f"--part decoder --to {args.to}: {unsupported[args.to]} "
                             f"(--decoder {info['decoder']}); use --to mmseg, or --part encoder")
        notes.append(f"note: {unsupported[args.to]}; exported the encoder only (--to mmseg takes the "
                     f"{info['decoder'].upper()} decoder)")
        want_dec = False
    if want_dec and info["decoder"] == "fpn" and not info["deep_supervision"]:
        notes.append("note: DeCon-SL pre-trains fpn_output2 only; the other FPN output convs stay randomly "
                     "initialized downstream")
    return (without_fc(encoder) if want_enc else None), (decoder if want_dec else None), info, notes


# ---------------------------------------------------------------- exporters

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


def export_torchvision(encoder):
    return {k: v.contiguous() for k, v in encoder.items()}


def mmseg_paths(output, labels):
    """PREFIX_label.pth, or DIR/label.pth when --output is a directory (existing, or ending in a separator)."""
    if os.path.isdir(output) or output.endswith(os.sep):
        return {label: os.path.join(output, f"{label}.pth") for label in labels}
    prefix = output[:-len(".pth")] if output.endswith(".pth") else output
    return {label: f"{prefix}_{label}.pth" for label in labels}


def make_parent(path):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


# ---------------------------------------------------------------- what the user sets downstream

def detectron2_config(path, info, fpn):
    """KEY VALUE lines that can be appended to Detectron2's train_net.py command line."""
    lines = [f"MODEL.WEIGHTS {path}", f"MODEL.RESNETS.DEPTH {DEPTHS[info['arch']]}"]
    if DEPTHS[info["arch"]] < 50:
        lines.append("MODEL.RESNETS.RES2_OUT_CHANNELS 64")  # basic blocks: res2 is 64 wide, not 256
    lines += ["MODEL.RESNETS.STRIDE_IN_1X1 False",  # torchvision ResNets stride in the 3x3 conv
              "INPUT.FORMAT RGB",
              f'MODEL.PIXEL_MEAN "{PIXEL_MEAN}"',
              f'MODEL.PIXEL_STD "{PIXEL_STD}"']
    if fpn:
        # the pre-trained fpn_* convs are conv+BN without bias: with FPN.NORM "" their norm would not load
        lines.append("MODEL.FPN.NORM SyncBN")
    return lines


def mmseg_config(paths, info):
    arch = info["arch"]
    lines = []
    if "backbone" in paths:
        # mmseg's stock configs build a deep-stem ResNetV1c from ImageNet weights; ours is a plain ResNet
        lines.append("model.pretrained = None")
        lines.append(f"model.backbone = dict(type='ResNet', depth={DEPTHS[arch]}, style='pytorch', "
                     f"init_cfg=dict(type='Pretrained', checkpoint='{paths['backbone']}'))")
    if "decode_head" in paths:
        lines.append(f"model.decode_head = dict(type='FCNHead', in_channels={C5_CHANNELS[arch]}, channels=256, "
                     f"num_convs=2, concat_input=False, dilation=6, "
                     f"init_cfg=dict(type='Pretrained', checkpoint='{paths['decode_head']}'))")
    if "neck" in paths:
        lines.append(f"model.neck = dict(type='FPN', in_channels={FPN_IN_CHANNELS[arch]}, out_channels=256, "
                     f"num_outs=4, norm_cfg=dict(type='SyncBN', requires_grad=True), "
                     f"init_cfg=dict(type='Pretrained', checkpoint='{paths['neck']}'))")
    lines.append(f"or, for the whole model at once: load_from = '{paths['full']}'")
    return lines


# ---------------------------------------------------------------- main

def main(argv=None):
    args = get_args_parser().parse_args(argv)
    try:
        encoder, decoder, info, notes = select(args)
        if args.to == "detectron2":
            outputs = {args.output: export_detectron2(encoder, decoder)}
        elif args.to == "mmseg":
            files = export_mmseg(encoder, decoder, info)
            paths = mmseg_paths(args.output, files)
            outputs = {paths[label]: sd for label, sd in files.items()}
        else:
            outputs = {args.output: export_torchvision(encoder)}
        if any(os.path.abspath(path) == os.path.abspath(args.checkpoint) for path in outputs):
            raise ValueError(f"--output {args.output} would overwrite the checkpoint")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)

    for path, obj in outputs.items():
        make_parent(path)
        with open(path, "wb") as f:
            if args.to == "detectron2":
                pickle.dump(obj, f)
            else:
                torch.save(obj, f)

    parts = [f"{len(encoder)} encoder keys"] if encoder is not None else []
    parts += [f"{len(decoder)} {info['decoder'].upper()} decoder keys"] if decoder is not None else []
    print(f"exported {' + '.join(parts)} of the {info['branch']} branch ({info['framework']}, {info['arch']}, "
          f"step {info['step']}) to {args.to}: {', '.join(outputs)}")
    for note in notes:
        print(note)
    if args.to == "detectron2":
        print("Detectron2 settings, as train_net.py command-line overrides (KEY VALUE):")
        print("\n".join("  " + line for line in detectron2_config(args.output, info, decoder is not None)))
        if decoder is not None:
            print('  (MODEL.FPN.NORM BN on a single GPU; never "": the FPN convs were pre-trained with BN)')
    elif args.to == "mmseg":
        print("mmseg config:")
        print("\n".join("  " + line for line in mmseg_config(paths, info)))
    else:
        print(f"torchvision: torchvision.models.{info['arch']}().load_state_dict(torch.load('{args.output}', "
              f"weights_only=True), strict=False) misses only fc.weight and fc.bias")


if __name__ == "__main__":
    main()
