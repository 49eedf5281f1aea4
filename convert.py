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
torchvision: the keys of the torchvision module the weights load into. The encoder alone: a ResNet
             (`resnet50().load_state_dict(sd, strict=False)` misses only fc.*). With the FPN: the detection
             backbone, `body.*` (the ResNet) and `fpn.*` (torchvision's FeaturePyramidNetwork with BatchNorm, which
             computes our FPN: models.torchvision_fpn_key), which `maskrcnn_resnet50_fpn_v2(weights=None,
             weights_backbone=None).backbone` loads with strict=True. `--fold-bn` folds each FPN BatchNorm into
             its conv, for the v1 detectors (fasterrcnn_resnet50_fpn, ...) whose FPN has no norm layers.

The branch defaults to what the authors export: the EMA teacher for SlotCon, the student for DenseCL.
"""
import os
import pickle
import sys

import torch

import utils
from finetune_seg import DATASET_DEFAULTS
from seg_data import DATASETS
from weights import export_detectron2, export_mmseg, export_torchvision, load_pretrained, without_fc

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
    a("--fold-bn", action="store_true", help="torchvision: fold each FPN BatchNorm into its conv (a conv with a "
      "bias), for the v1 detectors whose FPN has no norm layers")
    a("--dataset", choices=MMSEG_DATASETS, default="voc", help="mmseg: the dataset of the printed config, whose "
      "classes, crop, test mode and align_corners are finetune_seg.py's on it")
    return p


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
        notes.append("note: the checkpoint has no decoder (--decoder none); exported the encoder only")
        want_dec = False
    if want_dec and info["decoder"] == "fcn" and args.to != "mmseg":  # the FPN has counterparts in both others
        missing = f"{'Detectron2' if args.to == 'detectron2' else 'torchvision'} has no counterpart of the FCN decoder"
        if args.part == "decoder":
            raise ValueError(f"--part decoder --to {args.to}: {missing} (--decoder fcn); use --to mmseg, or "
                             "--part encoder")
        notes.append(f"note: {missing}; exported the encoder only (--to mmseg takes the FCN decoder)")
        want_dec = False
    if args.fold_bn and args.to != "torchvision":
        raise ValueError(f"--fold-bn is for --to torchvision (the v1 detectors' FPN), not --to {args.to}")
    if args.fold_bn and not want_dec:
        raise ValueError(f"--fold-bn: the export holds no FPN to fold (--decoder {info['decoder']}, "
                         f"--part {args.part})")
    if want_dec and info["decoder"] == "fpn" and not info["deep_supervision"]:
        notes.append("note: DeCon-SL pre-trains fpn_output2 only; the other FPN output convs stay randomly "
                     "initialized downstream")
    return (without_fc(encoder) if want_enc else None), (decoder if want_dec else None), info, notes


# ---------------------------------------------------------------- what the user runs downstream

def torchvision_usage(path, info, encoder, decoder, fold_bn):
    """The Python line that loads the torchvision export."""
    arch, load = info["arch"], f"torch.load('{path}', weights_only=True)"
    if decoder is None:
        return (f"torchvision.models.{arch}().load_state_dict({load}, strict=False)  # misses only fc.weight and "
                "fc.bias")
    if arch == "resnet50":
        builder = "fasterrcnn_resnet50_fpn" if fold_bn else "maskrcnn_resnet50_fpn_v2"
        module = f"torchvision.models.detection.{builder}(weights=None, weights_backbone=None, num_classes=K).backbone"
    elif fold_bn:
        module = (f"torchvision.models.detection.backbone_utils.resnet_fpn_backbone(backbone_name='{arch}', "
                  "weights=None, norm_layer=torch.nn.BatchNorm2d, trainable_layers=5)")
    else:
        module = (f"torchvision.models.detection.backbone_utils.BackboneWithFPN(torchvision.models.{arch}(), "
                  f"{{'layer1': '0', 'layer2': '1', 'layer3': '2', 'layer4': '3'}}, {FPN_IN_CHANNELS[arch]}, 256, "
                  "norm_layer=torch.nn.BatchNorm2d)")
    module += ".fpn" if encoder is None else ""
    if info["deep_supervision"]:
        return f"{module}.load_state_dict({load})"
    return f"{module}.load_state_dict({load}, strict=False)  # misses the output convs of levels 3-5 (DeCon-SL)"


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

def detectron2_settings(path, info, fpn):
    """{KEY: value} for Detectron2, as SlotCon's COCO_R_50_FPN_1x config and MoCo's VOC config set them for a
    torchvision-style ResNet: RGB input normalized like ours, the stride in the 3x3 conv, SyncBN, no frozen stage."""
    depth = DEPTHS[info["arch"]]
    out = {"MODEL.WEIGHTS": path, "MODEL.PIXEL_MEAN": PIXEL_MEAN, "MODEL.PIXEL_STD": PIXEL_STD,
           "MODEL.BACKBONE.FREEZE_AT": 0, "MODEL.RESNETS.DEPTH": depth}
    if depth < 50:
        out["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64  # basic blocks: res2 is 64 wide, not 256
    out.update({"MODEL.RESNETS.STRIDE_IN_1X1": False, "MODEL.RESNETS.NORM": "SyncBN"})
    if fpn:  # the pre-trained fpn_* convs are conv+BN without bias: with FPN.NORM "" their norm would not load
        out["MODEL.FPN.NORM"] = "SyncBN"
    out["INPUT.FORMAT"] = "RGB"
    return out


def detectron2_overrides(settings):
    """KEY VALUE lines for train_net.py's command line."""
    return [f'{k} "{v}"' if isinstance(v, list) else f"{k} {v}" for k, v in settings.items()]


