"""Training data for the general-scene naturalizer: simulated event streams with exact frames.

Every clip is drawn from a seed (``base_seed + index``), so a dataset is reproducible and can be
generated on the fly by any number of workers or cached on disk. A clip is

* a background: a natural image that ships inside an installed package (scikit-image's data,
  scikit-learn's two sample photos) or a procedural dead-leaves image, grey, seen through a
  moving camera (:func:`events.simulate.simulate_scene`: translation, rotation, zoom,
  perspective);
* 0-3 foreground objects (crops of other images or dead leaves, with soft random masks) moving
  on their own;
* per-clip DVS parameters from wide ranges (thresholds 0.1-0.7 with ON/OFF ratio up to 1.5,
  mismatch, refractory period, photoreceptor low-pass, background noise, leak, hot pixels) so
  the model sees the spread of real sensors;
* the events binned into ``count`` frames ``[T, 2, H, W]`` (10 ms bins from t = 0) and the exact
  intensity frame at the end of every bin ``[T, H, W]``.

The image split is by source: :data:`TEST_IMAGES` are never used for training (the simulated
test set :func:`test_clips` uses only them, and dead leaves from a seed range training never
draws). ``../shared/data/events-gt`` (real recordings) is never read here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from events import ROI, bin_events
from events.simulate import SceneClip, SceneConfig, dead_leaves, object_mask, simulate_scene

__all__ = [
    "IMAGE_SOURCES",
    "TEST_IMAGES",
    "SceneDataConfig",
    "SceneDataset",
    "image_bank",
    "test_clips",
]

# name -> (loader description, licence) for the model card. scikit-image's own notes
# (skimage/data/__init__.py docstrings) give each image's provenance.
IMAGE_SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("scikit-image data.astronaut (NASA)", "public domain"),
    "brick": ("scikit-image data.brick", "CC0 (scikit-image contributors)"),
    "camera": ("scikit-image data.camera", "CC0 (scikit-image)"),
    "cell": ("scikit-image data.cell", "CC0 (scikit-image)"),
    "chelsea": ("scikit-image data.chelsea (Stefan van der Walt)", "CC0"),
    "clock": ("scikit-image data.clock (Stefan van der Walt)", "CC0"),
    "coffee": ("scikit-image data.coffee (Rachel Michetti)", "CC0"),
    "coins": ("scikit-image data.coins (Walters Art Museum)", "public domain"),
    "grass": ("scikit-image data.grass (Flickr, Liz West)", "CC0"),
    "gravel": ("scikit-image data.gravel (Flickr, Greg Mulhauser)", "CC0"),
    "hubble_deep_field": ("scikit-image data.hubble_deep_field (NASA/ESA)", "public domain"),
    "immunohistochemistry": ("scikit-image data.immunohistochemistry", "public domain"),
    "moon": ("scikit-image data.moon", "public domain (unknown author)"),
    "page": ("scikit-image data.page", "CC0 (scikit-image)"),
    "retina": ("scikit-image data.retina (Häggström)", "CC0"),
    "rocket": ("scikit-image data.rocket (SpaceX)", "CC0"),
    "text": ("scikit-image data.text", "CC0 (scikit-image)"),
    "china": ("scikit-learn load_sample_images china.jpg (danielbuechele, Flickr)", "CC BY 2.0"),
    "flower": ("scikit-learn load_sample_images flower.jpg (vultilion, Flickr)", "CC BY 2.0"),
    "dead-leaves": ("procedural: events.simulate.dead_leaves", "generated, no licence"),
}

TEST_IMAGES = ("coffee", "rocket", "flower", "clock")  # never trained on
_TEST_LEAVES_SEED = 10**9  # dead leaves of the test set come from seeds training never reaches


def _gray(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        a = a.astype(np.float64)
    elif a.dtype == np.uint8:
        a = a / 255.0
    if a.ndim == 3:
        a = a[..., :3] @ np.array([0.299, 0.587, 0.114])
    return np.clip(a.astype(np.float64), 0.0, 1.0)


@lru_cache(maxsize=2)
def image_bank(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    """The natural images of ``split`` ("train" or "test") as grey ``[H, W]`` float64 in [0, 1].

    Only images that ship inside the installed packages are used (nothing is downloaded);
    an image whose package is missing is skipped.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    out: list[tuple[str, np.ndarray]] = []
    try:
        import skimage.data as skd
    except ImportError:  # pragma: no cover - scikit-image is a training dependency
        skd = None  # type: ignore[assignment]
    for name in IMAGE_SOURCES:
        if name == "dead-leaves" or (name in TEST_IMAGES) != (split == "test"):
            continue
        img = None
        if name in ("china", "flower"):
            try:
                from sklearn.datasets import load_sample_image

                img = load_sample_image(f"{name}.jpg")
            except ImportError:  # pragma: no cover
                img = None
        elif skd is not None:
            img = getattr(skd, name)()
        if img is not None:
            out.append((name, _gray(img)))
    return tuple(out)


