"""Joint image/label pipelines reproducing the mmsegmentation train and test pipelines.

Every transform here is a callable ``(image, mask) -> (image, mask)`` on
``tv_tensors.Image`` ``[3, H, W]`` and ``tv_tensors.Mask`` ``[H, W]``, so they chain in a
``torchvision.transforms.v2.Compose`` next to the stock v2 transforms (flip, dtype,
normalise). All randomness comes from torch's global RNG, which the DataLoader seeds per
worker (numpy's is not reseeded in workers, so numpy randomness would repeat augmentations).

Size convention: **every size in dtop is (H, W)**. mmsegmentation writes scales as (W, H),
e.g. ADE20K ``scale=(2048, 512)`` is ``(512, 2048)`` here. For keep-ratio resizing only the
long and short edge matter (mmcv ``rescale_size`` semantics), so the order of ``scale``
does not change the result; for ``crop_size`` and padding it does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dtop.data.base import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "JointTransform",
    "KeepRatioResize",
    "PadToSize",
    "PhotoMetricDistortion",
    "RandomCropCatMax",
    "RandomResize",
    "build_eval_transform",
    "build_train_transform",
    "keep_ratio_size",
    "shift_hue",
]

JointTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Tensor, Tensor]]


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    """Validate an (H, W) pair (configs hand over lists)."""
    if len(value) != 2 or any(int(v) != v or v < 1 for v in value):
        raise ValueError(f"{name} must be two positive ints (H, W), got {value!r}")
    return int(value[0]), int(value[1])


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """(H, W) after mmcv ``imrescale(img, scale)``: the largest size with the same aspect
    whose long edge is <= max(scale) and short edge <= min(scale) (may upscale)."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    # antialias=False matches mmcv/cv2 INTER_LINEAR, which does not low-pass on downscaling.
    return F.resize(image, list(size), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)


