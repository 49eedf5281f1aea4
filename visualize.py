"""Pictures of a pre-training: what the teacher assigns at each supervised level (c5, fcn, p2..p5).

    python visualize.py --checkpoint runs/demo/last.pt --output viz/
    python visualize.py --checkpoint runs/decon-ml/last.pt --images photos/ a.jpg --output viz/

Per image one PNG strip: the image, then one panel per level, upsampled with nearest neighbours so each level's grid
stays visible. SlotCon: the teacher's argmax prototype at each position (the grouping that forms its slots), one
fixed colour per prototype id, blended over the image. DenseCL: the first three principal components of the
teacher's dense projections as RGB, fitted on all images of the call so that colours compare across images.
`summary.png` holds every image as a row and the levels as columns. Without --images: built-in scenes of the
segmentation test split (seed 102), not among pre-training's (--seed 0).
"""
import colorsys
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import utils
from data import IMAGE_EXTENSIONS, SyntheticScenes, find_files, load_rgb, to_tensor
from models import FRAMEWORKS
from seg_data import SYNTHETIC_SPLIT_SEEDS
from weights import build_decon, read_checkpoint

LABEL, GAP = 14, 2  # px: the band of level names above the panels, the white space between panels
BLEND = 0.5  # weight of the prototype colours over the image


# ---------------------------------------------------------------- the teacher's maps

@torch.no_grad()
def teacher_maps(model, x):
    """One normalized image (1, 3, S, S) -> {level: map} in the model's level order. SlotCon: (h, w) int64 argmax
    prototype ids of the teacher's scores; DenseCL: (h, w, D) float64 dense projections of the teacher."""
    feats = model.teacher.features(x)
    maps = {}
    for lvl, head in model.teacher.heads.items():
        out = head(feats[lvl])
        if FRAMEWORKS[model.framework].picture == "prototypes":
            maps[lvl] = out.scores[0].argmax(0).numpy()                                      # (B, K, h, w) scores
        else:
            h, w = feats[lvl].shape[-2:]
            maps[lvl] = out.grid[0].T.reshape(h, w, -1).double().numpy()                      # (B, D, h * w) grid
    return maps


# ---------------------------------------------------------------- colours

