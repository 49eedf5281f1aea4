"""Tests of the weights room: every export (weights.py, convert.py) checked against each library's names, derived
here independently, and loaded back.

    python -m pytest -q test_*.py
"""
import contextlib
import hashlib
import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision

import convert
from test_decon import HERE, fake_checkpoint


# ---------------------------------------------------------------- export (convert.py): each library's names, derived

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

FROZEN_BN = ("weight", "bias", "running_mean", "running_var")  # Detectron2's FrozenBatchNorm2d buffers

def resnet_blocks(depth):
    """(stage 1..4, block, convs [(index, cin, cout, kernel)], shortcut (cin, cout) or None), from the ResNet
    paper's table: stage widths 64/128/256/512, bottlenecks expand x4, a projection shortcut wherever the
    shape changes."""
    counts, bottleneck = {18: ((2, 2, 2, 2), False), 34: ((3, 4, 6, 3), False), 50: ((3, 4, 6, 3), True)}[depth]
    cin = 64
    for stage, n in enumerate(counts, start=1):
        width = 64 * 2 ** (stage - 1)
        cout = 4 * width if bottleneck else width
        for b in range(n):
            convs = ([(1, cin, width, 1), (2, width, width, 3), (3, width, cout, 1)] if bottleneck
                     else [(1, cin, width, 3), (2, width, width, 3)])
            shortcut = (cin, cout) if b == 0 and (cin != cout or stage > 1) else None
            yield stage, b, convs, shortcut
            cin = cout

def stage_channels(depth):
    out = {}
    for stage, _, convs, _ in resnet_blocks(depth):
        out[stage] = convs[-1][2]
    return [out[s] for s in (1, 2, 3, 4)]

def norm(prefix, c, stats=BN):
    return {f"{prefix}.{s}": (() if s == "num_batches_tracked" else (c,)) for s in stats}

def d2_resnet(depth, stats=BN):
    """Detectron2 ResNet (build_resnet_backbone): stem.conv1 + res2..res5, Conv2d with a `norm` submodule."""
    keys = {"stem.conv1.weight": (64, 3, 7, 7), **norm("stem.conv1.norm", 64, stats)}
    for stage, b, convs, shortcut in resnet_blocks(depth):
        block = f"res{stage + 1}.{b}"
        for i, cin, cout, k in convs:
            keys[f"{block}.conv{i}.weight"] = (cout, cin, k, k)
            keys.update(norm(f"{block}.conv{i}.norm", cout, stats))
        if shortcut:
            keys[f"{block}.shortcut.weight"] = (shortcut[1], shortcut[0], 1, 1)
            keys.update(norm(f"{block}.shortcut.norm", shortcut[1], stats))
    return keys

def d2_fpn(in_channels, out=256):
    """Detectron2 FPN with MODEL.FPN.NORM BN/SyncBN: fpn_lateral{s} (1x1) and fpn_output{s} (3x3), no bias."""
    keys = {}
    for s, cin in zip((2, 3, 4, 5), in_channels):
        keys[f"fpn_lateral{s}.weight"] = (out, cin, 1, 1)
        keys.update(norm(f"fpn_lateral{s}.norm", out))
        keys[f"fpn_output{s}.weight"] = (out, out, 3, 3)
        keys.update(norm(f"fpn_output{s}.norm", out))
    return keys

