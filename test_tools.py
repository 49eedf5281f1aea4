"""Tests of the tools: pictures (visualize.py, eval.py --save-predictions), bench.py, reproduce.py and probe.py
(the Hungarian algorithm against scipy, k-means, the matching, probes end to end).

    python -m pytest -q test_*.py
"""
import argparse
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bench
import data
import eval as eval_module
import pretrain
import seg_data
import visualize
import weights
from seg_data import IGNORE_INDEX, build_dataset
from eval import get_args_parser as eval_parser, main as eval_main

import itertools

from scipy.optimize import linear_sum_assignment  # test-only reference (requirements-test.txt)

import probe
from test_decon import HERE, fake_checkpoint, hold_folder, run_pretrain, tiny_args, tiny_model
from weights import build_decon, read_checkpoint
from test_segmentation import fake_finetuned, make_folder, write_image


# ---------------------------------------------------------------- pictures (visualize.py, eval.py --save-predictions)

@pytest.fixture(scope="module")
def pretrained_runs(tmp_path_factory):
    """Real last.pt files of one-step pretrain.py runs, a SlotCon and a DenseCL variant, shared by this section."""
    paths, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as pretrain_here: at 64 px a second thread costs more than it saves
    try:
        for name in ("ml-fpn", "densecl-sl-fcn"):
            out = tmp_path_factory.mktemp(name)
            pretrain.main(tiny_args(name, output_dir=str(out), max_steps=1))
            paths[name] = str(out / "last.pt")
    finally:
        torch.set_num_threads(threads)
    return paths

def run_visualize(*argv):
    return visualize.main(visualize.get_args_parser().parse_args([str(a) for a in argv]))

def test_visualize_strip_has_one_panel_per_level_of_the_expected_size(pretrained_runs, tmp_path, one_thread):
    for name in ("a", "b"):
        write_image(str(tmp_path / "in" / f"{name}.png"), w=50, h=40)
    ckpt = pretrained_runs["ml-fpn"]
    run_visualize("--checkpoint", ckpt, "--images", tmp_path / "in", "--output", tmp_path / "viz")
    s, gap, top = 64, visualize.GAP, visualize.LABEL
    assert sorted(os.listdir(tmp_path / "viz")) == ["000-a.png", "001-b.png", "summary.png"]
    strip = np.asarray(Image.open(tmp_path / "viz" / "001-b.png"))
    assert strip.shape == (top + s, 5 * s + 4 * gap, 3)  # the image, p2, p3, p4, p5
    assert Image.open(tmp_path / "viz" / "summary.png").size == (5 * s + 4 * gap, top + 2 * s + gap)
    assert all((strip[:top, c * (s + gap):c * (s + gap) + s] < 100).any() for c in range(5))  # a label on each

    model = tiny_model("ml-fpn")  # the teacher again, through Branch.forward
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    image = data.load_rgb(str(tmp_path / "in" / "b.png")).resize((s, s), Image.BICUBIC)
    with torch.no_grad():
        out = model.eval().teacher([data.to_tensor(image)[None]])[0]
    panels = [strip[top:, c * (s + gap):c * (s + gap) + s] for c in range(5)]
    assert np.array_equal(panels[0], np.asarray(image))
    for lvl, panel, cells in zip(("p2", "p3", "p4", "p5"), panels[1:], (16, 8, 4, 2)):
        ids = out[lvl].scores[0].argmax(0).numpy()
        assert ids.shape == (cells, cells)
        grid = Image.fromarray(visualize.prototype_palette(8)[ids]).resize((s, s), Image.NEAREST)
        assert np.array_equal(panel, np.asarray(Image.blend(image, grid, 0.5))), lvl

def test_visualize_gives_a_prototype_one_colour_in_every_image(pretrained_runs, tmp_path, one_thread):
    ckpt, s = pretrained_runs["ml-fpn"], 64
    run_visualize("--checkpoint", ckpt, "--scenes", 2, "--output", tmp_path)
    model = weights.build_decon(*weights.read_checkpoint(ckpt))
    scenes = data.SyntheticScenes(2, 128, seg_data.SYNTHETIC_SPLIT_SEEDS["test"])
    seen = {}  # prototype id -> the colours recovered from its blended cells, over both images
    for i, name in enumerate(("000-scene0.png", "001-scene1.png")):
        image = np.asarray(scenes[i].resize((s, s), Image.BICUBIC), dtype=int)
        ids = visualize.teacher_maps(model, data.to_tensor(Image.fromarray(image.astype(np.uint8)))[None])["p3"]
        p3 = np.asarray(Image.open(tmp_path / name), dtype=int)[visualize.LABEL:, 2 * (s + visualize.GAP):][:, :s]
        for (y, x), k in np.ndenumerate(ids):  # at the centre of each 8 x 8 cell, colour = 2 * blend - image
            cy, cx = 8 * y + 4, 8 * x + 4
            seen.setdefault(k, ([], []))[i].append(2 * p3[cy, cx] - image[cy, cx])
    palette = visualize.prototype_palette(8).astype(int)
    assert any(first and second for first, second in seen.values()), "no prototype in both images"
    for k, (first, second) in seen.items():
        assert all(np.abs(c - palette[k]).max() <= 2 for c in first + second), k
    assert np.abs(palette[:, None] - palette[None]).max(-1)[~np.eye(8, dtype=bool)].min() > 8  # ids stand apart
    assert np.array_equal(visualize.prototype_palette(64)[:8], palette)  # the colour of an id, whatever K

def test_pca_colours_match_an_svd_of_all_positions_of_all_images():
    rng = np.random.default_rng(0)
    scale = np.array([6.0, 4.0, 2.5, 1.0, 0.5, 0.2])  # well separated components
    basis = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    maps = [(rng.normal(size=(h, w, 6)) * scale) @ basis.T + 3.0 for h, w in ((4, 5), (2, 3), (6, 6))]
    x = np.concatenate([m.reshape(-1, 6) for m in maps])
    x = x - x.mean(0)
    vt = np.linalg.svd(x, full_matrices=False)[2][:3]
    vt = vt * np.sign(vt[np.arange(3), np.abs(vt).argmax(1)])[:, None]  # the largest loading positive
    p = x @ vt.T
    lo, hi = np.percentile(p, 1, axis=0), np.percentile(p, 99, axis=0)
    expected = np.round(np.clip((p - lo) / (hi - lo), 0, 1) * 255)
    got = np.concatenate([c.reshape(-1, 3) for c in visualize.pca_colours(maps)]).astype(int)
    assert [c.shape for c in visualize.pca_colours(maps)] == [(4, 5, 3), (2, 3, 3), (6, 6, 3)]
    assert np.abs(got - expected).max() <= 1

