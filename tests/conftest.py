"""Shared pytest fixtures: tiny random-weight backbones (built offline) and a network guard.

Fixtures (session-scoped unless noted; all on CPU, fp32):

* ``tiny_openclip_config`` (function-scoped): a fresh dict, the tiny open_clip custom config;
* ``tiny_openclip``: :class:`~vlm_tta.models.VisionLanguageModel` built from that config (seed 0);
* ``tiny_hf_clip`` / ``tiny_hf_siglip``: transformers ``CLIPModel`` / ``SiglipModel`` wrapped with
  :func:`vlm_tta.models.from_hf` (seed 0);
* ``tiny_hf_clip_dir`` / ``tiny_hf_siglip_dir``: a directory holding the same model + processor as
  ``save_pretrained`` writes them, for ``load_model("hf:/dir")``.
* ``cfg_file``: the tiny open_clip config as a JSON file (``--model FILE --pretrained none``);
* ``data_root``: tiny fake datasets in their real layouts for the benchmark tests: eurosat (3 classes
  x 3 images), oxford_pets (2 x 3), textures (3 x 2).

The session-scoped models are shared: never change their weights in place. Load a private copy
(``load_model(f"hf:{tiny_hf_clip_dir}")`` or ``tiny_models.build_tiny_openclip()``) to do that.

No test may touch the network: the Hugging Face libraries are put in offline mode before they are
imported, and connections to anything but localhost raise ``OSError``.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

# Before huggingface_hub / transformers are imported (they read these once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py importable from every test module

import tiny_models  # noqa: E402

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1", "0.0.0.0", None, ""}


def _blocked(host) -> bool:
    return isinstance(host, (str, bytes)) and (host.decode() if isinstance(host, bytes) else host) not in _LOCAL_HOSTS


@pytest.fixture(scope="session", autouse=True)
def _no_network():
    """Any connection (or DNS lookup) to a non-local host fails at once instead of hanging."""
    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect,
        socket.socket.connect_ex,
        socket.getaddrinfo,
    )

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _blocked(address[0]):
            raise OSError(f"network access is blocked in tests (tried to connect to {address!r})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _blocked(address[0]):
            raise OSError(f"network access is blocked in tests (tried to connect to {address!r})")
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if _blocked(host):
            raise socket.gaierror(f"network access is blocked in tests (tried to resolve {host!r})")
        return real_getaddrinfo(host, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(socket.socket, "connect", connect)
    mp.setattr(socket.socket, "connect_ex", connect_ex)
    mp.setattr(socket, "getaddrinfo", getaddrinfo)
    yield
    mp.undo()


@pytest.fixture
def tiny_openclip_config() -> dict:
    return tiny_models.tiny_openclip_config()


@pytest.fixture(scope="session")
def tiny_openclip():
    return tiny_models.build_tiny_openclip(seed=0)


@pytest.fixture(scope="session")
def _tiny_hf_clip_parts():
    return tiny_models.build_tiny_hf_clip(seed=0)


@pytest.fixture(scope="session")
def _tiny_hf_siglip_parts(tmp_path_factory):
    pytest.importorskip("sentencepiece", reason="the tiny SigLIP tokenizer is a sentencepiece model")
    pytest.importorskip("google.protobuf", reason="transformers' SiglipTokenizer requires protobuf")
    return tiny_models.build_tiny_hf_siglip(tmp_path_factory.mktemp("siglip_spm"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(_tiny_hf_clip_parts, tmp_path_factory) -> Path:
    return tiny_models.save_hf(*_tiny_hf_clip_parts, tmp_path_factory.mktemp("tiny_hf_clip"))


@pytest.fixture(scope="session")
def tiny_hf_siglip_dir(_tiny_hf_siglip_parts, tmp_path_factory) -> Path:
    return tiny_models.save_hf(*_tiny_hf_siglip_parts, tmp_path_factory.mktemp("tiny_hf_siglip"))


@pytest.fixture(scope="session")
def tiny_hf_clip(_tiny_hf_clip_parts, tiny_hf_clip_dir):
    # Depends on the directory fixture so the files are written before anyone can touch the weights.
    from vlm_tta.models import from_hf

    model, processor = _tiny_hf_clip_parts
    return from_hf(model, processor, name="hf:tiny-clip", device="cpu")


@pytest.fixture(scope="session")
def tiny_hf_siglip(_tiny_hf_siglip_parts, tiny_hf_siglip_dir):
    from vlm_tta.models import from_hf

    model, processor = _tiny_hf_siglip_parts
    return from_hf(model, processor, name="hf:tiny-siglip", device="cpu")


@pytest.fixture(scope="session")
def cfg_file(tmp_path_factory) -> str:
    import json

    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(tiny_models.tiny_openclip_config()))
    return str(path)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    from fake_datasets import make_coop, make_textures

    root = tmp_path_factory.mktemp("bench_data")
    make_coop(root, "eurosat", labels=[0, 3, 7], per_class=3, splits=("test",))
    make_coop(root, "oxford_pets", labels=[1, 2], per_class=3, splits=("test",))
    make_textures(root, classes=("banded", "zigzagged", "dotted"), per_class=2)
    return root


@pytest.fixture(autouse=True)
def _scratch_cache_dir(tmp_path_factory, monkeypatch):
    """Tests that use the default cache location write to a scratch folder, never ~/.cache."""
    monkeypatch.setenv("VLM_TTA_CACHE_DIR", str(tmp_path_factory.mktemp("vlm_tta_cache")))
    monkeypatch.delenv("VLM_TTA_NO_CACHE", raising=False)
