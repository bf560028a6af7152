"""Training data for ``python -m sparks_ext train``: image-folder trees and the built-in digits.

An image folder is ``DIR/train/<class>/<image>`` and ``DIR/val/<class>/<image>`` (PNG, JPEG, BMP,
GIF, TIFF or WebP, decoded with Pillow); the class names are the sub-folder names, sorted, and
``val`` must hold the same classes as ``train``. Images are converted to one channel (when every
sampled training image is grey) or RGB, resized to the model's input and normalised with the
mean and std of the training images.

Augmentation is drawn from a generator seeded by (seed, epoch, image index), never from the
global RNG, so an epoch sees the same crops whatever the number of DataLoader workers or
processes, and a resumed run repeats exactly what an uninterrupted run would have drawn:
- ``"small"`` (images up to 64 pixels): random crop from the image padded by 1/8 of its size,
  and a horizontal flip;
- ``"imagenet"``: RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3), horizontal flip and
  AlexNet's PCA lighting noise (std 0.1); evaluation resizes the short side to 8/7 of the input
  and takes the centre crop;
- ``"none"``: resize only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["IMAGE_EXTENSIONS", "AUGMENTATIONS", "ImageFolder", "TensorImages", "scan_image_folder",
           "load_datasets", "Datasets"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("auto", "none", "small", "imagenet")

# AlexNet's PCA of ImageNet pixel colours (RGB, pixels in [0, 1]), as used by ReActNet's Lighting.
_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                        [-0.5808, -0.0045, -0.8140],
                        [-0.5836, -0.6948, 0.4203]])


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("image folders are decoded with Pillow: pip install pillow "
                          "(or pip install 'sparks_ext[train]')") from None
    return Image


def _images_in(folder: Path):
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def scan_image_folder(root) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Checks the tree ``root/{train,val}/<class>/<image>`` and lists it.

    Returns ``(classes, {"train": [(path, label), ...], "val": [...]})``. Raises ValueError
    naming what is wrong: a missing split folder, no class folders, a class folder without
    images, or val classes that differ from train's.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data {str(root)!r}: not a directory (expected DIR/train/<class>/*.png and "
                         "DIR/val/<class>/*.png, or 'digits')")
    splits = {}
    classes = None
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise ValueError(f"--data {str(root)!r}: no {split}/ folder (expected {root}/{split}/<class>/<images>)")
        stray = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if stray:
            raise ValueError(f"--data {str(root)!r}: images directly in {split}/ ({stray[0]}, ...); each image "
                             f"belongs in a class folder, {split}/<class>/<image>")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise ValueError(f"--data {str(root)!r}: {split}/ has no class folders")
        if classes is None:
            classes = names
        elif names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise ValueError(f"--data {str(root)!r}: val/ classes differ from train/'s "
                             f"(missing in val: {missing or 'none'}, not in train: {extra or 'none'})")
        items = []
        for label, name in enumerate(names):
            images = _images_in(folder / name)
            if not images:
                raise ValueError(f"--data {str(root)!r}: {split}/{name}/ holds no images "
                                 f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
            items += [(path, label) for path in images]
        splits[split] = items
    if len(classes) < 2:
        raise ValueError(f"--data {str(root)!r}: needs at least 2 classes, found {classes}")
    return classes, splits


def _generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


def _uniform(g, low, high):
    return low + (high - low) * float(torch.rand((), generator=g))


def _resized_crop_box(width: int, height: int, g: torch.Generator):
    """torchvision's RandomResizedCrop box: (left, top, w, h)."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(g, 0.08, 1.0)
        ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            return left, top, w, h
    side = min(width, height)  # fall back to the centre crop
    return (width - side) // 2, (height - side) // 2, side, side


def _to_tensor(image) -> torch.Tensor:
    """PIL image (L or RGB) -> float (C, H, W) in [0, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    channels = len(image.getbands())
    return data.reshape(image.height, image.width, channels).permute(2, 0, 1).float() / 255.0


def _random_crop_flip(x: torch.Tensor, g: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop of x (C, H, W) padded by 1/8 of its size (at least 1 pixel), then a flip."""
    _, h, w = x.shape
    pad_h, pad_w = max(1, h // 8), max(1, w // 8)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h))
    top = int(torch.randint(0, 2 * pad_h + 1, (), generator=g))
    left = int(torch.randint(0, 2 * pad_w + 1, (), generator=g))
    x = padded[:, top:top + h, left:left + w]
    if flip and bool(torch.rand((), generator=g) < 0.5):
        x = x.flip(-1)
    return x


@dataclass
class Normalize:
    mean: list
    std: list

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return (x - mean) / std


class ImageFolder(torch.utils.data.Dataset):
    """Images listed by :func:`scan_image_folder`, decoded with Pillow, resized to
    ``image_size`` and augmented (``augment`` in "none" | "small" | "imagenet", train split only)
    with a generator seeded by (seed, epoch, index); call :meth:`set_epoch` before each epoch."""

    def __init__(self, items: Sequence[tuple[Path, int]], image_size: int, channels: int,
                 augment: str = "none", train: bool = False, seed: int = 0,
                 normalize: Optional[Normalize] = None):
        self.items, self.image_size, self.channels = list(items), int(image_size), int(channels)
        self.augment, self.train, self.seed, self.epoch = augment, train, seed, 0
        self.normalize = normalize

    def __len__(self):
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.items]

    def decode(self, index: int):
        Image = _pil()
        path, _ = self.items[index]
        try:
            with Image.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                image.load()
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"cannot decode image {path}: {e}") from None
        return image

    def __getitem__(self, index: int):
        Image = _pil()
        image = self.decode(index)
        size = self.image_size
        g = _generator(self.seed, self.epoch, index) if self.train else None
        bilinear = Image.Resampling.BILINEAR
        if self.augment == "imagenet" and g is not None:
            left, top, w, h = _resized_crop_box(image.width, image.height, g)
            x = _to_tensor(image.resize((size, size), bilinear, box=(left, top, left + w, top + h)))
            if bool(torch.rand((), generator=g) < 0.5):
                x = x.flip(-1)
            if self.channels == 3:
                alpha = torch.randn(3, generator=g) * 0.1
                x = x + (_EIGVEC @ (alpha * _EIGVAL))[:, None, None]
        elif self.augment == "imagenet":
            scale = size * 8 / 7 / min(image.width, image.height)  # resize 256, centre crop 224
            w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
            image = image.resize((w, h), bilinear)
            left, top = (w - size) // 2, (h - size) // 2
            x = _to_tensor(image.crop((left, top, left + size, top + size)))
        else:
            if image.size != (size, size):
                image = image.resize((size, size), bilinear)
            x = _to_tensor(image)
            if self.augment == "small" and g is not None:
                x = _random_crop_flip(x, g)
        if self.normalize is not None:
            x = self.normalize(x)
        return x, self.items[index][1]


