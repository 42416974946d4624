"""Datasets by name (fashion-mnist, fashion-mnist-m, cifar10, imagefolder, fake), proxy subsets and loaders.

Small datasets live in memory as uint8 tensors and are normalised per item, so an epoch costs
little more than the model. The data order is a function of (seed, epoch) only (`set_epoch`),
which is what makes resumed training end in the same state as an uninterrupted run.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from . import fashion_mnist_m
from .errors import DatasetError

# where `apt-get install dataset-fashion-mnist` puts the files; tests may monkeypatch this list
SYSTEM_DIRS = [Path("/usr/share/datasets")]
CACHE_DIR = Path(os.environ.get("ASGA_DATA_CACHE", Path.home() / ".cache" / "asga-deploy" / "data"))
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DataSpec:
    """What a dataset delivers: class count, channels, native input size and normalisation."""

    name: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = ("fashion-mnist", "fashion-mnist-m", "cifar10", "imagefolder", "fake")
_WITH_OPTIONS = ("fake", "fashion-mnist-m")  # the others take no `:options` (they would be ignored)


def _fake_params(name: str) -> dict:
    """Parse `fake[:classes=K,size=S,chans=C,train=N,test=M,seed=X]` into its parameters."""
    p = {"classes": 10, "size": 28, "chans": 1, "train": 256, "test": 128, "seed": 0}
    _, _, opts = name.partition(":")
    for item in filter(None, opts.split(",")):
        key, _, val = item.partition("=")
        if key not in p or not val.isdigit():
            raise DatasetError(f"bad fake dataset option {item!r} in {name!r}; use "
                               "fake:classes=K,size=S,chans=C,train=N,test=M,seed=X (integers)")
        p[key] = int(val)
    if p["classes"] < 2 or p["size"] < 4 or p["chans"] not in (1, 3) or p["train"] < 1 or p["test"] < 1:
        raise DatasetError(f"fake dataset {name!r}: need classes >= 2, size >= 4, chans 1 or 3, train/test >= 1")
    return p


def _check_name(name: str) -> str:
    base = name.split(":", 1)[0]
    if base not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DatasetError(f"unknown dataset {name!r}{hint} (known: {', '.join(DATASETS)})")
    if ":" in name and base not in _WITH_OPTIONS:
        raise DatasetError(f"dataset {base} takes no options (got {name!r}); only "
                           f"{' and '.join(_WITH_OPTIONS)} do, e.g. fashion-mnist-m:seed=1")
    return base


def dataset_spec(name: str, data_dir: str | Path | None = None) -> DataSpec:
    """Return the DataSpec of a dataset; imagefolder counts its classes in data_dir/train."""
    base = _check_name(name)
    if base == "fashion-mnist":
        return DataSpec(name, 10, 1, 28, (0.2860,), (0.3530,))
    if base == "fashion-mnist-m":
        fashion_mnist_m.parse_seed(name)  # a bad option fails here, before any data is read
        return DataSpec(name, 10, 3, 28, fashion_mnist_m.MEAN, fashion_mnist_m.STD)
    if base == "cifar10":
        return DataSpec(name, 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    if base == "fake":
        p = _fake_params(name)
        return DataSpec(name, p["classes"], p["chans"], p["size"], (0.5,) * p["chans"], (0.25,) * p["chans"])
    root = _imagefolder_split(data_dir, "train")
    classes = [d for d in root.iterdir() if d.is_dir()]
    return DataSpec(name, len(classes), 3, 224, IMAGENET_MEAN, IMAGENET_STD)


# ---------------------------------------------------------------- in-memory uint8 datasets

class TensorImages(Dataset):
    """uint8 images (N, C, H, W) and int64 labels in memory; normalise (and augment) per item."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DataSpec, in_chans: int,
                 augment: bool):
        self.images, self.targets, self.augment = images, labels, augment
        self.in_chans = in_chans
        size = images.shape[-1]
        self.pad = max(1, size // 8)  # 4 px at 32x32 (the CIFAR recipe), 3 px at 28x28
        c = images.shape[1]
        mean = torch.tensor(spec.mean[:c] if len(spec.mean) >= c else spec.mean * c).reshape(-1, 1, 1)
        std = torch.tensor(spec.std[:c] if len(spec.std) >= c else spec.std * c).reshape(-1, 1, 1)
        # one multiply-add per pixel: x / (255 std) - mean / std
        self.mul, self.add = 1.0 / (255.0 * std), -mean / std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.augment:
            p, size = self.pad, img.shape[-1]
            r = int(torch.randint(0, 2 * (2 * p + 1) ** 2, (1,)))  # one draw: crop offsets and flip
            flip, r = r % 2, r // 2
            y, x = divmod(r, 2 * p + 1)
            img = F.pad(img, (p, p, p, p))[:, y:y + size, x:x + size]
            if flip:
                img = img.flip(-1)
        out = img.float() * self.mul + self.add
        if out.shape[0] != self.in_chans:
            out = out.expand(self.in_chans, -1, -1).contiguous() if out.shape[0] == 1 else out.mean(0, keepdim=True)
        return out, int(self.targets[i])


_MEMORY: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = [F.interpolate(images[i:i + 4096].float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)
           for i in range(0, len(images), 4096)]
    return torch.cat(out)


# ---------------------------------------------------------------- Fashion-MNIST (IDX files)

def read_idx(path: str | Path) -> torch.Tensor:
    """Return the uint8 array of an IDX file (.gz or raw): big-endian header, then the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # a broken or cut gzip stream
        raise DatasetError(f"{path} is damaged: it does not decompress ({e or type(e).__name__}); replace it "
                           "(download it again, or reinstall dataset-fashion-mnist)") from None
    except OSError as e:
        raise DatasetError(f"cannot read IDX file {path}: {e.strerror or e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not an IDX file of uint8 (bad magic {data[:4].hex()}); replace it")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path} is truncated: its header needs {4 + 4 * ndim} bytes, the file holds "
                           f"{len(data)}; replace it (download it again, or reinstall dataset-fashion-mnist)")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    n = 1
    for d in dims:
        n *= d
    body = data[4 + 4 * ndim:]
    if len(body) != n:
        raise DatasetError(f"{path}: header says {dims} ({n} bytes) but the file holds {len(body)} bytes")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)


_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _fmnist_candidates(data_dir: str | Path | None) -> list[Path]:
    if data_dir is not None:
        d = Path(data_dir)
        return [d, d / "fashion-mnist", d / "FashionMNIST" / "raw"]
    return [s / "fashion-mnist" for s in SYSTEM_DIRS] + [CACHE_DIR / "FashionMNIST" / "raw"]


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist(split: str, data_dir, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    places = _fmnist_candidates(data_dir)
    for folder in places:
        img, lab = (_find_idx(folder, s) for s in _FMNIST_FILES[split])
        if img is not None and lab is not None:
            images, labels = read_idx(img), read_idx(lab)
            if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels) or not len(labels):
                raise DatasetError(f"{img} and {lab} do not form an image/label pair")
            if int(labels.max()) >= 10:
                raise DatasetError(f"{lab} holds label {int(labels.max())} outside Fashion-MNIST's 10 classes "
                                   "0..9 (a damaged or foreign label file); replace it")
            return images.unsqueeze(1), labels.long()
    if download:
        import torchvision

        root = Path(data_dir) if data_dir is not None else CACHE_DIR
        try:
            torchvision.datasets.FashionMNIST(str(root), train=split == "train", download=True)
        except Exception as e:
            raise DatasetError(f"downloading Fashion-MNIST into {root} failed: {str(e).splitlines()[0]}") from None
        return _fashion_mnist(split, root, download=False)
    raise DatasetError(
        f"Fashion-MNIST ({split}) not found; looked for {_FMNIST_FILES[split][0]}[.gz] in "
        + ", ".join(str(p) for p in places)
        + ". Get it with `sudo apt-get install dataset-fashion-mnist`, point --data-dir at a folder "
          "holding the four *-ubyte.gz files, or pass --download")


def _cifar10(split: str, data_dir, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    import torchvision

    root = Path(data_dir) if data_dir is not None else CACHE_DIR
    if not (root / "cifar-10-batches-py").is_dir() and not download:
        raise DatasetError(f"CIFAR-10 not found: looked for {root / 'cifar-10-batches-py'}; pass --download "
                           "(needs internet) or point --data-dir at the folder holding cifar-10-batches-py")
    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except Exception as e:
        raise DatasetError(f"CIFAR-10 under {root} could not be loaded: {str(e).splitlines()[0]}") from None
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets, dtype=torch.long)


def _fake(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable synthetic images: a fixed random pattern per class plus noise, all from one seed."""
    p = _fake_params(name)
    g = torch.Generator().manual_seed(p["seed"])
    # coarse 4x4 blocks: structure that convs and global pooling can tell apart
    coarse = (torch.rand(p["classes"], p["chans"], 4, 4, generator=g) > 0.5).float() * 200 + 27
    templates = F.interpolate(coarse, size=(p["size"], p["size"]), mode="nearest")
    n = p[split]
    g.manual_seed(p["seed"] * 1000 + (1 if split == "train" else 2))
    labels = torch.arange(n) % p["classes"]
    labels = labels[torch.randperm(n, generator=g)]
    noise = torch.randn(n, p["chans"], p["size"], p["size"], generator=g) * 40
    return (templates[labels] + noise).clamp(0, 255).to(torch.uint8), labels


# ---------------------------------------------------------------- ImageNet-style folders

def _imagefolder_split(data_dir, split: str) -> Path:
    if data_dir is None:
        raise DatasetError("dataset imagefolder needs --data-dir pointing at a folder with train/ and val/ "
                           "(or test/) subfolders, one folder per class")
    root = Path(data_dir)
    names = ("train",) if split == "train" else ("val", "test")
    for n in names:
        if (root / n).is_dir():
            return root / n
    raise DatasetError(f"imagefolder: no {' or '.join(names)} folder under {root} (expected "
                       f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg)")


def _imagefolder(split, data_dir, in_chans, input_size, augment):
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    spec = DataSpec("imagefolder", 0, 3, input_size, IMAGENET_MEAN, IMAGENET_STD)
    if augment:
        tf = [T.RandomResizedCrop(input_size), T.RandomHorizontalFlip()]
    else:  # the usual 0.875 centre crop
        tf = [T.Resize(int(round(input_size / 0.875))), T.CenterCrop(input_size)]
    mean, std = spec.mean, spec.std
    if in_chans == 1:
        tf.append(T.Grayscale(1))
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    tf += [T.ToTensor(), T.Normalize(mean, std)]
    try:
        return ImageFolder(str(_imagefolder_split(data_dir, split)), transform=T.Compose(tf))
    except (FileNotFoundError, OSError) as e:
        raise DatasetError(f"imagefolder {data_dir}: {e}") from None


def get_dataset(name: str, split: str, data_dir: str | Path | None = None, in_chans: int | None = None,
                input_size: int | None = None, augment: bool = False, download: bool = False) -> Dataset:
    """Return a Dataset of (normalised float CxHxW tensor, int label) for 'train' or 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = _check_name(name)
    spec = dataset_spec(name, data_dir)
    in_chans = in_chans or spec.in_chans
    size = input_size or spec.input_size
    if base == "imagefolder":
        return _imagefolder(split, data_dir, in_chans, size, augment)
    key = (name, split, str(data_dir), size)
    if key not in _MEMORY:
        if base == "fashion-mnist":
            images, labels = _fashion_mnist(split, data_dir, download)
        elif base == "fashion-mnist-m":
            grey, labels = _fashion_mnist(split, data_dir, download)
            images = fashion_mnist_m.blended(grey, labels, split, fashion_mnist_m.parse_seed(name), CACHE_DIR)
        elif base == "cifar10":
            images, labels = _cifar10(split, data_dir, download)
        else:
            images, labels = _fake(name, split)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < spec.num_classes:
            raise DatasetError(f"dataset {name} ({split}) holds labels outside its {spec.num_classes} classes")
        _MEMORY[key] = (_resize(images, size), labels)
    images, labels = _MEMORY[key]
    return TensorImages(images, labels, spec, in_chans, augment)


# ---------------------------------------------------------------- subsets and loaders

def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Return the labels of a dataset (TensorImages, ImageFolder, or a Subset of them) as int64."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)
    return torch.as_tensor(targets, dtype=torch.long)


def proxy_subset(dataset: Dataset, size: int | float, seed: int, name: str, split: str
                 ) -> tuple[Subset, str]:
    """Return a class-balanced seeded subset (count or fraction in (0, 1]) and its 16-hex fingerprint."""
    n = len(dataset)
    if isinstance(size, float) and not isinstance(size, bool):
        if not 0.0 < size <= 1.0:
            raise DatasetError(f"subset fraction {size} must be in (0, 1]")
        count = max(1, round(size * n))
    else:
        count = int(size)
    if count > n:
        raise DatasetError(f"subset of {count} images asked from {name} {split}, which holds only {n}")
    if count < 1:
        raise DatasetError(f"subset size must be at least 1 (got {count})")
    labels = dataset_labels(dataset)
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    pools = {c: (labels == c).nonzero().flatten() for c in classes}
    pools = {c: idx[torch.randperm(len(idx), generator=g)] for c, idx in pools.items()}
    take = dict.fromkeys(classes, 0)
    # round-robin over a seeded class order until the count is met: balanced up to one image
    order = [classes[i] for i in torch.randperm(len(classes), generator=g).tolist()]
    left = count
    while left:
        for c in order:
            if left and take[c] < len(pools[c]):
                take[c] += 1
                left -= 1
    indices = sorted(int(i) for c in classes for i in pools[c][:take[c]])
    return Subset(dataset, indices), subset_fingerprint(name, split, indices)


def subset_fingerprint(name: str, split: str, indices) -> str:
    """Return the first 16 hex digits of sha256(name, split, sorted indices)."""
    text = f"{name}|{split}|" + ",".join(str(i) for i in sorted(int(i) for i in indices))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ShardSampler(Sampler[int]):
    """Rank r of w takes items r, r+w, ...: no padding, so all-reduced counts equal the dataset size."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
                distributed: bool = False, drop_last: bool = False) -> DataLoader:
    """Return a DataLoader whose order depends on (seed, epoch) only; call set_epoch before each epoch."""
    g = torch.Generator().manual_seed(seed)
    sampler = None
    if distributed:
        import torch.distributed as dist
        from torch.utils.data.distributed import DistributedSampler

        rank, world = dist.get_rank(), dist.get_world_size()
        sampler = (DistributedSampler(dataset, world, rank, shuffle=True, seed=seed, drop_last=drop_last)
                   if shuffle else ShardSampler(len(dataset), rank, world))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                        num_workers=workers, drop_last=drop_last, generator=g,
                        persistent_workers=False, pin_memory=torch.cuda.is_available())
    loader.asga_seed = seed
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the next pass over loader depend on (seed, epoch) only: shuffling and worker seeds."""
    seed = getattr(loader, "asga_seed", 0)
    if loader.generator is not None:
        loader.generator.manual_seed(seed * 100_003 + epoch)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
