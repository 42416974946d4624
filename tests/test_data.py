"""Datasets: IDX parsing, Fashion-MNIST lookup and errors, fake data, proxy subsets, epoch-seeded order."""

import gzip
import hashlib

import pytest
import torch

from asga_deploy import data
from asga_deploy.errors import DatasetError

from .conftest import FAKE, write_idx


def test_read_idx_roundtrip_and_corruption(tmp_path):
    arr = torch.arange(60, dtype=torch.uint8).reshape(5, 4, 3)
    assert torch.equal(data.read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    raw = tmp_path / "raw-idx"  # not gzipped: torchvision's extracted layout
    raw.write_bytes(gzip.decompress((tmp_path / "a.gz").read_bytes()))
    assert torch.equal(data.read_idx(raw), arr)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))  # header says 9 bytes, 2 follow
    with pytest.raises(DatasetError, match="9 bytes"):
        data.read_idx(tmp_path / "short.gz")
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78")
    with pytest.raises(DatasetError, match="not an IDX"):
        data.read_idx(tmp_path / "bad")


def test_fashion_mnist_from_data_dir(fmnist_dir):
    train = data.get_dataset("fashion-mnist", "train", data_dir=fmnist_dir)
    test = data.get_dataset("fashion-mnist", "test", data_dir=fmnist_dir)
    assert (len(train), len(test)) == (40, 20)
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y == 3
    spec = data.dataset_spec("fashion-mnist")
    expected = (train.images[3, 0].float() / 255 - spec.mean[0]) / spec.std[0]
    assert torch.allclose(x[0], expected, atol=1e-5)
    rgb = data.get_dataset("fashion-mnist", "train", data_dir=fmnist_dir, in_chans=3, input_size=32)
    x3, _ = rgb[3]
    assert x3.shape == (3, 32, 32) and torch.equal(x3[0], x3[2])


def test_missing_fashion_mnist_names_every_place(tmp_path, monkeypatch):
    empty = tmp_path / "nothing"
    with pytest.raises(DatasetError) as e:
        data.get_dataset("fashion-mnist", "train", data_dir=empty)
    msg = str(e.value)
    assert str(empty) in msg and str(empty / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-dir" in msg and "--download" in msg
    monkeypatch.setattr(data, "SYSTEM_DIRS", [tmp_path / "sys"])
    monkeypatch.setattr(data, "CACHE_DIR", tmp_path / "cache")
    with pytest.raises(DatasetError) as e:
        data.get_dataset("fashion-mnist", "test")
    assert str(tmp_path / "sys" / "fashion-mnist") in str(e.value) and str(tmp_path / "cache") in str(e.value)


def test_unknown_dataset_suggests_names():
    with pytest.raises(DatasetError, match="did you mean fashion-mnist"):
        data.dataset_spec("fashion-mnst")
    with pytest.raises(DatasetError, match="bad fake dataset option"):
        data.dataset_spec("fake:clases=3")


def test_fake_is_deterministic_and_configurable():
    a = data.get_dataset("fake:classes=4,size=16,chans=3,train=20", "train")
    assert len(a) == 20 and a[0][0].shape == (3, 16, 16)
    assert data.dataset_spec("fake:classes=4").num_classes == 4
    data._MEMORY.clear()
    b = data.get_dataset("fake:classes=4,size=16,chans=3,train=20", "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_proxy_subset_balanced_seeded_fingerprint():
    ds = data.get_dataset("fake:train=300", "train")
    sub, fp = data.proxy_subset(ds, 50, seed=3, name="fake", split="train")
    labels = data.dataset_labels(sub)
    assert len(sub) == 50 and torch.bincount(labels, minlength=10).tolist() == [5] * 10
    assert sub.indices == sorted(sub.indices)
    text = "fake|train|" + ",".join(map(str, sub.indices))
    assert fp == hashlib.sha256(text.encode()).hexdigest()[:16]
    sub2, fp2 = data.proxy_subset(ds, 50, seed=3, name="fake", split="train")
    assert sub2.indices == sub.indices and fp2 == fp
    _, fp3 = data.proxy_subset(ds, 50, seed=4, name="fake", split="train")
    assert fp3 != fp
    half, _ = data.proxy_subset(ds, 0.5, seed=0, name="fake", split="train")
    counts = torch.bincount(data.dataset_labels(half), minlength=10)
    assert len(half) == 150 and counts.max() - counts.min() <= 1


def test_proxy_subset_too_large():
    ds = data.get_dataset(FAKE, "test")
    with pytest.raises(DatasetError, match="52 images.*only 51"):
        data.proxy_subset(ds, 52, seed=0, name=FAKE, split="test")
    with pytest.raises(DatasetError, match=r"\(0, 1\]"):
        data.proxy_subset(ds, 1.5, seed=0, name=FAKE, split="test")


def test_data_order_depends_on_seed_and_epoch_only():
    ds = data.get_dataset(FAKE, "train", augment=True)

    def first_batch(seed, epoch):
        loader = data.make_loader(ds, 8, shuffle=True, seed=seed)
        data.set_epoch(loader, epoch)
        torch.manual_seed(0)  # augmentation draws from the global generator
        return next(iter(loader))[1]

    assert torch.equal(first_batch(0, 1), first_batch(0, 1))
    assert not torch.equal(first_batch(0, 1), first_batch(0, 2))
    assert not torch.equal(first_batch(0, 1), first_batch(1, 1))


def test_augmentation_keeps_shape_and_changes_pixels():
    ds = data.get_dataset(FAKE, "train", augment=True)
    torch.manual_seed(0)
    views = torch.stack([ds[0][0] for _ in range(8)])
    assert views.shape == (8, 1, 28, 28)
    assert not all(torch.equal(views[0], v) for v in views[1:])


def test_imagefolder_layout(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, color in (("cat", (200, 10, 10)), ("dog", (10, 10, 200))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40 + i, 36), color).save(tmp_path / split / c / f"{i}.png")
    assert data.dataset_spec("imagefolder", tmp_path).num_classes == 2
    train = data.get_dataset("imagefolder", "train", tmp_path, input_size=24, augment=True)
    val = data.get_dataset("imagefolder", "test", tmp_path, input_size=24)
    x, y = val[3]
    assert len(train) == 4 and x.shape == (3, 24, 24) and y == 1
    assert data.dataset_labels(val).tolist() == [0, 0, 1, 1]
    with pytest.raises(DatasetError, match="train/ and val/"):
        data.get_dataset("imagefolder", "train")


def test_missing_cifar10_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py.*--download"):
        data.get_dataset("cifar10", "train", data_dir=tmp_path)
