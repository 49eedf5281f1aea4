"""Tests of the segmentation room: the metric and inference (eval.py), the labelled datasets in each layout
(seg_data.py), finetune_seg.py's flags, fractions, crops and transfer, fine-tuning and evaluation end to end.

    python -m pytest -q test_*.py
"""
import json
import os
import random
import socket
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import eval as eval_module
import finetune_seg as ft
import seg_data
import weights
from data import IMAGENET_MEAN, IMAGENET_STD, DataError
from seg_data import IGNORE_INDEX, EvalTransform, Transformed, build_dataset, check_dataset
from eval import confusion_matrix, evaluate, predict, segmentation_scores, window_starts
from eval import get_args_parser as eval_parser, main as eval_main
from models import Segmenter
from test_decon import HERE, fake_checkpoint, run_script


# ---------------------------------------------------------------- segmentation: the metric and inference (eval.py)

HAND_CM = np.array([[3, 1, 0, 0, 0],
                    [0, 2, 0, 0, 1],
                    [0, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0]])

def test_scores_of_a_hand_made_confusion_matrix():
    s = segmentation_scores(torch.tensor(HAND_CM))
    # IoU_0 = 3 / (4 + 4 - 3), IoU_1 = 2 / (3 + 3 - 2), IoU_3 = 0 / 1, IoU_4 = 0 / 1
    np.testing.assert_allclose(s["iou"], [0.6, 0.5, np.nan, 0.0, 0.0])
    assert s["miou"] == pytest.approx((0.6 + 0.5 + 0 + 0) / 4)
    assert s["pixel_acc"] == pytest.approx(5 / 8)

def test_confusion_matrix_counts_pixels_and_skips_the_ignore_index():
    pairs = [(t, p) for t in range(5) for p in range(5) for _ in range(HAND_CM[t, p])]
    pairs += [(IGNORE_INDEX, 0), (IGNORE_INDEX, 3), (IGNORE_INDEX, 4)]  # ignored whatever the prediction
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))
    target = torch.tensor([pairs[i][0] for i in order]).view(1, -1)
    pred = torch.tensor([pairs[i][1] for i in order]).view(1, -1)
    assert torch.equal(confusion_matrix(pred, target, 5), torch.tensor(HAND_CM))
    with pytest.raises(ValueError, match="class 7"):
        confusion_matrix(torch.zeros(3, dtype=torch.long), torch.tensor([0, 7, 255]), 5)

def test_all_classes_absent_gives_nan_not_an_error():
    s = segmentation_scores(np.zeros((3, 3)))
    assert np.isnan(s["miou"]) and np.isnan(s["iou"]).all()

class Pointwise(nn.Module):
    """A 1x1 conv: its logits at a pixel depend on that pixel only, so every window agrees with the whole image."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, self.num_classes, 1)

    def forward(self, x):
        return self.conv(x)

def test_window_starts_cover_the_side_and_end_flush():
    assert window_starts(37, 16, 10) == [0, 10, 20, 21]
    assert window_starts(16, 16, 10) == [0]
    assert window_starts(9, 16, 10) == [0]  # shorter than a window: one window, the whole side

def test_slide_inference_matches_whole_for_a_pointwise_model():
    torch.manual_seed(0)
    model, image = Pointwise(), torch.randn(2, 3, 37, 45)
    whole = predict(model, image, "whole")
    slide = predict(model, image, "slide", crop=16, stride=10)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    assert predict(model, image, "whole", out_size=(74, 90)).shape == (2, 4, 74, 90)

def test_segmenter_output_size_and_stride():
    x = torch.randn(1, 3, 50, 70)  # not a multiple of 32: the FPN pads internally
    for arch, decoder, stride in (("resnet18", "fcn", 32), ("resnet18", "fpn", 32), ("resnet50", "fcn", 16)):
        model = Segmenter(arch, decoder, 5).eval()
        assert model.output_stride == stride
        with torch.no_grad():
            assert model(x).shape == (1, 5, 50, 70)


def test_refuge_reports_the_optic_disc_as_rim_plus_cup():
    """Classes 0 background, 1 rim, 2 cup. The disc is rim + cup: TP = both in {1, 2}; the cup is class 2."""
    cm = np.array([[50, 3, 1],    # ground truth background: 3 predicted rim, 1 cup
                   [4, 20, 6],    # rim: 4 missed, 6 taken for cup (still disc)
                   [0, 2, 10]])   # cup: 2 taken for rim (still disc)
    regions = eval_module.region_scores(torch.tensor(cm), seg_data.DATASETS["refuge"]["regions"])
    disc_tp, disc_fp, disc_fn = 20 + 6 + 2 + 10, 3 + 1, 4
    cup_tp, cup_fp, cup_fn = 10, 1 + 6, 2
    assert regions["optic disc"]["iou"] == pytest.approx(100 * disc_tp / (disc_tp + disc_fp + disc_fn), abs=1e-4)
    assert regions["optic disc"]["dice"] == pytest.approx(100 * 2 * disc_tp / (2 * disc_tp + disc_fp + disc_fn),
                                                          abs=1e-4)
    assert regions["optic cup"]["iou"] == pytest.approx(100 * cup_tp / (cup_tp + cup_fp + cup_fn), abs=1e-4)
    assert regions["optic cup"]["dice"] == pytest.approx(100 * 2 * cup_tp / (2 * cup_tp + cup_fp + cup_fn), abs=1e-4)
    assert seg_data.DATASETS["refuge"]["classes"] == ("background", "optic disc rim", "optic cup")


# ---------------------------------------------------------------- segmentation datasets, in each dataset's layout

def write_image(path, w=40, h=32, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, fmt)

def write_mask(path, values, w=40, h=32, palette=False, fmt=None):
    """A mask whose rows cycle through `values`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mask = np.array([values[i % len(values)] for i in range(h)], dtype=np.uint8)[:, None].repeat(w, 1)
    im = Image.fromarray(mask)
    if palette:  # VOC stores class ids as palette indices: putpalette turns the L image into P, ids unchanged
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        assert im.mode == "P"
    im.save(path, fmt)
    return mask

def mask_ids(dataset, idx=0):
    return sorted(np.unique(dataset[idx][1]).tolist())

def make_voc(root):
    voc = os.path.join(root, "VOCdevkit", "VOC2012")
    lists = {"train.txt": ["2007_000032"], "aug.txt": ["2008_000002", "2008_000003"], "val.txt": ["2007_000033"]}
    for name, ids in lists.items():
        os.makedirs(os.path.join(voc, "ImageSets", "Segmentation"), exist_ok=True)
        with open(os.path.join(voc, "ImageSets", "Segmentation", name), "w") as f:
            f.write("\n".join(ids) + "\n")
        folder = "SegmentationClassAug" if name == "aug.txt" else "SegmentationClass"
        for i in ids:
            write_image(os.path.join(voc, "JPEGImages", i + ".jpg"))
            write_mask(os.path.join(voc, folder, i + ".png"), [0, 15, 255], palette=folder == "SegmentationClass")
    return voc