def test_visualize_pca_colours_are_deterministic_and_fitted_on_all_images(pretrained_runs, tmp_path, one_thread):
    ckpt = pretrained_runs["densecl-sl-fcn"]
    for name in ("a", "b"):
        write_image(str(tmp_path / f"{name}.png"))
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in ("one", "two"):
        run_visualize("--checkpoint", ckpt, "--images", a, b, a, "--output", tmp_path / out)
    names = ["000-a.png", "001-b.png", "002-a.png", "summary.png"]
    assert sorted(os.listdir(tmp_path / "one")) == names
    assert all((tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes() for n in names)
    strips = [np.asarray(Image.open(tmp_path / "one" / n)) for n in names[:3]]
    assert strips[0].shape == (visualize.LABEL + 64, 3 * 64 + 2 * visualize.GAP, 3)  # the image, c5, fcn
    assert np.array_equal(strips[0], strips[2]) and not np.array_equal(strips[0], strips[1])
    run_visualize("--checkpoint", ckpt, "--images", a, "--output", tmp_path / "alone")
    alone = np.asarray(Image.open(tmp_path / "alone" / "000-a.png"))
    assert not np.array_equal(alone, strips[0])  # one fit over the call's images, not one per image

def test_visualize_bad_input_is_one_line_before_any_work(tmp_path, capsys):
    good = str(tmp_path / "last.pt")
    fake_checkpoint(good)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    finetuned = fake_finetuned(str(tmp_path / "seed0.pt"))
    cases = ((["--checkpoint", finetuned], f"--checkpoint {finetuned}: not a pretrain.py checkpoint (a fine-tuned"),
             (["--checkpoint", tmp_path / "notes.txt"], "notes.txt: cannot be read as a PyTorch checkpoint"),
             (["--checkpoint", tmp_path / "nope.pt"], f"--checkpoint {tmp_path / 'nope.pt'}: no such file"),
             (["--checkpoint", good, "--images", tmp_path / "empty"], f"--images {tmp_path / 'empty'}: no images"),
             (["--checkpoint", good, "--images", tmp_path / "nope.jpg"], "nope.jpg: no such file or folder"),
             (["--checkpoint", good, "--images", tmp_path / "broken"],
              f"none of the 1 files can be decoded (first: {tmp_path / 'broken' / 'x.jpg'})"),
             (["--checkpoint", good, "--size", 16], "--size 16: must be at least 32"),
             (["--checkpoint", good, "--output", tmp_path / "notes.txt" / "viz"], "notes.txt is a file"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            run_visualize(*argv, *([] if "--output" in argv else ["--output", tmp_path / "viz"]))
        lines = capsys.readouterr().err.splitlines()
        assert e.value.code == 2 and lines[-1].startswith("error: ") and message in lines[-1], (message, lines)
        assert len(lines) == 1 + ("broken" in str(argv)), lines  # the undecodable file: its warning, then the error
    assert not (tmp_path / "viz").exists()

def test_visualize_skips_an_undecodable_image_with_a_warning(pretrained_runs, tmp_path, capsys, one_thread):
    write_image(str(tmp_path / "in" / "a.png"))
    (tmp_path / "in" / "b.jpg").write_bytes(b"\xff\xd8\xff truncated")
    write_image(str(tmp_path / "in" / "c.png"))
    run_visualize("--checkpoint", pretrained_runs["ml-fpn"], "--images", tmp_path / "in", "--output",
                  tmp_path / "viz")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "b.jpg" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: cannot decode image {tmp_path / 'in' / 'b.jpg'}: ")
    assert warnings[0].endswith("(skipped)")
    assert sorted(os.listdir(tmp_path / "viz")) == ["000-a.png", "001-c.png", "summary.png"]
    assert Image.open(tmp_path / "viz" / "summary.png").height == visualize.LABEL + 2 * 64 + visualize.GAP

def test_prediction_picture_uses_the_dataset_palette_and_grey_for_ignore():
    voc, city = eval_module.class_palette("voc", 21), eval_module.class_palette("cityscapes", 19)
    # the published colours: the VOC devkit's labelcolormap, cityscapesScripts' labels.py
    assert [tuple(voc[i]) for i in (0, 1, 7, 15, 20)] == [(0, 0, 0), (128, 0, 0), (128, 128, 128), (192, 128, 128),
                                                          (0, 64, 128)]
    assert [tuple(city[i]) for i in (0, 10, 13, 18)] == [(128, 64, 128), (70, 130, 180), (0, 0, 142), (119, 11, 32)]
    assert np.array_equal(eval_module.class_palette("synthetic", 9)[:9], voc[:9])
    for lut, k in ((voc, 21), (city, 19), (eval_module.class_palette("folder", 255), 255)):
        assert tuple(lut[IGNORE_INDEX]) == (224, 224, 224) and not (lut[:k] == lut[IGNORE_INDEX]).all(1).any()
    mean, std = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(data.IMAGENET_STD).view(3, 1, 1)
    image = ((torch.tensor([0.2, 0.4, 0.6]).view(3, 1, 1) - mean) / std).expand(3, 1, 2)  # smaller than the mask
    mask = torch.tensor([[0, 1, 255], [15, 20, 255]])
    pred = torch.tensor([[1, 1, 0], [15, 0, 7]])
    picture = np.asarray(eval_module.prediction_picture(image, mask, pred, voc))
    assert picture.shape == (2, 9, 3)
    assert (picture[:, :3] == [51, 102, 153]).all()  # the image, resized to the mask's size
    grey = [224, 224, 224]
    assert picture[:, 3:6].tolist() == [[[0, 0, 0], [128, 0, 0], grey], [[192, 128, 128], [0, 64, 128], grey]]
    assert picture[:, 6:].tolist() == [[[128, 0, 0], [128, 0, 0], [0, 0, 0]],
                                       [[192, 128, 128], [0, 0, 0], [128, 128, 128]]]

def test_eval_save_predictions_draws_every_image_with_its_mask(tmp_path, capsys, one_thread):
    root = make_folder(str(tmp_path / "data"))  # masks: rows cycling through 0, 1, 2, 255
    ckpt = fake_finetuned(str(tmp_path / "seed0.pt"), num_classes=3)
    eval_main(eval_parser().parse_args(["--checkpoint", ckpt, "--dataset", "folder", "--data-root", root,
                                        "--workers", "0", "--save-predictions", str(tmp_path / "pictures")]))
    assert "2 pictures in" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "pictures")) == ["00000.png", "00001.png"]
    colours = {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0], 255: [224, 224, 224]}  # VOC's colour map, ignore grey
    for name, image in (("00000.png", "a.jpg"), ("00001.png", "sub/b.jpg")):
        picture = np.asarray(Image.open(tmp_path / "pictures" / name), dtype=int)
        assert picture.shape == (32, 120, 3)
        rgb = np.asarray(data.load_rgb(os.path.join(root, "images", "test", image)), dtype=int)
        assert np.abs(picture[:, :40] - rgb).max() <= 1
        assert all((picture[y, 40:80] == colours[(0, 1, 2, 255)[y % 4]]).all() for y in range(32))
        assert {tuple(c) for c in picture[:, 80:].reshape(-1, 3)} <= {tuple(colours[k]) for k in (0, 1, 2)}