@dataclass(frozen=True)
class SceneDataConfig:
    """What one training clip looks like (see the module docstring)."""

    height: int = 64
    width: int = 64
    n_bins: int = 32
    dt_us: int = 10_000
    p_dead_leaves: float = 0.35  # share of backgrounds that are procedural
    leaves_size: int = 160
    object_size_px: int = 48
    split: str = "train"
    scene: SceneConfig = field(default_factory=SceneConfig)

    def to_dict(self) -> dict:
        return asdict(self)


def _crop(rng: np.random.Generator, img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape
    s = min(size, h, w)
    y, x = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
    return img[y : y + s, x : x + s]


def make_clip(index: int, config: SceneDataConfig, base_seed: int = 0) -> SceneClip:
    """Clip number ``index`` of a dataset (deterministic in ``base_seed + index``)."""
    seed = (_TEST_LEAVES_SEED if config.split == "test" else 0) + base_seed + index
    rng = np.random.default_rng(seed)
    bank = image_bank(config.split)
    if not bank or rng.random() < config.p_dead_leaves:
        bg = dead_leaves((config.leaves_size, config.leaves_size), rng)
    else:
        bg = bank[rng.integers(len(bank))][1]
    n_obj = int(rng.integers(config.scene.n_objects[0], config.scene.n_objects[1] + 1))
    objects = []
    for _ in range(n_obj):
        s = config.object_size_px
        img = (
            dead_leaves((s, s), rng, r_max=s / 2)
            if not bank or rng.random() < 0.5
            else _crop(rng, bank[rng.integers(len(bank))][1], int(rng.integers(s, 4 * s)))
        )
        objects.append((img, object_mask(img.shape, rng)))
    scene = replace(config.scene, height=config.height, width=config.width)
    times = np.arange(1, config.n_bins + 1, dtype=np.int64) * config.dt_us
    return simulate_scene(
        bg, objects, duration_us=int(times[-1]), frame_times_us=times, config=scene, seed=rng
    )


def clip_tensors(clip: SceneClip, n_bins: int, dt_us: int) -> tuple[np.ndarray, np.ndarray]:
    """(count frames ``uint8 [T, 2, H, W]`` of 10 ms bins from t = 0, frames ``float16 [T, H, W]``
    at the bins' ends)."""
    x = bin_events(
        clip.events,
        ROI.full(clip.width, clip.height),
        dt_us,
        t0=0,
        n_bins=n_bins,
        polarity="split",
        mode="count",
    )
    return x, clip.frames.astype(np.float16)


class SceneDataset(torch.utils.data.Dataset):
    """Map-style dataset of simulated clips: item ``i`` -> ``(x uint8 [T, 2, H, W], target
    float16 [T, H, W])``; optional on-disk cache (``.npz`` per clip, keyed by the config hash)."""

    def __init__(
        self,
        config: SceneDataConfig,
        length: int,
        base_seed: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ):
        self.config = config
        self.length = int(length)
        self.base_seed = int(base_seed)
        key = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        self.cache = Path(cache_dir) / f"scenes-{key}-{base_seed}" if cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)
            (self.cache / "config.json").write_text(json.dumps(config.to_dict(), indent=1))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        path = self.cache / f"{index:07d}.npz" if self.cache else None
        if path is not None and path.exists():
            with np.load(path) as z:
                return z["x"], z["y"]
        clip = make_clip(index, self.config, self.base_seed)
        x, y = clip_tensors(clip, self.config.n_bins, self.config.dt_us)
        if path is not None:
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, x=x, y=y)
            os.replace(tmp, path)
        return x, y


def iterate_batches(dataset: SceneDataset, batch: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless shuffled index batches."""
    while True:
        order = rng.permutation(len(dataset))
        for i in range(0, len(order) - batch + 1, batch):
            yield order[i : i + batch].tolist()


def test_clips(
    n: int = 8,
    seed: int = 0,
    *,
    height: int = 120,
    width: int = 160,
    duration_us: int = 500_000,
    frame_every_us: int = 50_000,
) -> list[SceneClip]:
    """The simulated test set: ``n`` clips of held-out images (:data:`TEST_IMAGES`) and
    held-out dead leaves, at a resolution training never uses, with exact frames every
    ``frame_every_us``. Deterministic in ``seed``."""
    cfg = SceneDataConfig(
        height=height,
        width=width,
        split="test",
        leaves_size=2 * max(height, width),
        object_size_px=max(height, width) // 3,
    )
    clips = []
    times = np.arange(frame_every_us, duration_us + 1, frame_every_us, dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng(_TEST_LEAVES_SEED + 7919 * seed + i)
        bank = image_bank("test")
        bg = (
            bank[i % len(bank)][1]
            if bank and i % 3 != 2
            else dead_leaves((cfg.leaves_size, cfg.leaves_size), rng)
        )
        objects = []
        for _ in range(int(rng.integers(0, 3))):
            s = cfg.object_size_px
            img = dead_leaves((s, s), rng, r_max=s / 2)
            objects.append((img, object_mask(img.shape, rng)))
        scene = replace(cfg.scene, height=height, width=width)
        clips.append(
            simulate_scene(bg, objects, duration_us=duration_us, frame_times_us=times, config=scene, seed=rng)
        )
    return clips
