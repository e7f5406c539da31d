"""Aspect-ratio buckets: the bucket ladder, where each image goes and how it is cropped, the
bucket batch sampler (one bucket per batch, equal steps on every rank, deterministic order,
exact resume), buckets.json and the dry-run table, and SDXL's size/crop conditioning."""

import json
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from helpers import fit_with, write_recipe
from sdkit.training.batches import BucketBatchSampler
from sdkit.training.buckets import bucket_sizes, cover, place

# (width, height): 3:2, 2:3 and 1:1, twice each, and one more square
SIZES = [(48, 32), (32, 48), (32, 32), (60, 40), (40, 60), (40, 40), (36, 36)]
STEP = 8
BUCKETS = ["data.buckets=true", f"data.bucket_step={STEP}"]


def test_ladder_at_32_px_has_three_buckets_near_the_pixel_budget():
    buckets = bucket_sizes(32, STEP, max_aspect=2.0)
    assert buckets == [(24, 40), (32, 32), (40, 24)]
    assert all(w % STEP == 0 and h % STEP == 0 and w * h <= 32 * 32 for w, h in buckets)
    big = bucket_sizes(1024, 64)
    assert (1024, 1024) in big and (1216, 832) in big and (832, 1216) in big
    assert all(max(w, h) / min(w, h) <= 2.0 for w, h in big)
    assert all(w >= 768 and h >= 768 for w, h in bucket_sizes(1024, 64, min_side=768))


def test_each_image_goes_to_the_nearest_bucket_and_covers_it():
    buckets = bucket_sizes(32, STEP)
    assert place((48, 32), buckets).bucket == (40, 24)
    assert place((32, 48), buckets).bucket == (24, 40)
    assert place((33, 31), buckets).bucket == (32, 32)
    assert cover((48, 32), (40, 24)) == (40, 26)  # width decides; height rounded down, still covers
    assert cover((32, 48), (24, 40)) == (26, 40)
    p = place((48, 32), buckets)
    left, top, right, bottom = p.crop_box()
    assert (right - left, bottom - top) == p.bucket and (left, top) == (0, 1)


