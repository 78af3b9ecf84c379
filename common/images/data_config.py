"""One data configuration per model: how a radiograph file becomes that model's input.

Like timm's `pretrained_cfg`, a `DataConfig` is decided once per backbone or checkpoint, written
into the store manifest and into every checkpoint, and every consumer (extraction, fine-tune
training and evaluation, heads.predict, class activation maps) builds its input from it and from
nothing else, so one model sees one field of view wherever it runs.

Geometry (`resize`), from the decoded gray image to a square of side round(input_size / crop_pct),
then the centered input_size crop of that square:

- "pad" (default): scale the long side to the square and center the image on black. Nothing is
  cut (the costophrenic angles and apices stay in view) and nothing is distorted (CheXpert's
  images are not square). On square archives such as NIH ChestX-ray14 it equals a plain resize.
- "crop": scale the short side and cut the long one to a centered square (torchxrayvision's rule).
- "stretch": resize both sides independently (distorts non-square images).

Training augmentation is this same input shifted by up to train_shift * input_size pixels (the
uncovered border black) and mirrored left-right with probability 1/2 when train_flip is set: the
eval geometry plus a random crop and flip, never another field of view.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from common import fs
from common.images.decode import MAX_PIXELS, decode_gray, to_unit_array

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("pad", "crop", "stretch")
INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# Written beside the values so a later reader can tell what the fields meant.
VALUE_SCALING = "8-bit /255, 16-bit /65535"
CHANNELS = {3: "gray replicated to 3 channels", 1: "one gray channel"}


class DataConfigError(ValueError):
    """A data configuration that is malformed or not one this code knows; one line."""


@dataclass(frozen=True)
class Placement:
    """Where an original image lands in the input: input = original * scale + offset, per axis."""

    scale_x: float
    scale_y: float
    left: float
    top: float

    def to_input(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x * self.scale_x + self.left, y * self.scale_y + self.top


@dataclass(frozen=True)
class DataConfig:
    input_size: int
    resize: str = "pad"
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    train_shift: float = 0.0625
    train_flip: bool = True
    # 3: gray replicated to three channels (ImageNet models); 1: one gray channel (torchxrayvision's).
    in_channels: int = 3

    def __post_init__(self):
        if not isinstance(self.input_size, int) or isinstance(self.input_size, bool) or self.input_size < 8:
            raise DataConfigError(f"input_size {self.input_size!r}: give an integer of at least 8 pixels")
        if self.resize not in RESIZE_MODES:
            raise DataConfigError(f"resize {self.resize!r}: choose from {', '.join(RESIZE_MODES)}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise DataConfigError(f"crop_pct {self.crop_pct!r}: give a fraction in [0.1, 1]")
        if self.interpolation not in INTERPOLATIONS:
            raise DataConfigError(f"interpolation {self.interpolation!r}: choose from {', '.join(INTERPOLATIONS)}")
        if not 0.0 <= self.train_shift < 0.5:
            raise DataConfigError(f"train_shift {self.train_shift!r}: give a fraction in [0, 0.5)")
        if self.in_channels not in (1, 3):
            raise DataConfigError(f"in_channels {self.in_channels!r}: 1 (gray) or 3 (gray replicated)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != self.in_channels or (name == "std" and min(value) <= 0):
                raise DataConfigError(f"{name} {value!r}: give {self.in_channels} number(s) (std > 0)")
        # JSON gives lists; keep tuples so equal configs compare and hash equal.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    # --- records -----------------------------------------------------------------------------

    def to_dict(self) -> dict:
        record = {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std),
                  "value_scaling": VALUE_SCALING, "channels": CHANNELS[self.in_channels]}
        if self.in_channels == 3:  # as every record before one-channel models: equal configs, equal records
            del record["in_channels"]
        return record

    @classmethod
    def from_dict(cls, record: dict, source: str = "data config") -> DataConfig:
        """The config a manifest or checkpoint recorded; one-line DataConfigError naming `source` otherwise."""
        if not isinstance(record, dict):
            raise DataConfigError(f"{source}: data_config is {type(record).__name__}, not a table")
        fields = {f.name for f in dataclasses.fields(cls)}
        known = {"value_scaling": VALUE_SCALING, "channels": CHANNELS[record.get("in_channels", 3)]
                 if record.get("in_channels", 3) in CHANNELS else None}
        for key, value in known.items():
            if record.get(key, value) != value:
                raise DataConfigError(f"{source}: data_config {key} {record[key]!r} is not what this code does ({value!r})")
        unknown = sorted(set(record) - fields - set(known))
        if unknown:
            raise DataConfigError(f"{source}: data_config has unknown field(s) {', '.join(unknown)}")
        if "input_size" not in record:
            raise DataConfigError(f"{source}: data_config has no input_size")
        try:
            return cls(**{k: v for k, v in record.items() if k in fields})
        except (TypeError, DataConfigError) as exc:
            raise DataConfigError(f"{source}: {exc}") from None

    def describe(self) -> str:
        """One line for logs and reports."""
        crop = f", center crop {self.crop_pct:g}" if self.crop_pct < 1 else ""
        how = {"pad": "long side scaled, padded to square (aspect kept, nothing cut)",
               "crop": "short side scaled, center-cropped to square",
               "stretch": "both sides scaled (aspect not kept)"}[self.resize]
        norm = "ImageNet mean/std" if self.mean == IMAGENET_MEAN and self.std == IMAGENET_STD else \
            f"mean {', '.join(f'{v:g}' for v in self.mean)}, std {', '.join(f'{v:g}' for v in self.std)}"
        return f"{self.input_size} px, {how}{crop}, {self.interpolation}, {norm}, {CHANNELS[self.in_channels]}"

    def describe_training(self) -> str:
        flip = " and a horizontal flip half the time" if self.train_flip else ""
        return f"the eval input shifted by up to {round(self.input_size * self.train_shift)} px{flip}"

    # --- geometry ----------------------------------------------------------------------------

    @property
    def square_side(self) -> int:
        """The side of the square the image is resized to before the center crop."""
        return round(self.input_size / self.crop_pct)

    def _content(self, width: int, height: int) -> tuple[int, int, tuple[float, float, float, float] | None]:
        """Size the (part of the) image is resized to, and the source box that is used (None: all)."""
        side = self.square_side
        if self.resize == "stretch":
            return side, side, None
        if self.resize == "crop":
            m = min(width, height)
            return side, side, ((width - m) / 2, (height - m) / 2, (width + m) / 2, (height + m) / 2)
        s = side / max(width, height)
        return max(1, round(width * s)), max(1, round(height * s)), None

    def placement(self, width: int, height: int) -> Placement:
        """How an image of (width, height) maps into the input, as `load` places it."""
        side, cut = self.square_side, (self.square_side - self.input_size) // 2
        w, h, box = self._content(width, height)
        if box is None:
            left, top = (side - w) // 2, (side - h) // 2
            return Placement(w / width, h / height, left - cut, top - cut)
        sx, sy = w / (box[2] - box[0]), h / (box[3] - box[1])
        return Placement(sx, sy, -box[0] * sx - cut, -box[1] * sy - cut)

    def load(self, path: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        """`path` as this model's (input_size, input_size) float32 gray input in [0, 1]; raises if
        unreadable or larger than `max_pixels`."""
        return self.place(*decode_gray(path, self.square_side, max_pixels))

    def load_with(self, other: DataConfig, path: str, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
        """`path` as this config's input and as `other`'s, from one decode: a backbone's input and a lung
        model's own input of the same film. The decode is this config's (a JPEG reduced as far as this
        config's side allows), so this input is exactly what `load` gives: one model, one preprocessing."""
        gray, scale = decode_gray(path, self.square_side, max_pixels)
        return self.place(gray, scale), other.place(gray, scale)

    def place(self, gray: Image.Image, scale: float) -> np.ndarray:
        """A decoded image (common.images.decode.decode_gray's mode 'F' image and scale) as this config's input."""
        side, size = self.square_side, self.input_size
        w, h, box = self._content(*gray.size)
        resized = gray.resize((w, h), INTERPOLATIONS[self.interpolation], box=box)
        if (w, h) != (side, side):
            canvas = Image.new("F", (side, side), 0.0)
            canvas.paste(resized, ((side - w) // 2, (side - h) // 2))
            resized = canvas
        if side != size:
            cut = (side - size) // 2
            resized = resized.crop((cut, cut, cut + size, cut + size))
        return to_unit_array(resized, scale)

    def train_view(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A training view of a `load`ed image: random shift (black border) and flip."""
        shift = round(self.input_size * self.train_shift)
        if shift:
            padded = np.pad(image, shift)
            top, left = (int(v) for v in rng.integers(0, 2 * shift + 1, size=2))
            image = padded[top:top + self.input_size, left:left + self.input_size]
        if self.train_flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)

    # --- network input -------------------------------------------------------------------------

    def to_tensor(self, batch: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(N, S, S) float32 in [0, 1] -> (N, in_channels, S, S) float32, normalized per channel.

        A torch tensor stays on its device, so a GPU caller can copy the one-channel batch
        (a third of the bytes) and normalize there.
        """
        import torch

        x = torch.as_tensor(batch)
        if x.ndim != 3 or x.shape[1:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected a batch of shape (N, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        x = x.to(torch.float32)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, self.in_channels, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, self.in_channels, 1, 1)
        # (N, 1, S, S) broadcast against (1, 3, 1, 1) replicates the gray channel in the same op.
        return (x.unsqueeze(1) - mean) / std

    def with_overrides(self, input_size: int | None = None, resize: str | None = None) -> DataConfig:
        """This config with the flags a user gave (None: keep)."""
        changes = {k: v for k, v in (("input_size", input_size), ("resize", resize)) if v is not None}
        return dataclasses.replace(self, **changes) if changes else self


def load_input(load: Callable, path: str) -> tuple[np.ndarray | None, str | None]:
    """(image, None), or (None, a one-line error) for a file `load` cannot read (or an object not there). A
    store that fails to hand over an object's bytes (unreachable, refused) raises: that says nothing of the
    image, and an error row would keep it out of the store for good."""
    try:
        source = fs.readable(path)  # a local path as it is; an object's bytes
    except (FileNotFoundError, IsADirectoryError, ValueError) as exc:  # no such object; a refused URI
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]
    try:
        return load(source), None
    except Exception as exc:  # any decoder failure is data, recorded per image
        message = " ".join(str(exc).split())
        return None, f"{type(exc).__name__}: {message}"[:500]


def input_loader(data_config: DataConfig, transform=None, max_pixels: int = MAX_PIXELS) -> Callable:
    """path -> the backbone's input; with a `transform`, (that input, the transform's own view of the film:
    `transform.view(data_config)`, e.g. the lung model's input at its own size), both from one decode."""
    if transform is None:
        return partial(data_config.load, max_pixels=max_pixels)
    return partial(data_config.load_with, transform.view(data_config), max_pixels=max_pixels)
