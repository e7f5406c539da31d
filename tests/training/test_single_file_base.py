"""A single-file `.safetensors` checkpoint as `model.pretrained` (diffusers' from_single_file), with
`model.config` naming the diffusers folder its configs and tokenizers come from (offline)."""

from __future__ import annotations

import pytest

from helpers import train_recipe, write_recipe
from sdkit.errors import UserError
from sdkit.export.run import export_command
from sdkit.recipe import load_recipe


@pytest.fixture(scope="module")
def single_file(tiny_sd_struct, tmp_path_factory):
    """The SD 1.5-structure tiny model exported as one original-layout file, in fp32 (as trained)."""
    path = tmp_path_factory.mktemp("single") / "model.safetensors"
    export_command(format="safetensors", model=str(tiny_sd_struct), out=str(path), single_file=True, dtype="fp32")
    return path


def _first_loss(tmp_path, model, images, name, **model_keys):
    recipe = write_recipe(tmp_path, model, {"dataset": str(images), "resolution": 64}, tmp_path / name,
                          train={"max_steps": 1, "batch_size": 2})
    return train_recipe(recipe, [f"model.{k}={v}" for k, v in model_keys.items()]).loss_history[0]


def test_single_file_trains_with_the_folder_step0_loss(single_file, tiny_sd_struct, image_folder, tmp_path):
    from_folder = _first_loss(tmp_path, tiny_sd_struct, image_folder, "folder")
    from_file = _first_loss(tmp_path, single_file, image_folder, "file", config=str(tiny_sd_struct))
    assert from_file == pytest.approx(from_folder, rel=1e-6, abs=1e-7)


def test_pickled_single_file_and_stray_config_are_refused(tiny_sd_struct, image_folder, tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not opened")
    with pytest.raises(UserError, match=r"model\.pretrained: '.*model\.ckpt' is a pickled checkpoint, which sdkit never loads"):
        load_recipe(write_recipe(tmp_path, ckpt, image_folder, tmp_path / "a"))
    with pytest.raises(UserError, match="model.config applies to a single-file .safetensors model.pretrained"):
        load_recipe(write_recipe(tmp_path, tiny_sd_struct, image_folder, tmp_path / "b"),
                    [f"model.config={tiny_sd_struct}"])


def test_single_file_without_config_offline_is_one_line(single_file, image_folder, tmp_path):
    from sdkit.families import resolve_family_name

    recipe = load_recipe(write_recipe(tmp_path, single_file, image_folder, tmp_path / "run"))
    with pytest.raises(UserError) as e:  # diffusers infers SD 1.5's hub repo, which is not here offline
        resolve_family_name(recipe.model)
    assert str(e.value).startswith(f"model.config: the configs of '{single_file}' live in "
                                   "'stable-diffusion-v1-5/stable-diffusion-v1-5', which cannot be read here")
    assert "\n" not in str(e.value)
