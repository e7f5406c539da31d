"""DreamBooth prior preservation: class images generated once with the base model (seeded, their
settings in the PNG, reused on rerun, sharded by rank), each batch paired with class samples of
its own bucket, the loss as diffusers computes it, both terms logged, and the dry run's counts."""

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from helpers import write_recipe
from sdkit.training.batches import BucketBatchSampler
from sdkit.training.class_images import shard


def test_shards_split_the_work_between_processes_without_overlap():
    work = list(range(7))
    parts = [shard(work, rank, 3) for rank in range(3)]
    assert sorted(sum(parts, [])) == work and parts[0] == [0, 3, 6]
    assert shard(work, 0, 1) == work


def test_each_batch_is_paired_with_class_samples_of_its_bucket_and_resumes_exactly():
    # instances: 4 in bucket 0, 3 in bucket 1; class images: 3 in bucket 0, 1 in bucket 1, 2 in bucket 2 (unused)
    buckets = [0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 2, 2]
    prior = [False] * 7 + [True] * 6
    plain = BucketBatchSampler(buckets[:7], 2, seed=1, rank=0, world_size=2)
    samplers = [BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2, prior=prior) for r in (0, 1)]
    seen_classes = set()
    for epoch in range(3):
        runs = [s.epoch_batches(epoch) for s in samplers]
        plain_batches = plain.epoch_batches(epoch)
        assert len(runs[0]) == len(runs[1]) == samplers[0].batches_per_epoch() == 2
        for b0, b1, alone in zip(*runs, plain_batches):
            for batch in (b0, b1):
                instance, classes = batch[:2], batch[2:]
                assert [prior[i] for i, _, _ in instance] == [False, False] and all(prior[i] for i, _, _ in classes)
                assert len(classes) == 2 and len({buckets[i] for i, _, _ in batch}) == 1
                seen_classes |= {i for i, _, _ in classes}
            assert b0[:2] == alone  # the instance order is the one without class images
    assert seen_classes == {7, 8, 9, 10}  # every class image of a trained bucket, over the epochs
    again = BucketBatchSampler(buckets, 2, seed=1, rank=1, world_size=2, prior=prior)
    again.set_epoch(2, start_batch=1)
    assert list(again) == samplers[1].epoch_batches(2)[1:]


def test_class_keys_need_each_other():
    from pydantic import ValidationError

    from sdkit.errors import UserError
    from sdkit.recipe import recipe_from_dict

    def recipe(**data):
        return recipe_from_dict({"model": {"pretrained": "m"}, "data": {"dataset": "d", **data},
                                 "train": {"max_steps": 1}, "output_dir": "out"})

    assert recipe(class_prompt="a dog", num_class_images=2).prior_preservation
    assert not recipe().prior_preservation
    for bad in ({"num_class_images": 2}, {"class_prompt": "a dog"}):
        with pytest.raises((ValidationError, UserError), match="class"):
            recipe(**bad)


def test_loss_is_instance_loss_plus_weighted_prior_loss_as_diffusers_computes_it():
    from sdkit.recipe_sections import TrainConfig
    from sdkit.training.objectives import NoisyBatch, combine
    from sdkit.training.objectives import DDPMObjective

    objective = DDPMObjective({"num_train_timesteps": 1000}, TrainConfig(max_steps=1))
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    batch = NoisyBatch(noisy=pred, timesteps=torch.zeros(4), target=target, weights=torch.ones(4))
    terms = objective.loss_terms(pred, batch, torch.tensor([False, False, True, True]))
    # diffusers: torch.chunk into the instance half and the class half, mean squared error of each
    instance = torch.nn.functional.mse_loss(pred[:2], target[:2])
    prior = torch.nn.functional.mse_loss(pred[2:], target[2:])
    assert torch.allclose(terms["instance"], instance) and torch.allclose(terms["prior"], prior)
    assert torch.allclose(combine(terms, 0.5), instance + 0.5 * prior)
    no_class = objective.loss_terms(pred, batch, torch.zeros(4, dtype=torch.bool))
    assert no_class["prior"] == 0 and torch.allclose(no_class["instance"], objective.loss(pred, batch))


@pytest.fixture
def dog_recipe(tmp_path, tiny_sd, image_folder):
    def make(name, **data):
        return write_recipe(tmp_path, tiny_sd, {"dataset": str(image_folder), **data}, tmp_path / name,
                            train={"max_steps": 2, "batch_size": 2})
    return make


def test_class_images_are_generated_once_and_the_prior_loss_trains(tmp_path, dog_recipe):
    from PIL import Image

    from sdkit.recipe import load_recipe
    from sdkit.training.build import bucket_report
    from sdkit.training.datacheck import check_data
    from sdkit.training.trainer import Trainer

    classes = tmp_path / "class"
    keys = {"class_prompt": "a photo of a dog", "class_dir": str(classes), "num_class_images": 3, "class_steps": 2}
    recipe = load_recipe(dog_recipe("prior", **keys))
    before = check_data(recipe)  # what `sdkit data check` and the dry run print
    assert "0 found, 3 to generate" in before and "samples per epoch: 4 instance + 4 class" in before

    prior = Trainer(recipe)
    prior.fit()
    files = sorted(classes.glob("*.png"))
    assert [p.name for p in files] == [f"sdkit-class-0000{k}.png" for k in range(3)]
    with Image.open(files[1]) as image:
        assert image.size == (32, 32) and image.text["prompt"] == "a photo of a dog" and image.text["seed"] == "1"
    assert prior.logged["loss_prior"] > 0 and prior.logged["loss_instance"] > 0

    stamps = [p.stat().st_mtime_ns for p in files]
    (files[2]).unlink()  # a rerun makes only the missing one
    again = Trainer(load_recipe(dog_recipe("again", **keys)))
    again.fit()
    assert [p.stat().st_mtime_ns for p in files[:2]] == stamps[:2] and files[2].is_file()
    assert "3 found, 0 to generate" in bucket_report(load_recipe(dog_recipe("third", **keys)), "sd")
    assert again.loss_history == pytest.approx(prior.loss_history, abs=1e-6)  # the same images, the same run

    plain = Trainer(load_recipe(dog_recipe("plain")))
    plain.fit()
    assert "loss_prior" not in plain.logged
    a, b = prior.trainable_state(), plain.trainable_state()
    assert any(not torch.equal(a[k], b[k]) for k in a)
