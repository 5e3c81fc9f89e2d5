"""Stage ``mnist_digits``: MNIST digit images for Moving MNIST → ``data/mnist/digits.zarr``.

Sources:
- ``bundled`` (offline default): scikit-learn's 8x8 digits (values 0..16), upsampled the MNIST
  way: the digit fills a 20x20 box centred in a 28x28 image, values scaled to 0..255.
- ``download``: the four MNIST IDX files (gzip'd), fetched with their sha256 and parsed without
  pickle; train and test concatenated.

The store holds one episode: ``data/images`` (N, 28, 28) uint8 and ``data/labels`` (N,) uint8.
"""
from __future__ import annotations

import gzip
import logging
import tempfile
import zlib
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import numpy as np
from pydantic import Field

from pipeline.cli import run_stage
from pipeline.config import StrictModel, load_section
from pipeline.download import fetch
from pipeline.paths import MNIST_DIGITS
from pipeline.store import EpisodeStoreWriter, StoreConfig
from pipeline.tracking import stage_run

log = logging.getLogger(__name__)

OUT = MNIST_DIGITS
SIZE = 28  # MNIST image side
BOX = 20  # MNIST digits are normalised to a 20x20 box, centred in 28x28
BUNDLED_SOURCE = "bundled: scikit-learn digits 8x8 upsampled to 28x28"
DOWNLOAD_SOURCE = "download: MNIST train + test (IDX files)"
IDX_UBYTE = 0x08

SHA256 = Field(pattern=r"^[0-9a-fA-F]{64}$")
MNIST_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"


class RemoteFile(StrictModel):
    url: str
    sha256: str = SHA256


class MnistFiles(StrictModel):
    train_images: RemoteFile = RemoteFile(
        url=MNIST_URL + "train-images-idx3-ubyte.gz",
        sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609")
    train_labels: RemoteFile = RemoteFile(
        url=MNIST_URL + "train-labels-idx1-ubyte.gz",
        sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c")
    test_images: RemoteFile = RemoteFile(
        url=MNIST_URL + "t10k-images-idx3-ubyte.gz",
        sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6")
    test_labels: RemoteFile = RemoteFile(
        url=MNIST_URL + "t10k-labels-idx1-ubyte.gz",
        sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")


class DownloadConfig(StrictModel):
    allowed_schemes: list[str] = ["https"]
    allowed_hosts: list[str] = ["storage.googleapis.com"]
    files: MnistFiles = MnistFiles()


class Config(StrictModel):
    """The ``mnist_digits`` section of params.yaml."""

    source: Literal["bundled", "download"] = "bundled"
    download: DownloadConfig = DownloadConfig()


def read_idx(path: Path, ndim: int, name: str | None = None) -> np.ndarray:
    """Parse a gzip'd IDX file of unsigned bytes with ``ndim`` dimensions (no pickle).

    IDX: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then each
    dimension as a big-endian uint32, then the data. Errors name ``name`` (default: the path).
    """
    name = name or str(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{name}: not a readable gzip file: {exc}") from exc
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{name}: too short for an IDX header of {ndim} dimensions ({len(raw)} bytes)")
    magic = bytes([0, 0, IDX_UBYTE, ndim])
    if raw[:4] != magic:
        raise ValueError(
            f"{name}: bad IDX magic number 0x{raw[:4].hex()}: expected 0x{magic.hex()} "
            f"(unsigned bytes, {ndim} dimensions)"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(f"{name}: IDX dimensions {dims} need {size} bytes of data, the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _load_split(images_file: tuple[Path, str], labels_file: tuple[Path, str]) -> tuple[np.ndarray, np.ndarray]:
    """Parse and cross-check one split; each file is given as (path, name used in errors)."""
    (images_path, images_name), (labels_path, labels_name) = images_file, labels_file
    images = read_idx(images_path, 3, images_name)
    labels = read_idx(labels_path, 1, labels_name)
    if images.shape[1:] != (SIZE, SIZE):
        raise ValueError(f"{images_name}: images are {images.shape[1:]}, expected ({SIZE}, {SIZE})")
    if len(labels) != len(images):
        raise ValueError(f"{labels_name}: {len(labels)} labels for {len(images)} images in {images_name}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_name}: labels must be 0..9, found {int(labels.max())}")
    return images, labels


def download_digits(cfg: DownloadConfig, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fetch and parse the four MNIST files into ``workdir``; returns train+test images, labels."""
    files = {}
    for key, spec in cfg.files:
        dest = workdir / (Path(urlsplit(spec.url).path).name or key)
        fetch(spec.url, dest, spec.sha256, cfg.allowed_schemes, cfg.allowed_hosts, desc=key)
        files[key] = (dest, f"mnist_digits.download.files.{key} ({spec.url})")
    train = _load_split(files["train_images"], files["train_labels"])
    test = _load_split(files["test_images"], files["test_labels"])
    return np.concatenate([train[0], test[0]]), np.concatenate([train[1], test[1]])


def upsample_digits(images: np.ndarray, max_value: float) -> np.ndarray:
    """Small digit images (N, h, w) → (N, 28, 28) uint8: resized to 20x20, centred, 0..255."""
    from skimage.transform import resize

    boxed = resize(images.astype(np.float64) / max_value, (len(images), BOX, BOX), order=1, mode="edge",
                   anti_aliasing=False)
    pad = (SIZE - BOX) // 2
    out = np.zeros((len(images), SIZE, SIZE), dtype=np.uint8)
    out[:, pad : pad + BOX, pad : pad + BOX] = np.clip(np.rint(boxed * 255), 0, 255).astype(np.uint8)
    return out


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits (8x8, 0..16), upsampled to 28x28 uint8."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return upsample_digits(d.images, 16.0), d.target.astype(np.uint8)


def run(cfg: Config, out: Path = OUT, store_cfg: StoreConfig | None = None) -> dict:
    """Write the digits store at ``out``; returns its metrics."""
    if cfg.source == "download":
        with tempfile.TemporaryDirectory(prefix="mnist-") as tmp:
            images, labels = download_digits(cfg.download, Path(tmp))
        source = DOWNLOAD_SOURCE
    else:
        images, labels = bundled_digits()
        source = BUNDLED_SOURCE
    with EpisodeStoreWriter(out, store_cfg, attrs={"source": source}) as w:
        w.add_episode(images=images, labels=labels)
    log.info("%s: %d digits (%s)", out, len(images), source)
    return {"digits": int(len(images)), "source": source}


def main() -> None:
    cfg = load_section("mnist_digits", Config)
    store_cfg = load_section("store", StoreConfig)
    with stage_run("mnist_digits", None, cfg) as r:
        r.log_metrics(run(cfg, OUT, store_cfg))


if __name__ == "__main__":
    run_stage(main)