# ---------------------------------------------------------------- tools: bench.py

def test_bench_runs_a_tiny_config_and_writes_json(tmp_path):
    out = tmp_path / "out.json"
    parser = bench.get_args_parser()
    a = parser.parse_args(["--variants", "ml-fpn", "--arch", "resnet18", "--image-size", "32", "--batch-size", "2",
                           "--steps", "1", "--warmup", "0", "--dim-hidden", "32", "--num-prototypes", "8",
                           "--baseline", "--checkpoint-heads", "--precision", "fp32", "--json", str(out)])
    bench.main(bench.check_args(a, parser))
    records = json.loads(out.read_text())
    assert [(r["variant"], r["config"]) for r in records] == [
        ("ml-fpn", "authors (fp32)"), ("ml-fpn", "fp32+ckpt_heads")]  # NHWC is for CUDA
    ops = records[1]["dispatched_ops"]
    assert ops["parameters"] > 100 and 0 < ops["optimizer_step"] < 40 and ops["ema_update"] == 1
    for r in records:
        assert {"variant", "config", "img_per_s", "ms_per_step", "peak_mem_mb", "gflop_per_img"} <= set(r)
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["peak_mem_mb"] > 0
        assert sum(r["flop_share"].values()) == pytest.approx(1.0)
        assert r["flop_share"]["encoder"] > 0 and r["flop_share"]["decoder"] > 0
        assert set(r["head_flop_share"]) == {"p2 head", "p2 predictor", "p3 head", "p3 predictor", "p4 head",
                                             "p4 predictor", "p5 head", "p5 predictor"}
    base, ours = records
    assert ours["speedup_vs_baseline"] == pytest.approx(ours["img_per_s"] / base["img_per_s"])
    # the checkpointed heads run their forward twice: 4/3 of the student heads' FLOPs
    assert ours["gflop_per_img"] > base["gflop_per_img"]

def test_bench_rejects_unknown_variants_before_work(capsys):
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit):
        bench.check_args(parser.parse_args(["--variants", "ml-fpn,dino"]), parser)
    assert "--variants: unknown dino" in capsys.readouterr().err

def test_bench_rejects_memory_estimates_of_what_it_does_not_count(capsys):
    parser = bench.get_args_parser()
    with pytest.raises(SystemExit):
        bench.check_args(parser.parse_args(["--estimate-memory", "--baseline"]), parser)
    assert "--estimate-memory counts our training step only" in capsys.readouterr().err

def test_live_bytes_counts_each_storage_while_it_is_alive():
    with bench.LiveBytes() as count:
        a = torch.empty(1000)                         # 4000 bytes
        b = torch.empty(2000)                         # 8000: 12000 alive
        del a                                         # 8000
        view = b[:10]                                 # the same storage: nothing new
        c = torch.empty(500, dtype=torch.bfloat16)    # 1000: 9000 alive
    assert (count.peak, count.live) == (12000, 9000)
    assert view.untyped_storage() is b.untyped_storage() and c.numel() == 500

@pytest.mark.parametrize("variant", ["densecl-ml-fpn", "ml-fpn"])
def test_memory_estimate_on_fake_tensors_counts_what_the_real_step_allocates(variant, tmp_path):
    """The same two steps, counted on real tensors and (bench.py --estimate-memory) on fake ones. DenseCL has no
    data-dependent shape: the counts are equal. SlotCon's slot losses keep the present prototypes only (at most
    4 of the 1024 at c5, 2x2 here: the slot logits are the largest tensors at this size), and the estimate takes
    every prototype as present: an upper bound."""
    parser = bench.get_args_parser()
    a = bench.check_args(parser.parse_args(
        ["--variants", variant, "--arch", "resnet18", "--image-size", "64", "--batch-size", "4", "--steps", "1",
         "--warmup", "0", "--dim-hidden", "32", "--num-prototypes", "1024", "--checkpoint-heads", "--estimate-memory",
         "--json", str(tmp_path / "est.json")]), parser)
    bench.main(a)
    [est] = json.loads((tmp_path / "est.json").read_text())
    assert est["variant"] == variant and est["config"] == "bf16+channels_last+ckpt_heads"
    run = bench.Run(variant, bench.ours_config(a, "cuda"), a, torch.device("cpu"))
    resident = bench.tensor_mb([*run.model.parameters(), *run.model.buffers(), *run.crops, run.coords, run.flags])
    with bench.LiveBytes() as count:
        run.step()
        run.step()
    real = resident + count.peak / 2 ** 20
    assert est["resident_mb"] == pytest.approx(resident) and est["state_mb"] == pytest.approx(run.state_mb())
    grads_and_optimizer = run.state_mb() - bench.tensor_mb([*run.model.parameters(), *run.model.buffers()])
    assert real > resident + grads_and_optimizer  # and activations on top
    if variant.startswith("densecl"):
        assert est["est_peak_mb"] == pytest.approx(real, rel=1e-3)
    else:
        assert real < est["est_peak_mb"] < 3 * real


