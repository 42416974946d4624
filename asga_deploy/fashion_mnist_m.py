"""Fashion-MNIST-M: Fashion-MNIST blended with colour photo patches, the way MNIST-M is made from MNIST.

Ganin & Lempitsky (2015) built MNIST-M by taking, for each digit, a random patch of a colour photo and
the per-channel absolute difference |patch - digit|. Here the photos are those scikit-image ships in
its wheel (no download), and train and test cut their patches from DISJOINT sets of photos, so the test
split also measures transfer to textures never seen in training. A split is a pure function of
(the Fashion-MNIST bytes, the photos' pixels, the recipe version, the seed); it is built once and cached
on disk under a fingerprint of exactly those, so a changed source or recipe can never serve stale data.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from .errors import DatasetError, MissingDependencyError
from .io import atomic_torch_save

RECIPE = "fashion-mnist-m/1"  # bump when the recipe changes: the fingerprint, hence the cache, follows
# Disjoint by construction; each side gets everyday colour photos, a mostly-black one (the image shows
# through almost unchanged) and a grey texture. motorcycle_right is left out: the same scene as _left.
PHOTOS = {
    "train": ("astronaut", "rocket", "retina", "immunohistochemistry", "motorcycle_left", "brick", "grass"),
    "test": ("chelsea", "coffee", "hubble_deep_field", "gravel"),
}
# per-channel mean/std of the train split, seed 0, real Fashion-MNIST (measured; recipe 1)
MEAN, STD = (0.4150, 0.3708, 0.3656), (0.2660, 0.2251, 0.2256)
_CHUNK = 8192  # images per gather: bounds the int64 index tensor to about 50 MB


def parse_seed(name: str) -> int:
    """Return the seed of `fashion-mnist-m[:seed=N]` (0 when not given)."""
    _, _, opts = name.partition(":")
    seed = 0
    for item in filter(None, opts.split(",")):
        key, _, val = item.partition("=")
        if key != "seed" or not val.isdigit():
            raise DatasetError(f"bad fashion-mnist-m option {item!r} in {name!r}; the only option is "
                               "seed=N (a non-negative integer), e.g. fashion-mnist-m:seed=1")
        seed = int(val)
    return seed


def _skimage_data():
    try:
        import skimage.data
    except ImportError as e:
        raise MissingDependencyError(
            f"scikit-image is not installed ({e}): fashion-mnist-m cuts its patches from the photos "
            "bundled in scikit-image's wheel; pip install scikit-image") from None
    return skimage.data


def load_photos(names: tuple[str, ...]) -> list[torch.Tensor]:
    """Return the named scikit-image photos as (3, H, W) uint8 tensors (grey ones repeated to 3 channels)."""
    sk = _skimage_data()
    out = []
    for name in names:
        try:
            arr = sk.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(sk, name)()
        except Exception as e:  # a photo that needs a download (pooch) or an unknown name
            raise DatasetError(f"scikit-image photo {name!r} could not be loaded offline: "
                               f"{str(e).splitlines()[0]}") from None
        t = torch.from_numpy(np.ascontiguousarray(arr))
        if t.dtype != torch.uint8 or t.dim() not in (2, 3):
            raise DatasetError(f"scikit-image photo {name!r} is {tuple(t.shape)} {t.dtype}, not a uint8 image")
        t = t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t[..., :3].permute(2, 0, 1)
        out.append(t.contiguous())
    return out


def _raw(seed: int, split: str, stream: int, n: int) -> np.ndarray:
    """Return n uint64 draws; PCG64's raw output is stable across NumPy versions (Generator methods are not)."""
    ss = np.random.SeedSequence([seed, ("train", "test").index(split), stream])
    return np.random.PCG64(ss).random_raw(n).astype(np.uint64)


