"""The latent + text-embedding cache: once built, training runs no encoder; a second run
encodes nothing; the loss is the same with and without it; what changes the encoders'
output invalidates it; and it stays off where it would be wrong."""

import json

import pytest
import torch

from helpers import write_recipe
from sdkit.recipe import load_recipe
from sdkit.training.trainer import Trainer


class EncoderCalls:
    """Forward calls of VAE encoders and text encoders anywhere in the process.

    A global forward hook: the trainer loads its own modules, and a VAE encode calls
    `vae.encoder` (not `vae.forward`), so the count is on the module that does the work.
    """

    def __init__(self):
        from diffusers.models.autoencoders.vae import Encoder
        from transformers import PreTrainedModel

        self._vae_type, self._text_type = Encoder, PreTrainedModel
        self.vae = self.text = 0

    def _hook(self, module, args, output):
        if isinstance(module, self._vae_type):
            self.vae += 1
        elif isinstance(module, self._text_type):  # CLIP / T5 text encoders; the UNet is diffusers'
            self.text += 1

    def __enter__(self):
        self._handle = torch.nn.modules.module.register_module_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def counts(self) -> tuple[int, int]:
        return self.vae, self.text


def make_trainer(tmp_path, model, data, out, overrides=(), steps=4):
    recipe = write_recipe(tmp_path, model, data, out, train={"max_steps": steps, "batch_size": 2})
    return Trainer(load_recipe(recipe, list(overrides)))


def setup_and_train(trainer, calls: EncoderCalls):
    """(encoder calls during set-up, encoder calls during the training steps)."""
    try:
        trainer.setup()
        after_setup = calls.counts()
        trainer.loop()
        after_loop = calls.counts()
    finally:
        trainer.accelerator.end_training()
    return after_setup, tuple(b - a for a, b in zip(after_setup, after_loop))


def cache_files(out):
    return sorted(p.relative_to(out / "cache") for p in (out / "cache").glob("*/*.safetensors"))


def test_training_from_the_cache_runs_no_encoder(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "run"
    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, steps=4)
    with EncoderCalls() as calls:
        (setup_vae, setup_text), during = setup_and_train(trainer, calls)
    assert trainer.data.cached
    assert setup_vae >= 1 and setup_text >= 2  # the samples, and the empty caption
    assert during == (0, 0)
    # 4 images, no flip: one entry each, plus the empty-caption embedding
    assert len(cache_files(out)) == 4 + 1
    assert len(trainer.loss_history) == 4
    # The encoders are idle while training from the cache: kept off the accelerator.
    assert all(p.device.type == "cpu" for m in trainer.family.frozen_modules() for p in m.parameters())


def test_without_the_cache_every_step_encodes(tiny_sd, image_folder, tmp_path):
    # The counter's control: the same run uncached calls each encoder once per step.
    out = tmp_path / "run"
    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, ["data.cache=false"], steps=3)
    with EncoderCalls() as calls:
        _, during = setup_and_train(trainer, calls)
    assert not trainer.data.cached and not (out / "cache").exists()
    assert during == (3, 3)