# ---------------------------------------------------------------- tools: reproduce.py (one --quick run, shared)

ROWS = [("Random init", "none"), ("SlotCon", "encoder"), ("DeCon-SL-SlotCon-FPN", "encoder"),
        ("DeCon-SL-SlotCon-FPN", "encoder+decoder"), ("DeCon-ML-SlotCon-FPN", "encoder"),
        ("DeCon-ML-SlotCon-FPN", "encoder+decoder")]

def _reproduce(out, *flags, rc=0):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "reproduce.py"), "--quick", "--output-dir", str(out),
                           *flags], capture_output=True, text=True, cwd=HERE)
    assert proc.returncode == rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    return out, _reproduce(out).stdout

def test_reproduce_quick_writes_table7_shaped_results(quick_run):
    out, stdout = quick_run
    lines = stdout.strip().splitlines()
    assert len(lines) == 3 + 3 + 6 * 3 + 1 and all("done in" in line for line in lines[:-1])  # one line per stage
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["fractions"] == [0.05, 0.25, 1.0]
    assert [(r["pretraining"], r["transfer"]) for r in results["table"]] == ROWS
    for row in results["table"]:
        assert len(row["cells"]) == 3
        for cell in row["cells"]:
            assert math.isfinite(cell["mean"]) and 0 <= cell["mean"] <= 100 and cell["std"] >= 0
            assert list(cell["per_seed"]) == ["0"] and cell["values"] == [cell["per_seed"]["0"]] == [cell["mean"]]
    assert len(results["stages"]) == 24 and all(s["command"].startswith("python ") for s in results["stages"])
    probes = {r["network"]: r["levels"] for r in results["probes"]}
    assert list(probes) == ["Random init", "SlotCon", "DeCon-SL-SlotCon-FPN", "DeCon-SL-SlotCon-FPN encoder + random "
                            "decoder", "DeCon-ML-SlotCon-FPN", "DeCon-ML-SlotCon-FPN encoder + random decoder"]
    assert list(probes["SlotCon"]) == ["c5", "p2", "p3", "p4", "p5"] and list(probes["DeCon-ML-SlotCon-FPN "
                                                                                   "encoder + random decoder"]) == \
        ["p2", "p3", "p4", "p5"]
    ml = json.loads((out / "probe" / "decon-ml-slotcon-fpn-seed0" / "probe.json").read_text())["levels"]
    assert probes["DeCon-ML-SlotCon-FPN"]["p2"]["linear"]["mean"] == ml["p2"]["checkpoint"]["linear"]["miou"]
    assert probes["Random init"]["p3"]["kmeans"]["mean"] == ml["p3"]["random"]["kmeans"]["miou"]
    md = (out / "results.md").read_text()
    assert "| pre-training | transfer | 5 % | 25 % | 100 % |" in md
    assert "| network | level | linear | k-means | prototypes | fg/bg linear | fg/bg k-means |" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and "+-" in line and line.count("|") == 6]
    assert [tuple(c.strip() for c in line.split("|")[1:3]) for line in table] == ROWS
    assert "python pretrain.py --framework slotcon --decoder fpn --alpha 0.0 --dropout 0.5" in md
    assert "python probe.py --pretrained" in md


def test_reproduce_starts_a_finetune_when_its_own_pretraining_is_done(monkeypatch):
    """Two jobs, pre-trainings A (quick) and B (which finishes only once A's fine-tune has started): B times out
    if the fine-tunes wait for every pre-training. A failed stage stops what is still queued."""
    import reproduce
    started, ran = threading.Event(), []

    def stage(label, cmd, out_dir, done_file, threads, progress, inputs=()):
        ran.append(label)
        if label == "ft A":
            started.set()
        if label == "B" and not started.wait(timeout=30):
            raise AssertionError("the fine-tune of A did not start while B was running")
        if label == "C":
            raise SystemExit("error: C failed")
        return {"command": label, "seconds": 0.0}

    monkeypatch.setattr(reproduce, "run_stage", stage)
    spec = lambda label, *inputs: (label, [], "", f"{label}.done", list(inputs))
    args = argparse.Namespace(jobs=2, threads=1)
    stages = reproduce.run_all([spec("A"), spec("B"), spec("ft B", "B.done"), spec("ft A", "A.done")], args, print)
    assert [s["label"] for s in stages] == ["A", "B", "ft B", "ft A"]
    assert ran.index("ft A") < ran.index("ft B")
    ran.clear()
    args.jobs = 1
    with pytest.raises(SystemExit, match="C failed"):
        reproduce.run_all([spec("C"), spec("ft none"), spec("ft C", "C.done")], args, print)
    assert ran == ["C"]

def _finetune_mtimes(out):
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "finetune").glob("*/results.json")}

