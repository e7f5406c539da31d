"""Recipes: schema, overrides, and errors that name the key and the file."""

from pathlib import Path

import pytest

from sdkit.errors import UserError
from sdkit.recipe import field_paths, load_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))

MINIMAL = """
model:
  pretrained: some-org/some-model
data:
  dataset: some-org/some-data
train:
  max_steps: 10
output_dir: runs/x
"""


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=()):
    with pytest.raises(UserError) as info:
        load_recipe(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(recipe, tmp_path, monkeypatch):
    # Offline recipes point at runs/tiny/...; validation only checks those folders exist.
    monkeypatch.chdir(tmp_path)
    for sub in ("tiny/sd", "tiny/sd2", "tiny/sdxl", "tiny/sd3", "tiny/images", "quickstart/base", "quickstart/digits"):
        (tmp_path / "runs" / sub).mkdir(parents=True)
    loaded = load_recipe(recipe)
    assert loaded.train.max_steps or loaded.train.epochs


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(path, ["train.max_steps=500", "optim.lr=5e-5", "validation.prompts=[a, b]", "method.type=full"])
    assert r.train.max_steps == 500
    assert r.optim.lr == 5e-5
    assert r.validation.prompts == ["a", "b"]
    assert r.method.type == "full"
    assert r.data.cache is True and r.method.rank == 4
    assert load_recipe(path, ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_misspelled_key_names_key_file_and_close_match(tmp_path):
    path = write(tmp_path, MINIMAL.replace("max_steps", "max_step"))
    msg = error_of(path)
    assert "train.max_step" in msg and "train.max_steps" in msg and str(path) in msg


def test_misspelled_override_names_command_line(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), ["optim.lrr=1"])
    assert "optim.lrr" in msg and "optim.lr" in msg and "command line" in msg


def test_unknown_section(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL + "trian:\n  seed: 1\n"))
    assert "'trian'" in msg and "train" in msg


def test_wrong_type_names_key(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), ["train.batch_size=many"])
    assert "train.batch_size" in msg and "many" in msg


def test_bad_choice_names_key(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), ["train.mixed_precision=fp8"])
    assert "train.mixed_precision" in msg


def test_missing_required_key(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL.replace("output_dir: runs/x\n", "")))
    assert "output_dir" in msg and "required" in msg


def test_missing_local_folder(tmp_path):
    msg = error_of(write(tmp_path, MINIMAL), [f"data.dataset={tmp_path}/nope"])
    assert "data.dataset" in msg and "nope" in msg


def test_resolution_multiple_of_8(tmp_path):
    assert "multiple of 8" in error_of(write(tmp_path, MINIMAL), ["data.resolution=30"])


def test_needs_steps_or_epochs(tmp_path):
    assert "max_steps" in error_of(write(tmp_path, MINIMAL.replace("  max_steps: 10\n", "  seed: 1\n")))


def test_missing_recipe_file(tmp_path):
    assert "does not exist" in error_of(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    assert "not valid YAML" in error_of(write(tmp_path, "model: [unclosed\n"))


def test_readme_documents_every_recipe_field():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [key for key in field_paths() if f"`{key}`" not in readme]
    assert not missing, f"README.md does not document: {missing}"


def test_textual_inversion_keys(tmp_path):
    path = write(tmp_path, MINIMAL)
    ti = ["method.type=textual_inversion", "method.placeholder_token=<cat-toy>", "method.initializer_token=toy"]
    recipe = load_recipe(path, ti + ["method.num_vectors=3"])
    assert recipe.method.trains_text_encoders and not recipe.cache_used
    assert "textual inversion" in recipe.cache_blocker()
    assert "method.placeholder_token: textual_inversion needs one word" in error_of(path, ti[:1])
    assert "method.placeholder_token applies to method.type textual_inversion" in error_of(path, ti[1:2])
    assert "method.train_text_encoder applies to method.type full" in error_of(path, ti + ["method.train_text_encoder=true"])
    sd3 = error_of(path, ti + ["method.num_vectors=2", "model.family=sd3"])
    assert sd3.endswith("method.num_vectors: sd3 pipelines do not expand a multi-vector token in prompts; use num_vectors=1 (got 2)")
