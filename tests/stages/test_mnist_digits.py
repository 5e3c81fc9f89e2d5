"""Stage mnist_digits: IDX download from a loopback server, the bundled digits, params."""
from __future__ import annotations

import gzip
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import ParamsError, load_section
from pipeline.store import EpisodeStore, StoreConfig
from stages import mnist_digits
from stages.mnist_digits import BUNDLED_SOURCE, Config, read_idx, run
from tests.pipeline.test_download import serve

REPO = Path(__file__).resolve().parents[2]
SMALL_STORE = StoreConfig(chunk_frames=4, shard_chunks=2)


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000 08 <ndim>, big-endian uint32 dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    return header + arr.astype(np.uint8).tobytes()


def write_gz(path: Path, data: bytes) -> str:
    gz = gzip.compress(data, mtime=0)
    path.write_bytes(gz)
    return hashlib.sha256(gz).hexdigest()


@pytest.fixture
def mnist_server(tmp_path):
    """Serves a tiny MNIST (5 train, 3 test) as gzip'd IDX files; yields (config, images, labels)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=8, dtype=np.uint8)
    root = tmp_path / "www"
    root.mkdir()
    arrays = {
        "train_images": images[:5], "train_labels": labels[:5],
        "test_images": images[5:], "test_labels": labels[5:],
    }
    digests = {k: write_gz(root / f"{k}.gz", idx_bytes(a)) for k, a in arrays.items()}
    with serve(root) as base:
        files = {k: {"url": f"{base}/{k}.gz", "sha256": digests[k]} for k in arrays}
        cfg = Config.model_validate({
            "source": "download",
            "download": {"allowed_schemes": ["http"], "allowed_hosts": ["127.0.0.1"], "files": files},
        })
        yield cfg, images, labels, root


def test_download_parses_idx_train_then_test(mnist_server, tmp_path, monkeypatch):
    cfg, images, labels, _ = mnist_server
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    out = tmp_path / "data" / "digits.zarr"
    metrics = run(cfg, out, SMALL_STORE)
    store = EpisodeStore.open(out)
    np.testing.assert_array_equal(store.array("images")[:], images)
    np.testing.assert_array_equal(store.array("labels")[:], labels)
    assert store.n_episodes == 1 and store.attrs["source"].startswith("download")
    assert metrics["digits"] == 8
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits.zarr"]  # no downloads beside the store
    assert list((tmp_path / "tmp").iterdir()) == []  # the download directory is removed


def test_download_checksum_mismatch_fails_and_writes_nothing(mnist_server, tmp_path):
    cfg, *_, root = mnist_server
    (root / "test_labels.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8)), mtime=0))
    out = tmp_path / "data" / "digits.zarr"
    with pytest.raises(ValueError, match="test_labels.gz: sha256 mismatch"):
        run(cfg, out, SMALL_STORE)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_labels_count_must_match_images(mnist_server, tmp_path):
    cfg, *_, root = mnist_server
    digest = write_gz(root / "test_labels.gz", idx_bytes(np.zeros(2, np.uint8)))
    files = cfg.download.files.model_copy(update={
        "test_labels": cfg.download.files.test_labels.model_copy(update={"sha256": digest})})
    cfg = cfg.model_copy(update={"download": cfg.download.model_copy(update={"files": files})})
    with pytest.raises(ValueError, match=r"mnist_digits.download.files.test_labels .*2 labels for 3 images"):
        run(cfg, tmp_path / "digits.zarr", SMALL_STORE)


@pytest.mark.parametrize(
    "data, ndim, message",
    [
        (idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-1], 3, r"need 1568 bytes of data, the file has 1567"),
        (bytes([0, 0, 0x0D, 3]) + bytes(12), 3, "bad IDX magic number 0x00000d03"),
        (idx_bytes(np.zeros((4, 4), np.uint8)), 1, "bad IDX magic number 0x00000802"),
        (b"\x00\x00", 1, "too short for an IDX header"),
    ],
)
def test_malformed_idx_names_the_file(tmp_path, data, ndim, message):
    path = tmp_path / "bad-idx.gz"
    write_gz(path, data)
    with pytest.raises(ValueError, match=message) as exc:
        read_idx(path, ndim)
    assert str(path) in str(exc.value)


def test_not_gzip_names_the_file(tmp_path):
    path = tmp_path / "plain.gz"
    path.write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match=r"plain.gz: not a readable gzip file"):
        read_idx(path, 1)


def test_read_idx_big_endian_dims(tmp_path):
    arr = np.arange(2 * 3 * 300, dtype=np.uint32).astype(np.uint8).reshape(2, 3, 300)  # a dim > 255
    write_gz(tmp_path / "x.gz", idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", 3), arr)


def test_bundled_digits(tmp_path):
    out = tmp_path / "digits.zarr"
    metrics = run(Config(), out, SMALL_STORE)
    store = EpisodeStore.open(out)
    images, labels = store.array("images")[:], store.array("labels")[:]
    assert images.shape == (1797, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.uint8 and set(np.unique(labels)) == set(range(10))
    assert images.max() == 255 and images.min() == 0
    # the digit lies in the centred 20x20 box: a 4-pixel empty border
    border = np.ones((28, 28), bool)
    border[4:24, 4:24] = False
    assert images[:, border].max() == 0
    assert images[:, 4:24, 4:24].max(axis=(1, 2)).min() > 0
    assert store.attrs["source"] == BUNDLED_SOURCE
    assert metrics == {"digits": 1797, "source": BUNDLED_SOURCE}


def test_upsample_keeps_the_drawing():
    """A bright 8x8 pixel becomes a bright 2.5x2.5 patch at the matching place of the 20x20 box."""
    small = np.zeros((1, 8, 8))
    small[0, 2, 5] = 16
    big = mnist_digits.upsample_digits(small, 16.0)[0]
    y, x = np.unravel_index(np.argmax(big), big.shape)
    assert (4 + 2 * 2.5 <= y < 4 + 3 * 2.5) and (4 + 5 * 2.5 <= x < 4 + 6 * 2.5)


def _params_with(tmp_path: Path, section: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["mnist_digits"] = section
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_repository_params_validate():
    cfg = load_section("mnist_digits", Config, path=REPO / "params.yaml")
    assert cfg == Config()  # the model's defaults match params.yaml


@pytest.mark.parametrize(
    "change, key",
    [
        (lambda s: s.update(colour="red"), "mnist_digits.colour: unknown key"),
        (lambda s: s.update(source="torrent"), "mnist_digits.source"),
        (lambda s: s["download"]["files"]["test_labels"].update(sha256="abc"), "mnist_digits.download.files.test_labels.sha256"),
        (lambda s: s["download"]["files"]["train_images"].update(md5="x"), "mnist_digits.download.files.train_images.md5: unknown key"),
    ],
)
def test_params_errors_name_the_key(tmp_path, change, key):
    section = yaml.safe_load((REPO / "params.yaml").read_text())["mnist_digits"]
    change(section)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load_section("mnist_digits", Config, path=_params_with(tmp_path, section))
