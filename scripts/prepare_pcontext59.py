"""Convert Pascal Context's 459-class annotations to the 59-class PNGs mmseg reads.

Input: ``trainval.tar.gz`` of the Pascal Context release unpacked (``trainval/<id>.mat``,
field ``LabelMap`` with the 1-based ids of its ``labels.txt``) and VOC2010 with its
``ImageSets/Main/{train,val}.txt`` (Pascal Context's 4998/5105 split). Output under
``VOCdevkit/VOC2010``::

    SegmentationClassContext/<id>.png                (0 = background, 1..59)
    ImageSets/SegmentationContext/{train,val}.txt

The 59 classes and their order are the ``_mapping`` of mmseg's pascal_context converter
(from the Detail API); every other id becomes background, which the loader ignores.

    python scripts/prepare_pcontext59.py <VOCdevkit/VOC2010> <trainval dir> [--nproc N]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import loadmat

# 459-class ids of background (0) and the 59 classes, sorted: index = 59-class label.
CONTEXT59_IDS = np.sort(
    np.array([
        0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454, 295,
        296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347,
        220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115,
    ])
)  # fmt: skip
NUM_CONTEXT_IDS = 460  # labels.txt ids 1..459, plus 0

ID_TO_LABEL59 = np.zeros(NUM_CONTEXT_IDS, dtype=np.uint8)
ID_TO_LABEL59[CONTEXT59_IDS] = np.arange(len(CONTEXT59_IDS))


def context_to_59(label_map: np.ndarray) -> np.ndarray:
    """Map a 459-class ``LabelMap`` to uint8 0..59 (0 = background and all unselected ids)."""
    if label_map.min(initial=0) < 0 or label_map.max(initial=0) >= NUM_CONTEXT_IDS:
        raise ValueError(f"Pascal Context ids must be in 0..459, got {label_map.min()}..{label_map.max()}")
    return ID_TO_LABEL59[label_map.astype(np.int64)]


def convert_one(image_id: str, mat_dir: Path, out_dir: Path) -> None:
    label_map = np.asarray(loadmat(str(mat_dir / f"{image_id}.mat"))["LabelMap"])
    Image.fromarray(context_to_59(label_map)).save(out_dir / f"{image_id}.png")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("voc_root", type=Path, help="VOCdevkit/VOC2010 (with JPEGImages/ and ImageSets/Main/)")
    parser.add_argument("mat_dir", type=Path, help="Pascal Context trainval/ folder of <id>.mat files")
    parser.add_argument("--nproc", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)

    out_dir = args.voc_root / "SegmentationClassContext"
    list_dir = args.voc_root / "ImageSets" / "SegmentationContext"
    splits: dict[str, list[str]] = {}
    for split in ("train", "val"):
        main_list = args.voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not main_list.is_file():
            parser.error(f"missing {main_list}: voc_root must be VOCdevkit/VOC2010 of the VOC2010 trainval release")
        ids = sorted({line.strip() for line in main_list.read_text().splitlines() if line.strip()})
        for image_id in ids:
            for needed in (args.mat_dir / f"{image_id}.mat", args.voc_root / "JPEGImages" / f"{image_id}.jpg"):
                if not needed.is_file():
                    parser.error(f"{main_list} lists {image_id} but {needed} does not exist")
        splits[split] = ids
    out_dir.mkdir(parents=True, exist_ok=True)
    list_dir.mkdir(parents=True, exist_ok=True)

    ids = [image_id for split_ids in splits.values() for image_id in split_ids]
    if args.nproc > 1:
        with ProcessPoolExecutor(args.nproc) as pool:
            list(pool.map(convert_one, ids, [args.mat_dir] * len(ids), [out_dir] * len(ids), chunksize=16))
    else:
        for image_id in ids:
            convert_one(image_id, args.mat_dir, out_dir)
    for split, split_ids in splits.items():
        (list_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids))
    print(f"wrote {len(ids)} labels to {out_dir} and {', '.join(splits)} lists to {list_dir}")


if __name__ == "__main__":
    main()
