"""On-disk segmentation datasets in their mmsegmentation layouts, one DataModule each."""

from dtop.data.datasets.ade20k import ADE20KDataModule
from dtop.data.datasets.camvid import CamVidDataModule
from dtop.data.datasets.cityscapes import CityscapesDataModule
from dtop.data.datasets.cocostuff10k import CocoStuff10kDataModule
from dtop.data.datasets.datamodule import FileListDataModule
from dtop.data.datasets.filelist import DatasetLayoutError, SampleFiles, SegFileDataset
from dtop.data.datasets.pcontext59 import PascalContext59DataModule

__all__ = [
    "ADE20KDataModule",
    "CamVidDataModule",
    "CityscapesDataModule",
    "CocoStuff10kDataModule",
    "DatasetLayoutError",
    "FileListDataModule",
    "PascalContext59DataModule",
    "SampleFiles",
    "SegFileDataset",
]