def test_voc_loader(tmp_path):
    voc = make_voc(str(tmp_path))
    train = build_dataset("voc", "train", voc)
    assert len(train) == 3 and train.classes[15] == "person"  # train.txt + SBD's aug.txt
    assert mask_ids(train, 0) == [0, 15, 255] and mask_ids(train, 2) == [0, 15, 255]
    assert len(build_dataset("voc", "test", os.path.dirname(voc))) == 1  # VOCdevkit works too; test = val
    image, mask = Transformed(train, EvalTransform((1000, 64)))[0]
    assert image.shape == (3, 64, 80) and mask.shape == (32, 40)  # short side to 64; the metric at native size

def test_cityscapes_loader_maps_label_ids_to_train_ids(tmp_path):
    root = str(tmp_path)
    for split in ("train", "val"):
        stem = f"aachen_000000_00001{split == 'val'}"
        write_image(os.path.join(root, "leftImg8bit", split, "aachen", stem + "_leftImg8bit.png"))
        write_mask(os.path.join(root, "gtFine", split, "aachen", stem + "_gtFine_labelIds.png"), [0, 7, 26, 33, 4])
    train = build_dataset("cityscapes", "train", root)
    assert len(train) == 1 and len(build_dataset("cityscapes", "test", root)) == 1
    # unlabeled 0 and static 4 -> ignore; road 7 -> 0, car 26 -> 13, bicycle 33 -> 18
    assert mask_ids(train) == [0, 13, 18, 255]

def test_isic2017_loader(tmp_path):
    root = str(tmp_path)
    names = {"train": ("train", "Training"), "val": ("val", "Validation"), "test": ("test", "Test_v2")}
    for split, (sub, tag) in names.items():
        for k in range(2):
            name = f"ISIC_000000{k}"
            write_image(os.path.join(root, sub, f"ISIC-2017_{tag}_Data", name + ".jpg"))
            write_mask(os.path.join(root, sub, f"ISIC-2017_{tag}_Part1_GroundTruth", name + "_segmentation.png"),
                       [0, 255])
        write_image(os.path.join(root, sub, f"ISIC-2017_{tag}_Data", "ISIC_0000000_superpixels.png"))
    for split in names:
        data = build_dataset("isic2017", split, root)
        assert len(data) == 2 and mask_ids(data) == [0, 1]

def make_refuge(root):
    for image, mask in (("REFUGE-Training400/Training400/Glaucoma/g0001.jpg",
                         "Annotation-Training400/Disc_Cup_Masks/Glaucoma/g0001.bmp"),
                        ("REFUGE-Training400/Training400/Non-Glaucoma/n0001.jpg",
                         "Annotation-Training400/Disc_Cup_Masks/Non-Glaucoma/n0001.bmp"),
                        ("REFUGE-Validation400/V0001.jpg", "REFUGE-Validation400-GT/Disc_Cup_Masks/V0001.bmp"),
                        ("REFUGE-Test400/Test400/T0001.jpg", "REFUGE-Test-GT/Disc_Cup_Masks/G/T0001.bmp")):
        write_image(os.path.join(root, image))
        write_mask(os.path.join(root, mask), [255, 128, 0])
    # the annotation archive also holds .jpg illustrations with the same stems: not masks
    write_image(os.path.join(root, "Annotation-Training400/Disc_Cup_Fovea_Illustration/g0001.jpg"))

def test_refuge_loader_maps_grey_levels(tmp_path):
    make_refuge(str(tmp_path))
    train = build_dataset("refuge", "train", str(tmp_path))
    assert len(train) == 2 and train.pairs[0][1].endswith("g0001.bmp")
    image, mask = train[0]
    assert mask[0, 0] == 0 and mask[1, 0] == 1 and mask[2, 0] == 2  # 255 background, 128 disc, 0 cup
    assert len(build_dataset("refuge", "val", str(tmp_path))) == 1
    assert len(build_dataset("refuge", "test", str(tmp_path))) == 1

def make_folder(root, values=(0, 1, 2, 255)):
    for split in ("train", "val", "test"):
        for name in ("a", "sub/b"):
            write_image(os.path.join(root, "images", split, name + ".jpg"))
            write_mask(os.path.join(root, "masks", split, name + ".png"), list(values))
    return root

def test_folder_loader(tmp_path):
    root = make_folder(str(tmp_path))
    data = build_dataset("folder", "val", root, num_classes=3)
    assert len(data) == 2 and data.classes == ("class0", "class1", "class2") and mask_ids(data) == [0, 1, 2, 255]
    check_dataset(data)

def test_synthetic_splits_are_distinct_and_deterministic():
    a, b = build_dataset("synthetic", "train", synthetic_size=64), build_dataset("synthetic", "test", synthetic_size=64)
    assert (len(a), len(b)) == (256, 64)
    assert np.array_equal(np.asarray(a[3][0]), np.asarray(build_dataset("synthetic", "train", synthetic_size=64)[3][0]))
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(b[0][0]))
    assert a[0][1].max() <= 8 and len(a.classes) == 9

def test_image_without_mask_is_named(tmp_path):
    root = make_folder(str(tmp_path))
    write_image(os.path.join(root, "images", "train", "orphan.jpg"))
    with pytest.raises(DataError, match="orphan.jpg has no mask"):
        build_dataset("folder", "train", root, num_classes=3)
    voc = make_voc(str(tmp_path / "v"))
    os.remove(os.path.join(voc, "SegmentationClassAug", "2008_000003.png"))
    with pytest.raises(DataError, match="2008_000003.jpg has no mask"):
        build_dataset("voc", "train", voc)

def test_mask_value_beyond_the_classes_is_named(tmp_path):
    root = make_folder(str(tmp_path), values=(0, 1, 5))
    data = build_dataset("folder", "train", root, num_classes=3)
    with pytest.raises(DataError, match=r"masks/train/a\.png: value 5 is not a class id below 3"):
        check_dataset(data)
    voc = make_voc(str(tmp_path / "v"))
    write_mask(os.path.join(voc, "SegmentationClass", "2007_000033.png"), [0, 21])
    with pytest.raises(DataError, match="2007_000033.png: value 21"):
        check_dataset(build_dataset("voc", "val", voc))