class TensorImages(torch.utils.data.Dataset):
    """In-memory images (N, C, H, W) and labels, with the "small" augmentation (without the
    flip: for digits it would change the class) drawn as :class:`ImageFolder` does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str = "none",
                 train: bool = False, seed: int = 0):
        self.images, self.labels = images, labels
        self.augment, self.train, self.seed, self.epoch = augment, train, seed, 0

    def __len__(self):
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, index: int):
        x = self.images[index]
        if self.train and self.augment == "small":
            x = _random_crop_flip(x, _generator(self.seed, self.epoch, index), flip=False)
        return x, int(self.labels[index])


@dataclass
class Datasets:
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    classes: list
    channels: int
    image_size: int
    augment: str


def _channels_of(items, sample: int = 64) -> int:
    Image = _pil()
    step = max(1, len(items) // sample)
    for path, _ in items[::step]:
        try:
            with Image.open(path) as image:
                if image.mode not in ("1", "L", "I;16", "I", "F", "LA"):
                    return 3
        except OSError as e:
            raise ValueError(f"cannot decode image {path}: {e}") from None
    return 1


def _statistics(dataset: ImageFolder, sample: int = 512) -> Normalize:
    """Per-channel mean and std of up to ``sample`` training images (evenly spaced)."""
    step = max(1, len(dataset) // sample)
    xs = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)])
    dims = (0, 2, 3)
    return Normalize(xs.mean(dims).tolist(), xs.std(dims).clamp_min(1e-3).tolist())


def load_datasets(data: str, image_size: Optional[int], augment: str = "auto", seed: int = 0,
                  default_image_size: int = 32, normalize: Optional[dict] = None) -> Datasets:
    """The train and val datasets of ``data``: "digits" (scikit-learn's 8x8 digits, the split of
    :func:`sparks_ext.datasets.load_digits_split`) or an image-folder root.

    ``image_size`` None keeps the digits at 8x8 and resizes folder images to
    ``default_image_size``; ``augment`` "auto" is "none" for the digits, "small" for folder
    images up to 64 pixels and "imagenet" above. ``normalize`` ({"mean": [...], "std": [...]})
    reuses saved statistics instead of measuring them.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {AUGMENTATIONS}, got {augment!r}")
    if image_size is not None and (isinstance(image_size, bool) or int(image_size) < 4):
        raise ValueError(f"--image-size must be at least 4, got {image_size}")
    if data == "digits":
        from .datasets import load_digits_split
        x_train, y_train, x_val, y_val = load_digits_split()
        size = 8 if image_size is None else int(image_size)
        if size != 8:
            x_train = F.interpolate(x_train, size=(size, size), mode="bilinear", align_corners=False)
            x_val = F.interpolate(x_val, size=(size, size), mode="bilinear", align_corners=False)
        if augment == "imagenet":
            raise ValueError("--augment imagenet needs an image folder; the digits take none or small")
        aug = "none" if augment == "auto" else augment
        return Datasets(TensorImages(x_train, y_train, aug, True, seed), TensorImages(x_val, y_val),
                        [str(i) for i in range(10)], 1, size, aug)
    classes, splits = scan_image_folder(data)
    size = default_image_size if image_size is None else int(image_size)
    aug = ("small" if size <= 64 else "imagenet") if augment == "auto" else augment
    channels = _channels_of(splits["train"])
    if normalize is None:
        normalize = _statistics(ImageFolder(splits["train"], size, channels, "imagenet" if aug == "imagenet" else "none"))
    else:
        normalize = Normalize(list(normalize["mean"]), list(normalize["std"]))
    train = ImageFolder(splits["train"], size, channels, aug, True, seed, normalize)
    val = ImageFolder(splits["val"], size, channels, aug, False, seed, normalize)
    return Datasets(train, val, classes, channels, size, aug)
