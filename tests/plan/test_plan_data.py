"""`sdkit plan` traces the step at the run's largest bucket and, with prior preservation, at the
doubled batch (instance + class samples): the shapes the trainer's loader can hand it."""

from __future__ import annotations

from sdkit.recipe import recipe_from_dict


def _recipe(pretrained, **data):
    return recipe_from_dict({
        "model": {"pretrained": str(pretrained)},
        "method": {"type": "lora", "rank": 4},
        "data": {"dataset": "some/dataset", "resolution": 64, "cache": False, **data},
        "train": {"max_steps": 1, "batch_size": 2},
        "output_dir": "runs/plan-test",
    })


def test_plan_estimates_at_the_largest_bucket_and_the_class_images(tiny_sd, capsys):
    from sdkit.plan.architectures import load_model_spec
    from sdkit.plan.estimate import estimate
    from sdkit.plan.report import _print_settings
    from rich.console import Console

    model = load_model_spec(str(tiny_sd))
    # bucket step 24 at 64 px: the square bucket is 48x48 (2304 px), the largest 72x48 (3456 px)
    buckets = estimate(_recipe(tiny_sd, buckets=True, bucket_step=24), model)
    assert buckets.bucket == (72, 48)
    square_64 = estimate(_recipe(tiny_sd), model)
    square_48 = estimate(_recipe(tiny_sd, resolution=48), model)
    assert square_64.bucket == (64, 64)
    assert square_48.peak_bytes < buckets.peak_bytes < square_64.peak_bytes  # traced at 3456 px
    prior = estimate(_recipe(tiny_sd, class_prompt="a dog", num_class_images=2), model)
    assert prior.peak_bytes > square_64.peak_bytes  # 2 instance + 2 class samples per micro-batch
    _print_settings(Console(width=200), buckets, {"family": "sd", "denoiser_params": 1})
    assert "largest bucket 72x48" in capsys.readouterr().out
