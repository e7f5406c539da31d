"""The trained modules as ONE prepared module: two CPU processes (DDP over gloo) training the
denoiser and the text encoder on different shards of the data end with the same weights on
both ranks: every trainable gradient is averaged, the text encoder's too."""

import pytest
from safetensors.torch import load_file

from helpers import free_port, train_two_cpu_ranks, write_recipe


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_training_the_text_encoder_agree_on_its_weights(tiny_sd, tmp_path):
    from sdkit.quickstart.tiny import make_image_folder

    data = make_image_folder(tmp_path / "images", n=8, size=32)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sd, data, out, method={"type": "lora", "rank": 4, "train_text_encoder": True},
                          train={"max_steps": 4, "batch_size": 2})
    results, seen = train_two_cpu_ranks(tmp_path, recipe, port=free_port())
    assert not set(seen[0]["seen"][:4]) & set(seen[1]["seen"][:4]), "the ranks trained on the same images"
    text = [load_file(results / f"text-{rank}.safetensors") for rank in (0, 1)]
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in text[0].items()), \
        "the text encoder's LoRA did not train"
    denoiser = [load_file(results / f"weights-{rank}.safetensors") for rank in (0, 1)]
    assert largest_difference(*denoiser) == 0.0
    assert largest_difference(*text) == 0.0, "the ranks' text encoders drifted apart (gradients not averaged)"
