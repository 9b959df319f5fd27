"""COCO-Stuff-10k (v1.1), 171 classes, in the layout of mmseg's coco_stuff10k converter."""

from __future__ import annotations

from dtop.data.datasets.datamodule import FileListDataModule
from dtop.data.datasets.filelist import SampleFiles, pair_files

__all__ = ["COCOSTUFF_CLASSES", "COCOSTUFF_PALETTE", "CocoStuff10kDataModule"]

COCOSTUFF_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other", "ceiling-tile",
    "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff",
    "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house", "leaves",
    "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper",
    "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield", "railing", "railroad",
    "river", "road", "rock", "roof", "rug", "salad", "sand", "sea", "shelf", "sky-other", "skyscraper",
    "snow", "solid-other", "stairs", "stone", "straw", "structural-other", "table", "tent",
    "textile-other", "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other",
    "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind",
    "window-other", "wood",
]  # fmt: skip

# mmsegmentation's COCOStuffDataset palette.
COCOSTUFF_PALETTE = [
    (0, 192, 64), (0, 192, 64), (0, 64, 96), (128, 192, 192), (0, 64, 64), (0, 192, 224), (0, 192, 192),
    (128, 192, 64), (0, 192, 96), (128, 192, 64), (128, 32, 192), (0, 0, 224), (0, 0, 64), (0, 160, 192),
    (128, 0, 96), (128, 0, 192), (0, 32, 192), (128, 128, 224), (0, 0, 192), (128, 160, 192),
    (128, 128, 0), (128, 0, 32), (128, 32, 0), (128, 0, 128), (64, 128, 32), (0, 160, 0), (0, 0, 0),
    (192, 128, 160), (0, 32, 0), (0, 128, 128), (64, 128, 160), (128, 160, 0), (0, 128, 0),
    (192, 128, 32), (128, 96, 128), (0, 0, 128), (64, 0, 32), (0, 224, 128), (128, 0, 0), (192, 0, 160),
    (0, 96, 128), (128, 128, 128), (64, 0, 160), (128, 224, 128), (128, 128, 64), (192, 0, 32),
    (128, 96, 0), (128, 0, 192), (0, 128, 32), (64, 224, 0), (0, 0, 64), (128, 128, 160), (64, 96, 0),
    (0, 128, 192), (0, 128, 160), (192, 224, 0), (0, 128, 64), (128, 128, 32), (192, 32, 128),
    (0, 64, 192), (0, 0, 32), (64, 160, 128), (128, 64, 64), (128, 0, 160), (64, 32, 128),
    (128, 192, 192), (0, 0, 160), (192, 160, 128), (128, 192, 0), (128, 0, 96), (192, 32, 0),
    (128, 64, 128), (64, 128, 96), (64, 160, 0), (0, 64, 0), (192, 128, 224), (64, 32, 0), (0, 192, 128),
    (64, 128, 224), (192, 160, 0), (0, 192, 0), (192, 128, 96), (192, 96, 128), (0, 64, 128), (64, 0, 96),
    (64, 224, 128), (128, 64, 0), (192, 0, 224), (64, 96, 128), (128, 192, 128), (64, 0, 224),
    (192, 224, 128), (128, 192, 64), (192, 0, 96), (192, 96, 0), (128, 64, 192), (0, 128, 96), (0, 224, 0),
    (64, 64, 64), (128, 128, 224), (0, 96, 0), (64, 192, 192), (0, 128, 224), (128, 224, 0), (64, 192, 64),
    (128, 128, 96), (128, 32, 128), (64, 0, 192), (0, 64, 96), (0, 160, 128), (192, 0, 64), (128, 64, 224),
    (0, 32, 128), (192, 128, 192), (0, 64, 224), (128, 160, 128), (192, 128, 0), (128, 64, 32),
    (128, 32, 64), (192, 0, 128), (64, 192, 32), (0, 160, 64), (64, 0, 0), (192, 192, 160), (0, 32, 64),
    (64, 128, 128), (64, 192, 160), (128, 160, 64), (64, 128, 0), (192, 192, 32), (128, 96, 192),
    (64, 0, 128), (64, 64, 32), (0, 224, 192), (192, 0, 0), (192, 64, 160), (0, 96, 192), (192, 128, 128),
    (64, 64, 160), (128, 224, 192), (192, 128, 64), (192, 64, 32), (128, 96, 64), (192, 0, 192),
    (0, 192, 32), (64, 224, 64), (64, 0, 64), (128, 192, 160), (64, 96, 64), (64, 128, 192), (0, 192, 160),
    (192, 224, 64), (64, 128, 64), (128, 192, 32), (192, 32, 192), (64, 64, 192), (0, 64, 32),
    (64, 160, 192), (192, 64, 64), (128, 64, 160), (64, 32, 192), (192, 192, 192), (0, 64, 160),
    (192, 160, 192), (192, 192, 0), (128, 64, 96), (192, 32, 64), (192, 64, 128), (64, 192, 96),
    (64, 160, 64), (64, 64, 0),
]  # fmt: skip


class CocoStuff10kDataModule(FileListDataModule):
    """COCO-Stuff-10k: 9k train2014 / 1k test2014 images (test2014 is the validation split).

    The ``*_labelTrainIds.png`` files hold 0 = unlabeled and 1..171 = classes (mmseg's
    converter output), so labels are read with reduce_zero_label: 0 -> 255, k -> k - 1.
    Defaults (mmseg ``coco-stuff10k.py``): scale (512, 2048) [mmseg (2048, 512)], crop
    512x512, slide inference with stride 341.
    """

    name = "COCO-Stuff-10k"
    layout = (
        "  <root> = coco_stuff10k/\n"
        "    images/{train2014,test2014}/<name>.jpg\n"
        "    annotations/{train2014,test2014}/<name>_labelTrainIds.png   (0 = unlabeled, 1..171)\n"
        "  Create it from the cocostuff-10k-v1.1 release (images/, annotations/*.mat, imageLists/) with\n"
        "    python scripts/prepare_cocostuff10k.py <release dir> -o <root>"
    )
    num_classes = 171
    class_names = COCOSTUFF_CLASSES
    palette = COCOSTUFF_PALETTE
    reduce_zero_label = True
    train_split, val_split = "train2014", "test2014"
    default_scale = (512, 2048)
    default_crop_size = (512, 512)

    def list_split(self, split: str) -> list[SampleFiles]:
        return pair_files(
            self.root / "images" / split,
            ".jpg",
            self.root / "annotations" / split,
            "_labelTrainIds.png",
            self.layout_help,
        )
