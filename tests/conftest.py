"""Shared fixtures: tiny random-weight models of every family, built once per session.

Set offline before anything imports huggingface_hub, so no test can reach the network.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs as pytest-xdist workers, one per core: one compute thread each, or the workers'
    # OpenMP threads contend for the same cores. Subprocesses the tests start inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from sdkit.quickstart import tiny  # noqa: E402  (imports no torch at module level)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """SD 1.5-like pipeline folder, 32 px."""
    return tiny.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    """SD 2.1-like pipeline folder (v-prediction, DDIM), 32 px."""
    return tiny.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd2"), v_prediction=True)


@pytest.fixture(scope="session")
def tiny_sd_struct(tmp_path_factory):
    """SD 1.5 block structure with tiny channels, 64 px: converts to the original single-file layout."""
    return tiny.build_tiny_sd(tmp_path_factory.mktemp("tiny_sd_struct"), sd_structure=True)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """SDXL base pipeline folder, 32 px."""
    return tiny.build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"))


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory):
    """SDXL refiner (img2img, text_encoder_2 only, aesthetic score), same VAE as `tiny_sdxl`."""
    return tiny.build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl_refiner"), refiner=True)


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """SD3 pipeline folder (two CLIPs + T5, flow matching), 32 px."""
    return tiny.build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """CLIPModel + CLIPProcessor folder (32 px images), for CLIP-score evaluation."""
    return tiny.build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture
def image_folder(tmp_path):
    """4 distinct 32 px PNGs with metadata.jsonl captions (the `imagefolder` layout)."""
    return tiny.make_image_folder(tmp_path / "images", n=4, size=32, captions="metadata")