def detectron2_yaml(settings):
    """The same settings as YAML lines, to merge into a config file."""
    lines, open_path = [], []
    for key, value in settings.items():
        *path, leaf = key.split(".")
        common = next((i for i, (a, b) in enumerate(zip(open_path, path)) if a != b), min(len(open_path), len(path)))
        lines += [f"{'  ' * i}{name}:" for i, name in enumerate(path) if i >= common]
        open_path = path
        text = f'"{value}"' if isinstance(value, str) else value
        lines.append(f"{'  ' * len(path)}{leaf}: {text}")
    return lines


MMSEG_DATASETS = ("cityscapes", "isic2017", "refuge", "voc")


def mmseg_dataset(name):
    """What finetune_seg.py runs on dataset `name` by default: classes, crop, test mode, align_corners."""
    spec, recipe = DATASETS[name], DATASET_DEFAULTS[name]
    crop = recipe["crop_size"]
    test_cfg = dict(mode="whole") if spec["mode"] == "whole" else \
        dict(mode="slide", crop_size=(crop, crop), stride=(spec["stride"], spec["stride"]))
    return dict(num_classes=len(spec["classes"]), crop=crop, test_cfg=test_cfg, align_corners=recipe["align_corners"])


def mmseg_model(paths, info, dataset="voc"):
    """One complete mmseg 1.x `model` that builds as is and loads the exported files: a plain ResNet (not the
    default ResNetV1c) with SyncBN, dilated to output stride 16 for the FCN on ResNet-50; the paper's FCN head
    (mmseg's Normal(0.01) init of the classifier kept beside the pre-trained convs), or for an FPN export mmseg's
    FPN neck with BN and fpn_r50.py's Semantic-FPN head; our input normalization (RGB, ImageNet mean and std). It is
    the network finetune_seg.py fine-tunes on `dataset` (models.Segmenter), parameter names included."""
    arch, spec = info["arch"], mmseg_dataset(dataset)
    depth, fcn = DEPTHS[arch], "neck" not in paths
    dilate = fcn and depth == 50  # torchvision's BasicBlock (ResNet-18/34) cannot dilate: our fine-tuning does not
    norm_cfg = dict(type="SyncBN", requires_grad=True)
    pretrained = lambda part: [dict(type="Pretrained", checkpoint=paths[part])] if part in paths else []
    head_init = [dict(type="Normal", std=0.01, override=dict(name="conv_seg"))]
    loss = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    model = dict(
        type="EncoderDecoder", pretrained=None,
        data_preprocessor=dict(type="SegDataPreProcessor", mean=PIXEL_MEAN, std=PIXEL_STD, bgr_to_rgb=True,
                               pad_val=0, seg_pad_val=255, size=(spec["crop"], spec["crop"])),
        backbone=dict(type="ResNet", depth=depth, num_stages=4, out_indices=(0, 1, 2, 3),
                      dilations=(1, 1, 1, 2) if dilate else (1, 1, 1, 1),
                      strides=(1, 2, 2, 1) if dilate else (1, 2, 2, 2),
                      contract_dilation=True, norm_cfg=norm_cfg, norm_eval=False, style="pytorch",
                      **({"init_cfg": pretrained("backbone")[0]} if "backbone" in paths else {})))
    if fcn:
        model["decode_head"] = dict(type="FCNHead", in_channels=C5_CHANNELS[arch], in_index=3, channels=256,
                                    num_convs=2, concat_input=False, dilation=6, dropout_ratio=0,
                                    num_classes=spec["num_classes"], norm_cfg=norm_cfg,
                                    align_corners=spec["align_corners"], loss_decode=loss,
                                    init_cfg=head_init + pretrained("decode_head"))
    else:
        model["neck"] = dict(type="FPN", in_channels=FPN_IN_CHANNELS[arch], out_channels=256, num_outs=4,
                             norm_cfg=norm_cfg, init_cfg=pretrained("neck")[0])
        model["decode_head"] = dict(type="FPNHead", in_channels=[256] * 4, in_index=[0, 1, 2, 3],
                                    feature_strides=[4, 8, 16, 32], channels=128, dropout_ratio=0.1,
                                    num_classes=spec["num_classes"], norm_cfg=norm_cfg,
                                    align_corners=spec["align_corners"], loss_decode=loss, init_cfg=head_init)
    model.update(auxiliary_head=None, train_cfg=dict(), test_cfg=spec["test_cfg"])
    return model


