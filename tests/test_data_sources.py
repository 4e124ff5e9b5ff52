"""Each loader on small files written here in the real on-disk format, and on broken ones."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jdcl_ray.data import (
    ImageDataset,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_mnist,
    load_parquet,
    load_stl10,
    mixed_size_side,
)
from jdcl_ray.errors import UserError

RNG = np.random.default_rng(0)


def at(path: Path, rest: str = "") -> str:
    """A pattern matching ``path`` literally, then the regex ``rest``."""
    return re.escape(str(path)) + rest


def pixels(*shape: int) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


# --- IDX ---------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    data = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def write_idx_split(root: Path, prefix: str, images: np.ndarray, labels: np.ndarray, ext: str):
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(root / f"{prefix}-labels-idx1-ubyte{ext}", labels)


@pytest.mark.parametrize("ext", ["", ".gz"])
def test_idx_round_trip(tmp_path, ext):
    train, test = pixels(6, 5, 4), pixels(3, 5, 4)
    write_idx_split(tmp_path, "train", train, np.array([0, 1, 2, 3, 1, 0]), ext)
    write_idx_split(tmp_path, "t10k", test, np.array([2, 2, 0]), ext)
    data = load_idx(tmp_path, "train")
    assert data.images.shape == (6, 1, 5, 4) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images[:, 0].numpy(), train)
    assert data.labels.tolist() == [0, 1, 2, 3, 1, 0] and data.labels.dtype == np.int64
    assert data.num_classes == 4
    assert np.array_equal(load_idx(tmp_path, "test").images[:, 0].numpy(), test)


def test_idx_header_written_by_hand(tmp_path):
    # magic 00 00 08 03, dims 1, 2, 3 as big-endian uint32, then the 6 pixels.
    images = b"\x00\x00\x08\x03" + b"\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x03"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(images + bytes([1, 2, 3, 4, 5, 6]))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    data = load_idx(tmp_path)
    assert data.images[0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert data.labels.tolist() == [7]


def test_idx_truncated(tmp_path):
    write_idx_split(tmp_path, "train", pixels(4, 5, 5), np.arange(4), "")
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match=at(path, r".*90 data bytes, expected 100")):
        load_idx(tmp_path)


def test_idx_truncated_gzip(tmp_path):
    write_idx_split(tmp_path, "train", pixels(4, 5, 5), np.arange(4), ".gz")
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(UserError, match=at(path)):
        load_idx(tmp_path)


def test_idx_label_count_differs(tmp_path):
    write_idx_split(tmp_path, "train", pixels(4, 5, 5), np.arange(3), "")
    with pytest.raises(UserError, match=r"train-labels-idx1-ubyte has 3 labels, expected 4"):
        load_idx(tmp_path)


def test_idx_missing_folder_and_file(tmp_path):
    with pytest.raises(UserError, match=at(tmp_path / "nowhere")):
        load_idx(tmp_path / "nowhere")
    write_idx(tmp_path / "train-images-idx3-ubyte", pixels(2, 3, 3))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte is missing"):
        load_idx(tmp_path)


def test_fashion_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    write_idx_split(raw, "t10k", pixels(2, 28, 28), np.array([9, 0]), ".gz")
    data = load_fashion_mnist(tmp_path, split="test")
    assert data.name == "fashion_mnist/test"
    assert data.class_names[0] == "T-shirt/top" and data.class_names[9] == "Ankle boot"
    assert data.labels.tolist() == [9, 0]


def test_mnist_needs_files_or_root(tmp_path):
    with pytest.raises(UserError, match="mnist needs a root"):
        load_mnist()
    with pytest.raises(UserError, match=at(tmp_path)):
        load_mnist(tmp_path)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_from_debian():
    data = load_fashion_mnist(split="test")
    assert data.images.shape == (10_000, 1, 28, 28)
    assert np.bincount(data.labels).tolist() == [1000] * 10  # the test split is balanced
    assert data.num_classes == 10


def test_digits_splits():
    train, test, full = load_digits("train"), load_digits("test"), load_digits("all")
    assert len(train) + len(test) == len(full) == 1797
    assert len(test) == 360  # i % 5 == 0 for i < 1797
    assert full.images.shape[1:] == (1, 8, 8) and full.images.dtype == torch.uint8
    assert int(full.images.max()) == 255 and int(full.images.min()) == 0
    assert np.array_equal(test.images.numpy(), full.images.numpy()[::5])
    from sklearn.datasets import load_digits as sklearn_digits

    # 0..16 scaled to 0..255: scaling back and rounding recovers the original levels.
    original = sklearn_digits().images
    assert np.array_equal(np.rint(full.images[:, 0].numpy().astype(float) * 16 / 255), original)
    with pytest.raises(UserError, match="'val'"):
        load_digits("val")


# --- CIFAR -------------------------------------------------------------------------------------


def write_pickle(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        pickle.dump(content, file, protocol=2)


def write_cifar10(root: Path, per_batch: int = 2) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    written = {}
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = pixels(per_batch, 3072)
        labels = RNG.integers(0, 10, size=per_batch).tolist()
        write_pickle(folder / batch, {b"batch_label": b"x", b"labels": labels, b"data": data})
        written[batch] = (data, labels)
    return written


def test_cifar10_round_trip(tmp_path):
    written = write_cifar10(tmp_path)
    data = load_cifar10(tmp_path, "train")
    assert data.images.shape == (10, 3, 32, 32) and data.images.dtype == torch.uint8
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    # A row is the red plane (1024 values, row-major), then green, then blue.
    assert data.images[3, 1, 2, 5] == rows[3, 1024 + 2 * 32 + 5]
    assert data.images[7, 2, 31, 0] == rows[7, 2048 + 31 * 32]
    labels = [label for i in range(1, 6) for label in written[f"data_batch_{i}"][1]]
    assert data.labels.tolist() == labels
    assert data.class_names[9] == "truck"
    # The extracted folder itself works as root too.
    test = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar10_missing_batch_and_folder(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"cifar-10-batches-py/data_batch_3 is missing"):
        load_cifar10(tmp_path)
    with pytest.raises(UserError, match=at(tmp_path / "absent")):
        load_cifar10(tmp_path / "absent")


def test_cifar10_wrong_label_count(tmp_path):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(path, {b"data": pixels(3, 3072), b"labels": [1, 2]})
    with pytest.raises(UserError, match=at(path, r" has 2 labels, expected 3")):
        load_cifar10(tmp_path, "test")


def write_cifar100(root: Path) -> dict[str, tuple]:
    folder = root / "cifar-100-python"
    fine = [f"fine{i:02d}".encode() for i in range(100)]
    coarse = [f"coarse{i:02d}".encode() for i in range(20)]
    write_pickle(folder / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse})
    written = {}
    for split, count in (("train", 4), ("test", 3)):
        data = pixels(count, 3072)
        fine_labels, coarse_labels = RNG.integers(0, 100, count), RNG.integers(0, 20, count)
        content = {b"data": data, b"fine_labels": fine_labels.tolist()}
        content[b"coarse_labels"] = coarse_labels.tolist()
        write_pickle(folder / split, content)
        written[split] = (data, fine_labels, coarse_labels)
    return written


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path)
    fine = load_cifar100(tmp_path, "train")
    assert fine.images.shape == (4, 3, 32, 32)
    assert np.array_equal(fine.images.reshape(4, -1).numpy(), written["train"][0])
    assert fine.labels.tolist() == written["train"][1].tolist() and fine.num_classes == 100
    coarse = load_dataset("cifar100_coarse", str(tmp_path), split="test")
    assert coarse.labels.tolist() == written["test"][2].tolist()
    assert coarse.num_classes == 20 and coarse.class_names[3] == "coarse03"
    assert coarse.name == "cifar100_coarse/test"


# --- STL-10 ------------------------------------------------------------------------------------


def write_stl10(root: Path, splits: dict[str, int]) -> dict[str, tuple]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    written = {}
    for split, count in splits.items():
        images = pixels(count, 3, 96, 96)
        # On disk each channel is stored column by column.
        (folder / f"{split}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())
        labels = RNG.integers(1, 11, count).astype(np.uint8)
        if split != "unlabeled":
            (folder / f"{split}_y.bin").write_bytes(labels.tobytes())
        written[split] = (images, labels)
    return written


def test_stl10_round_trip(tmp_path):
    written = write_stl10(tmp_path, {"train": 3, "unlabeled": 2})
    data = load_stl10(tmp_path, "train")
    assert data.images.shape == (3, 3, 96, 96) and data.images.dtype == torch.uint8
    assert np.array_equal(data.images.numpy(), written["train"][0])
    raw = (tmp_path / "stl10_binary" / "train_X.bin").read_bytes()
    # Byte c*96*96 + x*96 + y of the first image is channel c, row y, column x.
    assert data.images[0, 2, 10, 70] == raw[2 * 96 * 96 + 70 * 96 + 10]
    assert data.labels.tolist() == (written["train"][1].astype(int) - 1).tolist()
    assert data.class_names[2] == "car"
    unlabeled = load_stl10(tmp_path / "stl10_binary", "unlabeled")
    assert unlabeled.labels is None and len(unlabeled) == 2


def test_stl10_truncated_and_missing_labels(tmp_path):
    write_stl10(tmp_path, {"train": 2, "test": 2})
    path = tmp_path / "stl10_binary" / "train_X.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match=at(path, r" has 55295 bytes")):
        load_stl10(tmp_path, "train")
    labels = tmp_path / "stl10_binary" / "test_y.bin"
    labels.unlink()
    with pytest.raises(UserError, match=at(labels, r" is missing")):
        load_stl10(tmp_path, "test")


# --- image folders -----------------------------------------------------------------------------


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_with_classes_round_trip(tmp_path):
    written = {
        ("cat", "a.png"): pixels(6, 5, 3),
        ("cat", "b.PNG"): pixels(6, 5, 3),
        ("ant", "z.png"): pixels(6, 5, 3),
    }
    for (label, file), array in written.items():
        save_png(tmp_path / label / file, array)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.class_names == ["ant", "cat"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.images.shape == (3, 3, 6, 5) and data.images.dtype == torch.uint8
    expected = [written["ant", "z.png"], written["cat", "a.png"], written["cat", "b.PNG"]]
    for image, array in zip(data.images, expected, strict=True):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), array)


def test_flat_grey_folder(tmp_path):
    first, second = pixels(4, 4), pixels(4, 4)
    save_png(tmp_path / "1.png", first)
    save_png(tmp_path / "2.png", second)
    data = load_image_folder(tmp_path)
    assert data.labels is None and data.class_names == [] and data.num_classes == 0
    assert data.images.shape == (2, 1, 4, 4)
    assert np.array_equal(data.images[1, 0].numpy(), second)
    as_rgb = load_image_folder(tmp_path, channels=3)
    assert as_rgb.images.shape == (2, 3, 4, 4)
    assert all(np.array_equal(as_rgb.images[0, c].numpy(), first) for c in range(3))


def test_folder_of_mixed_sizes_is_resized_to_the_median_shorter_side(tmp_path):
    save_png(tmp_path / "a.png", pixels(4, 4, 3))
    save_png(tmp_path / "b.png", pixels(6, 5, 3))
    save_png(tmp_path / "c.png", pixels(7, 9, 3))
    assert load_image_folder(tmp_path).images.shape == (3, 3, 5, 5)  # shorter sides 4, 5, 7
    assert mixed_size_side([(1000, 800), (640, 480), (300, 200)]) == 128  # photos: capped
    data = load_image_folder(tmp_path, image_size=8)
    assert data.images.shape == (3, 3, 8, 8)


def test_folder_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match=at(tmp_path / "missing")):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(UserError, match=at(tmp_path, r" has no images")):
        load_image_folder(tmp_path)
    save_png(tmp_path / "good.png", pixels(4, 4))
    png = io.BytesIO()
    Image.fromarray(pixels(4, 4)).save(png, format="PNG")
    (tmp_path / "broken.png").write_bytes(png.getvalue()[:40])
    with pytest.raises(UserError, match=at(tmp_path / "broken.png")):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=at(tmp_path / "broken.png")):
        load_image_folder(tmp_path)


def test_folder_split_dispatch(tmp_path):
    save_png(tmp_path / "train" / "a" / "1.png", pixels(4, 4))
    save_png(tmp_path / "test" / "a" / "1.png", pixels(4, 4))
    save_png(tmp_path / "test" / "b" / "1.png", pixels(4, 4))
    assert len(load_dataset("folder", tmp_path, split="test")) == 2
    assert len(load_dataset("folder", tmp_path, split="train", image_size=2)) == 1
    with pytest.raises(UserError, match="val"):
        load_dataset("folder", tmp_path, split="val")


# --- Parquet -----------------------------------------------------------------------------------


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parquet_bytes_and_int_labels(tmp_path):
    arrays = [pixels(5, 5, 3) for _ in range(3)]
    path = tmp_path / "set.parquet"
    table = pa.table({"image": [png_bytes(a) for a in arrays], "label": [2, 0, 2]})
    pq.write_table(table, path)
    data = load_parquet(path)
    assert data.images.shape == (3, 3, 5, 5)
    for image, array in zip(data.images, arrays, strict=True):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), array)
    assert data.labels.tolist() == [2, 0, 2] and data.num_classes == 3


def test_parquet_struct_and_string_labels(tmp_path):
    arrays = [pixels(4, 4) for _ in range(3)]
    images = [{"bytes": png_bytes(a), "path": f"{i}.png"} for i, a in enumerate(arrays)]
    path = tmp_path / "hf.parquet"
    pq.write_table(pa.table({"img": images, "kind": ["dog", "cat", "dog"]}), path)
    data = load_parquet(path, image_column="img", label_column="kind")
    assert data.images.shape == (3, 1, 4, 4)
    assert np.array_equal(data.images[2, 0].numpy(), arrays[2])
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [1, 0, 1]


def test_parquet_label_column_rules(tmp_path):
    path = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"image": [png_bytes(pixels(4, 4))]}), path)
    assert load_parquet(path).labels is None
    with pytest.raises(UserError, match=r"no label column 'y'.*found image"):
        load_parquet(path, label_column="y")


def test_parquet_errors_name_file_and_column(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"pixels": [b"x"], "label": [0]}), path)
    with pytest.raises(
        UserError, match=at(path, r" has no image column 'image': found pixels, label")
    ):
        load_parquet(path)
    with pytest.raises(UserError, match=at(path, r" row 0")):
        load_parquet(path, image_column="pixels")
    with pytest.raises(UserError, match=at(tmp_path / "none.parquet")):
        load_parquet(tmp_path / "none.parquet")


# --- dispatch and the dataset type --------------------------------------------------------------


def test_load_dataset_dispatch_and_errors(tmp_path):
    assert load_dataset("digits", split="test").name == "digits/test"
    with pytest.raises(UserError, match=r"'imagenet' is unknown.*cifar10.*stl10"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match=r"does not take option.*colour"):
        load_dataset("digits", colour=True)
    with pytest.raises(UserError, match="cifar10 needs a root"):
        load_dataset("cifar10")


def test_subset_keeps_classes():
    data = ImageDataset(
        images=torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).reshape(4, 3, 2, 2),
        labels=np.array([0, 1, 2, 1]),
        class_names=["a", "b", "c"],
        name="toy",
    )
    part = data.subset(np.array([3, 0]))
    assert torch.equal(part.images, data.images[[3, 0]])
    assert part.labels.tolist() == [1, 0] and part.num_classes == 3 and part.name == "toy"
