"""Cityscapes fine annotations, 19 evaluation classes (labelTrainIds)."""

from __future__ import annotations

from dtop.data.datasets.datamodule import FileListDataModule
from dtop.data.datasets.filelist import SampleFiles, pair_files

__all__ = ["CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "CityscapesDataModule"]

CITYSCAPES_CLASSES = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip

CITYSCAPES_PALETTE = [
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
]  # fmt: skip


class CityscapesDataModule(FileListDataModule):
    """Cityscapes gtFine with ``*_gtFine_labelTrainIds.png`` (0..18, 255 ignore).

    Defaults (mmseg ``cityscapes.py``): scale (1024, 2048) [mmseg (2048, 1024)], crop
    512x1024, slide inference with stride (341, 683). The 768x768 setting is
    ``crop_size=(768, 768), stride=(512, 512)``.
    """

    name = "Cityscapes"
    layout = (
        "  <root> = cityscapes/ (leftImg8bit_trainvaltest.zip + gtFine_trainvaltest.zip unzipped)\n"
        "    leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png\n"
        "    gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png\n"
        "  The labelTrainIds files are not in the official zip: create them with\n"
        "    python scripts/prepare_cityscapes.py <root>\n"
        "  (from *_gtFine_labelIds.png or *_gtFine_polygons.json)."
    )
    num_classes = 19
    class_names = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE
    train_split, val_split = "train", "val"
    default_scale = (1024, 2048)
    default_crop_size = (512, 1024)

    def list_split(self, split: str) -> list[SampleFiles]:
        return pair_files(
            self.root / "leftImg8bit" / split,
            "_leftImg8bit.png",
            self.root / "gtFine" / split,
            "_gtFine_labelTrainIds.png",
            self.layout_help,
        )