def test_a_second_run_encodes_nothing(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "run"
    make_trainer(tmp_path, tiny_sd, image_folder, out, steps=2).fit()
    files = cache_files(out)
    again = make_trainer(tmp_path, tiny_sd, image_folder, out, steps=2)
    with EncoderCalls() as calls:
        setup, during = setup_and_train(again, calls)
    assert again.data.cached
    assert setup == (0, 0) and during == (0, 0)
    assert cache_files(out) == files


@pytest.mark.parametrize("method", ["lora", "full"])
def test_cached_and_uncached_runs_reach_the_same_loss(method, tiny_sd, image_folder, tmp_path):
    # Flips and caption dropout on: the cache must hand back the same variant the
    # uncached loader makes, and the empty-caption embedding for dropped captions.
    opts = ["data.random_flip=true", "data.caption_dropout=0.3", f"method.type={method}"]
    runs = {}
    for cache in (True, False):
        trainer = make_trainer(tmp_path, tiny_sd, image_folder, tmp_path / f"run-{cache}",
                               [*opts, f"data.cache={cache}"], steps=6)
        trainer.fit()
        assert trainer.data.cached is cache
        runs[cache] = trainer
    cached, uncached = runs[True].loss_history, runs[False].loss_history
    assert len(cached) == len(uncached) == 6
    assert cached == pytest.approx(uncached, rel=1e-5)
    a, b = runs[True].trainable_state(), runs[False].trainable_state()
    assert a.keys() == b.keys()
    if method == "lora":
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    else:
        # The empty caption is encoded alone in the cache and inside the batch without it:
        # ~1e-7 apart. On biases whose gradient is nearly zero Adam turns that into a
        # sign, so single weights can differ by ~lr; the update as a whole must not.
        from diffusers import UNet2DConditionModel

        start = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
        apart = sum(((a[k] - b[k]) ** 2).sum() for k in a).sqrt()
        moved = sum(((a[k] - start[k]) ** 2).sum() for k in a).sqrt()
        assert apart < 0.01 * moved


def test_a_changed_caption_is_encoded_again(tiny_sd, image_folder, tmp_path):
    out = tmp_path / "run"
    make_trainer(tmp_path, tiny_sd, image_folder, out, steps=1).fit()
    before = cache_files(out)
    meta = image_folder / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    rows[1]["text"] = "a caption nobody has encoded yet"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))

    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, steps=1)
    with EncoderCalls() as calls:
        setup, during = setup_and_train(trainer, calls)
    assert setup == (1, 1) and during == (0, 0)  # one batch: the one changed sample
    after = cache_files(out)
    assert len(set(after) - set(before)) == 1 and len(after) == len(before)  # the old entry is pruned


def test_a_changed_resolution_encodes_every_image_again(tiny_sd, image_folder, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    make_trainer(tmp_path, tiny_sd, image_folder, out, steps=1).fit()
    before = cache_files(out)
    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, ["data.resolution=16"], steps=1)
    with EncoderCalls() as calls:
        setup, during = setup_and_train(trainer, calls)
    assert setup[0] >= 1 and during == (0, 0)
    after = cache_files(out)
    assert not set(after) & set(before) - {p for p in before if p.name.startswith("empty")}
    sizes = {load_file(out / "cache" / p)["moments"].shape[-1] for p in after if not p.name.startswith("empty")}
    assert sizes == {8}  # 16 px through the tiny VAE (factor 2) only: the 32 px entries were pruned


def test_encoder_weights_replaced_in_place_invalidate(tiny_sd, image_folder, tmp_path):
    import os
    import shutil

    from diffusers import AutoencoderKL

    model = shutil.copytree(tiny_sd, tmp_path / "model")
    out = tmp_path / "run"
    make_trainer(tmp_path, model, image_folder, out, steps=1).fit()
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)
    vae.save_pretrained(model / "vae")  # same path, new weights
    for f in (model / "vae").glob("*.safetensors"):  # a later write on any filesystem clock
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    trainer = make_trainer(tmp_path, model, image_folder, out, steps=1)
    with EncoderCalls() as calls:
        setup, during = setup_and_train(trainer, calls)
    assert setup[0] >= 1 and during == (0, 0)
    assert len(list((out / "cache").iterdir())) == 2


