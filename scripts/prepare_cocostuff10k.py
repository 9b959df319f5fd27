"""Convert the COCO-Stuff-10k v1.1 release to the layout of mmseg's coco_stuff10k converter.

Input (cocostuff-10k-v1.1.zip unzipped)::

    <src>/images/<name>.jpg   <src>/annotations/<name>.mat (field S)   <src>/imageLists/{train,test}.txt

Output (read by ``CocoStuff10kDataModule``)::

    <out>/images/{train2014,test2014}/<name>.jpg
    <out>/annotations/{train2014,test2014}/<name>_labelTrainIds.png

``S`` holds 0 = unlabeled and the 182 (1-based) COCO-Stuff ids, 11 of which are unused; the
171 used ids become 1..171 in order and 0 stays 0, exactly the files mmseg writes (the
loader then applies reduce_zero_label: 0 -> 255, k -> k - 1). Unused ids, which mmseg would
leave unchanged and so alias to another class, become 0 (unlabeled) here.

    python scripts/prepare_cocostuff10k.py <src> [-o <out>] [--nproc N]
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import loadmat

# 1-based COCO ids with no category (the 91 "thing" ids include 11 gaps).
UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)
USED_IDS = [i for i in range(1, 183) if i not in UNUSED_IDS]

# COCO id (0..182) -> train id (1..171; 0 = unlabeled).
COCO_TO_TRAIN = np.zeros(183, dtype=np.uint8)
COCO_TO_TRAIN[USED_IDS] = np.arange(1, 172)

SPLITS = {"train": "train2014", "test": "test2014"}


def coco_ids_to_train_ids(mask: np.ndarray) -> np.ndarray:
    """Map a COCO-Stuff ``S`` mask to uint8 train ids 0..171 (0 = unlabeled)."""
    if mask.min(initial=0) < 0 or mask.max(initial=0) > 182:
        raise ValueError(f"COCO-Stuff ids must be in 0..182, got {mask.min()}..{mask.max()}")
    return COCO_TO_TRAIN[mask.astype(np.int64)]


def convert_one(name: str, src: Path, out: Path, split_dir: str) -> None:
    """Copy ``<name>.jpg`` and write ``<name>_labelTrainIds.png`` into ``split_dir``."""
    shutil.copyfile(src / "images" / f"{name}.jpg", out / "images" / split_dir / f"{name}.jpg")
    mask = loadmat(str(src / "annotations" / f"{name}.mat"))["S"]
    label = coco_ids_to_train_ids(np.asarray(mask))
    Image.fromarray(label).save(out / "annotations" / split_dir / f"{name}_labelTrainIds.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="unzipped cocostuff-10k-v1.1 folder")
    parser.add_argument("-o", "--out", type=Path, help="output root (default: src)")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    out: Path = args.out or args.src

    jobs: list[tuple[str, str]] = []
    for list_name, split_dir in SPLITS.items():
        list_file = args.src / "imageLists" / f"{list_name}.txt"
        if not list_file.is_file():
            parser.error(f"missing {list_file} (expected the release's imageLists/{{train,test}}.txt)")
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        for name in names:
            for needed in (args.src / "images" / f"{name}.jpg", args.src / "annotations" / f"{name}.mat"):
                if not needed.is_file():
                    parser.error(f"{list_file} lists {name} but {needed} does not exist")
        jobs += [(name, split_dir) for name in names]
        (out / "images" / split_dir).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split_dir).mkdir(parents=True, exist_ok=True)

    names, split_dirs = [j[0] for j in jobs], [j[1] for j in jobs]
    if args.nproc > 1:
        with ProcessPoolExecutor(args.nproc) as pool:
            list(pool.map(convert_one, names, [args.src] * len(jobs), [out] * len(jobs), split_dirs, chunksize=16))
    else:
        for name, split_dir in jobs:
            convert_one(name, args.src, out, split_dir)
    print(f"wrote {len(jobs)} images and labels under {out}")


if __name__ == "__main__":
    main()
