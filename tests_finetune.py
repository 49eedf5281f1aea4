"""Tests of finetune_seg.py and eval.py (issue 3): the metric against hand-made confusion matrices, sliding-window
inference, every dataset loader on a tiny fixture in its layout, bad input, label fractions, weight transfer, and a
short fine-tune on the built-in scenes.

    python -m pytest -q tests_finetune.py
"""
import argparse
import json
import os
import random
import zlib

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import finetune_seg as ft
from eval import (IGNORE_INDEX, DataError, EvalTransform, Segmenter, Transformed, build_dataset, check_dataset,
                  confusion_matrix, evaluate, predict, segmentation_scores, window_starts)
from eval import get_args_parser as eval_parser, main as eval_main
from pretrain import build_model as build_decon


# ---------------------------------------------------------------- metric

# rows = ground truth, columns = prediction. Class 2 appears in neither (NaN, left out); class 3 is in the ground
# truth but never predicted (IoU 0); class 4 is predicted but absent from the ground truth (IoU 0).
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


# ---------------------------------------------------------------- inference

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


# ---------------------------------------------------------------- fixtures in each dataset's layout

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
    image, mask = Transformed(train, EvalTransform(64))[0]
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


# ---------------------------------------------------------------- bad input

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
                          (["--transfer", "encoder+decoder"], "needs --pretrained")):
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


# ---------------------------------------------------------------- fractions, sampling, schedule, augmentation

def test_fraction_subsets_are_deterministic_per_seed_and_nested():
    a = ft.fraction_indices(400, 0.05, seed=0)
    assert a == ft.fraction_indices(400, 0.05, seed=0) and len(a) == 20 and a == sorted(a)
    assert a != ft.fraction_indices(400, 0.05, seed=1)
    assert set(a) <= set(ft.fraction_indices(400, 0.25, seed=0))
    assert ft.fraction_indices(400, 1.0, seed=3) == list(range(400))
    assert len(ft.fraction_indices(10, 0.01, seed=0)) == 1


def test_iteration_sampler_repeats_small_sets_and_does_not_depend_on_the_world_size():
    one = ft.IterationSampler(3, iters=5, batch_per_rank=4, seed=0)
    keys = list(one)
    assert len(keys) == 20 and sorted({k % 3 for k in keys}) == [0, 1, 2]  # 3 images fill batches of 4
    assert len(set(keys)) == 20  # each repeat is another epoch: another augmentation key
    ranks = []
    for r in range(2):
        s = ft.IterationSampler(3, iters=5, batch_per_rank=2, seed=0)
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
    t = ft.TrainTransform(crop_size=48, scale_range=(1.0, 1.0))
    random.seed(0)
    for _ in range(4):
        x, y = t(image, mask)
        assert x.shape == (3, 48, 48) and y.shape == (48, 48)
        assert (y[30:] == IGNORE_INDEX).all() and (y[:, 40:] == IGNORE_INDEX).all()  # padding is ignored
        valid = y != IGNORE_INDEX
        std, mean = torch.tensor([0.229, 0.224, 0.225])[:, None], torch.tensor([0.485, 0.456, 0.406])[:, None]
        rgb = ((x[:, valid] * std + mean) * 255).round()
        torch.testing.assert_close(rgb, torch.from_numpy(colours[y[valid].numpy()]).T.float())


# ---------------------------------------------------------------- transfer

def fake_pretraining(path, decoder="fcn", deep_supervision=False, framework="slotcon"):
    """A tiny pretrain.py-style last.pt whose every float tensor (buffers too) differs from a fresh model's, and
    whose teacher differs from its student, so that loaded tensors and the branch can be told apart."""
    a = argparse.Namespace(framework=framework, arch="resnet18", decoder=decoder, dropout=0.0,
                           alpha=0.5 if decoder != "none" else 1.0, deep_supervision=deep_supervision, dim_hidden=16,
                           dim_out=8, num_prototypes=4, num_prototypes_dec=None, queue_size=32)
    torch.manual_seed(123)
    model = build_decon(a)
    with torch.no_grad():
        for branch, shift in ((model.student, 0.25), (model.teacher, 0.5)):
            for t in branch.state_dict().values():
                if t.is_floating_point():
                    t.add_(shift)
    torch.save({"model": model.state_dict(), "args": vars(a), "step": 7}, path)
    return model


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
    decon = fake_pretraining(path)
    model = fresh_segmenter()
    before = snapshot(model)
    pretrained = ft.read_pretrained([path])
    notes = ft.transfer(model, pretrained, "encoder")
    assert "teacher branch (the authors' choice for slotcon)" in pretrained["notes"][0]
    for k, v in decon.teacher.encoder.state_dict().items():  # the teacher, SlotCon's default
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert not changed(model, before, "decode_head.") and "random init (--transfer encoder)" in notes[-1]


