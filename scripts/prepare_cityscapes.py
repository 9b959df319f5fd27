"""Create Cityscapes ``*_gtFine_labelTrainIds.png`` (19 classes, 255 ignore) without cityscapesscripts.

Each label is converted from ``*_gtFine_labelIds.png`` when present (exact, fast), else by
rasterising ``*_gtFine_polygons.json`` the way cityscapesscripts' ``json2labelImg`` does:
objects drawn in file order with PIL ``ImageDraw.polygon`` (later objects occlude earlier
ones), deleted objects and negative ids (license plate) skipped, "<class>group" labels
drawn as their class.

    python scripts/prepare_cityscapes.py <cityscapes root> [--splits train val] [--source auto]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IGNORE = 255

# (name, id, trainId) of cityscapesscripts/helpers/labels.py; trainId 255 = not evaluated.
LABELS: list[tuple[str, int, int]] = [
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
    ("license plate", -1, -1),
]  # fmt: skip
NAME_TO_ID = {name: label_id for name, label_id, _ in LABELS}

# labelId -> trainId for all 256 uint8 values (ids outside the table -> ignore).
ID_TO_TRAINID = np.full(256, IGNORE, dtype=np.uint8)
for _, _id, _train_id in LABELS:
    if _id >= 0:
        ID_TO_TRAINID[_id] = _train_id


def labelids_to_trainids(label_ids: np.ndarray) -> np.ndarray:
    """Map a uint8 labelIds array to trainIds (0..18, 255)."""
    return ID_TO_TRAINID[label_ids]


def polygons_to_labelids(annotation: dict[str, Any], source: str = "<json>") -> np.ndarray:
    """Rasterise a ``*_gtFine_polygons.json`` dict to labelIds as cityscapesscripts (background 0)."""
    canvas = Image.new("L", (annotation["imgWidth"], annotation["imgHeight"]), NAME_TO_ID["unlabeled"])
    draw = ImageDraw.Draw(canvas)
    for obj in annotation["objects"]:
        if obj.get("deleted", 0):
            continue
        name = obj["label"]
        if name not in NAME_TO_ID and name.endswith("group"):
            name = name[: -len("group")]
        if name not in NAME_TO_ID:
            raise ValueError(f"{source}: unknown Cityscapes label {obj['label']!r}")
        if NAME_TO_ID[name] < 0:
            continue
        draw.polygon([tuple(point) for point in obj["polygon"]], fill=NAME_TO_ID[name])
    return np.array(canvas)


def convert_one(stem: Path, source: str) -> Path:
    """Write ``<stem>_gtFine_labelTrainIds.png`` from ``<stem>_gtFine_labelIds.png`` or ``_polygons.json``."""
    ids_png = stem.with_name(stem.name + "_gtFine_labelIds.png")
    poly_json = stem.with_name(stem.name + "_gtFine_polygons.json")
    if source in ("auto", "labelIds") and ids_png.is_file():
        with Image.open(ids_png) as img:
            label_ids = np.array(img)
        if label_ids.ndim != 2 or label_ids.dtype != np.uint8:
            raise ValueError(
                f"{ids_png}: expected an 8-bit single-channel labelIds PNG, got {label_ids.dtype} {label_ids.shape}"
            )
    elif source in ("auto", "polygons") and poly_json.is_file():
        label_ids = polygons_to_labelids(json.loads(poly_json.read_text()), str(poly_json))
    else:
        raise FileNotFoundError(f"no {'labelIds PNG or polygons JSON' if source == 'auto' else source} for {stem}")
    out = stem.with_name(stem.name + "_gtFine_labelTrainIds.png")
    Image.fromarray(labelids_to_trainids(label_ids)).save(out)
    return out


def find_stems(split_dir: Path) -> list[Path]:
    """``<city>/<name>`` prefixes of every annotated frame in a gtFine split."""
    stems = {
        p.with_name(p.name[: -len(suffix)])
        for suffix in ("_gtFine_labelIds.png", "_gtFine_polygons.json")
        for p in split_dir.rglob(f"*{suffix}")
    }
    return sorted(stems)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="Cityscapes root holding gtFine/ and leftImg8bit/")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="gtFine splits to convert")
    parser.add_argument("--source", choices=["auto", "labelIds", "polygons"], default="auto")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)

    stems = []
    for split in args.splits:
        split_dir = args.root / "gtFine" / split
        if not split_dir.is_dir():
            parser.error(f"{split_dir} does not exist (expected <root>/gtFine/{{train,val}}/<city>/)")
        found = find_stems(split_dir)
        if not found:
            parser.error(f"no *_gtFine_labelIds.png or *_gtFine_polygons.json under {split_dir}")
        stems += found
    if args.nproc > 1:
        with ProcessPoolExecutor(args.nproc) as pool:
            list(pool.map(convert_one, stems, [args.source] * len(stems), chunksize=16))
    else:
        for stem in stems:
            convert_one(stem, args.source)
    print(f"wrote {len(stems)} *_gtFine_labelTrainIds.png under {args.root / 'gtFine'}")


if __name__ == "__main__":
    main()