def test_reproduce_reuses_finished_stages(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    lines = _reproduce(out).stdout.strip().splitlines()
    assert all("reused" in line for line in lines[:-1]) and len(lines) == 25
    assert _finetune_mtimes(out) == before and len(before) == 18
    with open(out / "results.json") as f:
        assert len(json.load(f)["table"]) == 6

def test_reproduce_refuses_stages_made_with_other_settings(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    err = _reproduce(out, "--finetune-lr", "0.05", rc=1).stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "run with other settings" in err
    assert "--lr 0.02" in err and "use another --output-dir or delete it" in err
    assert _finetune_mtimes(out) == before  # refused before any work

def test_reproduce_redoes_the_finetunes_of_a_redone_pretraining(quick_run):
    out, _ = quick_run
    before = _finetune_mtimes(out)
    ckpt = out / "pretrain" / "slotcon-seed0" / "last.pt"
    later = max(before.values()) + 10**9
    os.utime(ckpt, ns=(later, later))  # as if SlotCon had been pre-trained again after its fine-tunes
    lines = _reproduce(out).stdout.strip().splitlines()
    redone = sorted(line.split("] ")[1].split(":")[0] for line in lines[:-1] if "done in" in line)
    assert redone == [f"finetune SlotCon / encoder / {f} % / seed 0" for f in ("100", "25", "5")] + \
        ["probe SlotCon / seed 0"]
    after = _finetune_mtimes(out)
    assert {k for k in after if after[k] != before[k]} == {f"slotcon-encoder-{f}-seed0" for f in ("0.05", "0.25", "1")}


# ---------------------------------------------------------------- tools: probe.py
CPU = torch.device("cpu")
TINY_PROBE = ["--synthetic-train", "8", "--synthetic-test", "4", "--synthetic-size", "64", "--probe-epochs", "1",
              "--kmeans-restarts", "1", "--kmeans-iters", "3", "--batch-size", "8"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- Hungarian

def test_hungarian_equals_scipy_on_square_rectangular_and_tied_matrices():
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (1, 5), (5, 1), (4, 4), (9, 9), (3, 7), (7, 3), (12, 5), (16, 16)]
    for n, m in shapes * 6:
        for cost in (rng.normal(size=(n, m)), rng.integers(0, 3, (n, m)).astype(float), np.zeros((n, m))):  # ties
            rows, cols = probe.hungarian(cost)
            ref_rows, ref_cols = linear_sum_assignment(cost)
            assert len(rows) == len(cols) == min(n, m)
            assert (np.diff(rows) > 0).all() and len(set(cols.tolist())) == len(cols)  # rows sorted, cols distinct
            assert cols.max() < m and rows.max() < n
            assert cost[rows, cols].sum() == pytest.approx(cost[ref_rows, ref_cols].sum(), abs=1e-9)


def test_hungarian_matching_maximizes_matched_pixels_as_a_brute_force():
    rng = np.random.default_rng(1)
    for k, c in ((5, 5), (3, 5), (6, 4)):
        for _ in range(5):
            table = rng.integers(0, 100, (k, c))
            matching = probe.hungarian_matching(table)
            got = sum(table[r, m] for r, m in enumerate(matching) if m >= 0)
            if k <= c:  # each row to a distinct column
                best = max(sum(table[r, p[r]] for r in range(k)) for p in itertools.permutations(range(c), k))
            else:  # each column to a distinct row
                best = max(sum(table[p[j], j] for j in range(c)) for p in itertools.permutations(range(k), c))
            assert got == best
            assert (matching >= 0).sum() == min(k, c) and len(set(matching[matching >= 0].tolist())) == min(k, c)


def test_hungarian_rejects_what_is_not_a_finite_matrix():
    with pytest.raises(ValueError, match="finite 2-d cost matrix"):
        probe.hungarian(np.array([[0.0, np.inf], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="finite 2-d cost matrix"):
        probe.hungarian(np.zeros(3))


# ---------------------------------------------------------------- matching and mIoU, by hand

def test_hungarian_scores_of_a_hand_made_contingency_matrix():
    table = np.array([[10, 40, 0],   # cluster 0 -> class 1
                      [30, 5, 5],    # cluster 1 -> class 0
                      [0, 5, 15]])   # cluster 2 -> class 2
    matching = probe.hungarian_matching(table)
    assert matching.tolist() == [1, 0, 2]
    # class 0: TP 30, predicted 40, present 40; class 1: 40, 50, 50; class 2: 15, 20, 20
    iou = [30 / (40 + 40 - 30), 40 / (50 + 50 - 40), 15 / (20 + 20 - 15)]
    s = probe.matched_scores(table, matching)
    assert s["iou"] == pytest.approx(iou) and s["miou"] == pytest.approx(np.mean(iou))
    assert s["pixel_acc"] == pytest.approx(85 / 110)
    record = probe.measure_record(table, matching, "hungarian")
    assert record["miou"] == pytest.approx(100 * np.mean(iou), abs=1e-4)
    assert record["contingency"] == table.tolist() and record["matching"] == [1, 0, 2]
    json.dumps(record)


def test_majority_matching_of_more_prototypes_than_classes_by_hand():
    table = np.array([[5, 1, 0],
                      [0, 0, 0],    # an unused prototype: matched to nothing
                      [2, 9, 1],
                      [3, 0, 4]])
    matching = probe.majority_matching(table)
    assert matching.tolist() == [0, -1, 1, 2]
    # predicted 0 = row 0, 1 = row 2, 2 = row 3; classes hold 10, 10 and 5 pixels
    iou = [5 / (6 + 10 - 5), 9 / (12 + 10 - 9), 4 / (7 + 5 - 4)]
    s = probe.matched_scores(table, matching)
    assert s["iou"] == pytest.approx(iou) and s["pixel_acc"] == pytest.approx(18 / 25)
    assert probe.measure_record(table, matching, "majority")["matching"] == [0, None, 1, 2]


def test_pixels_of_an_unmatched_cluster_are_errors():
    table = np.array([[10, 0], [0, 10], [5, 5]])  # three clusters, two classes: one cluster stays unmatched
    matching = probe.hungarian_matching(table)
    assert matching.tolist() == [0, 1, -1]
    s = probe.matched_scores(table, matching)
    assert s["iou"] == pytest.approx([10 / 15, 10 / 15]) and s["pixel_acc"] == pytest.approx(20 / 30)


def test_contingency_upsamples_nearest_and_leaves_out_ignored_pixels():
    ids = torch.tensor([[0, 1], [2, 0]])
    mask = torch.tensor([[0, 0, 1, 1],
                         [0, 255, 1, 2],
                         [2, 2, 0, 0],
                         [2, 1, 255, 0]], dtype=torch.uint8)
    table = probe.contingency([ids], [mask], 3, 3)
    # cluster 0: top-left block (0, 0, 0; 255 left out) and bottom-right (0, 0, 0; 255 left out)
    assert table.tolist() == [[6, 0, 0], [0, 3, 1], [0, 1, 3]]
    assert int(table.sum()) == int((mask != 255).sum())


# ---------------------------------------------------------------- k-means and the linear probe

def test_kmeans_recovers_well_separated_blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(5)[:4] * 10
    labels = torch.randint(4, (600,), generator=g)
    x = centers[labels] + 0.1 * torch.randn(600, 5, generator=g)
    fitted, inertia = probe.kmeans(x, 4, iters=20, restarts=2, seed=3)
    found = probe.squared_distances(x, fitted).argmin(1)
    table = probe.contingency([found], [labels], 4, 4)
    matching = probe.hungarian_matching(table)
    assert (table.numpy() * (np.arange(4)[None] != matching[:, None])).sum() == 0  # only matched cells hold pixels
    assert probe.matched_scores(table, matching)["miou"] == 1.0
    assert inertia == pytest.approx(float(((x - centers[labels]) ** 2).sum()), rel=0.05)
    again, _ = probe.kmeans(x, 4, iters=20, restarts=2, seed=3)
    assert torch.equal(again, fitted)  # seeded
    with pytest.raises(ValueError, match="3 points for 4 clusters"):
        probe.kmeans(x[:3], 4)


def test_sample_positions_draws_distinct_positions_of_the_maps_seeded():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 2, 2, generator=g), torch.randn(3, 6, 1, generator=g)]
    every = torch.cat([f.flatten(1).T for f in feats])  # (30, 3)
    assert torch.equal(probe.sample_positions(feats, 30, 0), every)
    sample = probe.sample_positions(feats, 11, 0)
    where = [int(((every - row) == 0).all(1).nonzero()) for row in sample]  # each row is one position
    assert sample.shape == (11, 3) and len(set(where)) == 11
    assert torch.equal(probe.sample_positions(feats, 11, 0), sample)
    assert not torch.equal(probe.sample_positions(feats, 11, 1), sample)


def test_bilinear_weights_upsample_as_f_interpolate():
    g = torch.Generator().manual_seed(0)
    for (h, w), size in (((3, 3), (128, 128)), ((5, 7), (13, 11)), ((4, 6), (4, 6)), ((2, 9), (64, 40))):
        x = torch.randn(2, 3, h, w, generator=g)
        ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        got = probe.bilinear_weights(h, size[0], CPU) @ x @ probe.bilinear_weights(w, size[1], CPU).T
        assert torch.allclose(got, ref, atol=1e-6)


def toy_level(n=12, classes=4, seed=0, constant=False):
    """Features (6, 8, 8) whose first 4 channels are 4 x one-hot of the label of 2x2-cell blocks (+ noise and two
    constant channels), or all ones; masks (16, 16): those labels at twice the size, 255 on the first row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n, 4, 4), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    feats = 4 * F.one_hot(labels, classes).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(n, classes, 8, 8,
                                                                                             generator=g)
    feats = torch.cat([feats, torch.ones(n, 2, 8, 8)], 1)
    if constant:
        feats = torch.ones_like(feats)
    masks = labels.repeat_interleave(2, 1).repeat_interleave(2, 2).to(torch.uint8)
    masks[:, 0] = 255
    return list(feats), list(masks)


def probe_args(**kw):
    return argparse.Namespace(**{**dict(probe_epochs=20, probe_lr=0.05, probe_batch_size=4, batch_size=8, seed=0,
                                        kmeans_samples=10 ** 6, kmeans_iters=30, kmeans_restarts=3), **kw})


def test_features_that_encode_the_label_are_probed_and_clustered_perfectly():
    train_feats, train_masks = toy_level(seed=0)
    test_feats, test_masks = toy_level(seed=1)
    out = probe.probe_level(train_feats, test_feats, None, None, {"train": train_masks, "test": test_masks}, 4, True,
                            probe_args(), CPU, "toy")
    assert list(out) == ["linear", "kmeans", "linear_fgbg", "kmeans_fgbg"]
    assert out["linear"]["miou"] > 95 and out["linear_fgbg"]["miou"] > 95
    kmeans = out["kmeans"]
    assert kmeans["miou"] == 100.0 and kmeans["pixel_acc"] == 100.0 and kmeans["matching_kind"] == "hungarian"
    table = np.array(kmeans["contingency"])
    assert (table[np.arange(4), kmeans["matching"]] == table.sum(1)).all()  # diagonal after matching
    labelled = sum(int((m != 255).sum()) for m in test_masks)
    for name in out:
        assert np.sum(out[name]["contingency"]) == labelled


def test_channel_stats_are_the_mean_and_std_over_every_position():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 10.0, 100.0])[:, None, None]
    feats = [torch.randn(3, 4, 5, generator=g) * scale + 7, torch.randn(3, 2, 6, generator=g) * scale - 1]
    positions = torch.cat([f.flatten(1) for f in feats], 1)  # (C, all positions)
    mean, std = probe.channel_stats(feats)
    assert torch.allclose(mean, positions.mean(1), atol=1e-5)
    assert torch.allclose(std, positions.std(1, unbiased=False), rtol=1e-5)


def test_the_standardized_probe_ignores_a_per_channel_scale_and_shift_of_the_features():
    feats, masks = toy_level(seed=0)
    test_feats, test_masks = toy_level(seed=1)
    a = torch.tensor([1.0, 1000.0, 0.001, 5.0, 0.2, 30.0])[:, None, None]
    b = torch.tensor([0.0, -50.0, 3.0, 1e3, 0.0, 7.0])[:, None, None]
    preds = []
    for f, t in ((feats, test_feats), ([a * x + b for x in feats], [a * x + b for x in test_feats])):
        conv, mean, std = probe.train_linear_probe(f, masks, 4, False, 3, 0.05, 4, 0, CPU)
        preds.append(torch.stack(probe.linear_predictions(conv, mean, std, t, test_masks, 4, False, 8, CPU)[0]))
    assert (preds[0] == preds[1]).float().mean() > 0.999


def test_linear_probe_on_constant_features_stays_at_chance():
    feats, masks = toy_level(seed=0, constant=True)
    test_feats, test_masks = toy_level(seed=1, constant=True)
    conv, mean, std = probe.train_linear_probe(feats, masks, 4, False, 20, 0.05, 4, 0, CPU)
    (pred,) = probe.linear_predictions(conv, mean, std, test_feats, test_masks, 4, False, 8, CPU)
    counts = torch.bincount(torch.cat([m[m != 255] for m in masks]).long(), minlength=4)
    assert all(torch.equal(p, torch.full_like(p, int(counts.argmax()))) for p in pred)  # the training majority
    table = probe.contingency(pred, test_masks, 4, 4)
    assert probe.matched_scores(table, np.arange(4))["miou"] <= 1 / 4 + 1e-9


def test_probe_size_keeps_the_short_side_and_rounds_the_long_one_to_32():
    assert probe.probe_size(128, 128, 96) == (96, 96)
    assert probe.probe_size(500, 375, 224) == (288, 224)   # 298.7 -> 288
    assert probe.probe_size(375, 500, 224) == (224, 288)
    assert probe.probe_size(40, 200, 32) == (32, 160)


# ---------------------------------------------------------------- end to end, on real pretrain.py checkpoints

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """last.pt of one-step pretrain.py runs (in a subprocess, as a user runs it): DeCon-ML-SlotCon-FPN and the
    encoder-only SlotCon."""
    paths = {}
    for name in ("ml-fpn", "slotcon"):
        out = tmp_path_factory.mktemp(name)
        r = run_pretrain(name, max_steps=1, output_dir=out)
        assert r.returncode == 0, r.stderr[-2000:]
        paths[name] = str(out / "last.pt")
    return paths


def labelled_test_pixels():
    masks = build_dataset("synthetic", "test", synthetic_lengths=(8, 32, 4), synthetic_size=64)
    return sum(int((np.asarray(masks[i][1]) != 255).sum()) for i in range(len(masks)))


def table_rows(stdout):
    """The printed table: {(level, network): [cells]}, the level carried down to its other rows."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("level "))
    rows, level = {}, None
    for line in lines[start + 1:]:
        if line.startswith("wrote "):
            break
        parts = line.split()
        if not line.startswith(" "):
            level, parts = parts[0], parts[1:]
        rows[level, parts[0]] = parts[1:]
    return lines[start], rows


def recomputed_miou(record):
    """mIoU (%) from a record's contingency and matching, a second way: per class, TP / (GT + predicted - TP)."""
    table = np.array(record["contingency"], dtype=float)
    match = np.array([-1 if m is None else m for m in record["matching"]])
    ious = []
    for c in range(table.shape[1]):
        tp = table[match == c, c].sum()
        gt, pred = table[:, c].sum(), table[match == c].sum()
        if gt + pred > 0:
            ious.append(tp / (gt + pred - tp))
    return 100 * np.mean(ious)


def test_probe_of_a_decon_ml_fpn_checkpoint_end_to_end(checkpoints, tmp_path):
    out = tmp_path / "probe"
    r = subprocess.run([sys.executable, os.path.join(HERE, "probe.py"), "--pretrained", checkpoints["ml-fpn"],
                        *TINY_PROBE, "--output-dir", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=HERE, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads((out / "probe.json").read_text())
    levels = results["levels"]
    assert list(levels) == ["c5", "p2", "p3", "p4", "p5"]
    assert list(levels["c5"]) == ["checkpoint", "random"]  # at c5 the control is the checkpoint
    for lvl in ("p2", "p3", "p4", "p5"):
        assert list(levels[lvl]) == ["checkpoint", "random", "enc+rand-dec"]
    assert results["classes"][0] == "background" and len(results["classes"]) == 9 and results["size"] == 64
    assert results["args"]["pretrained"] == checkpoints["ml-fpn"] and results["notes"] == []
    pixels = labelled_test_pixels()
    shapes = {"linear": (9, 9), "kmeans": (9, 9), "prototypes": (8, 9), "linear_fgbg": (2, 2), "kmeans_fgbg": (2, 2)}
    for lvl, inits in levels.items():
        for init, measures in inits.items():
            # alpha 0: no c5 head, so no prototypes there; the heads of p2..p5 give theirs
            assert list(measures) == [m for m in probe.MEASURES if m != "prototypes" or lvl != "c5"]
            for name, record in measures.items():
                assert np.array(record["contingency"]).shape == shapes[name]
                assert np.sum(record["contingency"]) == pixels
                assert len(record["matching"]) == shapes[name][0]
                assert record["miou"] == pytest.approx(recomputed_miou(record), abs=1e-3)
                assert len(record["per_class_iou"]) == shapes[name][1]
            assert measures["kmeans"]["matching_kind"] == "hungarian" and measures["linear"]["matching"] == list(
                range(9))
        if lvl != "c5":
            assert inits["checkpoint"]["prototypes"]["matching_kind"] == "majority"

    head, rows = table_rows(r.stdout)
    assert head.split() == ["level", "network", "linear", "k-means", "prototypes", "fg/bg", "linear", "fg/bg",
                            "k-means"]
    assert set(rows) == {(lvl, init) for lvl in levels for init in levels[lvl]}
    for (lvl, init), cells in rows.items():
        want = [f"{levels[lvl][init][m]['miou']:.2f}" if m in levels[lvl][init] else "-" for m in probe.MEASURES]
        assert cells == want
    assert "majority (many-to-one)" in r.stdout and "Hungarian (one-to-one)" in r.stdout
    assert "standardized with the training set's per-channel mean and std" in r.stdout
    assert f"wrote {out / 'probe.json'}" in r.stdout


def test_the_three_networks_differ_only_where_they_should(checkpoints):
    state, pre = read_checkpoint(checkpoints["ml-fpn"])
    trained = build_decon(state, pre).teacher
    branches, levels, at, heads, notes = probe.probe_networks(state, pre, "fpn", seed=0)
    ckpt, random, control = branches["checkpoint"], branches["random"], branches["enc+rand-dec"]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert same(ckpt.encoder, trained.encoder) and same(ckpt.decoder, trained.decoder)
    assert same(control.encoder, trained.encoder) and same(control.decoder, random.decoder)
    assert not same(random.encoder, trained.encoder) and not same(random.decoder, trained.decoder)
    assert same(ckpt.heads["p2"], trained.heads["p2"]) and not same(random.heads["p2"], trained.heads["p2"])
    again = probe.probe_networks(state, pre, "fpn", seed=0)[0]["random"]
    assert same(again, random) and not same(probe.probe_networks(state, pre, "fpn", seed=1)[0]["random"], random)
    assert levels == ["c5", "p2", "p3", "p4", "p5"] and heads == ["p2", "p3", "p4", "p5"]
    assert at == {"checkpoint": levels, "random": levels, "enc+rand-dec": levels[1:]}
    assert not any(b.training for b in branches.values())


def run_main(*argv):
    return probe.main(probe.get_args_parser().parse_args([str(a) for a in argv]))


def test_a_probe_folder_in_use_by_another_job_is_refused_before_any_work(checkpoints, tmp_path, capsys):
    out = tmp_path / "probe"
    holder = hold_folder(out)
    try:
        with pytest.raises(SystemExit) as e:
            run_main("--pretrained", checkpoints["ml-fpn"], *TINY_PROBE, "--output-dir", out)
        assert e.value.code == 2 and sorted(os.listdir(out)) == [".lock"]
        assert capsys.readouterr().err.startswith(f"error: --output-dir {out} is in use by another job (host ")
    finally:
        holder.kill()
        holder.wait()


def test_an_encoder_only_checkpoint_gets_the_decoder_levels_of_a_random_decoder(checkpoints, tmp_path, capsys):
    results = run_main("--pretrained", checkpoints["slotcon"], *TINY_PROBE, "--no-binary", "--output-dir", tmp_path)
    out = capsys.readouterr().out
    levels = results["levels"]
    assert list(levels) == ["c5", "p2", "p3", "p4", "p5"]
    assert list(levels["c5"]) == ["checkpoint", "random"] and list(levels["c5"]["checkpoint"]) == [
        "linear", "kmeans", "prototypes"]  # the c5 head of an encoder-only SlotCon
    for lvl in ("p2", "p3", "p4", "p5"):
        assert list(levels[lvl]) == ["checkpoint", "random", "enc+rand-dec"]
        assert levels[lvl]["checkpoint"] == levels[lvl]["enc+rand-dec"]  # one network: the encoder + random FPN
        assert list(levels[lvl]["random"]) == ["linear", "kmeans"]  # no fg/bg, no trained head at p2..p5
    assert "encoder-only checkpoint: p2, p3, p4, p5 through a random FPN" in out
    on_disk = json.loads((tmp_path / "probe.json").read_text())
    assert on_disk["levels"]["p3"]["checkpoint"]["kmeans"]["contingency"] == \
        levels["p3"]["enc+rand-dec"]["kmeans"]["contingency"]

    fcn = run_main("--pretrained", checkpoints["slotcon"], *TINY_PROBE, "--no-binary", "--decoder", "fcn",
                   "--output-dir", tmp_path / "fcn")
    assert list(fcn["levels"]) == ["c5", "fcn"]


# ---------------------------------------------------------------- one-line errors, before any work

def test_bad_inputs_stop_with_one_line_before_any_work(checkpoints, tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    blocker = tmp_path / "file"
    blocker.write_text("")
    ckpt = checkpoints["ml-fpn"]
    misfit = tmp_path / "misfit.pt"
    saved = torch.load(ckpt, weights_only=True)
    torch.save({**saved, "args": {**saved["args"], "dim_hidden": 48}}, misfit)
    cases = [
        (["--pretrained", tmp_path / "missing.pt"], f"--pretrained {tmp_path / 'missing.pt'}: no such file"),
        (["--pretrained", junk], f"--pretrained {junk}: cannot be read as a PyTorch checkpoint"),
        (["--pretrained", plain], f"--pretrained {plain}: not a pretrain.py checkpoint"),
        (["--pretrained", misfit], f"--pretrained {misfit}: its weights do not fit its pre-training args (Error(s) in "
                                   "loading state_dict for DeCon:"),
        (["--pretrained", ckpt, "--output-dir", blocker / "out"], f"--output-dir {blocker / 'out'} cannot be created: "
                                                                  f"{blocker} is a file"),
        (["--pretrained", ckpt, "--size", "48"], "--size 48: must be a positive multiple of 32"),
        (["--pretrained", ckpt, "--decoder", "fcn"], "--decoder fcn: the checkpoint has its own fpn decoder"),
        (["--pretrained", ckpt, "--dataset", "voc"], "--data-root is required for --dataset voc"),
        (["--pretrained", ckpt, "--dataset", "voc", "--data-root", tmp_path / "nope"],
         f"--data-root {tmp_path / 'nope'}: no such folder"),
        (["--pretrained", ckpt, "--num-classes", "3"], "--num-classes is for --dataset folder"),
        (["--pretrained", ckpt, "--probe-epochs", "0"], "--probe-epochs must be at least 1"),
    ]
    for argv, message in cases:
        out = tmp_path / "never"
        with pytest.raises(SystemExit) as e:
            run_main(*argv, *(["--output-dir", out] if "--output-dir" not in argv else []))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith(f"error: {message}"), err
        assert err.count("\n") == 1 and not out.exists(), err


def test_a_folder_dataset_of_mixed_sizes_with_ignored_pixels(checkpoints, tmp_path, capsys):
    """--dataset folder: images of two sizes (batched by shape), masks with 255, class names from classes.txt."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 3)):
        for i in range(n):
            h, w = (48, 64) if i % 2 else (70, 50)
            os.makedirs(tmp_path / "data" / "images" / split, exist_ok=True)
            os.makedirs(tmp_path / "data" / "masks" / split, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                tmp_path / "data" / "images" / split / f"{i}.png")
            mask = rng.integers(0, 3, (h, w)).astype(np.uint8)
            mask[:3] = 255
            Image.fromarray(mask).save(tmp_path / "data" / "masks" / split / f"{i}.png")
    (tmp_path / "data" / "classes.txt").write_text("sky\nroad\ncar\n")
    results = run_main("--pretrained", checkpoints["ml-fpn"], "--dataset", "folder", "--data-root", tmp_path / "data",
                       "--probe-epochs", "1", "--kmeans-restarts", "1", "--kmeans-iters", "3", "--output-dir",
                       tmp_path / "out")
    capsys.readouterr()
    assert results["classes"] == ["sky", "road", "car"] and results["images"] == {"train": 4, "test": 3}
    pixels = sum(int((np.asarray(Image.open(tmp_path / "data" / "masks" / "test" / f"{i}.png")) != 255).sum())
                 for i in range(3))
    for inits in results["levels"].values():
        for measures in inits.values():
            assert all(np.sum(r["contingency"]) == pixels for r in measures.values())