def test_transfer_encoder_and_decoder_and_student_branch(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_pretraining(path)
    model = fresh_segmenter()
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path], branch="student"), "encoder+decoder")
    for k, v in decon.student.decoder.state_dict().items():
        assert torch.equal(model.decode_head.state_dict()[k], v), k
    assert torch.equal(model.backbone.conv1.weight, decon.student.encoder.conv1.weight)
    assert changed(model, before, "decode_head.") == {k for k in before if k.startswith("decode_head.convs.")
                                                       and not k.endswith("num_batches_tracked")}
    assert "random init: conv_seg" in notes[-1]


def test_transfer_fpn_without_deep_supervision_keeps_missing_levels_random(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_pretraining(path, decoder="fpn", deep_supervision=False)
    model = fresh_segmenter("fpn")
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path]), "encoder+decoder")
    loaded = changed(model, before, "decode_head.")
    assert any(k.startswith("decode_head.fpn_lateral5") for k in loaded)
    assert any(k.startswith("decode_head.fpn_output2") for k in loaded)
    assert not any(k.startswith(("decode_head.fpn_output3", "decode_head.conv_seg", "decode_head.scale_heads"))
                   for k in loaded)
    assert torch.equal(model.decode_head.fpn_output2.weight, decon.teacher.decoder.fpn_output2.weight)
    assert "fpn_output3, fpn_output4, fpn_output5" in notes[-1] and "deep supervision" in notes[-1]


def test_heterogeneous_decoders_transfer_the_encoder_only(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_pretraining(path, decoder="fpn", deep_supervision=True)
    model = fresh_segmenter("fcn")
    before = snapshot(model)
    notes = ft.transfer(model, ft.read_pretrained([path]), "encoder+decoder")
    assert changed(model, before, "backbone.") and not changed(model, before, "decode_head.")
    assert "heterogeneous decoders (pre-trained fpn, fine-tuned fcn)" in notes[-1]


def test_converted_files_load_by_their_keys(tmp_path):
    path = str(tmp_path / "last.pt")
    decon = fake_pretraining(path)
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
        pretrained = ft.read_pretrained([str(p) for p in paths])
        assert pretrained["arch"] == "resnet18"
        ft.transfer(model, pretrained, mode)
        assert torch.equal(model.backbone.layer4[1].bn2.weight, decon.teacher.encoder.layer4[1].bn2.weight)
        if mode == "encoder+decoder":
            assert torch.equal(model.decode_head.convs[1].conv.weight, decon.teacher.decoder.convs[1].conv.weight)
    assert "ignored 2 (fc.weight, fc.bias)" in ft.read_pretrained([str(tmp_path / "tv.pth")])["notes"][0]
    # mmseg's FPN neck names, as convert.py exports them, map back onto the FPN
    fpn = fake_pretraining(path, decoder="fpn", deep_supervision=True).teacher.decoder.state_dict()
    neck = {}
    for k, v in fpn.items():  # fpn_lateral3.norm.bias -> neck.lateral_convs.1.bn.bias
        name, rest = k.split(".", 1)
        module = "lateral_convs" if name.startswith("fpn_lateral") else "fpn_convs"
        layer = "conv.weight" if rest == "weight" else "bn." + rest[len("norm."):]
        neck[f"neck.{module}.{int(name[-1]) - 2}.{layer}"] = v
    _, _, got, _ = ft.split_state_dict(neck)
    assert got.keys() == fpn.keys() and all(torch.equal(got[k], fpn[k]) for k in fpn)


def test_transfer_errors_are_one_line(tmp_path):
    path = str(tmp_path / "last.pt")
    fake_pretraining(path, decoder="none")
    args = finetune_args("--pretrained", path, "--transfer", "encoder+decoder", "--workers", "0")
    with pytest.raises(ValueError, match="has no decoder weights; use --transfer encoder"):
        ft.prepare(args)
    args = finetune_args("--pretrained", path, "--arch", "resnet50", "--workers", "0")
    with pytest.raises(ValueError, match="--arch resnet50: --pretrained holds a resnet18 encoder"):
        ft.prepare(args)
    torch.save({"optimizer": {"lr": 1.0}}, str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="junk.pt: neither a pretrain.py checkpoint nor a state dict"):
        ft.read_pretrained([str(tmp_path / "junk.pt")])


# ---------------------------------------------------------------- a short fine-tune

@pytest.fixture
def one_thread():
    """On 64 px inputs, intra-op threads cost more in synchronization than they save, and when the cores are
    shared (parallel CI jobs) a 2-thread step can be 10x slower than a 1-thread one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_short_finetune_beats_the_untrained_model_and_eval_reproduces_it(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    common = ["--arch", "resnet18", "--synthetic-size", "64", "--synthetic-train", "64", "--synthetic-val", "8",
              "--synthetic-test", "24", "--crop-size", "64", "--workers", "0"]
    args = finetune_args(*common, "--decoder", "fpn", "--iters", "40", "--batch-size", "8", "--lr", "0.05",
                         "--eval-every", "20", "--select", "best", "--output-dir", str(out))
    results = ft.main(args)

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