def test_every_rank_runs_the_same_batches_of_one_bucket_each():
    bucket_ids = [0] * 5 + [1] * 2 + [2] * 9  # odd sizes: 5, 2 and 9 images
    samplers = [BucketBatchSampler(bucket_ids, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for epoch in range(3):
        per_rank = []
        for s in samplers:
            s.set_epoch(epoch)
            per_rank.append(list(s))
        assert len(per_rank[0]) == len(per_rank[1]) == samplers[0].batches_per_epoch() == 1 + 1 + 2
        for a, b in zip(*per_rank):  # the same bucket on both ranks at every step, never mixed
            assert len({bucket_ids[i] for i, _, _ in a + b}) == 1 and len(a) == len(b) == 2


def test_order_is_deterministic_per_seed_and_epoch_and_resumes_mid_epoch():
    bucket_ids = [i % 3 for i in range(30)]
    full = BucketBatchSampler(bucket_ids, 2, seed=5)
    epochs = []
    for epoch in (0, 1):
        full.set_epoch(epoch)
        epochs.append(list(full))
    assert epochs[0] != epochs[1]
    again = BucketBatchSampler(bucket_ids, 2, seed=5)
    again.set_epoch(1, start_batch=4)
    assert list(again) == epochs[1][4:]
    other = BucketBatchSampler(bucket_ids, 2, seed=6)
    assert list(other) != epochs[0]


def test_repeats_multiply_how_often_a_record_is_seen():
    sampler = BucketBatchSampler([0] * 6, 1, seed=0, repeats=[1, 1, 1, 3, 3, 3])
    seen = sampler.times_seen(0)
    assert [seen[i] for i in range(6)] == [1, 1, 1, 3, 3, 3]
    copies = {c for batch in sampler.epoch_batches(0) for i, _, c in batch if i == 4}
    assert copies == {0, 1, 2}


# ----------------------------------------------------------------- in training

@pytest.fixture
def mixed_folder(tmp_path):
    from sdkit.quickstart.tiny import make_image_folder

    return make_image_folder(tmp_path / "images", n=len(SIZES), sizes=SIZES)


def _record_batches(trainer, hook_time_ids=False):
    calls, received = [], []

    def before(t):
        compute = t.step.compute_loss

        def recording(batch):
            calls.append({"index": [int(i) for i in batch["index"]], "crop": batch["crop_top_left"].clone(),
                          "shape": tuple((batch["moments"] if "moments" in batch else batch["pixel_values"]).shape[-2:])})
            return compute(batch)

        t.step.compute_loss = recording
        if hook_time_ids:
            t.family.denoiser.register_forward_pre_hook(
                lambda m, a, kw: received.append(kw["added_cond_kwargs"]["time_ids"].detach().clone()), with_kwargs=True)

    fit_with(trainer, before)
    return calls, received


@pytest.mark.parametrize("cached", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["cached", "random-crop"])
def test_sdxl_buckets_get_real_sizes_crops_and_targets(tiny_sdxl, mixed_folder, tmp_path, cached):
    """3:2, 2:3 and 1:1 images at 32 px: three buckets, crops no larger than the step's
    rounding, every batch one size, and the time ids the UNet receives are each image's
    real original size, its crop and its bucket."""
    from sdkit.recipe import load_recipe
    from sdkit.training.trainer import Trainer

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path, tiny_sdxl, mixed_folder, out, train={"max_steps": 4, "batch_size": 2})
    extra = [] if cached else ["data.center_crop=false", "data.random_flip=true"]
    trainer = Trainer(load_recipe(recipe, BUCKETS + extra))
    calls, received = _record_batches(trainer, hook_time_ids=True)
    doc = json.loads((out / "buckets.json").read_text())
    assert sorted((b["width"], b["height"], b["images"]) for b in doc["buckets"]) == [(24, 40, 2), (32, 32, 3), (40, 24, 2)]
    by_file = {row["file"]: row for row in doc["images"]}
    for row in doc["images"]:
        left, top, right, bottom = row["crop"]
        assert [right - left, bottom - top] == row["bucket"]
        lost_w, lost_h = row["resized"][0] - row["bucket"][0], row["resized"][1] - row["bucket"][1]
        assert 0 <= lost_w < STEP and 0 <= lost_h < STEP  # no more than the rounding to the step
    dataset = getattr(trainer.data.dataset, "dataset", trainer.data.dataset)
    assert len(calls) == len(received) == 4
    for call, ids in zip(calls, received):
        placements = [dataset.placement(i) for i in call["index"]]
        assert len({p.bucket for p in placements}) == 1  # one bucket per batch
        scale = 2 ** (len(trainer.family.vae.config.block_out_channels) - 1) if cached else 1  # latents or pixels
        assert call["shape"] == (placements[0].bucket[1] // scale, placements[0].bucket[0] // scale)
        for row, index in enumerate(call["index"]):
            record, p = dataset.records[index], placements[row]
            w, h = SIZES[int(record.name[:4])]
            top, left = ids[row, 2:4].tolist()
            assert ids[row, :2].tolist() == [h, w]  # the image's real size
            assert ids[row, 4:].tolist() == [p.bucket[1], p.bucket[0]]  # its bucket, (h, w)
            assert [top, left] == call["crop"][row].tolist()
            if cached:
                assert [left, top] == by_file[record.name]["crop"][:2]
            else:
                assert 0 <= top <= p.resized[1] - p.bucket[1] and 0 <= left <= p.resized[0] - p.bucket[0]


def _bucket_data(folder, **more):
    return {"dataset": str(folder), "buckets": True, "bucket_step": STEP, **more}


@pytest.mark.slow
def test_sigkill_mid_epoch_with_buckets_resumes_to_the_same_weights(tiny_sd, mixed_folder, tmp_path):
    from helpers import check_resume_after_sigkill

    # 7 images in 3 buckets, batch 2: 3 batches per epoch; the kill lands mid-epoch
    check_resume_after_sigkill(tmp_path, tiny_sd, _bucket_data(mixed_folder, random_flip=True),
                               {"max_steps": 7, "batch_size": 2, "checkpoint_every": 2})


@pytest.mark.slow
def test_two_processes_with_odd_bucket_sizes_run_the_same_steps(tiny_sd, tmp_path):
    """5 + 2 + 3 images over 3 buckets, 2 ranks x batch 2: no rank runs a batch more (which
    would hang DDP), and at every step both ranks train the same bucket shape. With class
    images (prior preservation), generated by both ranks, each its own shard."""
    from PIL import Image

    from helpers import train_two_cpu_ranks
    from sdkit.quickstart.tiny import make_image_folder

    sizes = [(48, 32)] * 5 + [(32, 48)] * 2 + [(32, 32)] * 3
    data = make_image_folder(tmp_path / "images", n=len(sizes), sizes=sizes)
    classes = tmp_path / "class"
    prior = {"class_prompt": "a dog", "class_dir": str(classes), "num_class_images": 4, "class_steps": 1}
    recipe = write_recipe(tmp_path, tiny_sd, _bucket_data(data, **prior), tmp_path / "run",
                          train={"epochs": 2, "max_steps": None, "batch_size": 2})
    _, ranks = train_two_cpu_ranks(tmp_path, recipe, port=29531)
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * (1 + 1 + 1)  # per epoch: 5//4, max(1, 2//4), 3//4 -> 1 each
    assert ranks[0]["shapes"] == ranks[1]["shapes"] and len({tuple(s) for s in ranks[0]["shapes"]}) == 3
    # generated images k = 0..3 take the buckets of images 0..3 (3:2): the 3:2 batches get class samples
    generated = sorted(classes.glob("*.png"))
    assert len(generated) == 4 and all(Image.open(p).size == (40, 24) for p in generated)
    assert any(i >= len(sizes) for rank in ranks for i in rank["seen"])  # class samples were trained
    assert "generating 4 with the base model (2 on this process)" in (tmp_path / "run" / "train.log").read_text()
