"""IDX reader/writer and the Fashion-MNIST loader, on files each test writes itself."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from edgetrain.sdk.data import (
    DATA_DIR_ENV,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    Dataset,
    batch_indices,
    load_split,
    read_idx,
    resolve_data_dir,
    to_model_input,
    write_idx,
)
from edgetrain.sdk.data.idx import encode_idx
from edgetrain.sdk.errors import ConfigError, DataError


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


# --- good files -------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(7, dtype=np.uint8),
        np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8),
        np.linspace(-2.5, 3.5, 6, dtype=np.float32),
        np.random.default_rng(1).standard_normal((3, 2, 4)).astype(np.float32),
        np.array([-300, 7, 32000], dtype=np.int16),
        np.array([-(2**31), 5, 2**31 - 1], dtype=np.int32),
        np.array([[1e300, -1e-300]], dtype=np.float64),
        np.array([-128, 0, 127], dtype=np.int8),
    ],
    ids=["u8-1d", "u8-3d", "f32-1d", "f32-3d", "i16", "i32", "f64", "i8"],
)
def test_round_trip(tmp_path: Path, array: np.ndarray, compress: bool) -> None:
    path = write_idx(tmp_path / "a.idx", array, gzip=compress)
    assert path.read_bytes().startswith(b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=")
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_multibyte_data_is_big_endian_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "be.idx"
    path.write_bytes(_header(0x0B, (2,)) + b"\x01\x02\xff\xfe")
    np.testing.assert_array_equal(read_idx(path), np.array([0x0102, -2], dtype=np.int16))
    assert encode_idx(np.array([0x0102], dtype=np.int16)).endswith(b"\x01\x02")


def test_gzip_detected_by_magic_not_suffix(tmp_path: Path) -> None:
    array = np.arange(10, dtype=np.uint8)
    gz_without_suffix = tmp_path / "labels-idx1-ubyte"
    gz_without_suffix.write_bytes(gzip.compress(encode_idx(array)))
    raw_with_suffix = tmp_path / "labels-idx1-ubyte.gz"
    raw_with_suffix.write_bytes(encode_idx(array))
    np.testing.assert_array_equal(read_idx(gz_without_suffix), array)
    np.testing.assert_array_equal(read_idx(raw_with_suffix), array)


def test_write_idx_refuses_unstorable_arrays(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="uint16"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16), gzip=False)
    with pytest.raises(DataError, match="dimensions"):
        write_idx(tmp_path / "x", np.array(3, dtype=np.uint8), gzip=False)
    assert not (tmp_path / "x").exists()


# --- corrupt files: each names the file and the problem ---------------------------------

@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "bad magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "unknown IDX dtype code 0x07"),
        (b"\x00\x00\x08", "truncated header"),
        (b"\x00\x00\x08\x03" + struct.pack(">2I", 2, 2), "truncated header"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (_header(0x08, (10,)) + bytes(9), r"truncated: header says 10 items \(10 bytes\), file has 9"),
        (_header(0x0D, (2, 2)) + bytes(15), r"truncated: header says 4 items \(16 bytes\), file has 15"),
        (_header(0x08, (10,)) + bytes(12), "2 trailing bytes"),
        (b"", "truncated header"),
    ],
    ids=["magic", "dtype", "short-preamble", "short-dims", "zero-ndim", "short-u8", "short-f32",
         "trailing", "empty"],
)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
def test_corrupt_file_raises_data_error(tmp_path: Path, payload: bytes, problem: str, compress: bool) -> None:
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    with pytest.raises(DataError, match=problem) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_truncated_message_matches_the_documented_form(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_header(0x08, (60000,)) + bytes(59990))
    with pytest.raises(DataError) as caught:
        read_idx(path)
    assert str(caught.value) == f"{path}: truncated: header says 60000 items (60000 bytes), file has 59990"


@pytest.mark.parametrize("damage", ["flip-crc", "cut-stream", "garbage-body"])
def test_corrupt_gzip_raises_data_error(tmp_path: Path, damage: str) -> None:
    good = bytearray(gzip.compress(encode_idx(np.arange(200, dtype=np.uint8))))
    if damage == "flip-crc":
        good[-6] ^= 0xFF  # the CRC32 in the trailer
        bad = bytes(good)
    elif damage == "cut-stream":
        bad = bytes(good[: len(good) // 2])
    else:
        bad = bytes(good[:10]) + b"\xff" * 40
    path = tmp_path / "x.gz"
    path.write_bytes(bad)
    with pytest.raises(DataError, match="corrupt gzip") as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_idx(tmp_path / "nope")


# --- load_split ----------------------------------------------------------------------------

def _write_split(directory: Path, prefix: str, images: np.ndarray, labels: np.ndarray, compress: bool) -> None:
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip=compress)


def _fake(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


@pytest.mark.parametrize(("split", "prefix", "compress"), [("train", "train", True), ("test", "t10k", False)])
def test_load_split_reads_fixture(tmp_path: Path, split: str, prefix: str, compress: bool) -> None:
    images, labels = _fake(12)
    _write_split(tmp_path, prefix, images, labels, compress)
    data = load_split(split, data_dir=tmp_path)  # type: ignore[arg-type]
    assert isinstance(data, Dataset) and len(data) == 12
    assert data.images.dtype == np.uint8 and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, labels)
    sub = data.subset(np.array([3, 1]))
    np.testing.assert_array_equal(sub.labels, labels[[3, 1]])


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert resolve_data_dir() == DEFAULT_DATA_DIR
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    images, labels = _fake(3)
    (tmp_path / "env").mkdir()
    _write_split(tmp_path / "env", "t10k", images, labels, compress=False)
    assert len(load_split("test")) == 3


def test_load_split_count_mismatch_names_both_files(tmp_path: Path) -> None:
    images, labels = _fake(5)
    _write_split(tmp_path, "train", images, labels[:4], compress=True)
    with pytest.raises(DataError, match="5 images but .* 4 labels") as caught:
        load_split("train", tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(caught.value)
    assert "train-labels-idx1-ubyte.gz" in str(caught.value)


def test_load_split_label_out_of_range(tmp_path: Path) -> None:
    images, labels = _fake(5)
    labels[2] = 10
    _write_split(tmp_path, "train", images, labels, compress=False)
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: 1 labels outside 0\.\.9 \(first at index 2: 10\)"):
        load_split("train", tmp_path)


def test_load_split_wrong_ranks(tmp_path: Path) -> None:
    images, labels = _fake(5)
    _write_split(tmp_path, "train", images.reshape(5, -1), labels, compress=False)
    with pytest.raises(DataError, match="images-idx3-ubyte: images must be 3-D"):
        load_split("train", tmp_path)
    _write_split(tmp_path, "train", images, labels.reshape(5, 1), compress=False)
    with pytest.raises(DataError, match="labels-idx1-ubyte: labels must be 1-D"):
        load_split("train", tmp_path)


def test_load_split_missing_file_says_how_to_fix(tmp_path: Path) -> None:
    images, labels = _fake(2)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, gzip=True)
    with pytest.raises(DataError) as caught:
        load_split("train", tmp_path)
    message = str(caught.value)
    assert "train-labels-idx1-ubyte" in message and "train-images" not in message
    assert "apt-get install dataset-fashion-mnist" in message and DATA_DIR_ENV in message
    with pytest.raises(DataError, match="not found.*apt-get install dataset-fashion-mnist"):
        load_split("test", tmp_path / "absent")


def test_load_split_rejects_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split"):
        load_split("validation", tmp_path)  # type: ignore[arg-type]


@pytest.mark.skipif(not DEFAULT_DATA_DIR.is_dir(), reason=f"{DEFAULT_DATA_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist() -> None:
    train, test = load_split("train", DEFAULT_DATA_DIR), load_split("test", DEFAULT_DATA_DIR)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    # Fashion-MNIST is balanced: every class has 6000 train and 1000 test images.
    assert np.bincount(train.labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    x = to_model_input(train.images[:20000], FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02


# --- to_model_input and batch_indices -------------------------------------------------------

def test_to_model_input_formula_and_layout() -> None:
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    x = to_model_input(images, mean=0.5, std=0.25)
    assert x.dtype == np.float32 and x.shape == (1, 1, 2, 2)
    expected = (images.astype(np.float64) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(x[:, 0], expected, rtol=1e-6)
    with pytest.raises(ConfigError):
        to_model_input(images, 0.0, 0.0)
    with pytest.raises(ConfigError):
        to_model_input(images.astype(np.float32), 0.0, 1.0)


@pytest.mark.parametrize(("n", "batch", "drop_last"), [(10, 3, False), (10, 3, True), (9, 3, True), (2, 5, False), (0, 4, False)])
def test_batch_indices_cover_an_epoch(n: int, batch: int, drop_last: bool) -> None:
    batches = list(batch_indices(n, batch, np.random.default_rng(0), drop_last=drop_last))
    sizes = [len(b) for b in batches]
    full, rest = divmod(n, batch)
    assert sizes == [batch] * full + ([rest] if rest and not drop_last else [])
    seen = np.concatenate(batches) if batches else np.array([], dtype=np.int64)
    assert len(np.unique(seen)) == len(seen) and seen.dtype == np.int64
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))


def test_batch_indices_shuffle_is_seeded() -> None:
    def epoch(seed: int, shuffle: bool = True) -> list[int]:
        return np.concatenate(list(batch_indices(50, 8, np.random.default_rng(seed), shuffle=shuffle))).tolist()

    assert epoch(1) == epoch(1)
    assert epoch(1) != epoch(2)
    assert epoch(1, shuffle=False) == list(range(50))
    with pytest.raises(ConfigError):
        next(batch_indices(5, 0, np.random.default_rng(0)))
