"""Converter scripts at value level (known source ids -> train ids) and end to end into the loaders."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from dtop.data.datasets import CityscapesDataModule, CocoStuff10kDataModule, PascalContext59DataModule
from dtop.data.datasets.cocostuff10k import COCOSTUFF_CLASSES
from dtop.data.datasets.pcontext59 import PCONTEXT59_CLASSES

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 60


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cityscapes = load_script("prepare_cityscapes")
cocostuff = load_script("prepare_cocostuff10k")
pcontext = load_script("prepare_pcontext59")


def write_rgb(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((H, W, 3), dtype=np.uint8)).save(path)


def bands(values: list[int], dtype: type = np.uint8) -> np.ndarray:
    """``H x W`` array of horizontal bands, one per value."""
    return np.repeat(np.array(values, dtype=dtype), -(-H // len(values)))[:H, None].repeat(W, axis=1)


# --------------------------------------------------------------------------- Cityscapes


def test_cityscapes_labelids_to_trainids() -> None:
    ids = np.array([7, 8, 11, 26, 33, 0, 1, 6, 9, 18, 29, 30, 34, 255], dtype=np.uint8)
    expected = [0, 1, 2, 13, 18, 255, 255, 255, 255, 255, 255, 255, 255, 255]
    assert cityscapes.labelids_to_trainids(ids).tolist() == expected
    # All 19 train ids are produced exactly once.
    assert sorted(v for v in cityscapes.ID_TO_TRAINID.tolist() if v != 255) == list(range(19))


def _poly(label: str, x0: int, y0: int, x1: int, y1: int, **extra: int) -> dict:
    return {"label": label, "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]], **extra}


def test_cityscapes_polygons_draw_in_file_order() -> None:
    annotation = {
        "imgHeight": H,
        "imgWidth": W,
        "objects": [
            _poly("road", 0, 20, 59, 39),
            _poly("cargroup", 10, 25, 19, 34),  # "<class>group" drawn as the class, over the road
            _poly("sky", 30, 25, 39, 34, deleted=1),  # deleted: skipped
            _poly("license plate", 12, 28, 14, 30),  # id -1: skipped, car stays
            _poly("ego vehicle", 40, 30, 59, 39),  # non-train class occludes the road
        ],
    }
    train_ids = cityscapes.labelids_to_trainids(cityscapes.polygons_to_labelids(annotation))
    assert train_ids.shape == (H, W)
    assert train_ids[5, 5] == 255  # background 'unlabeled'
    assert train_ids[22, 5] == 0  # road
    assert train_ids[30, 15] == 13 and train_ids[29, 13] == 13  # car, plate skipped
    assert train_ids[30, 35] == 0  # deleted sky not drawn
    assert train_ids[35, 50] == 255  # ego vehicle over road


def test_cityscapes_unknown_polygon_label_is_an_error() -> None:
    annotation = {"imgHeight": 4, "imgWidth": 4, "objects": [_poly("spaceship", 0, 0, 2, 2)]}
    with pytest.raises(ValueError, match="x.json: unknown Cityscapes label 'spaceship'"):
        cityscapes.polygons_to_labelids(annotation, "x.json")


def test_cityscapes_script_end_to_end(tmp_path: Path) -> None:
    root = tmp_path / "cityscapes"
    # train: official labelIds PNG; val: only the polygons JSON.
    train_stem = root / "gtFine" / "train" / "aachen" / "aachen_000000_000019"
    val_stem = root / "gtFine" / "val" / "lindau" / "lindau_000000_000019"
    train_stem.parent.mkdir(parents=True)
    val_stem.parent.mkdir(parents=True)
    Image.fromarray(bands([7, 26, 0, 33])).save(f"{train_stem}_gtFine_labelIds.png")
    annotation = {
        "imgHeight": H,
        "imgWidth": W,
        "objects": [_poly("road", 0, 0, 59, 19), _poly("bicycle", 0, 20, 59, 39)],
    }
    Path(f"{val_stem}_gtFine_polygons.json").write_text(json.dumps(annotation))
    write_rgb(root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png")
    write_rgb(root / "leftImg8bit" / "val" / "lindau" / "lindau_000000_000019_leftImg8bit.png")

    cityscapes.main([str(root)])

    train_ids = np.array(Image.open(f"{train_stem}_gtFine_labelTrainIds.png"))
    np.testing.assert_array_equal(train_ids, bands([0, 13, 255, 18]))
    val_ids = np.array(Image.open(f"{val_stem}_gtFine_labelTrainIds.png"))
    assert set(np.unique(val_ids).tolist()) == {0, 18}

    dm = CityscapesDataModule(root, batch_size=1)
    dm.setup("fit")
    assert set(dm.train_dataset[0]["label"].unique().tolist()) <= {0, 13, 18, 255}
    assert set(dm.val_dataset[0]["label"].unique().tolist()) == {0, 18}


def test_cityscapes_labelids_and_polygons_agree(tmp_path: Path) -> None:
    annotation = {
        "imgHeight": H,
        "imgWidth": W,
        "objects": [_poly("sky", 0, 0, 59, 15), {"label": "person", "polygon": [[5, 5], [30, 35], [2, 38]]}],
    }
    stem = tmp_path / "x"
    Path(f"{stem}_gtFine_polygons.json").write_text(json.dumps(annotation))
    from_json = np.array(Image.open(cityscapes.convert_one(stem, "polygons")))
    Image.fromarray(cityscapes.polygons_to_labelids(annotation)).save(f"{stem}_gtFine_labelIds.png")
    from_png = np.array(Image.open(cityscapes.convert_one(stem, "labelIds")))
    np.testing.assert_array_equal(from_json, from_png)
    assert {10, 11} <= set(np.unique(from_png).tolist())


# --------------------------------------------------------------------------- COCO-Stuff-10k


def test_cocostuff_id_mapping_matches_mmseg() -> None:
    # Spot values of mmseg's clsID_to_trID (0 unlabeled kept; 11 unused ids skipped).
    src = np.array([0, 1, 11, 13, 25, 27, 28, 31, 44, 46, 92, 182], dtype=np.uint16)
    expected = [0, 1, 11, 12, 24, 25, 26, 27, 40, 41, 81, 171]
    assert cocostuff.coco_ids_to_train_ids(src).tolist() == expected
    assert cocostuff.coco_ids_to_train_ids(np.array(list(cocostuff.UNUSED_IDS))).tolist() == [0] * 11
    assert len(cocostuff.USED_IDS) == len(COCOSTUFF_CLASSES) == 171
    with pytest.raises(ValueError, match="0..182"):
        cocostuff.coco_ids_to_train_ids(np.array([183]))


def test_cocostuff_script_end_to_end(tmp_path: Path) -> None:
    src, out = tmp_path / "cocostuff-10k-v1.1", tmp_path / "coco_stuff10k"
    names = {
        "train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
        "test": ["COCO_train2014_000000000079"],
    }
    (src / "imageLists").mkdir(parents=True)
    (src / "annotations").mkdir()
    for split, split_names in names.items():
        (src / "imageLists" / f"{split}.txt").write_text("\n".join(split_names) + "\n")
        for name in split_names:
            write_rgb(src / "images" / f"{name}.jpg")
            savemat(src / "annotations" / f"{name}.mat", {"S": bands([0, 1, 13, 182], np.uint16)})

    cocostuff.main([str(src), "-o", str(out)])

    png = out / "annotations" / "test2014" / "COCO_train2014_000000000079_labelTrainIds.png"
    np.testing.assert_array_equal(np.array(Image.open(png)), bands([0, 1, 12, 171]))
    assert (out / "images" / "train2014" / "COCO_train2014_000000000078.jpg").is_file()

    dm = CocoStuff10kDataModule(out, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1
    label = dm.val_dataset[0]["label"].numpy()
    np.testing.assert_array_equal(label, bands([255, 0, 11, 170], np.int64))
    assert COCOSTUFF_CLASSES[11] == "stop sign" and COCOSTUFF_CLASSES[170] == "wood"


def test_cocostuff_script_reports_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "imageLists").mkdir()
    (tmp_path / "imageLists" / "train.txt").write_text("COCO_x\n")
    (tmp_path / "imageLists" / "test.txt").write_text("")
    with pytest.raises(SystemExit):
        cocostuff.main([str(tmp_path)])
    assert "COCO_x" in capsys.readouterr().err


# --------------------------------------------------------------------------- Pascal Context 59


def test_pcontext_mapping_selects_the_59_classes() -> None:
    # 459-class ids (labels.txt of the release) of a few classes, and unselected ids.
    known = {2: "aeroplane", 9: "bag", 284: "person", 397: "table", 427: "tvmonitor", 458: "wood", 59: "car"}
    out = pcontext.context_to_59(np.array(list(known)))
    assert [PCONTEXT59_CLASSES[v - 1] for v in out.tolist()] == list(known.values())
    assert pcontext.context_to_59(np.array([0, 1, 3, 100, 459])).tolist() == [0] * 5  # background / unselected
    assert len(pcontext.CONTEXT59_IDS) == 60 and np.all(np.diff(pcontext.CONTEXT59_IDS) > 0)
    with pytest.raises(ValueError, match="0..459"):
        pcontext.context_to_59(np.array([460]))


def test_pcontext_script_end_to_end(tmp_path: Path) -> None:
    voc, mats = tmp_path / "VOCdevkit" / "VOC2010", tmp_path / "trainval"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    mats.mkdir()
    splits = {"train": ["2008_000003", "2008_000002"], "val": ["2008_000007"]}
    for split, ids in splits.items():
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            write_rgb(voc / "JPEGImages" / f"{i}.jpg")
            savemat(mats / f"{i}.mat", {"LabelMap": bands([0, 2, 1, 458, 284], np.uint16)})

    pcontext.main([str(voc), str(mats)])

    lists = voc / "ImageSets" / "SegmentationContext"
    assert (lists / "train.txt").read_text().split() == ["2008_000002", "2008_000003"]
    png = np.array(Image.open(voc / "SegmentationClassContext" / "2008_000007.png"))
    np.testing.assert_array_equal(png, bands([0, 1, 0, 59, 37]))

    dm = PascalContext59DataModule(voc, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2
    label = dm.val_dataset[0]["label"].numpy()
    np.testing.assert_array_equal(label, bands([255, 0, 255, 58, 36], np.int64))
    assert PCONTEXT59_CLASSES[36] == "person"
