"""Model families and how sdkit tells them apart (model_index.json `_class_name`)."""

from __future__ import annotations

from importlib import import_module

from sdkit.errors import UserError

# name -> (module, class). Family modules import no torch; they load when first asked for.
# Adding a family: one module here (a Family subclass), one line below, its pipelines in DETECT
# and its configs for `sdkit plan` in sdkit/plan/configs/.
FAMILIES = {
    "sd": ("sdkit.families.sd", "StableDiffusion"),
    "sdxl": ("sdkit.families.sdxl", "StableDiffusionXL"),
    "sd3": ("sdkit.families.sd3", "StableDiffusion3"),
}

# model_index.json _class_name -> family name; kept here so detection needs no torch.
DETECT = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}


def family_names() -> list[str]:
    return list(FAMILIES)


def family_class(name: str):
    if name not in FAMILIES:
        raise UserError(f"model.family: unknown family '{name}' (known: {', '.join(FAMILIES)})")
    module, cls = FAMILIES[name]
    try:
        return getattr(import_module(module), cls)
    except ModuleNotFoundError as e:
        if e.name == module:
            raise UserError(f"model.family: family '{name}' is not available in this sdkit version") from None
        raise


def detect_family(pretrained: str, revision=None, key: str = "model.pretrained") -> str:
    """Family name from the model's model_index.json."""
    from sdkit.inference.loading import read_model_index

    index = read_model_index(pretrained, revision)
    class_name = index.get("_class_name", "?")
    if class_name not in DETECT:
        raise UserError(
            f"{key}: '{pretrained}' is a {class_name}, which sdkit does not support yet "
            f"(supported: {', '.join(sorted(set(DETECT)))})"
        )
    return DETECT[class_name]


def local_family(pretrained: str):
    """The family of a local diffusers folder, read without torch or network; None when the
    folder is not a (supported) diffusers model or `pretrained` is a hub id."""
    import json
    import os

    index = os.path.join(os.path.expanduser(pretrained), "model_index.json")
    if not os.path.isfile(index):
        return None
    try:
        with open(index, encoding="utf-8") as f:
            return DETECT.get(json.load(f).get("_class_name"))
    except (OSError, ValueError, AttributeError):
        return None


def resolve_family_name(model_cfg) -> str:
    from sdkit.single_file import config_source, inferred_config_repo

    if model_cfg.family != "auto":
        return model_cfg.family
    source = config_source(model_cfg)
    if source is None:  # a single file without model.config: the repo diffusers would take its configs from
        source = inferred_config_repo(model_cfg.pretrained)
        try:
            return detect_family(source)
        except UserError as e:
            raise UserError(f"model.config: the configs of '{model_cfg.pretrained}' live in '{source}', which "
                            f"cannot be read here ({e}); set model.config to a diffusers folder of its architecture"
                            ) from None
    return detect_family(source, model_cfg.revision, key="model.config" if model_cfg.config else "model.pretrained")


def check_recipe_family(recipe, name: str) -> list[str]:
    """Problems of `recipe` for the family `name` (see Family.check_recipe)."""
    return family_class(name).check_recipe(recipe)
