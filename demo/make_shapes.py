#!/usr/bin/env python
"""Generate the demo dataset: coloured circles, squares and triangles on a light background.

    python demo/make_shapes.py data/shapes            # 2000 images at 32x32, skipped if the folder is complete

The images are a deterministic function of --seed, so every machine trains on the same data.
"""

import argparse
import os
import random

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 180, 20), (150, 60, 200)]
SHAPES = ("circle", "square", "triangle")


def draw_shape(rng, size):
    image = Image.new("RGB", (size, size), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    # Large, roughly centred shapes: a few minutes of CPU training is enough to learn them.
    extent = rng.uniform(0.5, 0.7) * size
    cx = size / 2 + rng.uniform(-0.08, 0.08) * size
    cy = size / 2 + rng.uniform(-0.08, 0.08) * size
    half = extent / 2
    colour = rng.choice(COLOURS)
    shape = rng.choice(SHAPES)
    if shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=colour)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    return image


def make_shapes(folder, count=2000, size=32, seed=0):
    """Write `count` PNGs to `folder` unless it already holds them; return the folder."""
    os.makedirs(folder, exist_ok=True)
    names = [f"shape_{index:05d}.png" for index in range(count)]
    if all(os.path.exists(os.path.join(folder, name)) for name in names):
        return folder
    rng = random.Random(seed)
    for name in names:
        draw_shape(rng, size).save(os.path.join(folder, name))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data/shapes")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"Shapes dataset ready in {make_shapes(args.folder, args.count, args.size, args.seed)}")