def prototype_palette(k):
    """(k, 3) uint8: the colour of prototype i, the same in every picture. Hues a golden-ratio step apart (never
    repeating), with two saturation and two brightness levels, so that neighbouring ids stand apart."""
    hsv = [((i * 0.6180339887498949) % 1, 0.55 if i % 2 else 0.95, 0.7 if i // 2 % 2 else 1.0) for i in range(k)]
    return np.round(np.array([colorsys.hsv_to_rgb(*c) for c in hsv]).reshape(k, 3) * 255).astype(np.uint8)


def pca_colours(maps):
    """DenseCL: a list of (h, w, D) maps of one level, one per image -> a list of (h, w, 3) uint8. The first three
    principal components of all positions of all images; each component's sign makes its largest loading positive
    (the same colours every call), and its 1st-99th percentiles over all images map to 0-255."""
    x = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps])                             # (positions, D)
    x = x - x.mean(0)
    _, vectors = np.linalg.eigh(x.T @ x)                                                       # ascending
    top = vectors[:, ::-1][:, :3]                                                              # (D, 3)
    top = top * np.sign(top[np.abs(top).argmax(0), np.arange(3)])
    p = x @ top
    lo, hi = np.percentile(p, 1, axis=0), np.percentile(p, 99, axis=0)
    rgb = np.round(np.clip((p - lo) / np.maximum(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)
    sizes = np.cumsum([m.shape[0] * m.shape[1] for m in maps])[:-1]
    return [part.reshape(m.shape[0], m.shape[1], 3) for part, m in zip(np.split(rgb, sizes), maps)]


def level_colours(model, maps):
    """{level: list of maps, one per image} -> {level: list of (h, w, 3) uint8}."""
    if FRAMEWORKS[model.framework].picture == "pca":
        return {lvl: pca_colours(m) for lvl, m in maps.items()}
    palettes = {lvl: prototype_palette(model.teacher.heads[lvl].prototypes.num_embeddings) for lvl in maps}
    return {lvl: [palettes[lvl][ids] for ids in m] for lvl, m in maps.items()}


# ---------------------------------------------------------------- pictures

def panel(image, colours, blend):
    """image: PIL (S, S); colours (h, w, 3) uint8 -> PIL (S, S): the colours upsampled with nearest neighbours (one
    block per grid cell), blended over the image with weight `blend` (1: the colours alone)."""
    top = Image.fromarray(colours).resize(image.size, Image.NEAREST)
    return top if blend == 1 else Image.blend(image, top, blend)


def grid_picture(rows, labels):
    """rows: lists of PIL (S, S) panels, one per column -> PIL RGB with `labels` above the columns, white between:
    (columns * S + (columns - 1) * GAP) x (LABEL + rows * S + (rows - 1) * GAP)."""
    s, cols = rows[0][0].size[0], len(labels)
    out = Image.new("RGB", (cols * s + (cols - 1) * GAP, LABEL + len(rows) * s + (len(rows) - 1) * GAP), "white")
    draw, font = ImageDraw.Draw(out), ImageFont.load_default()
    for c, label in enumerate(labels):
        draw.text((c * (s + GAP) + 2, 1), label, fill="black", font=font)
        for r, row in enumerate(rows):
            out.paste(row[c], (c * (s + GAP), LABEL + r * (s + GAP)))
    return out


def draw(model, images, size):
    """PIL RGB images -> (one strip per image, the summary), both grid_pictures: the image resized to size x size,
    then one panel per level in the model's order."""
    images = [im.resize((size, size), Image.BICUBIC) for im in images]
    maps = [teacher_maps(model, to_tensor(im)[None]) for im in images]
    colours = level_colours(model, {lvl: [m[lvl] for m in maps] for lvl in model.levels})
    blend = BLEND if FRAMEWORKS[model.framework].picture == "prototypes" else 1
    rows = [[im] + [panel(im, colours[lvl][i], blend) for lvl in model.levels] for i, im in enumerate(images)]
    labels = ["image"] + [f"{lvl} {m.shape[0]}x{m.shape[1]}" for lvl, m in maps[0].items()]
    return [grid_picture([row], labels) for row in rows], grid_picture(rows, labels)


# ---------------------------------------------------------------- inputs

def list_inputs(paths):
    """--images: files and folders (searched recursively) -> image paths, in the order given (each folder sorted).
    Raises ValueError naming a path that does not exist or a folder without images."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = find_files(path, IMAGE_EXTENSIONS)[0]
            if not found:
                raise ValueError(f"--images {path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise ValueError(f"--images {path}: no such file or folder")
    return files


def read_images(files):
    """Decode each file: [(name, PIL RGB)] of those that decode; each one that does not is a warning line naming
    it. None decoding is a ValueError naming the first."""
    images = []
    for path in files:
        try:
            images.append((os.path.splitext(os.path.basename(path))[0], load_rgb(path)))
        except OSError as e:
            print(f"warning: {e} (skipped)", file=sys.stderr, flush=True)
    if not images:
        raise ValueError(f"--images: none of the {len(files)} files can be decoded (first: {files[0]})")
    return images


# ---------------------------------------------------------------- command line

def get_args_parser():
    p = utils.ArgumentParser("visualize.py", description="Pictures of the teacher's assignments at every "
                                                         "supervised level of a pretrain.py checkpoint.")
    a = p.add_argument
    a("--checkpoint", required=True, help="a last.pt written by pretrain.py")
    a("--images", nargs="+", default=None, help="image files and folders (default: the built-in scenes)")
    a("--scenes", type=int, default=4, help="how many built-in scenes without --images")
    a("--size", type=int, default=None, help="side images are resized to (default: the pre-training's)")
    a("--output", default="viz", help="folder of the pictures (NNN-NAME.png and summary.png)")
    return p


def main(args):
    try:
        state, pre = read_checkpoint(args.checkpoint)
        size = args.size or pre["image_size"]
        if size < 32 or (pre["decoder"] == "fpn" and size % 32):
            raise ValueError(f"--size {size}: must be at least 32, and a multiple of 32 for an FPN")
        if args.images:
            images = read_images(list_inputs(args.images))
        else:
            scenes = SyntheticScenes(args.scenes, size=max(128, size), seed=SYNTHETIC_SPLIT_SEEDS["test"])
            images = [(f"scene{i}", scenes[i]) for i in range(len(scenes))]
        if not images:
            raise ValueError(f"--scenes {args.scenes}: nothing to draw")
        if problem := utils.unwritable(args.output):
            raise ValueError(f"--output {problem}")
    except ValueError as e:
        utils.fail(e)
    model = build_decon(state, pre)
    strips, summary = draw(model, [im for _, im in images], size)
    os.makedirs(args.output, exist_ok=True)
    for i, ((name, _), strip) in enumerate(zip(images, strips)):
        strip.save(os.path.join(args.output, f"{i:03d}-{name}.png"))
    summary.save(os.path.join(args.output, "summary.png"))
    print(f"wrote {len(strips)} pictures and summary.png to {args.output} ({pre['framework']}, levels "
          f"{' '.join(model.levels)}, {size} px)")
    return strips, summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