def draw_patches(n: int, photos: list[torch.Tensor], seed: int, split: str, size: int = 28
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (photo index, top row, left column) of n random size x size patches, all int64."""
    heights = np.array([p.shape[1] - size + 1 for p in photos], dtype=np.uint64)
    widths = np.array([p.shape[2] - size + 1 for p in photos], dtype=np.uint64)
    if (heights < 1).any() or (widths < 1).any():
        raise DatasetError(f"a photo is smaller than a {size}x{size} patch")
    photo = _raw(seed, split, 0, n) % np.uint64(len(photos))  # modulo bias < 2^-58: negligible
    top = _raw(seed, split, 1, n) % heights[photo]
    left = _raw(seed, split, 2, n) % widths[photo]
    return tuple(torch.from_numpy(a.astype(np.int64)) for a in (photo, top, left))


def blend(images: torch.Tensor, photos: list[torch.Tensor], seed: int, split: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (|patch - image| as (N, 3, S, S) uint8, photo index per image) for uint8 (N, 1, S, S) images."""
    n, _, size, _ = images.shape
    photo, top, left = draw_patches(n, photos, seed, split, size)
    # all photos in one flat (3, L) buffer: a patch is one gather of S*S linear indices
    flat = torch.cat([p.reshape(3, -1) for p in photos], 1)
    starts = torch.tensor([0] + [p.shape[1] * p.shape[2] for p in photos[:-1]]).cumsum(0)
    row_len = torch.tensor([p.shape[2] for p in photos])
    grid = torch.arange(size)
    out = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for i in range(0, n, _CHUNK):
        sl = slice(i, i + _CHUNK)
        p, w = photo[sl], row_len[photo[sl]]
        rows = (top[sl, None] + grid)[:, :, None] * w[:, None, None]
        idx = starts[p][:, None, None] + rows + (left[sl, None] + grid)[:, None, :]
        patch = flat[:, idx].transpose(0, 1).to(torch.int16)
        out[sl] = (patch - images[sl].to(torch.int16)).abs().to(torch.uint8)
    return out, photo.to(torch.uint8)


def fingerprint(images: torch.Tensor, labels: torch.Tensor, photos: list[torch.Tensor], split: str,
                seed: int) -> str:
    """Return sha256 (hex) of the recipe, split, seed, photo names and pixels, and the source images/labels."""
    h = hashlib.sha256(f"{RECIPE}|{split}|{seed}|{','.join(PHOTOS[split])}".encode())
    for t in (*photos, images, labels):
        t = t.contiguous()
        h.update(f"|{tuple(t.shape)}{t.dtype}|".encode())
        h.update(t.numpy())
    return h.hexdigest()


def _images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy()).hexdigest()


def _read_cache(path: Path, fp: str, n: int) -> torch.Tensor | None:
    """Return the cached images if the file is whole and built from the same inputs, else None."""
    try:
        blob = torch.load(path, weights_only=True)
        images = blob["images"]
        ok = (blob["fingerprint"] == fp and images.dtype == torch.uint8 and tuple(images.shape[:2]) == (n, 3)
              and blob["images_sha256"] == _images_digest(images))
    except Exception:  # truncated, foreign or corrupt file: rebuild it
        return None
    return images if ok else None


def cache_path(cache_dir: Path, split: str, seed: int, fp: str) -> Path:
    """Return where a split is cached: the fingerprint is in the name, so changed inputs never collide."""
    return Path(cache_dir) / "fashion-mnist-m" / f"{split}-seed{seed}-{fp[:16]}.pt"


def blended(images: torch.Tensor, labels: torch.Tensor, split: str, seed: int, cache_dir: Path) -> torch.Tensor:
    """Return the (N, 3, S, S) uint8 Fashion-MNIST-M images of a split: from the cache, or built and cached."""
    photos = load_photos(PHOTOS[split])
    fp = fingerprint(images, labels, photos, split, seed)
    path = cache_path(cache_dir, split, seed, fp)
    if path.is_file():
        cached = _read_cache(path, fp, len(images))
        if cached is not None:
            return cached
    out, index = blend(images, photos, seed, split)
    blob = {"recipe": RECIPE, "fingerprint": fp, "split": split, "seed": seed, "photos": list(PHOTOS[split]),
            "photo_index": index, "images": out, "images_sha256": _images_digest(out)}
    try:
        atomic_torch_save(blob, path)
    except OSError as e:
        raise DatasetError(f"cannot write the fashion-mnist-m cache {path}: {e.strerror or e}; make the folder "
                           "writable or point ASGA_DATA_CACHE at a writable one") from None
    return out