def d2_mask_rcnn_fpn(depth):
    """Mask R-CNN R-FPN as in SlotCon's COCO config: SyncBN everywhere, 4conv1fc box head, 4-conv mask head.
    The heads contain `conv1.norm.weight`-like names, so a stem key without its `stem.` prefix is ambiguous."""
    keys = {f"backbone.bottom_up.{k}": v for k, v in d2_resnet(depth).items()}
    keys.update({f"backbone.{k}": v for k, v in d2_fpn(stage_channels(depth)).items()})
    keys.update({"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1),
                 "proposal_generator.rpn_head.conv.weight": (256, 256, 3, 3),
                 "proposal_generator.rpn_head.conv.bias": (256,),
                 "proposal_generator.rpn_head.objectness_logits.weight": (3, 256, 1, 1),
                 "proposal_generator.rpn_head.objectness_logits.bias": (3,),
                 "proposal_generator.rpn_head.anchor_deltas.weight": (12, 256, 1, 1),
                 "proposal_generator.rpn_head.anchor_deltas.bias": (12,),
                 "roi_heads.box_head.fc1.weight": (1024, 256 * 7 * 7), "roi_heads.box_head.fc1.bias": (1024,),
                 "roi_heads.box_predictor.cls_score.weight": (81, 1024),
                 "roi_heads.box_predictor.cls_score.bias": (81,),
                 "roi_heads.box_predictor.bbox_pred.weight": (320, 1024),
                 "roi_heads.box_predictor.bbox_pred.bias": (320,),
                 "roi_heads.mask_head.deconv.weight": (256, 256, 2, 2), "roi_heads.mask_head.deconv.bias": (256,),
                 "roi_heads.mask_head.predictor.weight": (80, 256, 1, 1),
                 "roi_heads.mask_head.predictor.bias": (80,)})
    for i in (1, 2, 3, 4):
        keys[f"roi_heads.box_head.conv{i}.weight"] = (256, 256, 3, 3)
        keys.update(norm(f"roi_heads.box_head.conv{i}.norm", 256))
        keys[f"roi_heads.mask_head.mask_fcn{i}.weight"] = (256, 256, 3, 3)
        keys.update(norm(f"roi_heads.mask_head.mask_fcn{i}.norm", 256))
    return keys

def d2_faster_rcnn_c4(depth, stats=BN):
    """Faster R-CNN R-C4 (the paper's VOC detection): stem..res4 in `backbone`, res5 in `roi_heads`."""
    keys = {}
    for k, v in d2_resnet(depth, stats).items():
        keys[("roi_heads." if k.startswith("res5.") else "backbone.") + k] = v
    c4, c5 = stage_channels(depth)[2:]
    keys.update({"pixel_mean": (3, 1, 1), "pixel_std": (3, 1, 1),
                 "proposal_generator.rpn_head.conv.weight": (c4, c4, 3, 3),
                 "proposal_generator.rpn_head.conv.bias": (c4,),
                 "proposal_generator.rpn_head.objectness_logits.weight": (15, c4, 1, 1),
                 "proposal_generator.rpn_head.objectness_logits.bias": (15,),
                 "proposal_generator.rpn_head.anchor_deltas.weight": (60, c4, 1, 1),
                 "proposal_generator.rpn_head.anchor_deltas.bias": (60,),
                 "roi_heads.box_predictor.cls_score.weight": (21, c5), "roi_heads.box_predictor.cls_score.bias": (21,),
                 "roi_heads.box_predictor.bbox_pred.weight": (80, c5), "roi_heads.box_predictor.bbox_pred.bias": (80,)})
    return keys

def mm_resnet(depth):
    """mmseg ResNet(style='pytorch') = torchvision names: conv1, bn1, layer{i}.{j}.conv{k}/bn{k}/downsample.{0,1}."""
    keys = {"conv1.weight": (64, 3, 7, 7), **norm("bn1", 64)}
    for stage, b, convs, shortcut in resnet_blocks(depth):
        block = f"layer{stage}.{b}"
        for i, cin, cout, k in convs:
            keys[f"{block}.conv{i}.weight"] = (cout, cin, k, k)
            keys.update(norm(f"{block}.bn{i}", cout))
        if shortcut:
            keys[f"{block}.downsample.0.weight"] = (shortcut[1], shortcut[0], 1, 1)
            keys.update(norm(f"{block}.downsample.1", shortcut[1]))
    return keys

def mm_fcn_head(in_channels, channels=256, num_classes=19):
    """mmseg FCNHead(num_convs=2, concat_input=False): convs.{i} ConvModules (conv + bn) and conv_seg."""
    keys = {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}
    for i, cin in enumerate((in_channels, channels)):
        keys[f"convs.{i}.conv.weight"] = (channels, cin, 3, 3)
        keys.update(norm(f"convs.{i}.bn", channels))
    return keys

def mm_fpn_neck(in_channels, out=256):
    """mmseg FPN neck with norm_cfg=BN: lateral_convs.{i} (1x1) and fpn_convs.{i} (3x3) ConvModules."""
    keys = {}
    for i, cin in enumerate(in_channels):
        keys[f"lateral_convs.{i}.conv.weight"] = (out, cin, 1, 1)
        keys.update(norm(f"lateral_convs.{i}.bn", out))
        keys[f"fpn_convs.{i}.conv.weight"] = (out, out, 3, 3)
        keys.update(norm(f"fpn_convs.{i}.bn", out))
    return keys

