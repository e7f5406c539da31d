"""The tiny SD 1.x model served whole and split, once for every serve test (a server start is ~10 s idle)."""

import pytest

from serve_helpers import sdkit_serve


@pytest.fixture(scope="session")
def server(tiny_sd, tmp_path_factory):
    """(url, log path) of `sdkit serve TINY_SD --split` named `tiny`: tiny, tiny-text-encoder, tiny-denoiser, tiny-decoder."""
    with sdkit_serve({"tiny": tiny_sd}, tmp_path_factory.mktemp("serve"), "--max-steps", "3", "--max-size", "64",
                     "--split") as servers:
        yield servers["tiny"]
