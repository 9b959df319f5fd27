"""Dataset loaders on tiny synthetic copies of each on-disk layout, plus bad-input errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from dtop.data.datasets import (
    ADE20KDataModule,
    CamVidDataModule,
    CityscapesDataModule,
    CocoStuff10kDataModule,
    DatasetLayoutError,
    FileListDataModule,
    PascalContext59DataModule,
)
from dtop.data.datasets.filelist import make_label_lut, read_image, read_label

REPO = Path(__file__).resolve().parents[1]
MakeLayout = Callable[[Path], Path]
H, W = 40, 60
SMALL = {"scale": (40, 60), "crop_size": (32, 32), "batch_size": 2}  # keeps the pipelines tiny


def write_image(path: Path, seed: int = 0, ext_mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert(ext_mode).save(path)


def write_label(path: Path, values: list[int]) -> np.ndarray:
    """Label of horizontal bands, one per value, so every value is present."""
    path.parent.mkdir(parents=True, exist_ok=True)
    label = np.repeat(np.array(values, dtype=np.uint8), -(-H // len(values)))[:H, None].repeat(W, axis=1)
    Image.fromarray(label).save(path)
    return label


# --------------------------------------------------------------------------- layouts


def make_ade(root: Path, values: list[int] | None = None) -> Path:
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            name = f"ADE_{split[:5]}_{i:08d}"
            write_image(root / "images" / split / f"{name}.jpg", i)
            write_label(root / "annotations" / split / f"{name}.png", values or [0, 1, 75, 150])
    return root


def make_cityscapes(root: Path) -> Path:
    for split, cities in (("train", ("aachen", "bremen")), ("val", ("frankfurt",))):
        for city in cities:
            name = f"{city}_000000_000019"
            write_image(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            write_label(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png", [0, 13, 18, 255])
    return root


def make_cocostuff(root: Path) -> Path:
    for split in ("train2014", "test2014"):
        for i in range(2):
            name = f"COCO_{split}_{i:012d}"
            write_image(root / "images" / split / f"{name}.jpg", i)
            write_label(root / "annotations" / split / f"{name}_labelTrainIds.png", [0, 1, 171])
    return root


def make_pcontext(root: Path) -> Path:
    ids = {"train": ["2008_000002", "2008_000003"], "val": ["2008_000007"]}
    for split, split_ids in ids.items():
        for i in split_ids:
            write_image(root / "JPEGImages" / f"{i}.jpg")
            write_label(root / "SegmentationClassContext" / f"{i}.png", [0, 1, 59])
        lists = root / "ImageSets" / "SegmentationContext"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("\n".join(split_ids) + "\n")
    return root


def make_camvid(root: Path, absolute: bool = True) -> Path:
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        lines = []
        for i in range(n):
            name = f"0001TP_{i:06d}"
            ext = "png" if i % 2 else "jpg"
            write_image(root / split / f"{name}.{ext}", i)
            write_label(root / f"{split}annot" / f"{name}.png", [0, 3, 10, 11])
            prefix = "/SegNet/CamVid/" if absolute else ""
            lines.append(f"{prefix}{split}/{name}.{ext} {prefix}{split}annot/{name}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


CASES = [
    # module, layout writer, expected label values after loading (raw values in the fixture)
    (ADE20KDataModule, make_ade, {255, 0, 74, 149}),  # 0, 1, 75, 150: reduce_zero_label
    (CityscapesDataModule, make_cityscapes, {0, 13, 18, 255}),
    (CocoStuff10kDataModule, make_cocostuff, {255, 0, 170}),  # 0, 1, 171
    (PascalContext59DataModule, make_pcontext, {255, 0, 58}),  # 0, 1, 59
    (CamVidDataModule, make_camvid, {0, 3, 10, 255}),  # 11 = void
]


@pytest.mark.parametrize(("module", "make", "expected"), CASES, ids=lambda c: getattr(c, "__name__", ""))
def test_loader_reads_layout_and_maps_labels(
    tmp_path: Path, module: type[FileListDataModule], make: MakeLayout, expected: set[int]
) -> None:
    dm = module(make(tmp_path / "data"), **SMALL)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.val_dataset is not None
    sample = dm.val_dataset[0]
    assert sample["image"].dtype == torch.float32 and sample["image"].shape == (3, H, W)
    assert sample["label"].dtype == torch.int64 and sample["label"].shape == (H, W)
    assert set(sample["label"].unique().tolist()) == expected
    assert isinstance(sample["id"], str) and sample["id"]
    train = dm.train_dataset[0]
    assert train["image"].shape == (3, 32, 32) and train["label"].shape == (32, 32)
    assert set(train["label"].unique().tolist()) <= expected
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["label"].shape == (2, 32, 32)


def test_eval_image_is_resized_to_test_scale_but_label_is_not(tmp_path: Path) -> None:
    dm = ADE20KDataModule(make_ade(tmp_path / "ade"), batch_size=1)  # default scale (512, 2048)
    dm.setup("validate")
    assert dm.train_dataset is None
    sample = dm.val_dataset[0]
    assert sample["image"].shape == (3, 512, 768)  # 40x60 fit into short 512 / long 2048
    assert sample["label"].shape == (H, W)
    assert sample["id"] == "ADE_valid_00000000"


def test_ade_reduce_zero_label_values(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade")
    raw = write_label(root / "annotations" / "validation" / "ADE_valid_00000000.png", [0, 1, 2, 150])
    dm = ADE20KDataModule(root, **SMALL)
    dm.setup("validate")
    label = dm.val_dataset[0]["label"].numpy()
    np.testing.assert_array_equal(label, np.where(raw == 0, 255, raw.astype(np.int64) - 1))


def test_cityscapes_ids_are_city_free_names(tmp_path: Path) -> None:
    dm = CityscapesDataModule(make_cityscapes(tmp_path / "cs"), **SMALL)
    dm.setup("fit")
    assert [s.id for s in dm.train_dataset.samples] == ["aachen_000000_000019", "bremen_000000_000019"]


def test_camvid_relative_lists_and_test_split(tmp_path: Path) -> None:
    dm = CamVidDataModule(make_camvid(tmp_path / "camvid", absolute=False), test_split="test", **SMALL)
    dm.setup("test")
    assert len(dm.val_dataset) == 2 and len(dm.test_dataset) == 1
    assert dm.eval_mode == "whole"


def test_label_lut() -> None:
    lut = make_label_lut(reduce_zero_label=True)
    assert lut[0] == 255 and lut[1] == 0 and lut[150] == 149 and lut[255] == 255
    lut = make_label_lut(label_map={1: 2, 2: 3})  # no chaining
    assert lut[1] == 2 and lut[2] == 3 and lut[0] == 0


# --------------------------------------------------------------------------- image and label modes


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_load_as_rgb_uint8(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"img_{mode.replace(';', '')}.{'jpg' if mode == 'CMYK' else 'png'}"
    gray = np.linspace(0, 255, H * W).reshape(H, W).astype(np.uint8)
    if mode == "I;16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(path)  # 16-bit grayscale PNG
        assert Image.open(path).mode.startswith("I")
    else:
        Image.fromarray(gray).convert(mode).save(path)
    rgb = read_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    tolerance = 8 if mode == "CMYK" else 0  # jpeg
    assert np.abs(rgb.astype(int) - gray[:, :, None]).max() <= tolerance


def test_palette_label_reads_indices(tmp_path: Path) -> None:
    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    img = Image.fromarray(label, mode="L").convert("P")
    img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    np.testing.assert_array_equal(read_label(tmp_path / "p.png"), label)


def test_colour_label_is_rejected(tmp_path: Path) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*colour-coded"):
        read_label(tmp_path / "rgb.png")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("module", "hint"),
    [
        (ADE20KDataModule, "annotations/{training,validation}"),
        (CityscapesDataModule, "scripts/prepare_cityscapes.py"),
        (CocoStuff10kDataModule, "scripts/prepare_cocostuff10k.py"),
        (PascalContext59DataModule, "scripts/prepare_pcontext59.py"),
        (CamVidDataModule, "{train,val,test}annot"),
    ],
)
def test_missing_root_names_layout(tmp_path: Path, module: type[FileListDataModule], hint: str) -> None:
    dm = module(tmp_path / "nowhere", batch_size=1)
    with pytest.raises(DatasetLayoutError, match="does not exist") as err:
        dm.setup("validate")
    assert hint in str(err.value) and "DTOP_DATA" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_wrong_layout_names_missing_folder(tmp_path: Path) -> None:
    root = tmp_path / "ade"
    (root / "images" / "validation").mkdir(parents=True)  # no annotations/
    with pytest.raises(DatasetLayoutError, match="missing folder .*annotations"):
        ADE20KDataModule(root, batch_size=1).setup("validate")


def test_cityscapes_without_train_ids_points_to_script(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cs")
    for p in root.rglob("*_labelTrainIds.png"):
        p.rename(p.with_name(p.name.replace("labelTrainIds", "labelIds")))
    with pytest.raises(DatasetLayoutError, match="prepare_cityscapes.py") as err:
        CityscapesDataModule(root, batch_size=1).setup("validate")
    assert "frankfurt_000000_000019_leftImg8bit.png has no label" in str(err.value)


def test_count_mismatch_names_an_unmatched_file(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade")
    (root / "annotations" / "training" / "ADE_train_00000001.png").unlink()
    with pytest.raises(DatasetLayoutError, match="3 images .* but 2 labels") as err:
        ADE20KDataModule(root, batch_size=1).setup("fit")
    assert "ADE_train_00000001.jpg has no label" in str(err.value)


def test_missing_listed_file_is_named(tmp_path: Path) -> None:
    root = make_pcontext(tmp_path / "voc")
    (root / "JPEGImages" / "2008_000007.jpg").unlink()
    with pytest.raises(DatasetLayoutError, match="2008_000007.jpg"):
        PascalContext59DataModule(root, batch_size=1).setup("validate")


def test_malformed_camvid_list_line(tmp_path: Path) -> None:
    root = make_camvid(tmp_path / "camvid")
    (root / "val.txt").write_text("val/0001TP_000000.jpg\n")
    with pytest.raises(DatasetLayoutError, match=r"val.txt:1: expected '<image> <label>'"):
        CamVidDataModule(root, batch_size=1).setup("validate")


def test_out_of_range_label_names_the_file(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path / "cs")
    bad = root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelTrainIds.png"
    write_label(bad, [0, 19, 33])  # labelIds, not trainIds
    dm = CityscapesDataModule(root, batch_size=1)
    dm.setup("validate")
    with pytest.raises(ValueError, match=r"frankfurt_000000_000019_gtFine_labelTrainIds.png: label values \[19, 33\]"):
        dm.val_dataset[0]


def test_image_label_size_mismatch(tmp_path: Path) -> None:
    root = make_ade(tmp_path / "ade")
    Image.new("L", (W + 1, H)).save(root / "annotations" / "validation" / "ADE_valid_00000000.png")
    dm = ADE20KDataModule(root, batch_size=1)
    dm.setup("validate")
    with pytest.raises(ValueError, match="is 60x40 but label .* is 61x40"):
        dm.val_dataset[0]


@pytest.mark.parametrize(
    ("module", "crop", "stride"),
    [
        (ADE20KDataModule, (512, 512), (341, 341)),
        (CityscapesDataModule, (512, 1024), (341, 683)),
        (CocoStuff10kDataModule, (512, 512), (341, 341)),
        (PascalContext59DataModule, (480, 480), (320, 320)),
        (CamVidDataModule, (360, 480), (240, 320)),
    ],
)
def test_default_crop_and_stride_follow_mmseg(
    tmp_path: Path, module: type[FileListDataModule], crop: tuple[int, int], stride: tuple[int, int]
) -> None:
    dm = module(tmp_path, batch_size=1)
    assert dm.crop_size == crop and dm.stride == stride
    assert module(tmp_path, batch_size=1, crop_size=(768, 768)).stride == (512, 512)


def test_bad_eval_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="eval_mode"):
        ADE20KDataModule(tmp_path, batch_size=1, eval_mode="sliding")
    with pytest.raises(ValueError, match="stride"):
        ADE20KDataModule(tmp_path, batch_size=1, stride=(341, 600))


def test_auto_workers_share_the_cores_between_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    from types import SimpleNamespace

    from dtop.errors import ConfigError

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    dm = ADE20KDataModule(tmp_path, batch_size=1, num_workers="auto")
    assert dm.workers == 16  # one process on 32 cores: capped
    dm.trainer = SimpleNamespace(num_devices=4)
    assert dm.workers == 7  # 8 cores per device, one left to the device's process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert dm.workers == 1
    assert ADE20KDataModule(tmp_path, batch_size=1, num_workers=3).workers == 3
    for bad in ("many", -1, 2.5):
        with pytest.raises(ConfigError, match="num_workers"):
            ADE20KDataModule(tmp_path, batch_size=1, num_workers=bad)


def test_eval_loaders_start_no_more_workers_than_batches(tmp_path: Path) -> None:
    dm = CamVidDataModule(make_camvid(tmp_path), batch_size=1, val_batch_size=1, num_workers=4, test_split="test")
    dm.setup("fit")
    dm.setup("test")
    assert dm.train_dataloader().num_workers == 4
    assert dm.val_dataloader().num_workers == 2  # 2 val images, one per batch
    assert dm.test_dataloader().num_workers == 1  # 1 test image
    dm.val_batch_size = 2
    assert dm.val_dataloader().num_workers == 1


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("name", "module", "make"),
    [
        ("ade20k", ADE20KDataModule, make_ade),
        ("cityscapes", CityscapesDataModule, make_cityscapes),
        ("cocostuff10k", CocoStuff10kDataModule, make_cocostuff),
        ("pcontext59", PascalContext59DataModule, make_pcontext),
        ("camvid", CamVidDataModule, make_camvid),
    ],
)
def test_yaml_config_instantiates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: type[FileListDataModule], make: MakeLayout
) -> None:
    top = OmegaConf.create({"seed": 3, "data": OmegaConf.load(REPO / "conf" / "data" / f"{name}.yaml")})
    cfg = top.data
    monkeypatch.setenv("DTOP_DATA", str(tmp_path))
    root = Path(cfg.root)
    assert tmp_path in root.parents  # ${oc.env:DTOP_DATA,data}/<dataset>
    make(root)
    dm = instantiate(cfg)
    assert type(dm) is module and dm.seed == 3
    assert dm.crop_size == tuple(cfg.crop_size) and dm.stride == tuple(cfg.stride) and dm.eval_mode == cfg.eval_mode
    assert dm.scale == tuple(cfg.scale)
    dm.setup("validate")
    assert len(dm.val_dataset) > 0