def test_random_flip_caches_both_variants(tiny_sd, image_folder, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, ["data.random_flip=true"], steps=1)
    trainer.setup()
    trainer.accelerator.end_training()
    names = [p.name for p in cache_files(out) if not p.name.startswith("empty")]
    assert len(names) == 8  # 4 images x (plain, flipped)

    dataset, cache, family = trainer.data.dataset.dataset, trainer.data.dataset.cache, trainer.family
    with torch.no_grad():
        for flip in (False, True):
            pixels = dataset.item(2, flip)["pixel_values"][None]
            stored = load_file(cache.path(dataset, 2, flip))["moments"]
            torch.testing.assert_close(stored, family.encode_images(pixels)[0], rtol=1e-4, atol=1e-5)
    plain, flipped = (load_file(cache.path(dataset, 2, f))["moments"] for f in (False, True))
    assert not torch.allclose(plain, flipped)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        (["data.cache=false"], None),
        (["data.center_crop=false"], "random crops change the pixels every epoch"),
        (["method.train_text_encoder=true"], "the text encoder is trained"),
    ],
    ids=["cache-false", "random-crop", "train-text-encoder"],
)
def test_cache_is_off_where_it_would_be_wrong(overrides, reason, tiny_sd, image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    trainer = make_trainer(tmp_path, tiny_sd, image_folder, out, overrides, steps=2)
    with EncoderCalls() as calls:
        _, during = setup_and_train(trainer, calls)
    assert not trainer.data.cached and not (out / "cache").exists()
    assert during == (2, 2)
    if reason:  # the log says why (rich wraps long lines: compare with whitespace collapsed)
        assert f"latent cache off: {reason}" in " ".join(capsys.readouterr().err.split())


def test_each_rank_caches_its_own_shard(tiny_sd, image_folder, tmp_path):
    from sdkit.training.cache import LatentCache
    from sdkit.training.data import load_records
    from sdkit.training.samples import TrainDataset
    from sdkit.families.sd import StableDiffusion
    from sdkit.recipe import DataConfig, ModelConfig

    cfg = DataConfig(dataset=str(image_folder), resolution=32, random_flip=True)
    dataset = TrainDataset(load_records(cfg, log=lambda _m: None, progress=False), cfg, seed=0)
    family = StableDiffusion.load(ModelConfig(pretrained=str(tiny_sd)))
    cache = LatentCache(tmp_path / "cache")
    assert cache.build(family, dataset, rank=1, world_size=2) == 4  # indices 1 and 3, both flips
    assert sorted(i for i, _ in cache.missing(dataset)) == [0, 0, 2, 2]
    assert cache.missing(dataset, rank=1, world_size=2) == []
    assert cache.build(family, dataset, rank=0, world_size=2) == 4
    assert cache.missing(dataset) == []


# ----------------------------------------------------------------- content keys (no training)

@pytest.fixture(scope="module")
def sd_family(tiny_sd):
    from sdkit.families.sd import StableDiffusion
    from sdkit.recipe import ModelConfig

    return StableDiffusion.load(ModelConfig(pretrained=str(tiny_sd)))


def _dataset(folder, **data):
    from sdkit.recipe import DataConfig
    from sdkit.training.buckets import run_buckets
    from sdkit.training.data import load_records
    from sdkit.training.samples import TrainDataset

    cfg = DataConfig(dataset=str(folder), resolution=32, **data)
    return TrainDataset(load_records(cfg, log=lambda _m: None, progress=False), cfg, seed=0,
                        buckets=run_buckets(cfg, 8))


def test_inserting_or_renaming_an_image_encodes_only_that_image(sd_family, tmp_path):
    """Entries are keyed by content and transform, not by position: an image inserted first
    encodes once, a renamed file is the same image, and a removed one is pruned."""
    from sdkit.quickstart.tiny import make_image_folder
    from sdkit.training.cache import LatentCache

    folder = make_image_folder(tmp_path / "images", n=4, size=32, captions="txt")
    cache = LatentCache(tmp_path / "cache")
    assert cache.build(sd_family, _dataset(folder)) == 4
    make_image_folder(tmp_path / "new", n=1, size=32, captions="txt", seed=9)
    for suffix in (".png", ".txt"):  # sorts first: every other record moves one place down
        (tmp_path / "new" / f"0000{suffix}").rename(folder / f"000-inserted{suffix}")
    name = sorted(p.name for p in folder.glob("*.png"))[-1]
    (folder / name).rename(folder / f"renamed-{name}")
    (folder / name).with_suffix(".txt").rename(folder / f"renamed-{name[:-4]}.txt")
    dataset = _dataset(folder)
    assert [r.name for r in dataset.records][0] == "000-inserted.png"
    assert cache.missing(dataset) == [(0, False)] and cache.build(sd_family, dataset) == 1
    (folder / "000-inserted.png").unlink()
    assert cache.prune(_dataset(folder)) == 1 and len(list(cache.root.glob("*.safetensors"))) == 5


def test_changing_bucket_settings_encodes_exactly_the_images_that_move(sd_family, tmp_path):
    from sdkit.quickstart.tiny import make_image_folder
    from sdkit.training.cache import LatentCache

    sizes = [(48, 32), (32, 48), (32, 32), (64, 32)]
    folder = make_image_folder(tmp_path / "images", n=4, sizes=sizes, captions="txt")
    cache = LatentCache(tmp_path / "cache")
    assert cache.build(sd_family, _dataset(folder, buckets=True)) == 4
    narrow = _dataset(folder, buckets=True, max_aspect=1.5)  # 40x24 and 24x40 buckets go; the square stays
    assert sorted(i for i, _ in cache.missing(narrow)) == [0, 1, 3]
    assert cache.build(sd_family, narrow) == 3 and cache.prune(narrow) == 3