def config_source(name, value):
    """`name = dict(...)` as mmengine config source: one top-level key per line."""
    def text(v):
        if isinstance(v, dict):
            return "dict(" + ", ".join(f"{k}={text(x)}" for k, x in v.items()) + ")"
        if isinstance(v, (list, tuple)):
            inner = ", ".join(map(text, v)) + ("," if isinstance(v, tuple) and len(v) == 1 else "")
            return f"[{inner}]" if isinstance(v, list) else f"({inner})"
        return repr(v)
    return f"{name} = dict(\n" + ",\n".join(f"    {k}={text(v)}" for k, v in value.items()) + ")"


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
            outputs = {args.output: export_torchvision(encoder, decoder, args.fold_bn)}
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
        settings = detectron2_settings(args.output, info, decoder is not None)
        print("Detectron2 settings, as train_net.py command-line overrides (KEY VALUE):")
        print("\n".join("  " + line for line in detectron2_overrides(settings)))
        print("or in the config file (YAML):")
        print("\n".join("  " + line for line in detectron2_yaml(settings)))
        if decoder is not None:
            print('(FPN.NORM BN on a single GPU; never "": the FPN convs were pre-trained with BN)')
    elif args.to == "mmseg":
        print(f"mmseg 1.x config ({args.dataset}; --dataset picks another):")
        print(config_source("model", mmseg_model(paths, info, args.dataset)))
        print(f"# or load all parts at once instead of the Pretrained init_cfgs: load_from = '{paths['full']}'")
    else:
        print("torchvision: " + torchvision_usage(args.output, info, encoder, decoder, args.fold_bn))


if __name__ == "__main__":
    main()