class RandomResize:
    """mmseg ``RandomResize(scale, ratio_range, keep_ratio=True)``: rescale to fit inside
    ``scale * ratio`` with ``ratio ~ U(ratio_range)``; labels use nearest neighbour."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        self.scale = _pair(scale, "scale")
        if len(ratio_range) != 2 or not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range!r}")
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand(()).item()
        # mmcv truncates the jittered target scale to ints before fitting the image into it.
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = keep_ratio_size(image.shape[-2], image.shape[-1], target)
        return _resize_image(image, size), F.resize(mask, list(size), interpolation=v2.InterpolationMode.NEAREST)


class KeepRatioResize:
    """Test-time mmseg ``Resize(scale, keep_ratio=True)`` of the image only: the label stays
    at the original resolution, and the model resizes its logits back to it."""

    def __init__(self, scale: Sequence[int]) -> None:
        self.scale = _pair(scale, "scale")

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        size = keep_ratio_size(image.shape[-2], image.shape[-1], self.scale)
        return _resize_image(image, size), mask


class RandomCropCatMax:
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)``.

    Crops never leave the image (a side shorter than the crop is kept whole and padded
    later). While the crop is dominated by one class, i.e. it has a single class or one
    class covers >= ``cat_max_ratio`` of its non-ignore pixels, a new crop is drawn, up to
    10 times; the last draw is kept if none qualifies. This keeps large stuff classes (sky,
    road, wall) from filling whole batches.
    """

    max_tries = 10

    def __init__(self, crop_size: Sequence[int], cat_max_ratio: float = 0.75, ignore_index: int = 255) -> None:
        self.crop_size = _pair(crop_size, "crop_size")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index

    def _random_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.crop_size[0], height), min(self.crop_size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return top, left, crop_h, crop_w

    def _balanced(self, mask: Tensor, box: tuple[int, int, int, int]) -> bool:
        top, left, h, w = box
        counts = torch.bincount(mask[top : top + h, left : left + w].reshape(-1).long())
        if self.ignore_index < counts.numel():
            counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return counts.numel() > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        height, width = mask.shape[-2:]
        box = self._random_box(height, width)
        if self.cat_max_ratio < 1:
            for _ in range(self.max_tries):
                if self._balanced(mask, box):
                    break
                box = self._random_box(height, width)
        return F.crop(image, *box), F.crop(mask, *box)


def shift_hue(image: Tensor, shift: float) -> Tensor:
    """torchvision's ``adjust_hue`` of a float RGB image ``[..., 3, H, W]`` in [0, 1] by ``shift`` turns.

    The same function (to float rounding) in a dozen elementwise passes instead of torchvision's HSV round
    trip with its per-pixel gather: 2.4× faster on a 512² crop, where it was a sample's largest cost.
    Value ``v`` and chroma ``c`` stay; each channel is ``v - c·clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6·hue) mod 6`` and n = 5, 3, 1 for R, G, B (the hexcone's HSV→RGB).
    """
    r, g, b = image.unbind(-3)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    inv = torch.where(c > 0, c, 1.0).reciprocal_()
    hue = torch.where(v == r, (g - b) * inv, torch.where(v == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv))
    hue = (hue + 6.0 * shift).remainder_(6.0)
    k = (hue.unsqueeze(-3) + image.new_tensor([5.0, 3.0, 1.0]).view(3, 1, 1)).remainder_(6.0)
    return v.unsqueeze(-3) - c.unsqueeze(-3) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on float images in [0, 1]; each op fires with p=0.5.

    Brightness is additive and contrast multiplicative (as mmseg, unlike torchvision's
    ColorJitter); saturation uses torchvision's op (it blends with the grey image instead of
    scaling HSV saturation, a small deviation), hue :func:`shift_hue` (torchvision's, faster).
    Contrast runs either first or last, at random, as in mmseg. ``brightness_delta`` and ``hue_delta`` are in
    mmseg units: 0-255 intensity and 0-180 OpenCV hue.
    """

    def __init__(
        self,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
    ) -> None:
        self.brightness_delta = brightness_delta / 255.0
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = hue_delta

    @staticmethod
    def _fire() -> bool:
        return bool(torch.randint(0, 2, ()).item())

    @staticmethod
    def _uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(()).item()

    def _contrast(self, image: Tensor) -> Tensor:
        if self._fire():
            image = (image * self._uniform(*self.contrast_range)).clamp_(0.0, 1.0)
        return image

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        if not image.is_floating_point():
            raise TypeError("PhotoMetricDistortion expects a float image in [0, 1]; put ToDtype(scale=True) first")
        out = image.as_subclass(Tensor)
        if self._fire():
            out = (out + self._uniform(-self.brightness_delta, self.brightness_delta)).clamp(0.0, 1.0)
        contrast_first = self._fire()
        if contrast_first:
            out = self._contrast(out)
        if self._fire():
            out = F.adjust_saturation(out, self._uniform(*self.saturation_range))
        if self._fire():
            shift = int(torch.randint(-self.hue_delta, self.hue_delta + 1, ()).item())
            out = shift_hue(out, shift / 180.0)
        if not contrast_first:
            out = self._contrast(out)
        return tv_tensors.wrap(out, like=image), mask


class PadToSize:
    """Pad bottom/right up to ``size`` (mmseg pads after normalisation: image 0, label ignore)."""

    def __init__(self, size: Sequence[int], ignore_index: int = 255) -> None:
        self.size = _pair(size, "size")
        self.ignore_index = ignore_index

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask) -> tuple[Tensor, Tensor]:
        pad_h = max(self.size[0] - image.shape[-2], 0)
        pad_w = max(self.size[1] - image.shape[-1], 0)
        if pad_h == 0 and pad_w == 0:
            return image, mask
        padding = [0, 0, pad_w, pad_h]  # left, top, right, bottom
        return F.pad(image, padding, fill=0), F.pad(mask, padding, fill=self.ignore_index)


Normalisation = tuple[Sequence[float], Sequence[float]]  # (mean, std) of RGB in [0, 1]


def _to_normalised_float(norm: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(norm[0]), list(norm[1]))]


def build_train_transform(
    scale: Sequence[int],
    crop_size: Sequence[int],
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    ignore_index: int = 255,
    norm: Normalisation = (IMAGENET_MEAN, IMAGENET_STD),
) -> JointTransform:
    """mmseg train pipeline: RandomResize -> RandomCrop(cat_max_ratio) -> flip ->
    PhotoMetricDistortion -> normalise (``norm``: mean, std) -> pad to ``crop_size``; uint8 in, float32 out."""
    to_float, normalise = _to_normalised_float(norm)
    steps: list[Callable] = [
        RandomResize(scale, ratio_range),
        RandomCropCatMax(crop_size, cat_max_ratio, ignore_index),
        v2.RandomHorizontalFlip(flip_prob),
        to_float,
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [normalise, PadToSize(crop_size, ignore_index)]
    return v2.Compose(steps)


def build_eval_transform(scale: Sequence[int], norm: Normalisation = (IMAGENET_MEAN, IMAGENET_STD)) -> JointTransform:
    """mmseg test pipeline: keep-ratio resize of the image to ``scale``, label untouched."""
    return v2.Compose([KeepRatioResize(scale), *_to_normalised_float(norm)])