def prefixed(prefix, keys):
    return {prefix + k: v for k, v in keys.items()}

def d2_align(model, ckpt):
    """Detectron2's align_and_update_state_dicts (matching_heuristics): each model key takes the longest
    checkpoint key b with key == b or key.endswith('.' + b); a shape mismatch skips the key; one checkpoint key
    matching two model keys is an error. Returns ({model key: ckpt key}, [shape mismatches])."""
    loaded, used, mismatched = {}, {}, []
    for key in sorted(model):
        cands = [b for b in ckpt if key == b or key.endswith("." + b)]
        if not cands:
            continue
        b = max(cands, key=len)
        if tuple(ckpt[b].shape) != tuple(model[key]):
            mismatched.append((key, b))
            continue
        if b in used:
            raise ValueError(f"Cannot match one checkpoint key to multiple keys: {b} -> {used[b]}, {key}")
        used[b], loaded[key] = key, b
    return loaded, mismatched

def check_d2(ckpt, model, expected_model_keys):
    """Every exported key lands on exactly one model key, and those are exactly `expected_model_keys`."""
    loaded, mismatched = d2_align(model, ckpt)
    assert mismatched == []
    assert sorted(set(ckpt) - set(loaded.values())) == [], "exported keys that load nowhere"
    assert sorted(set(expected_model_keys) - set(loaded)) == [], "model keys left uninitialized"
    assert sorted(set(loaded) - set(expected_model_keys)) == []

def check_mm(state_dict, expected):
    """mmengine loads with strict=False: every key must be an expected name of the right shape, none missing."""
    assert sorted(set(state_dict) - set(expected)) == [], "unexpected keys"
    assert sorted(set(expected) - set(state_dict)) == [], "missing keys"
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == {k: tuple(v) for k, v in expected.items()}


