"""Pascal Context with the standard 59 classes (background ignored)."""

from __future__ import annotations

from dtop.data.datasets.datamodule import FileListDataModule, check_exist, read_list_file
from dtop.data.datasets.filelist import SampleFiles

__all__ = ["PCONTEXT59_CLASSES", "PCONTEXT59_PALETTE", "PascalContext59DataModule"]

# Label k (1..59) of SegmentationClassContext PNGs is PCONTEXT59_CLASSES[k - 1]; 0 = background.
PCONTEXT59_CLASSES = [
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup",
    "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard",
    "light", "motorbike", "mountain", "mouse", "person", "plate", "platform", "pottedplant", "road", "rock",
    "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree",
    "truck", "tvmonitor", "wall", "water", "window", "wood",
]  # fmt: skip

# mmsegmentation's PascalContextDataset59 palette.
PCONTEXT59_PALETTE = [
    (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61),
    (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7),
    (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214),
    (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8),
    (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20), (255, 8, 41),
    (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
]  # fmt: skip


class PascalContext59DataModule(FileListDataModule):
    """Pascal Context 59: 4998 train / 5105 val images of VOC2010.

    Labels hold 0 = background and 1..59 = classes; background is ignored
    (reduce_zero_label), as mmseg's ``PascalContextDataset59``. Defaults (mmseg
    ``pascal_context_59.py``): scale (520, 520), crop 480x480, slide inference with stride 320.
    """

    name = "Pascal Context 59"
    layout = (
        "  <root> = VOCdevkit/VOC2010/\n"
        "    JPEGImages/<id>.jpg\n"
        "    SegmentationClassContext/<id>.png   (0 = background, 1..59 = classes)\n"
        "    ImageSets/SegmentationContext/{train,val}.txt   (one <id> per line)\n"
        "  Create the PNGs and lists from the 459-class trainval.tar.gz (trainval/<id>.mat) with\n"
        "    python scripts/prepare_pcontext59.py <root> <trainval dir>"
    )
    num_classes = 59
    class_names = PCONTEXT59_CLASSES
    palette = PCONTEXT59_PALETTE
    reduce_zero_label = True
    train_split, val_split = "train", "val"
    default_scale = (520, 520)
    default_crop_size = (480, 480)

    def list_split(self, split: str) -> list[SampleFiles]:
        list_file = self.root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        samples = [
            SampleFiles(i, self.root / "JPEGImages" / f"{i}.jpg", self.root / "SegmentationClassContext" / f"{i}.png")
            for i in read_list_file(list_file, self.layout_help)
        ]
        return check_exist(samples, list_file, self.layout_help)
