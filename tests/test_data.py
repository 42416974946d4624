"""Datasets: IDX parsing, Fashion-MNIST lookup and errors, fake data, Fashion-MNIST-M, proxy subsets, epoch order."""

import gzip
import hashlib
import sys
from pathlib import Path

import pytest
import torch

from asga_deploy import data
from asga_deploy import fashion_mnist_m as fmm
from asga_deploy.errors import DatasetError, MissingDependencyError

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


# ---------------------------------------------------------------- fashion-mnist-m

def _grey(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fmnist_m_blend_is_abs_difference_with_a_photo_patch():
    photos = fmm.load_photos(fmm.PHOTOS["train"])
    images = _grey(300)
    out, index = fmm.blend(images, photos, seed=0, split="train")
    assert out.shape == (300, 3, 28, 28) and out.dtype == torch.uint8 and index.dtype == torch.uint8
    photo, top, left = fmm.draw_patches(300, photos, 0, "train")
    assert torch.equal(index.long(), photo) and set(photo.tolist()) == set(range(len(photos)))
    for i in (0, 1, 150, 299):
        p, y, x = int(photo[i]), int(top[i]), int(left[i])
        patch = photos[p][:, y:y + 28, x:x + 28].short()
        assert torch.equal(out[i], (patch - images[i].short()).abs().byte())


def test_fmnist_m_is_deterministic_per_seed_and_split():
    photos = fmm.load_photos(fmm.PHOTOS["train"])
    images = _grey(200)
    a, _ = fmm.blend(images, photos, seed=0, split="train")
    b, _ = fmm.blend(images.clone(), fmm.load_photos(fmm.PHOTOS["train"]), seed=0, split="train")
    assert a.numpy().tobytes() == b.numpy().tobytes()
    c, _ = fmm.blend(images, photos, seed=1, split="train")
    d, _ = fmm.blend(images, photos, seed=0, split="test")  # same photos, the test split's draws
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_fmnist_m_train_and_test_photos_are_disjoint():
    train, test = fmm.PHOTOS["train"], fmm.PHOTOS["test"]
    assert not set(train) & set(test) and len(set(train)) == len(train) and len(set(test)) == len(test)
    # different names could still be one picture (skimage's `cat` is `chelsea`): compare the pixels
    digests = {n: hashlib.sha256(p.numpy()).hexdigest()
               for n, p in zip(train + test, fmm.load_photos(train + test), strict=True)}
    assert len(set(digests.values())) == len(digests)


def test_fmnist_m_dataset_spec_loaders_and_subsets(fmnist_dir, data_cache):
    spec = data.dataset_spec("fashion-mnist-m:seed=3")
    assert (spec.num_classes, spec.in_chans, spec.input_size, len(spec.mean), len(spec.std)) == (10, 3, 28, 3, 3)
    train = data.get_dataset("fashion-mnist-m", "train", data_dir=fmnist_dir)
    test = data.get_dataset("fashion-mnist-m", "test", data_dir=fmnist_dir)
    assert (len(train), len(test)) == (40, 20) and train.images.shape == (40, 3, 28, 28)
    x, y = train[3]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32 and y == 3
    grey = data.get_dataset("fashion-mnist-m", "train", data_dir=fmnist_dir, in_chans=1, input_size=32)
    assert grey[3][0].shape == (1, 32, 32)
    sub, _ = data.proxy_subset(train, 20, seed=0, name="fashion-mnist-m", split="train")
    assert torch.bincount(data.dataset_labels(sub), minlength=10).tolist() == [2] * 10
    loader = data.make_loader(train, 8, shuffle=True, seed=0)
    data.set_epoch(loader, 0)
    assert next(iter(loader))[0].shape == (8, 3, 28, 28)
    blobs = {p.name.split("-")[0]: torch.load(p, weights_only=True)
             for p in (data_cache / "fashion-mnist-m").glob("*.pt")}
    assert blobs["train"]["photos"] == list(fmm.PHOTOS["train"]) and blobs["test"]["photos"] == list(fmm.PHOTOS["test"])
    assert int(blobs["test"]["photo_index"].max()) < len(fmm.PHOTOS["test"])


def test_fmnist_m_cache_is_reused_rebuilt_when_corrupt_and_keyed_by_inputs(fmnist_dir, data_cache, monkeypatch):
    first = data.get_dataset("fashion-mnist-m", "train", data_dir=fmnist_dir).images
    (path,) = (data_cache / "fashion-mnist-m").glob("train-seed0-*.pt")
    real_blend = fmm.blend

    def no_build(*a, **k):
        raise AssertionError("built again instead of reading the cache")

    monkeypatch.setattr(fmm, "blend", no_build)
    data._MEMORY.clear()
    assert torch.equal(data.get_dataset("fashion-mnist-m", "train", data_dir=fmnist_dir).images, first)
    path.write_bytes(path.read_bytes()[:1000])  # truncated: rebuilt, same bytes
    monkeypatch.setattr(fmm, "blend", real_blend)
    data._MEMORY.clear()
    assert torch.equal(data.get_dataset("fashion-mnist-m", "train", data_dir=fmnist_dir).images, first)
    assert torch.load(path, weights_only=True)["images_sha256"] == hashlib.sha256(first.numpy()).hexdigest()
    other = data.get_dataset("fashion-mnist-m:seed=1", "train", data_dir=fmnist_dir).images
    assert not torch.equal(other, first)
    images, labels = data._fashion_mnist("train", fmnist_dir, False)
    photos = fmm.load_photos(fmm.PHOTOS["train"])
    fp = fmm.fingerprint(images, labels, photos, "train", 0)
    assert fmm.cache_path(data_cache, "train", 0, fp) == path
    changed = images.clone()
    changed[0, 0, 0, 0] ^= 1  # any source byte, the seed, the split or the recipe moves the fingerprint
    assert len({fp, fmm.fingerprint(changed, labels, photos, "train", 0), fmm.fingerprint(images, labels, photos, "train", 1),
                fmm.fingerprint(images, labels, photos, "test", 0)}) == 4
    monkeypatch.setattr(fmm, "RECIPE", "fashion-mnist-m/999")
    assert fmm.fingerprint(images, labels, photos, "train", 0) != fp


def test_fmnist_m_errors(fmnist_dir, data_cache, monkeypatch):
    with pytest.raises(DatasetError, match="only option is seed=N"):
        data.dataset_spec("fashion-mnist-m:sed=1")
    with pytest.raises(DatasetError, match="takes no options"):
        data.dataset_spec("fashion-mnist:seed=1")
    with pytest.raises(DatasetError, match="did you mean fashion-mnist-m"):
        data.dataset_spec("fashion-mnist-mm")

    def read_only(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(fmm, "atomic_torch_save", read_only)
    with pytest.raises(DatasetError, match="cannot write the fashion-mnist-m cache.*ASGA_DATA_CACHE"):
        data.get_dataset("fashion-mnist-m", "test", data_dir=fmnist_dir)


def test_fmnist_m_without_scikit_image_says_how_to_install(fmnist_dir, data_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage...` raise ImportError
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    with pytest.raises(MissingDependencyError, match="scikit-image is not installed.*pip install scikit-image"):
        data.get_dataset("fashion-mnist-m", "test", data_dir=fmnist_dir)


@pytest.mark.skipif(not (Path("/usr/share/datasets/fashion-mnist") / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="needs the real Fashion-MNIST (apt-get install dataset-fashion-mnist)")
def test_fmnist_m_spec_mean_std_are_the_train_split_s(data_cache, monkeypatch):
    monkeypatch.setattr(fmm, "atomic_torch_save", lambda obj, path: path)  # spare the disk 141 MB
    images = data.get_dataset("fashion-mnist-m", "train").images
    x = images.float().div_(255)
    spec = data.dataset_spec("fashion-mnist-m")
    assert x.mean((0, 2, 3)).tolist() == pytest.approx(spec.mean, abs=1e-3)
    assert x.std((0, 2, 3)).tolist() == pytest.approx(spec.std, abs=1e-3)