def test_eval_reports_refuge_disc_and_cup(tmp_path, capsys):
    make_refuge(str(tmp_path / "refuge"))
    path = fake_finetuned(str(tmp_path / "seed0.pt"), num_classes=3)
    out = tmp_path / "report.json"
    eval_main(eval_parser().parse_args(["--checkpoint", path, "--dataset", "refuge", "--data-root",
                                        str(tmp_path / "refuge"), "--workers", "0", "--output", str(out),
                                        "--precision", "fp32"]))
    report = json.loads(out.read_text())
    model, _ = eval_module.load_checkpoint(path)  # the same split scored again, outside eval.main
    test = Transformed(build_dataset("refuge", "test", str(tmp_path / "refuge")), EvalTransform((1634, 1634)))
    cm = evaluate(model, test)["cm"]
    assert set(report["regions"]) == {"optic disc", "optic cup"}
    assert report["regions"] == eval_module.region_scores(cm, seg_data.DATASETS["refuge"]["regions"])
    assert "optic disc" in capsys.readouterr().out


def test_macos_archive_leftovers_are_skipped_everywhere(tmp_path):
    root = str(tmp_path)
    make_refuge(root)
    for leftover in ("__MACOSX/REFUGE-Training400/Training400/Glaucoma/g0001.jpg",
                     "REFUGE-Training400/Training400/Glaucoma/._g0001.jpg",
                     "Annotation-Training400/Disc_Cup_Masks/Glaucoma/._g0001.bmp"):
        os.makedirs(os.path.dirname(os.path.join(root, leftover)), exist_ok=True)
        open(os.path.join(root, leftover), "wb").write(b"\x00\x05\x16\x07 AppleDouble")
    train = build_dataset("refuge", "train", root)
    assert len(train) == 2 and not any("MACOSX" in a or "/._" in a for pair in train.pairs for a in pair)
    check_dataset(train)
    folder = make_folder(str(tmp_path / "f"))
    open(os.path.join(folder, "images", "train", "._a.jpg"), "wb").write(b"AppleDouble")
    assert len(build_dataset("folder", "train", folder, num_classes=3)) == 2


def test_layouts_users_already_have(tmp_path):
    """mmseg's converted REFUGE (labels 0 background, 1 cup, 2 rim -> ours), VOC with mmseg's trainaug.txt or
    DeepLab's train_aug.txt, and training / validation folders for --dataset folder."""
    root = str(tmp_path / "refuge")
    for split in ("training", "validation", "test"):
        write_image(os.path.join(root, "images", split, "g0001.png"))
        write_mask(os.path.join(root, "annotations", split, "g0001.png"), [0, 1, 2])
    refuge = build_dataset("refuge", "train", root)
    assert len(refuge) == 1 and len(build_dataset("refuge", "val", root)) == 1
    mask = refuge[0][1]
    assert (mask[0, 0], mask[1, 0], mask[2, 0]) == (0, 2, 1)
    for list_name in ("trainaug.txt", "train_aug.txt"):
        voc = make_voc(str(tmp_path / list_name))
        lists = os.path.join(voc, "ImageSets", "Segmentation")
        os.rename(os.path.join(lists, "aug.txt"), os.path.join(lists, list_name))
        with open(os.path.join(lists, list_name), "a") as f:
            f.write("2007_000032\n")  # train+aug lists hold the VOC train ids too: masks in SegmentationClass
        train = build_dataset("voc", "train", voc)
        assert len(train) == 3 and train.warnings == []
        assert [os.path.basename(os.path.dirname(m)) for _, m in train.pairs] == \
            ["SegmentationClass", "SegmentationClassAug", "SegmentationClassAug"]
    folder = make_folder(str(tmp_path / "f"))
    for split, alias in (("train", "training"), ("val", "validation")):
        for part in ("images", "masks"):
            os.rename(os.path.join(folder, part, split), os.path.join(folder, part, alias))
    assert len(build_dataset("folder", "train", folder, num_classes=3)) == 2
    assert len(build_dataset("folder", "val", folder, num_classes=3)) == 2


def test_voc_without_an_aug_list_warns_at_start_and_at_the_end(tmp_path, capsys):
    voc = make_voc(str(tmp_path))
    os.remove(os.path.join(voc, "ImageSets", "Segmentation", "aug.txt"))
    args = finetune_args("--dataset", "voc", "--data-root", voc, "--arch", "resnet18", "--decoder", "fpn",
                         "--iters", "2", "--batch-size", "2", "--crop-size", "64", "--workers", "0",
                         "--output-dir", str(tmp_path / "out"))
    results = ft.main(args)
    lines = capsys.readouterr()
    assert "warning: no aug.txt, trainaug.txt or train_aug.txt" in lines.err
    assert lines.out.strip().splitlines()[-1].endswith("(1464 images, not the paper's 10582; see docs/DATASETS.md, "
                                                       "'Dataset layouts'))")
    assert results["warnings"] and "training on VOC train.txt only" in results["warnings"][0]


def test_folder_class_names_from_classes_txt(tmp_path, capsys):
    root = make_folder(str(tmp_path))
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("background\nanimals\nplants\n")
    assert build_dataset("folder", "val", root).classes == ("background", "animals", "plants")
    assert finetune_args("--dataset", "folder", "--data-root", root).num_classes == 3
    with pytest.raises(SystemExit):
        finetune_args("--dataset", "folder", "--data-root", root, "--num-classes", "4")
    assert "classes.txt: 3 class names, but --num-classes 4" in capsys.readouterr().err


# ---------------------------------------------------------------- finetune_seg.py: flags, fractions, crops

def finetune_args(*argv):
    parser = ft.get_args_parser()
    return ft.finalize_args(parser.parse_args(list(argv)), parser)

def test_flags_are_rejected_before_any_work(tmp_path, capsys):
    for argv, message in ((["--dataset", "voc"], "--data-root is required"),
                          (["--dataset", "voc", "--data-root", str(tmp_path / "nope")], "no such folder"),
                          (["--fraction", "0"], "--fraction 0.0: must be in (0, 1]"),
                          (["--fraction", "1.5"], "--fraction 1.5: must be in (0, 1]"),
                          (["--dataset", "folder", "--data-root", str(tmp_path)], "--num-classes"),
                          (["--select", "best", "--eval-every", "0"], "--select best needs --eval-every"),
                          (["--transfer", "encoder+decoder"], "needs --pretrained"),
                          (["--cat-max-ratio", "0"], "--cat-max-ratio 0.0: must be in (0, 1] (1: off)"),
                          (["--scale-range", "2", "1"], "--scale-range 2.0 1.0: need 0 < MIN <= MAX"),
                          (["--test-scale", "10", "-1"], "--test-scale 10 -1: two positive sides, or 0 0 for native"),
                          (["--scale", "0", "5"], "--scale 0 5: two positive sides")):
        with pytest.raises(SystemExit):
            finetune_args(*argv)
        assert message in capsys.readouterr().err