def run(*argv):
    """convert.main in-process; returns its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        convert.main([str(a) for a in argv])
    return out.getvalue()

def branch_tensors(path, prefix):
    sd = torch.load(path, weights_only=True)["model"]
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}

def fingerprints(values):
    """Sorted (shape, hash of the bytes): equal iff the same tensors, whatever their names."""
    return sorted((tuple(np.shape(v)), hashlib.sha1(np.ascontiguousarray(np.asarray(v)).tobytes()).hexdigest())
                  for v in values)

def load_pkl(path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # how Detectron2 reads it

def test_detectron2_r50_fpn_lands_on_mask_rcnn_fpn(ckpts, tmp_path):
    out = tmp_path / "decon.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out)
    data = load_pkl(out)
    assert data["__author__"] == "DeCon" and data["matching_heuristics"] is True
    ckpt = data["model"]
    assert all(isinstance(v, np.ndarray) for v in ckpt.values())
    model = d2_mask_rcnn_fpn(50)
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))])
    # total size of the ResNet part agrees with torchvision's resnet50 without fc
    tv = torchvision.models.resnet50(weights=None).state_dict()
    assert sum(v.numel() for k, v in tv.items() if not k.startswith("fc.")) == \
        sum(int(np.prod(v)) for k, v in model.items() if k.startswith("backbone.bottom_up."))

    # values: SlotCon exports the teacher; one pair per rename rule, then all tensors as a multiset
    enc = branch_tensors(ckpts["r50_fpn"], "teacher.encoder.")
    dec = branch_tensors(ckpts["r50_fpn"], "teacher.decoder.")
    pairs = {"stem.conv1.weight": enc["conv1.weight"], "stem.conv1.norm.running_var": enc["bn1.running_var"],
             "res2.0.conv3.norm.weight": enc["layer1.0.bn3.weight"],
             "res5.2.conv2.weight": enc["layer4.2.conv2.weight"],
             "res3.0.shortcut.weight": enc["layer2.0.downsample.0.weight"],
             "res4.0.shortcut.norm.bias": enc["layer3.0.downsample.1.bias"],
             "res2.1.conv1.norm.num_batches_tracked": enc["layer1.1.bn1.num_batches_tracked"],
             "fpn_output4.norm.running_mean": dec["fpn_output4.norm.running_mean"],
             "fpn_lateral5.weight": dec["fpn_lateral5.weight"]}
    for key, want in pairs.items():
        np.testing.assert_array_equal(ckpt[key], want.numpy(), err_msg=key)
    assert fingerprints(ckpt.values()) == fingerprints(v.numpy() for v in [*enc.values(), *dec.values()])

    for line in ("MODEL.RESNETS.STRIDE_IN_1X1 False", "INPUT.FORMAT RGB", "MODEL.RESNETS.DEPTH 50",
                 'MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]"', 'MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"',
                 "MODEL.FPN.NORM SyncBN", f"MODEL.WEIGHTS {out}"):
        assert f"  {line}\n" in text
    assert "RES2_OUT_CHANNELS" not in text

def test_detectron2_encoder_lands_on_faster_rcnn_c4(ckpts, tmp_path):
    out = tmp_path / "enc.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out, "--part", "encoder")
    ckpt = load_pkl(out)["model"]
    model = d2_faster_rcnn_c4(50)
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.", "roi_heads.res5."))])
    assert "FPN.NORM" not in text
    # with Detectron2's default FrozenBN the only leftovers are the BN step counters, which it ignores
    loaded, _ = d2_align(d2_faster_rcnn_c4(50, FROZEN_BN), ckpt)
    assert {k.rsplit(".", 1)[1] for k in set(ckpt) - set(loaded.values())} == {"num_batches_tracked"}

def test_detectron2_r18_single_level_fpn(ckpts, tmp_path):
    out = tmp_path / "r18.pkl"
    text = run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "detectron2", "--output", out)
    ckpt = load_pkl(out)["model"]
    model = d2_mask_rcnn_fpn(18)
    untrained = ("backbone.fpn_output3.", "backbone.fpn_output4.", "backbone.fpn_output5.")
    check_d2(ckpt, model, [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))
                           and not k.startswith(untrained)])
    assert "  MODEL.RESNETS.DEPTH 18\n" in text and "  MODEL.RESNETS.RES2_OUT_CHANNELS 64\n" in text
    assert "note: DeCon-SL pre-trains fpn_output2 only" in text

def test_detectron2_fcn_exports_encoder_with_note(ckpts, tmp_path):
    out = tmp_path / "fcn.pkl"
    text = run("--checkpoint", ckpts["r18_fcn"], "--to", "detectron2", "--output", out)
    ckpt = load_pkl(out)["model"]
    model = d2_mask_rcnn_fpn(18)
    check_d2(ckpt, model, [k for k in model if k.startswith("backbone.bottom_up.")])
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert notes == ["note: Detectron2 has no counterpart of the FCN decoder; exported the encoder only "
                     "(--to mmseg takes the FCN decoder)"]

@pytest.mark.parametrize("mutation", ["rename", "drop", "unprefix_stem"])
def test_detectron2_checker_catches_bad_keys(ckpts, tmp_path, mutation):
    """The checks above can fail: a renamed, missing or ambiguous key is caught."""
    out = tmp_path / "m.pkl"
    run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "detectron2", "--output", out, "--part", "encoder")
    ckpt = load_pkl(out)["model"]
    if mutation == "rename":
        ckpt["res2.0.downsample.1.weight"] = ckpt.pop("res3.0.shortcut.norm.weight")
    elif mutation == "drop":
        del ckpt["res4.1.conv2.norm.bias"]
    else:
        ckpt["conv1.norm.weight"] = ckpt.pop("stem.conv1.norm.weight")
    model = d2_mask_rcnn_fpn(18)
    with pytest.raises((AssertionError, ValueError)):
        check_d2(ckpt, model, [k for k in model if k.startswith("backbone.bottom_up.")])

def test_mmseg_r50_fpn_backbone_neck_full(ckpts, tmp_path):
    prefix = tmp_path / "decon_r50"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "mmseg", "--output", prefix)
    files = {name: torch.load(f"{prefix}_{name}.pth", weights_only=True) for name in ("backbone", "neck", "full")}
    assert not os.path.exists(f"{prefix}_decode_head.pth")
    assert all(set(f) == {"state_dict"} for f in files.values())
    backbone, neck, full = (files[n]["state_dict"] for n in ("backbone", "neck", "full"))
    check_mm(backbone, mm_resnet(50))
    check_mm(neck, mm_fpn_neck([256, 512, 1024, 2048]))
    check_mm(full, {**prefixed("backbone.", mm_resnet(50)), **prefixed("neck.", mm_fpn_neck([256, 512, 1024, 2048]))})

    dec = branch_tensors(ckpts["r50_fpn"], "teacher.decoder.")
    enc = branch_tensors(ckpts["r50_fpn"], "teacher.encoder.")
    assert torch.equal(neck["lateral_convs.0.conv.weight"], dec["fpn_lateral2.weight"])
    assert torch.equal(neck["fpn_convs.3.bn.running_var"], dec["fpn_output5.norm.running_var"])
    assert torch.equal(full["neck.lateral_convs.2.bn.bias"], dec["fpn_lateral4.norm.bias"])
    assert torch.equal(full["backbone.layer3.5.bn2.weight"], enc["layer3.5.bn2.weight"])
    assert fingerprints(v.numpy() for v in backbone.values()) == fingerprints(v.numpy() for v in enc.values())
    assert "norm_cfg=dict(type='SyncBN', requires_grad=True)" in text and f"load_from = '{prefix}_full.pth'" in text

def test_mmseg_fcn_backbone_decode_head_full(ckpts, tmp_path):
    prefix = tmp_path / "fcn"
    text = run("--checkpoint", ckpts["r18_fcn"], "--to", "mmseg", "--output", prefix)
    backbone, head, full = (torch.load(f"{prefix}_{n}.pth", weights_only=True)["state_dict"]
                            for n in ("backbone", "decode_head", "full"))
    expected_head = {k: v for k, v in mm_fcn_head(512).items() if not k.startswith("conv_seg.")}  # classifier: new
    check_mm(backbone, mm_resnet(18))
    check_mm(head, expected_head)
    check_mm(full, {**prefixed("backbone.", mm_resnet(18)), **prefixed("decode_head.", expected_head)})
    dec = branch_tensors(ckpts["r18_fcn"], "teacher.decoder.")
    assert all(torch.equal(head[k], dec[k]) for k in dec)
    assert "type='FCNHead', in_channels=512, in_index=3, channels=256, num_convs=2, concat_input=False, dilation=6" \
        in text

def test_mmseg_directory_output_and_decoder_only(ckpts, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    run("--checkpoint", ckpts["r18_fcn"], "--to", "mmseg", "--output", out, "--part", "decoder")
    assert sorted(os.listdir(out)) == ["decode_head.pth", "full.pth"]
    full = torch.load(out / "full.pth", weights_only=True)["state_dict"]
    check_mm(full, {k: v for k, v in prefixed("decode_head.", mm_fcn_head(512)).items() if "conv_seg" not in k})

def test_mmseg_checker_catches_bad_keys(ckpts, tmp_path):
    prefix = tmp_path / "m"
    run("--checkpoint", ckpts["r18_fpn_sl"], "--to", "mmseg", "--output", prefix, "--part", "decoder")
    neck = torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"]
    expected = {k: v for k, v in mm_fpn_neck([64, 128, 256, 512]).items()
                if not k.startswith(("fpn_convs.1.", "fpn_convs.2.", "fpn_convs.3."))}  # DeCon-SL: p2 only
    check_mm(neck, expected)
    neck["lateral_convs.0.norm.weight"] = neck.pop("lateral_convs.0.bn.weight")
    with pytest.raises(AssertionError):
        check_mm(neck, expected)

@pytest.mark.parametrize("name,arch", [("r50_fcn", "resnet50"), ("r18_none", "resnet18")])
def test_torchvision_loads_with_only_fc_missing(ckpts, tmp_path, name, arch):
    out = tmp_path / "tv.pth"
    text = run("--checkpoint", ckpts[name], "--to", "torchvision", "--output", out)
    sd = torch.load(out, weights_only=True)
    net = getattr(torchvision.models, arch)(weights=None)
    result = net.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    enc = branch_tensors(ckpts[name], "teacher.encoder.")
    assert sorted(sd) == sorted(enc)
    assert all(torch.equal(net.state_dict()[k], enc[k]) for k in enc)
    if name == "r50_fcn":
        assert "note: torchvision has no counterpart of the FCN decoder; exported the encoder only" in text

@pytest.mark.parametrize("name,branch,expected", [("r18_none", None, "teacher"), ("r18_none", "student", "student"),
                                                  ("r18_densecl_fpn", None, "student"),
                                                  ("r18_densecl_fpn", "teacher", "teacher")])
def test_branch_default_and_choice(ckpts, tmp_path, name, branch, expected):
    out = tmp_path / "b.pth"
    text = run("--checkpoint", ckpts[name], "--to", "torchvision", "--output", out, "--part", "encoder",
               *(["--branch", branch] if branch else []))
    sd = torch.load(out, weights_only=True)
    enc = branch_tensors(ckpts[name], f"{expected}.encoder.")
    other = branch_tensors(ckpts[name], f"{({'teacher': 'student', 'student': 'teacher'})[expected]}.encoder.")
    assert all(torch.equal(sd[k], enc[k]) for k in enc)
    assert not torch.equal(sd["conv1.weight"], other["conv1.weight"])
    assert f"of the {expected} branch" in text

def foreign_files(d, ckpts):
    (d / "random.pt").write_bytes(b"these are not weights\n" * 100)
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, d / "foreign.pt")
    return {"random": d / "random.pt", "foreign": d / "foreign.pt", "missing": d / "nope.pt", **ckpts}

@pytest.mark.parametrize("ckpt,argv,output,message", [
    ("random", ["--to", "mmseg"], "x", "random.pt: cannot be read as a PyTorch checkpoint"),
    ("foreign", ["--to", "mmseg"], "x",
     "not a DeCon pretrain.py checkpoint (expected a dict with 'model' and 'args')"),
    ("missing", ["--to", "mmseg"], "x", "no such file"),
    ("r18_none", ["--to", "mmseg", "--part", "decoder"], "x",
     "was pre-trained without a decoder (--decoder none); export --part encoder"),
    ("r18_fcn", ["--to", "detectron2", "--part", "decoder"], "x.pkl",
     "--part decoder --to detectron2: Detectron2 has no counterpart of the FCN decoder (--decoder fcn); "
     "use --to mmseg, or --part encoder"),
    ("r18_fcn", ["--to", "torchvision", "--part", "decoder"], "x.pth",
     "--part decoder --to torchvision: torchvision has no counterpart of the FCN decoder (--decoder fcn)"),
    ("r18_fpn_sl", ["--to", "mmseg", "--fold-bn"], "x", "--fold-bn is for --to torchvision"),
    ("r18_none", ["--to", "torchvision", "--fold-bn"], "x.pth", "--fold-bn: the export holds no FPN to fold"),
    ("r18_none", ["--to", "torchvision", "--part", "decoder"], "x.pth", "was pre-trained without a decoder"),
    ("r18_fpn_sl", ["--to", "detectron2"], "x.pth", "Detectron2 needs a file name ending in .pkl"),
])
def test_bad_input_is_one_line_error_and_writes_nothing(ckpts, tmp_path, capsys, ckpt, argv, output, message):
    path = foreign_files(tmp_path, ckpts)[ckpt]
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run("--checkpoint", path, "--output", out_dir / output, *argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out_dir.exists()

def test_output_never_overwrites_the_checkpoint(tmp_path, capsys):
    path = str(tmp_path / "tv_self.pt")
    fake_checkpoint(path, "slotcon")
    before = open(path, "rb").read()
    with pytest.raises(SystemExit) as e:
        run("--checkpoint", path, "--to", "torchvision", "--output", path)
    assert e.value.code == 2 and "would overwrite the checkpoint" in capsys.readouterr().err
    assert open(path, "rb").read() == before

def test_real_pretrain_checkpoint_via_cli(tmp_path):
    """A checkpoint written by pretrain.py itself (channels_last weights, real args), through the CLI."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, "pretrain.py", "--framework", "slotcon", "--decoder", "fpn", "--alpha", "0",
                    "--arch", "resnet18", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
                    "--max-steps", "1", "--dim-hidden", "64", "--num-prototypes", "16", "--synthetic-images", "16",
                    "--workers", "0", "--output-dir", str(tmp_path / "run")],
                   cwd=HERE, env=env, check=True, capture_output=True)
    ckpt = tmp_path / "run" / "last.pt"
    out = tmp_path / "real.pkl"
    res = subprocess.run([sys.executable, "convert.py", "--checkpoint", str(ckpt), "--to", "detectron2",
                          "--output", str(out)], cwd=HERE, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    model = d2_mask_rcnn_fpn(18)
    check_d2(load_pkl(out)["model"], model,
             [k for k in model if k.startswith(("backbone.bottom_up.", "backbone.fpn_"))])
    assert "teacher branch (slotcon, resnet18, step 1)" in res.stdout and "  MODEL.FPN.NORM SyncBN\n" in res.stdout

    prefix = tmp_path / "real_mm"
    run("--checkpoint", ckpt, "--to", "mmseg", "--output", prefix, "--branch", "student")
    neck = torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"]
    check_mm(neck, mm_fpn_neck([64, 128, 256, 512]))
    student = branch_tensors(ckpt, "student.decoder.")
    assert torch.equal(neck["fpn_convs.1.conv.weight"], student["fpn_output3.weight"])


def mmseg_printed_model(text):
    """The printed `model = dict(...)` (and `load_from`) of convert.py --to mmseg, run as the config file it is."""
    config = {}
    exec(text[text.index("model = dict("):], {}, config)
    return config["model"]


@pytest.mark.parametrize("name,dataset", [("r50_fcn", "voc"), ("r50_fpn", "cityscapes"), ("r18_fcn", "voc")])
def test_mmseg_config_builds_and_loads_every_exported_tensor(ckpts, tmp_path, name, dataset):
    """The printed config is complete for mmseg 1.x (EncoderDecoder, a plain ResNet, norm_cfg everywhere,
    data_preprocessor with a size, test_cfg, num_classes), and the names it builds are exactly the exported ones."""
    prefix = tmp_path / name
    text = run("--checkpoint", ckpts[name], "--to", "mmseg", "--output", prefix, "--dataset", dataset)
    model = mmseg_printed_model(text)
    assert model["type"] == "EncoderDecoder" and model["pretrained"] is None and model["auxiliary_head"] is None
    pre = model["data_preprocessor"]
    assert pre["type"] == "SegDataPreProcessor" and pre["bgr_to_rgb"] is True and pre["mean"] == convert.PIXEL_MEAN
    assert pre["size"] == {"voc": (513, 513), "cityscapes": (769, 769)}[dataset]
    assert model["test_cfg"] == {"voc": dict(mode="whole"), "cityscapes": dict(mode="slide", crop_size=(769, 769),
                                                                                stride=(513, 513))}[dataset]
    backbone, head = model["backbone"], model["decode_head"]
    assert backbone["type"] == "ResNet" and backbone["norm_cfg"]["type"] == "SyncBN"
    assert backbone["init_cfg"] == dict(type="Pretrained", checkpoint=f"{prefix}_backbone.pth")
    files = {n: torch.load(f"{prefix}_{n}.pth", weights_only=True)["state_dict"] for n in ("backbone", "full")}
    check_mm(files["backbone"], mm_resnet(backbone["depth"]))
    assert head["num_classes"] == {"voc": 21, "cityscapes": 19}[dataset] and head["norm_cfg"]["type"] == "SyncBN"
    assert head["init_cfg"][0] == dict(type="Normal", std=0.01, override=dict(name="conv_seg"))  # mmseg's, kept
    if head["type"] == "FCNHead":
        assert (backbone["dilations"], backbone["strides"]) == (((1, 1, 1, 2), (1, 2, 2, 1)) if name.startswith("r50")
                                                                else ((1, 1, 1, 1), (1, 2, 2, 2)))
        assert backbone["contract_dilation"] and head["align_corners"] is True
        assert (head["num_convs"], head["concat_input"], head["dilation"], head["dropout_ratio"]) == (2, False, 6, 0)
        assert head["init_cfg"][1] == dict(type="Pretrained", checkpoint=f"{prefix}_decode_head.pth")
        built = {k: v for k, v in mm_fcn_head(head["in_channels"], head["channels"], head["num_classes"]).items()
                 if not k.startswith("conv_seg.")}  # the classifier is new
        check_mm(torch.load(f"{prefix}_decode_head.pth", weights_only=True)["state_dict"], built)
        check_mm(files["full"], {**prefixed("backbone.", mm_resnet(backbone["depth"])),
                                 **prefixed("decode_head.", built)})
    else:
        neck = model["neck"]
        assert head["type"] == "FPNHead" and neck["type"] == "FPN" and neck["norm_cfg"]["type"] == "SyncBN"
        assert neck["init_cfg"] == dict(type="Pretrained", checkpoint=f"{prefix}_neck.pth")
        built = mm_fpn_neck(neck["in_channels"], neck["out_channels"])
        check_mm(torch.load(f"{prefix}_neck.pth", weights_only=True)["state_dict"], built)
        check_mm(files["full"], {**prefixed("backbone.", mm_resnet(backbone["depth"])), **prefixed("neck.", built)})
    assert f"load_from = '{prefix}_full.pth'" in text


def mm_fpn_head(num_classes, channels=128):
    """mmseg FPNHead(in_channels=[256] * 4, feature_strides=[4, 8, 16, 32]): scale_heads.{i} of max(1, i)
    ConvModules at the even indices (the Upsample modules between them have no parameters), and conv_seg."""
    keys = {"conv_seg.weight": (num_classes, channels, 1, 1), "conv_seg.bias": (num_classes,)}
    for i in range(4):
        for k in range(max(1, i)):
            keys[f"scale_heads.{i}.{2 * k}.conv.weight"] = (channels, 256 if k == 0 else channels, 3, 3)
            keys.update(norm(f"scale_heads.{i}.{2 * k}.bn", channels))
    return keys


@pytest.mark.parametrize("name,dataset", [("r18_fpn_sl", "voc"), ("r50_fpn", "refuge"), ("r18_fcn", "isic2017"),
                                          ("r50_fcn", "cityscapes")])
def test_the_printed_config_names_our_finetuning_network(ckpts, tmp_path, name, dataset):
    """The model convert.py prints, written out by hand after mmseg's definitions (ResNet, FPN neck with BN and
    FPNHead, or FCNHead), holds exactly the names and shapes of the models.Segmenter finetune_seg.py builds for
    that dataset, so mmseg loads a fine-tuned state dict strictly; what the export files hold is what
    finetune_seg.py transfers. (That the two compute the same logits: test_segmentation's hand derivation.)"""
    from models import Segmenter
    from weights import read_pretrained, transfer_segmenter
    prefix = tmp_path / name
    config = mmseg_printed_model(run("--checkpoint", ckpts[name], "--to", "mmseg", "--output", prefix,
                                     "--dataset", dataset))
    head = config["decode_head"]
    fpn = "neck" in config
    ours = Segmenter("resnet%d" % config["backbone"]["depth"], "fpn" if fpn else "fcn", head["num_classes"],
                     head["align_corners"])
    expected = prefixed("backbone.", mm_resnet(config["backbone"]["depth"]))
    if fpn:
        expected.update(prefixed("neck.", mm_fpn_neck(config["neck"]["in_channels"], config["neck"]["out_channels"])))
        expected.update(prefixed("decode_head.", mm_fpn_head(head["num_classes"], head["channels"])))
    else:
        expected.update(prefixed("decode_head.", mm_fcn_head(head["in_channels"], head["channels"],
                                                             head["num_classes"])))
    check_mm(ours.state_dict(), expected)
    transfer_segmenter(ours, read_pretrained([ckpts[name]]), "encoder+decoder")
    exported = torch.load(f"{prefix}_full.pth", weights_only=True)["state_dict"]
    mine = ours.state_dict()
    assert len(exported) > 100 and all(torch.equal(mine[k], v) for k, v in exported.items())


def test_detectron2_overrides_yaml_and_docs_are_one_and_the_same(ckpts, tmp_path):
    out = tmp_path / "decon_r50.pkl"
    text = run("--checkpoint", ckpts["r50_fpn"], "--to", "detectron2", "--output", out)
    settings = convert.detectron2_settings(str(out), {"arch": "resnet50"}, fpn=True)
    assert settings["MODEL.RESNETS.NORM"] == settings["MODEL.FPN.NORM"] == "SyncBN"
    assert settings["MODEL.BACKBONE.FREEZE_AT"] == 0 and settings["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    overrides, yaml = text.split("or in the config file (YAML):\n")
    assert [line[2:] for line in overrides.splitlines() if line.startswith("  ")] == \
        convert.detectron2_overrides(settings)
    yaml_lines = [line[2:] for line in yaml.splitlines() if line.startswith("  ")]
    assert yaml_lines == convert.detectron2_yaml(settings)
    for key, value in settings.items():  # every setting, once, in both forms
        assert sum(line.strip().startswith(key.split(".")[-1] + ":") for line in yaml_lines) >= 1
    docs = open(os.path.join(HERE, "docs", "EXPORT.md")).read()
    block = docs[docs.index("```yaml\n") + 8:]
    block = block[:block.index("```")].splitlines()
    assert block == convert.detectron2_yaml(convert.detectron2_settings("decon_r50.pkl", {"arch": "resnet50"}, True))