def test_bad_mask_stops_the_run_before_training(tmp_path):
    root = make_folder(str(tmp_path / "data"), values=(0, 3))
    out = tmp_path / "out"
    args = finetune_args("--dataset", "folder", "--data-root", root, "--num-classes", "3", "--arch", "resnet18",
                         "--workers", "0", "--output-dir", str(out))
    with pytest.raises(SystemExit, match="error: mask .*a.png: value 3"):
        ft.main(args)
    assert not out.exists()

def test_finetune_output_folder_rules(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seed3.pt").write_bytes(b"earlier run")
    with pytest.raises(SystemExit):
        finetune_args("--output-dir", str(out))
    assert f"--output-dir {out} holds an earlier run (seed3.pt); use --overwrite" in capsys.readouterr().err
    assert finetune_args("--output-dir", str(out), "--overwrite").overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit):  # cannot be created: refused before any work, as one line
        finetune_args("--output-dir", str(tmp_path / "file" / "out"))
    assert f"--output-dir {tmp_path / 'file' / 'out'} cannot be created: {tmp_path / 'file'} is a file" in \
        capsys.readouterr().err
    assert not (tmp_path / "new").exists() and finetune_args("--output-dir", str(tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # checked without creating anything

PLAIN = dict(scale_range=(0.5, 2.0), cat_max_ratio=1.0, photometric=False, keep_ratio=True)

@pytest.mark.parametrize("dataset,expected", [
    ("voc", dict(iters=30000, lr=0.003, schedule="step", lr_steps=[21000, 27000], weight_decay=1e-4, crop_size=513,
                 scale=(2049, 513), test_scale=(2049, 513), align_corners=True, mode="whole", select="last", **PLAIN)),
    ("cityscapes", dict(iters=90000, lr=0.01, schedule="step", lr_steps=[63000, 81000], weight_decay=1e-4,
                        crop_size=769, scale=(2049, 1025), test_scale=(2049, 1025), align_corners=True, mode="slide",
                        stride=513, **PLAIN)),
    # mmseg's ISIC 2017 project config: a fixed 512 x 512 resize, flip, PhotoMetricDistortion
    ("isic2017", dict(iters=24000, lr=0.01, schedule="poly", weight_decay=5e-4, crop_size=512, scale=(512, 512),
                      test_scale=(512, 512), keep_ratio=False, scale_range=(1.0, 1.0), cat_max_ratio=1.0,
                      photometric=True, align_corners=False, mode="whole", select="best", eval_every=500)),
    # mmseg 1.x's refuge.py: RandomResize((2056, 2124), 0.5-2), RandomCrop(512, cat_max_ratio=0.75), flip,
    # PhotoMetricDistortion; test Resize((1634, 1634))
    ("refuge", dict(iters=80000, lr=0.01, schedule="poly", weight_decay=5e-4, crop_size=512, scale=(2056, 2124),
                    test_scale=(1634, 1634), keep_ratio=True, scale_range=(0.5, 2.0), cat_max_ratio=0.75,
                    photometric=True, align_corners=False, mode="whole", select="last")),
])
def test_each_dataset_defaults_to_its_recipe(dataset, expected, tmp_path):
    """VOC and Cityscapes: SlotCon's fcn_d6_r50-d16 mmseg configs; ISIC and REFUGE: the paper's schedule (Sec. 3.4)
    with mmseg 1.x's pipelines. Flags override each value."""
    args = finetune_args("--dataset", dataset, "--data-root", str(tmp_path))
    got = {k: tuple(v) if isinstance(v, list) and k != "lr_steps" else v for k, v in vars(args).items()}
    assert {k: got[k] for k in expected} == expected
    assert args.batch_size == 16 and args.momentum == 0.9
    args = finetune_args("--dataset", dataset, "--data-root", str(tmp_path), "--scale", "0", "0", "--test-scale",
                         "300", "200", "--no-keep-ratio", "--scale-range", "1", "1.5", "--cat-max-ratio", "0.5",
                         "--no-photometric")
    assert (args.scale, args.test_scale, args.keep_ratio, tuple(args.scale_range), args.cat_max_ratio,
            args.photometric) == (None, (300, 200), False, (1.0, 1.5), 0.5, False)


def test_step_schedule_and_the_mmcv_rescale_rule(tmp_path):
    lrs = ft.step_schedule(0.003, 30000, [21000, 27000])
    assert (lrs[0], lrs[20999], lrs[21000], lrs[26999], lrs[27000], lrs[-1]) == pytest.approx(
        (0.003, 0.003, 3e-4, 3e-4, 3e-5, 3e-5))
    short = finetune_args("--dataset", "voc", "--data-root", str(tmp_path), "--iters", "1000")
    assert short.lr_steps == [700, 900]  # 70 % and 90 % of the iterations
    rescaled = seg_data.rescaled_size
    assert rescaled(500, 375, (2049, 513)) == (684, 513)         # a VOC image: the short side binds
    assert rescaled(2048, 1024, (2049, 1025)) == (2049, 1025)    # Cityscapes: both bind, barely
    assert rescaled(500, 375, (2049, 513), ratio=0.5) == (341, 256)  # the pair is truncated first: (1024, 256)
    assert rescaled(4000, 1000, (2049, 513)) == (2049, 512)      # a panorama: the long side binds
    assert rescaled(2124, 2056, (2056, 2124)) == (2124, 2056)    # a REFUGE training image: native at ratio 1
    assert rescaled(2124, 2056, (2056, 2124), ratio=0.5) == (1062, 1028)
    assert rescaled(2124, 2056, (1634, 1634)) == (1634, 1582)    # ... at REFUGE's test scale
    assert rescaled(1634, 1634, (1634, 1634)) == (1634, 1634)    # a REFUGE test image
    assert rescaled(1022, 767, (512, 512), keep_ratio=False) == (512, 512)  # ISIC: a fixed size
    assert rescaled(40, 32) == (40, 32) and rescaled(40, 32, ratio=1.5) == (60, 48)
    assert Segmenter("resnet18", "fcn", 3, align_corners=True).align_corners


def test_fraction_subsets_are_deterministic_per_seed_and_nested():
    a = seg_data.fraction_indices(400, 0.05, seed=0)
    assert a == seg_data.fraction_indices(400, 0.05, seed=0) and len(a) == 20 and a == sorted(a)
    assert a != seg_data.fraction_indices(400, 0.05, seed=1)
    assert set(a) <= set(seg_data.fraction_indices(400, 0.25, seed=0))
    assert seg_data.fraction_indices(400, 1.0, seed=3) == list(range(400))
    assert len(seg_data.fraction_indices(10, 0.01, seed=0)) == 1

def test_iteration_sampler_repeats_small_sets_and_does_not_depend_on_the_world_size():
    one = seg_data.IterationSampler(3, iters=5, batch_per_rank=4, seed=0)
    keys = list(one)
    assert len(keys) == 20 and sorted({k % 3 for k in keys}) == [0, 1, 2]  # 3 images fill batches of 4
    assert len(set(keys)) == 20  # each repeat is another epoch: another augmentation key
    ranks = []
    for r in range(2):
        s = seg_data.IterationSampler(3, iters=5, batch_per_rank=2, seed=0)
        s.rank, s.world = r, 2
        ranks.append(torch.tensor(list(s)).view(5, 2))
    assert torch.equal(torch.cat(ranks, 1).flatten(), torch.tensor(keys))

def test_poly_schedule():
    lrs = ft.poly_schedule(0.01, 100, power=0.9, min_lr=1e-4)
    assert lrs[0] == pytest.approx(0.01) and np.all(np.diff(lrs) < 0)
    assert lrs[50] == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)

def test_train_transform_keeps_image_and_mask_aligned():
    mask = np.array([[(x // 5 + y // 7) % 3 for x in range(40)] for y in range(30)], dtype=np.uint8)
    colours = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], dtype=np.uint8)
    image = Image.fromarray(colours[mask])
    t = seg_data.TrainTransform(crop_size=48, scale_range=(1.0, 1.0))
    random.seed(0)
    for _ in range(4):
        x, y = t(image, mask)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert (y[30:] == IGNORE_INDEX).all() and (y[:, 40:] == IGNORE_INDEX).all()  # padding is ignored
        valid = y != IGNORE_INDEX
        std, mean = torch.tensor([0.229, 0.224, 0.225])[:, None], torch.tensor([0.485, 0.456, 0.406])[:, None]
        rgb = ((x[:, valid] * std + mean) * 255).round()
        torch.testing.assert_close(rgb, torch.from_numpy(colours[y[valid].numpy()]).T.float())


def test_resize_and_colour_conversion_are_cv2s():
    """mmcv resizes with cv2 (INTER_LINEAR for images, INTER_NEAREST for masks) and PhotoMetricDistortion converts
    colours with cv2: ours are written in numpy with the rules of cv2's vector code. Nearest and the colour
    conversions agree exactly on rows whose width is a multiple of 64 pixels (cv2's scalar code, which takes the
    last pixels of other rows, rounds differently); bilinear within one grey level, on a few pixels."""
    import cv2
    rng = np.random.RandomState(0)
    for (h, w), (h2, w2) in [((61, 77), (130, 99)), ((480, 640), (257, 342)), ((375, 500), (513, 684)),
                             ((412, 425), (823, 850)), ((100, 100), (100, 100))]:
        image, mask = rng.randint(0, 256, (h, w, 3)).astype(np.uint8), rng.randint(0, 9, (h, w)).astype(np.uint8)
        ours = seg_data.resize_window(image, (w2, h2))
        diff = np.abs(ours.astype(int) - cv2.resize(image, (w2, h2), interpolation=cv2.INTER_LINEAR))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, ((h, w), diff.max(), (diff > 0).mean())
        assert np.array_equal(seg_data.resize_window(mask, (w2, h2), mode="nearest"),
                              cv2.resize(mask, (w2, h2), interpolation=cv2.INTER_NEAREST))
        box = (3, 5, min(w2, 3 + 64), min(h2, 5 + 50))  # a window costs what it holds, and is that part of the whole
        assert np.array_equal(seg_data.resize_window(image, (w2, h2), box), ours[box[1]:box[3], box[0]:box[2]])
    rgb = rng.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    rgb[:8] = rgb[:8, :, :1]  # greys: no hue, no saturation
    assert np.array_equal(seg_data.rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))
    hsv = np.stack(np.meshgrid(np.arange(180), np.arange(0, 256, 4), np.arange(0, 256, 4), indexing="ij"), -1)
    hsv = hsv.reshape(-1, 64, 3).astype(np.uint8)  # every hue, a grid of saturations and values
    assert np.array_equal(seg_data.hsv_to_rgb(hsv), cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))

# mmseg 1.x's transforms as a reference written out here from their definitions, the way mmseg runs them: cv2 on BGR
# arrays, draws from the global np.random stream. Ours runs on RGB, in numpy, from a RandomState.

def reference_photometric(bgr):
    """mmseg's PhotoMetricDistortion (defaults): brightness, contrast first or last, saturation, hue."""
    import cv2
    convert = lambda x, alpha=1.0, beta=0.0: np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(x):
        return convert(x, alpha=np.random.uniform(0.5, 1.5)) if np.random.randint(2) else x

    if np.random.randint(2):
        bgr = convert(bgr, beta=np.random.uniform(-32, 32))
    mode = np.random.randint(2)
    if mode == 1:
        bgr = contrast(bgr)
    if np.random.randint(2):
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = convert(hsv[:, :, 1], alpha=np.random.uniform(0.5, 1.5))
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if np.random.randint(2):
        hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(int) + np.random.randint(-18, 18)) % 180
        bgr = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    if mode == 0:
        bgr = contrast(bgr)
    return bgr

def reference_pipeline(bgr, seg, scale, crop, cat_max_ratio):
    """RandomResize(scale, (0.5, 2), keep_ratio) -> RandomCrop(crop, cat_max_ratio) -> RandomFlip(0.5) ->
    PhotoMetricDistortion, as mmcv / mmseg 1.x define them."""
    import cv2
    ratio = np.random.random_sample() * 1.5 + 0.5
    target = int(scale[0] * ratio), int(scale[1] * ratio)
    h, w = seg.shape
    f = min(max(target) / max(h, w), min(target) / min(h, w))
    size = int(w * f + 0.5), int(h * f + 0.5)
    bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_LINEAR)
    seg = cv2.resize(seg, size, interpolation=cv2.INTER_NEAREST)

    def window():
        top = np.random.randint(0, max(seg.shape[0] - crop, 0) + 1)
        left = np.random.randint(0, max(seg.shape[1] - crop, 0) + 1)
        return slice(top, top + crop), slice(left, left + crop)
    box = window()
    for _ in range(10):
        labels, counts = np.unique(seg[box], return_counts=True)
        counts = counts[labels != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
        box = window()
    bgr, seg = bgr[box], seg[box]
    if np.random.choice(["horizontal", None], p=[0.5, 0.5]) == "horizontal":
        bgr, seg = np.flip(bgr, 1), np.flip(seg, 1)
    return reference_photometric(np.ascontiguousarray(bgr)), seg

def test_refuge_training_pipeline_draws_and_crops_as_mmseg():
    """REFUGE's pipeline (mmseg 1.x refuge.py at a smaller scale), run by the reference above with np.random seeded
    and by ours with a RandomState of the same seed: the same draws, so the same rescale, window and flip (mask:
    exactly) and the same colours (image: within the resize's one grey level, carried through the distortion)."""
    scale, crop = (160, 150), 64
    ours = seg_data.TrainTransform(crop, scale, (0.5, 2.0), keep_ratio=True, cat_max_ratio=0.75, photometric=True)
    yy, xx = np.mgrid[:140, :150]
    r2 = (yy - 70) ** 2 + (xx - 80) ** 2
    mask = np.where(r2 < 20 ** 2, 2, np.where(r2 < 40 ** 2, 1, 0)).astype(np.uint8)  # cup, rim, background
    image = np.stack([xx * 255 // 150, yy * 255 // 140, (xx + yy) % 256], -1).astype(np.uint8)
    image = np.clip(image.astype(int) + np.random.RandomState(1).randint(-20, 21, image.shape), 0, 255).astype(np.uint8)
    worst, redrawn = 0, 0
    for seed in range(24):
        np.random.seed(seed)
        bgr, seg = reference_pipeline(image[..., ::-1].copy(), mask.copy(), scale, crop, 0.75)
        x, y = ours(Image.fromarray(image), mask, rng=np.random.RandomState(seed))
        h, w = seg.shape
        assert np.array_equal(y[:h, :w].numpy(), seg) and (y[h:] == IGNORE_INDEX).all() \
            and (y[:, w:] == IGNORE_INDEX).all(), seed
        std, mean = torch.tensor(IMAGENET_STD)[:, None, None], torch.tensor(IMAGENET_MEAN)[:, None, None]
        rgb = ((x[:, :h, :w] * std + mean) * 255).round().permute(1, 2, 0).numpy().astype(int)
        worst = max(worst, np.abs(rgb - bgr[..., ::-1]).max())
        ids, counts = np.unique(seg, return_counts=True)
        redrawn += len(ids) > 1 and counts.max() / counts.sum() < 0.75
    assert worst <= 2, worst  # 0 on the CPUs we ran it on; cv2 rounds the last pixels of some rows otherwise
    assert redrawn >= 20  # cat_max_ratio found windows holding two classes or more, none dominant

def test_photometric_distortion_is_mmsegs():
    """The same draws in the same order, the same uint8 truncations, cv2's colour conversions: equal to mmseg's
    PhotoMetricDistortion (the reference above; rows whose width is a multiple of 64 pixels, see above)."""
    image = np.random.RandomState(0).randint(0, 256, (48, 128, 3)).astype(np.uint8)
    for seed in range(40):
        np.random.seed(seed)
        expected = reference_photometric(image[..., ::-1].copy())[..., ::-1]
        assert np.array_equal(seg_data.photometric_distortion(image.copy(), np.random.RandomState(seed)), expected)

def test_cat_max_ratio_redraws_windows_where_one_class_dominates():
    """A 100 x 100 mask, background but for a 30 x 30 square: few 20 x 20 windows hold between a quarter and three
    quarters of square, so draws are refused and drawn again, up to 10 times; 255 does not count as a class."""
    mask = np.zeros((100, 100), np.uint8)
    mask[35:65, 35:65] = 1
    window = lambda box: mask[box[1]:box[3], box[0]:box[2]]
    share = lambda box: np.bincount(window(box).ravel(), minlength=2).max() / window(box).size
    boxes = [seg_data.crop_box(100, 100, 20, np.random.RandomState(s), window, 0.75) for s in range(50)]
    accepted = [b for b in boxes if share(b) < 0.75]
    plain = [seg_data.crop_box(100, 100, 20, np.random.RandomState(s)) for s in range(50)]
    assert len(accepted) > sum(share(b) < 0.75 for b in plain) + 10
    assert all(b[2] - b[0] == 20 and b[3] - b[1] == 20 for b in boxes)
    ignored = np.full((100, 100), IGNORE_INDEX, np.uint8)
    ignored[:, :50] = 0  # one class and 255: never accepted, so the 11th window is kept
    rng = np.random.RandomState(0)
    box = seg_data.crop_box(100, 100, 20, rng, lambda b: ignored[b[1]:b[3], b[0]:b[2]], 0.75)
    replay = np.random.RandomState(0)
    draws = [(replay.randint(0, 81), replay.randint(0, 81)) for _ in range(11)]
    assert (box[1], box[0]) == draws[-1]

def test_fpn_head_is_mmsegs_semantic_fpn_derived_by_hand():
    """Segmenter('fpn') = mmseg's EncoderDecoder of fpn_r50.py with a BN neck, written out here after mmseg's
    definitions with functional ops on the state dict's mmseg names: the FPN neck (1x1 lateral conv + BN, nearest
    top-down to the next level's size, 3x3 conv + BN), then FPNHead: level s through max(1, s - 2) conv-BN-ReLU
    stages of 128 channels, each but p2's followed by a bilinear x2, summed, Dropout2d(0.1), a 1x1 classifier;
    the logits resized bilinearly to the input. Any side works, as in mmseg (no padding to multiples of 32)."""
    torch.manual_seed(0)
    model = Segmenter("resnet18", "fpn", 5, align_corners=True)
    for m in model.modules():  # BN statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    sd = model.state_dict()
    stages = {0: [0], 1: [0], 2: [0, 2], 3: [0, 2, 4]}  # Upsample modules (no parameters) take the odd indices
    head_keys = {f"decode_head.scale_heads.{i}.{j}.{p}" for i, js in stages.items() for j in js
                 for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                           "bn.num_batches_tracked")} | {"decode_head.conv_seg.weight", "decode_head.conv_seg.bias"}
    assert {k for k in sd if k.startswith("decode_head.")} == head_keys
    assert sd["decode_head.scale_heads.0.0.conv.weight"].shape == (128, 256, 3, 3)
    assert sd["decode_head.scale_heads.3.4.conv.weight"].shape == (128, 128, 3, 3)
    assert sd["decode_head.conv_seg.weight"].shape == (5, 128, 1, 1)
    assert isinstance(model.decode_head.dropout, nn.Dropout2d) and model.decode_head.dropout.p == 0.1

    def conv_bn(x, name, padding, relu=False):
        y = F.conv2d(x, sd[f"{name}.conv.weight"], padding=padding)
        y = F.batch_norm(y, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"], sd[f"{name}.bn.weight"],
                         sd[f"{name}.bn.bias"], eps=1e-5)
        return F.relu(y) if relu else y

    up = lambda x, size, mode: F.interpolate(x, size=size, mode=mode, **({"align_corners": True}
                                                                           if mode == "bilinear" else {}))
    for shape in ((1, 3, 96, 128), (2, 3, 100, 130)):
        x = torch.randn(*shape)
        with torch.no_grad():
            c = model.backbone(x)
            lat = [conv_bn(c[i], f"neck.lateral_convs.{i}", 0) for i in range(4)]
            for i in (3, 2, 1):
                lat[i - 1] = lat[i - 1] + up(lat[i], lat[i - 1].shape[-2:], "nearest")
            p = [conv_bn(lat[i], f"neck.fpn_convs.{i}", 1) for i in range(4)]
            total = None
            for i, js in stages.items():
                t = p[i]
                for j in js:
                    t = conv_bn(t, f"decode_head.scale_heads.{i}.{j}", 1, relu=True)
                    if i > 0:
                        t = up(t, (2 * t.shape[-2], 2 * t.shape[-1]), "bilinear")
                total = t if total is None else total + up(t, total.shape[-2:], "bilinear")
            logits = F.conv2d(total, sd["decode_head.conv_seg.weight"], sd["decode_head.conv_seg.bias"])
            expected = up(logits, shape[-2:], "bilinear")
            got = model(x)
        assert got.shape == (shape[0], 5, *shape[-2:])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fine-tuning: what is transferred

def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}

def changed(model, before, prefix):
    """Names under `prefix` whose tensor differs from `before`."""
    return {k for k, v in model.state_dict().items() if k.startswith(prefix) and not torch.equal(v, before[k])}

def fresh_segmenter(decoder="fcn"):
    torch.manual_seed(0)
    return Segmenter("resnet18", decoder, 3)

def test_transfer_encoder_only(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    model = fresh_segmenter()
    before = snapshot(model)
    pretrained = weights.read_pretrained([path])
    notes = weights.transfer_segmenter(model, pretrained, "encoder")
    assert "teacher branch (the authors' choice for slotcon)" in pretrained["notes"][0]
    for k, v in decon.teacher.encoder.state_dict().items():  # the teacher, SlotCon's default
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert not changed(model, before, "decode_head.") and "random init (--transfer encoder)" in notes[-1]

def test_transfer_encoder_and_decoder_and_student_branch(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    model = fresh_segmenter()
    before = snapshot(model)
    notes = weights.transfer_segmenter(model, weights.read_pretrained([path], branch="student"), "encoder+decoder")
    for k, v in decon.student.decoder.state_dict().items():
        assert torch.equal(model.decode_head.state_dict()[k], v), k
    assert torch.equal(model.backbone.conv1.weight, decon.student.encoder.conv1.weight)
    assert changed(model, before, "decode_head.") == {k for k in before if k.startswith("decode_head.convs.")}
    assert "decoder -> decode_head.convs: 12 pre-trained tensors; random init: decode_head.conv_seg" in notes[-1]

def test_transfer_fpn_without_deep_supervision_keeps_missing_levels_random(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path, "sl-fpn")
    model = fresh_segmenter("fpn")
    before = snapshot(model)
    notes = weights.transfer_segmenter(model, weights.read_pretrained([path]), "encoder+decoder")
    loaded = changed(model, before, "neck.")
    assert {k.split(".")[1] + "." + k.split(".")[2] for k in loaded} == \
        {"lateral_convs.0", "lateral_convs.1", "lateral_convs.2", "lateral_convs.3", "fpn_convs.0"}
    assert not changed(model, before, "decode_head.")  # the Semantic-FPN head is new
    teacher = decon.teacher.decoder
    assert torch.equal(model.neck.fpn_convs[0].conv.weight, teacher.fpn_output2.weight)
    assert torch.equal(model.neck.lateral_convs[3].bn.running_var, teacher.fpn_lateral5.norm.running_var)
    assert "random init: neck.fpn_convs.1, neck.fpn_convs.2, neck.fpn_convs.3, decode_head" in notes[-1]
    assert "deep supervision" in notes[-1]

def test_heterogeneous_decoders_transfer_the_encoder_only(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_checkpoint(path, "ml-fpn")
    model = fresh_segmenter("fcn")
    before = snapshot(model)
    notes = weights.transfer_segmenter(model, weights.read_pretrained([path]), "encoder+decoder")
    assert changed(model, before, "backbone.") and not changed(model, before, "decode_head.")
    assert "heterogeneous decoders (pre-trained fpn, fine-tuned fcn)" in notes[-1]

def test_converted_files_load_by_their_keys(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_checkpoint(path)
    enc, dec = decon.teacher.encoder.state_dict(), decon.teacher.decoder.state_dict()
    files = {"backbone.pth": {"state_dict": enc}, "decode_head.pth": {"state_dict": dec},
             "full.pth": {"state_dict": {**{f"backbone.{k}": v for k, v in enc.items()},
                                         **{f"decode_head.{k}": v for k, v in dec.items()}}},
             "tv.pth": {**enc, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}}
    for name, content in files.items():
        torch.save(content, str(tmp_path / name))
    for paths, mode in (([tmp_path / "backbone.pth", tmp_path / "decode_head.pth"], "encoder+decoder"),
                        ([tmp_path / "full.pth"], "encoder+decoder"), ([tmp_path / "tv.pth"], "encoder")):
        model = fresh_segmenter()
        pretrained = weights.read_pretrained([str(p) for p in paths])
        assert pretrained["arch"] == "resnet18"
        weights.transfer_segmenter(model, pretrained, mode)
        assert torch.equal(model.backbone.layer4[1].bn2.weight, decon.teacher.encoder.layer4[1].bn2.weight)
        if mode == "encoder+decoder":
            assert torch.equal(model.decode_head.convs[1].conv.weight, decon.teacher.decoder.convs[1].conv.weight)
    assert "ignored 2 (fc.weight, fc.bias)" in weights.read_pretrained([str(tmp_path / "tv.pth")])["notes"][0]
    # mmseg's FPN neck names, as convert.py exports them, map back onto the FPN
    fpn = fake_checkpoint(path, "ml-fpn").teacher.decoder.state_dict()
    neck = {}
    for k, v in fpn.items():  # fpn_lateral3.norm.bias -> neck.lateral_convs.1.bn.bias
        name, rest = k.split(".", 1)
        module = "lateral_convs" if name.startswith("fpn_lateral") else "fpn_convs"
        layer = "conv.weight" if rest == "weight" else "bn." + rest[len("norm."):]
        neck[f"neck.{module}.{int(name[-1]) - 2}.{layer}"] = v
    _, _, got, _ = weights.split_state_dict(neck)
    assert got.keys() == fpn.keys() and all(torch.equal(got[k], fpn[k]) for k in fpn)
    # so do the torchvision detection-backbone names of convert.py --to torchvision (body.*, fpn.*)
    decon_fpn_enc = fake_checkpoint(path, "ml-fpn").teacher.encoder.state_dict()
    tv = {**{f"body.{k}": v for k, v in decon_fpn_enc.items()}, **{f"fpn.{weights.torchvision_fpn_key(k)}": v
                                                         for k, v in fpn.items()}}
    got_enc, _, got, ignored = weights.split_state_dict(tv)
    assert ignored == [] and got.keys() == fpn.keys() and all(torch.equal(got[k], fpn[k]) for k in fpn)
    assert got_enc.keys() == decon_fpn_enc.keys()

def test_transfer_errors_are_one_line(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_checkpoint(path, "slotcon")
    args = finetune_args("--pretrained", path, "--transfer", "encoder+decoder", "--workers", "0")
    with pytest.raises(ValueError, match="has no decoder weights; use --transfer encoder"):
        ft.prepare(args)
    args = finetune_args("--pretrained", path, "--arch", "resnet50", "--workers", "0")
    with pytest.raises(ValueError, match="--arch resnet50: --pretrained holds a resnet18 encoder"):
        ft.prepare(args)
    torch.save({"optimizer": {"lr": 1.0}}, str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="junk.pt: neither a pretrain.py checkpoint nor a state dict"):
        weights.read_pretrained([str(tmp_path / "junk.pt")])

def fake_finetuned(path, arch="resnet18", decoder="fcn", num_classes=9):
    """A finetune_seg.py-style seedN.pt (random weights) of the built-in scenes."""
    args = dict(vars(finetune_args("--workers", "0")), arch=arch, decoder=decoder, num_classes=num_classes)
    torch.save({"model": Segmenter(arch, decoder, num_classes).state_dict(), "args": args, "seed": 0}, path)
    return path

def test_a_finetuned_checkpoint_is_not_taken_for_pretrained_weights(tmp_path):
    path = fake_finetuned(str(tmp_path / "seed0.pt"))
    with pytest.raises(ValueError, match="a fine-tuned checkpoint .* --dataset synthetic.*--allow-finetuned"):
        weights.read_pretrained([path])
    taken = weights.read_pretrained([path], allow_finetuned=True)
    assert taken["arch"] == "resnet18" and taken["decoder_kind"] == "fcn"


# ---------------------------------------------------------------- fine-tuning and evaluation end to end

def test_eval_checks_its_output_before_evaluating(tmp_path, monkeypatch):
    path = fake_finetuned(str(tmp_path / "seed0.pt"))
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys.modules["eval"], "evaluate", lambda *a, **kw: pytest.fail("evaluated"))
    with pytest.raises(SystemExit, match="error: cannot write .*file/r.json: .* cannot be created"):
        eval_main(eval_parser().parse_args(["--checkpoint", path, "--output", str(tmp_path / "file" / "r.json")]))

def test_finetune_folder_belongs_to_one_job_and_a_killed_one_blocks_nothing(tmp_path):
    out = tmp_path / "seg"
    tiny = ["finetune_seg.py", "--arch", "resnet18", "--synthetic-size", "32", "--crop-size", "32", "--synthetic-train",
            "8", "--synthetic-val", "2", "--synthetic-test", "2", "--batch-size", "2", "--workers", "0",
            "--eval-every", "0", "--precision", "fp32", "--output-dir", str(out), "--overwrite"]
    first = subprocess.Popen([sys.executable, *tiny, "--iters", "100000"], cwd=HERE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        t0 = time.time()
        while f"PID {first.pid}," not in ((out / ".lock").read_text() if (out / ".lock").exists() else ""):
            assert first.poll() is None and time.time() - t0 < 120, first.stderr.read()
            time.sleep(0.05)
        listing = sorted(os.listdir(out))
        second = run_script(*tiny, "--iters", "2", timeout=120)
        assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"error: --output-dir {out} is in use by another job (host "
                                        f"{socket.gethostname()}, PID {first.pid}, since ")
        assert sorted(os.listdir(out)) == listing
    finally:
        first.kill()  # SIGKILL
        first.wait()
    third = run_script(*tiny, "--iters", "2", timeout=120)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / "results.json").read_text())["args"]["iters"] == 2


def test_short_finetune_beats_the_untrained_model_and_eval_reproduces_it(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["--arch", "resnet18", "--synthetic-size", "64", "--synthetic-train", "64", "--synthetic-val", "8",
              "--synthetic-test", "24", "--crop-size", "64", "--workers", "0"]
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"seed": 0, "iter": 40, "loss": 9.9}) + "\n")  # an earlier run's
    args = finetune_args(*common, "--decoder", "fpn", "--iters", "40", "--batch-size", "8", "--lr", "0.05",
                         "--eval-every", "20", "--select", "best", "--output-dir", str(out), "--overwrite")
    results = ft.main(args)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], "val_miou" in r) for r in log] == [(20, False), (20, True), (40, False), (40, True)]

    torch.manual_seed(0)  # the fine-tune's initial weights (seed 0)
    untrained = Segmenter("resnet18", "fpn", 9)
    test = Transformed(build_dataset("synthetic", "test", synthetic_lengths=(64, 8, 24), synthetic_size=64),
                       EvalTransform())
    before = 100 * evaluate(untrained, test)["miou"]
    saved = json.loads((out / "results.json").read_text())
    assert saved["miou_mean"] == results["miou_mean"] and saved["seeds"][0]["checkpoint"].endswith("seed0.pt")
    assert saved["miou_mean"] > before + 5, (saved["miou_mean"], before)
    assert saved["command"].startswith("python") and len(saved["iou_per_class_mean"]) == 9

    capsys.readouterr()
    scores = eval_main(eval_parser().parse_args(["--checkpoint", str(out / "seed0.pt"), "--workers", "0"]))
    printed = capsys.readouterr().out
    assert "mIoU" in printed
    assert 100 * scores["miou"] == pytest.approx(saved["miou_mean"], abs=1e-3)
    report = json.loads((out / "seed0.synthetic-test.json").read_text())
    assert report["miou"] == pytest.approx(saved["miou_mean"], abs=1e-3)
