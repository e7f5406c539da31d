"""sdkit.training.data on small images written here: every source layout, bad-image policy, transforms,
deterministic augmentation and the epoch sampler (sharding and exact resume)."""

import json
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image

from sdkit.training.data import load_records
from sdkit.training.batches import BucketBatchSampler
from sdkit.training.samples import TrainDataset, collate
from sdkit.errors import UserError
from sdkit.recipe import DataConfig

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def write_images(folder, n=4, size=(12, 8), captions="metadata", prefix="img"):
    """n solid-colour PNGs; captions: metadata | txt | none. Returns {file name: caption}."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for i in range(n):
        name = f"{prefix}{i}.png"
        Image.new("RGB", size, COLOURS[i % len(COLOURS)]).save(folder / name)
        written[name] = f"caption {prefix} {i}"
        if captions == "txt":
            (folder / f"{prefix}{i}.txt").write_text(written[name] + "\n")
    if captions == "metadata":
        with open(folder / "metadata.jsonl", "w") as f:
            for name, text in written.items():
                f.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return written


def cfg(dataset, **kw):
    return DataConfig(dataset=str(dataset), resolution=8, **kw)


def write_corrupt(path):
    path.write_bytes(os.urandom(200))


# ---------------------------------------------------------------- sources

def test_metadata_folder(tmp_path):
    written = write_images(tmp_path, captions="metadata")
    records = load_records(cfg(tmp_path))
    assert {r.name: r.caption for r in records} == written
    assert [r.name for r in records] == list(written)  # file order kept
    assert records[0].load_image().getpixel((0, 0)) == COLOURS[0]


def test_metadata_custom_caption_column_and_missing_column(tmp_path):
    write_images(tmp_path, n=2, captions="none")
    rows = [{"file_name": "img0.png", "prompt": "a"}, {"file_name": "img1.png", "prompt": "b"}]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.caption for r in load_records(cfg(tmp_path, caption_column="prompt"))] == ["a", "b"]
    with pytest.raises(UserError, match=r"data.caption_column.*file_name, prompt"):
        load_records(cfg(tmp_path))


def test_txt_captions_recurse_into_subfolders(tmp_path):
    written = write_images(tmp_path, n=2, captions="txt", prefix="a")
    written.update({f"sub/{k}": v for k, v in write_images(tmp_path / "sub", n=2, captions="txt", prefix="b").items()})
    (tmp_path / ".hidden").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / ".hidden" / "x.png")
    records = load_records(cfg(tmp_path))
    assert {r.name: r.caption for r in records} == written


def test_instance_prompt_for_folder_without_captions(tmp_path):
    write_images(tmp_path, n=3, captions="none")
    records = load_records(cfg(tmp_path, instance_prompt="a photo of sks dog"))
    assert [r.caption for r in records] == ["a photo of sks dog"] * 3


def test_instance_prompt_overrides_captions(tmp_path):
    write_images(tmp_path, n=2, captions="metadata")
    assert {r.caption for r in load_records(cfg(tmp_path, instance_prompt="p"))} == {"p"}


def test_no_captions_names_instance_prompt(tmp_path):
    write_images(tmp_path, n=2, captions="none")
    with pytest.raises(UserError, match="data.instance_prompt"):
        load_records(cfg(tmp_path))


def test_image_without_txt_is_named(tmp_path):
    write_images(tmp_path, n=3, captions="txt")
    (tmp_path / "img1.txt").unlink()
    with pytest.raises(UserError, match="img1.png"):
        load_records(cfg(tmp_path))
    assert len(load_records(cfg(tmp_path, instance_prompt="p"))) == 3


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="data.dataset.*does not exist"):
        load_records(cfg(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data.dataset"):
        load_records(cfg(tmp_path / "empty"))


def test_max_samples_keeps_first_usable(tmp_path):
    write_images(tmp_path, n=5, captions="txt")
    write_corrupt(tmp_path / "img0.png")
    records = load_records(cfg(tmp_path, max_samples=2), log=lambda _: None)
    assert [r.name for r in records] == ["img1.png", "img2.png"]


# ---------------------------------------------------------------- bad images

def test_corrupt_image_skipped_and_reported(tmp_path):
    write_images(tmp_path, n=3, captions="txt")
    write_corrupt(tmp_path / "img1.png")
    lines = []
    records = load_records(cfg(tmp_path), log=lines.append)
    assert [r.name for r in records] == ["img0.png", "img2.png"]
    assert len(lines) == 1 and "1 unreadable" in lines[0] and "img1.png" in lines[0]


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image_is_caught(tmp_path, suffix):
    """Image.verify() passes a truncated JPEG; the scan decodes, so it catches both."""
    write_images(tmp_path, n=2, captions="txt", size=(64, 64))
    (tmp_path / "img0.png").unlink()
    (tmp_path / "img0.txt").rename(tmp_path / "bad.txt")
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / f"bad{suffix}")
    data = (tmp_path / f"bad{suffix}").read_bytes()
    (tmp_path / f"bad{suffix}").write_bytes(data[: len(data) // 2])
    lines = []
    assert [r.name for r in load_records(cfg(tmp_path), log=lines.append)] == ["img1.png"]
    assert f"bad{suffix}" in lines[0] and "truncated" in lines[0]


def test_transparency_on_white_and_exif_rotation(tmp_path):
    image = Image.new("RGBA", (6, 4), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.save(tmp_path / "a.png")
    rotated = Image.new("RGB", (6, 4), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when shown
    rotated.save(tmp_path / "b.jpg", exif=exif)
    a, b = load_records(cfg(tmp_path, instance_prompt="x"))
    loaded = a.load_image()
    assert loaded.mode == "RGB" and loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (255, 0, 0)
    assert b.load_image().size == (4, 6)


def test_corrupt_image_error_policy_names_file(tmp_path):
    write_images(tmp_path, n=3, captions="metadata")
    write_corrupt(tmp_path / "img2.png")
    with pytest.raises(UserError, match="img2.png"):
        load_records(cfg(tmp_path, bad_images="error"))


def test_metadata_row_for_missing_file_counts_as_bad(tmp_path):
    write_images(tmp_path, n=2, captions="metadata")
    (tmp_path / "img0.png").unlink()
    lines = []
    assert [r.name for r in load_records(cfg(tmp_path), log=lines.append)] == ["img1.png"]
    assert "img0.png" in lines[0]


def test_all_images_bad_names_dataset(tmp_path):
    write_images(tmp_path, n=1, captions="txt")
    write_corrupt(tmp_path / "img0.png")
    with pytest.raises(UserError, match="data.dataset"):
        load_records(cfg(tmp_path), log=lambda _: None)


def test_many_images_scan_with_progress_bar(tmp_path):
    write_images(tmp_path, n=210, size=(2, 2), captions="none")
    write_corrupt(tmp_path / "img7.png")
    lines = []
    records = load_records(cfg(tmp_path, instance_prompt="p"), log=lines.append)
    assert len(records) == 209 and len(lines) == 1 and "img7.png" in lines[0]


# ---------------------------------------------------------------- datasets library

def _tiny_hf_dataset(n=3, size=(12, 8)):
    import datasets

    images = [Image.new("RGB", size, COLOURS[i]) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": images, "text": [f"row {i}" for i in range(n)]}, features=features)


def test_saved_dataset_folder(tmp_path):
    _tiny_hf_dataset().save_to_disk(str(tmp_path / "saved"))
    records = load_records(cfg(tmp_path / "saved"))
    assert [r.caption for r in records] == ["row 0", "row 1", "row 2"]
    assert records[1].load_image().getpixel((0, 0)) == COLOURS[1]
    assert records[1].name.endswith("[1]") and records[0].identity != records[1].identity
    sample = TrainDataset(records, cfg(tmp_path / "saved"), seed=0)[(2, 0)]
    assert sample["original_size"].tolist() == [8, 12] and sample["caption"] == "row 2"


def test_parquet_folder_through_load_dataset(tmp_path):
    (tmp_path / "pq").mkdir()
    _tiny_hf_dataset().to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    records = load_records(cfg(tmp_path / "pq", max_samples=2))
    assert [r.caption for r in records] == ["row 0", "row 1"]
    assert records[0].load_image().getpixel((0, 0)) == COLOURS[0]
    # a row's cache identity does not depend on how many rows were kept
    assert [r.identity for r in load_records(cfg(tmp_path / "pq"))][:2] == [r.identity for r in records]


def test_dataset_missing_columns_are_named(tmp_path):
    _tiny_hf_dataset().save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError, match=r"data.image_column: 'img'.*columns: image, text"):
        load_records(cfg(tmp_path / "saved", image_column="img"))
    with pytest.raises(UserError, match=r"data.caption_column: 'caption'.*columns: image, text"):
        load_records(cfg(tmp_path / "saved", caption_column="caption"))


def test_broken_dataset_row_named_when_loaded(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    good = Image.new("RGB", (4, 4))
    ds = datasets.Dataset.from_dict(
        {"image": [good, {"bytes": b"not an image", "path": None}], "text": ["a", "b"]}, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    records = load_records(cfg(tmp_path / "saved"))  # rows are not scanned at load
    with pytest.raises(UserError, match=r"saved\[1\]"):
        records[1].load_image()


# ---------------------------------------------------------------- transforms

def test_transform_shape_range_and_collate(tmp_path):
    write_images(tmp_path, n=3, captions="metadata", size=(30, 20))
    config = cfg(tmp_path)
    dataset = TrainDataset(load_records(config), config, seed=0)
    sample = dataset[(0, 0)]
    assert sample["pixel_values"].shape == (3, 8, 8) and sample["pixel_values"].dtype == torch.float32
    # pure red: channel 0 at +1, the others at -1 (lanczos keeps a flat colour flat)
    assert torch.allclose(sample["pixel_values"][0], torch.ones(8, 8))
    assert torch.allclose(sample["pixel_values"][1:], -torch.ones(2, 8, 8))
    batch = collate([dataset[(i, 0)] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["original_size"].shape == (3, 2) and batch["crop_top_left"].dtype == torch.long
    assert batch["caption"] == [f"caption img {i}" for i in range(3)] and batch["index"] == [0, 1, 2]


def _gradient(folder, width, height):
    """An image whose pixels encode their own column and row, to see where a crop came from."""
    folder.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 255 // (width - 1), y * 255 // (height - 1), 0) for y in range(height) for x in range(width)])
    image.save(folder / "g.png")
    (folder / "g.txt").write_text("g")
    return folder


def test_center_crop_coordinates_non_square(tmp_path):
    config = DataConfig(dataset=str(_gradient(tmp_path, 40, 16)), resolution=8)  # resized to 20x8
    sample = TrainDataset(load_records(config), config, seed=0)[(0, 0)]
    assert sample["original_size"].tolist() == [16, 40]
    assert sample["crop_top_left"].tolist() == [0, 6]  # round((20 - 8) / 2)
    tall = DataConfig(dataset=str(_gradient(tmp_path / "tall", 16, 41)), resolution=8)  # 8x20 (int(20.5))
    sample = TrainDataset(load_records(tall), tall, seed=0)[(0, 0)]
    assert sample["original_size"].tolist() == [41, 16] and sample["crop_top_left"].tolist() == [6, 0]


def test_random_crop_and_flip_deterministic_and_vary(tmp_path):
    folder = _gradient(tmp_path, 64, 16)  # resized to 32x8: 25 possible crop positions
    config = DataConfig(dataset=str(folder), resolution=8, center_crop=False, random_flip=True)
    records = load_records(config)
    a, b = TrainDataset(records, config, seed=7), TrainDataset(records, config, seed=7)
    for epoch in range(3):
        x, y = a[(0, epoch)], b[(0, epoch)]
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and x["flip"] == y["flip"]
        assert x["crop_top_left"].tolist() == y["crop_top_left"].tolist()
    seen = {(a[(0, e)]["flip"], a[(0, e)]["crop_top_left"][1].item()) for e in range(12)}
    assert len(seen) > 3 and {f for f, _ in seen} == {False, True}
    assert a.cache_variants() == [False, True]
    # global RNG untouched and irrelevant
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert a.variant(0, 5) == b.variant(0, 5)
    assert torch.equal(state, torch.get_rng_state())


def test_crop_left_measured_in_flipped_image(tmp_path):
    """The crop window and its left coordinate refer to the flipped resized image, as in diffusers."""
    folder = _gradient(tmp_path, 64, 16)
    config = DataConfig(dataset=str(folder), resolution=8, center_crop=False, random_flip=True)
    dataset = TrainDataset(load_records(config), config, seed=3)
    resized = dataset.records[0].load_image().resize((32, 8), Image.Resampling.LANCZOS, reducing_gap=3.0)
    for epoch in range(8):
        sample = dataset[(0, epoch)]
        top, left = sample["crop_top_left"].tolist()
        view = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if sample["flip"] else resized
        expected = torch.from_numpy(np.asarray(view.crop((left, top, left + 8, top + 8)), dtype=np.float32).reshape(-1, 3))
        got = ((sample["pixel_values"].permute(1, 2, 0).reshape(-1, 3) + 1) * 127.5).round()
        assert torch.equal(got, expected)


def test_caption_dropout_and_item(tmp_path):
    write_images(tmp_path, n=4, captions="metadata")
    config = cfg(tmp_path, caption_dropout=0.5, random_flip=True)
    dataset = TrainDataset(load_records(config), config, seed=0)
    drops = [dataset[(i, e)]["drop_caption"] for i in range(4) for e in range(10)]
    assert 5 < sum(drops) < 35
    sample = next(dataset[(i, e)] for i in range(4) for e in range(10) if dataset[(i, e)]["drop_caption"])
    assert sample["caption"] == ""
    fixed = dataset.item(1, flip=True)
    assert fixed["flip"] and not fixed["drop_caption"] and fixed["caption"] == "caption img 1"
    assert dataset.cache_variants() == [False, True]
    assert TrainDataset([], cfg(tmp_path), 0).cache_variants() == [False]


# ---------------------------------------------------------------- sampler

def _sampler(n, batch, seed=1, rank=0, world=1, buckets=None, repeats=None):
    return BucketBatchSampler(buckets or [0] * n, batch, seed=seed, rank=rank, world_size=world, repeats=repeats)


def _indices(sampler):
    return [i for b in sampler for i, _, _ in b]


@pytest.mark.parametrize("n,batch,world", [(10, 2, 2), (17, 3, 2), (9, 1, 3), (3, 2, 2), (1, 4, 1)])
def test_sampler_shards_disjoint_and_even(n, batch, world):
    samplers = [_sampler(n, batch, rank=r, world=world) for r in range(world)]
    for s in samplers:
        s.set_epoch(4)
    assert all(e == 4 for s in samplers for b in s for _, e, _ in b)
    assert all(len(b) == batch for s in samplers for b in s)
    shards = [_indices(s) for s in samplers]
    assert len({len(sh) for sh in shards}) == 1 and len(shards[0]) == samplers[0].batches_per_epoch() * batch
    if n >= batch * world:
        flat = [i for sh in shards for i in sh]
        assert len(flat) == len(set(flat)) and len(flat) > n - batch * world
    else:  # too few samples: every sample still appears
        assert set(i for sh in shards for i in sh) == set(range(n))


def test_sampler_covers_data_and_reshuffles():
    s, t = _sampler(8, 2, seed=0, world=2, rank=0), _sampler(8, 2, seed=0, world=2, rank=1)
    assert sorted(_indices(s) + _indices(t)) == list(range(8))
    orders = set()
    for epoch in range(4):
        s.set_epoch(epoch)
        orders.add(tuple(_indices(s)))
    assert len(orders) > 1
    again = _sampler(8, 2, seed=0, world=2, rank=0)
    again.set_epoch(3)
    assert list(again) == list(s)


def test_sampler_resume_yields_remaining_batches():
    full = _sampler(23, 3, seed=5, rank=1, world=2)
    full.set_epoch(2)
    all_batches = list(full)
    assert len(all_batches) == full.batches_per_epoch() == 3
    resumed = _sampler(23, 3, seed=5, rank=1, world=2)
    resumed.set_epoch(2, start_batch=2)
    assert list(resumed) == all_batches[2:] and len(resumed) == 1
    resumed.set_epoch(3)
    assert len(list(resumed)) == 3


def test_dataloader_with_workers_matches_in_process(tmp_path):
    write_images(tmp_path, n=6, captions="metadata")
    config = cfg(tmp_path, center_crop=False, random_flip=True, caption_dropout=0.3)
    dataset = TrainDataset(load_records(config), config, seed=11)

    def run(workers):
        sampler = _sampler(len(dataset), 2, seed=11)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
        out = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            out += [(b["index"], b["flip"], b["caption"], b["pixel_values"]) for b in loader]
        return out

    for (i0, f0, c0, p0), (i1, f1, c1, p1) in zip(run(0), run(2)):
        assert (i0, f0, c0) == (i1, f1, c1) and torch.equal(p0, p1)


# ---------------------------------------------------------------- several datasets, captions

def test_two_datasets_with_repeats_the_second_seen_three_times_as_often(tmp_path):
    write_images(tmp_path / "a", n=4, captions="txt", prefix="a")
    write_images(tmp_path / "b", n=4, captions="txt", prefix="b")
    config = DataConfig(resolution=8, datasets=[{"dataset": str(tmp_path / "a")},
                                                {"dataset": str(tmp_path / "b"), "repeats": 3, "caption_prefix": "sks"}])
    records = load_records(config)
    assert [r.name for r in records][:5] == ["a/a0.png", "a/a1.png", "a/a2.png", "a/a3.png", "b/b0.png"]
    assert records[4].caption == "sks, caption b 0" and records[0].caption == "caption a 0"
    sampler = BucketBatchSampler([0] * 8, 2, seed=0, repeats=[r.repeats for r in records])
    seen = sampler.times_seen(0)
    first = sum(seen[i] for i in range(4))
    second = sum(seen[i] for i in range(4, 8))
    assert first == 4 and second == 12


def test_kohya_folder_names_give_repeats_and_instance_prompt(tmp_path):
    write_images(tmp_path / "10_sks dog", n=2, captions="none", prefix="d")
    write_images(tmp_path / "1_dog", n=2, captions="txt", prefix="c")
    records = load_records(cfg(tmp_path, kohya_folder_names=True))
    by_name = {r.name: r for r in records}
    assert by_name["10_sks dog/d0.png"].repeats == 10 and by_name["10_sks dog/d0.png"].caption == "sks dog"
    assert by_name["1_dog/c1.png"].repeats == 1 and by_name["1_dog/c1.png"].caption == "caption c 1"


def test_caption_extension_shuffle_keep_tokens_and_per_dataset_dropout(tmp_path):
    write_images(tmp_path, n=2, captions="none")
    for i in range(2):
        (tmp_path / f"img{i}.caption").write_text("trigger, red, round, small, shiny")
    config = DataConfig(resolution=8, datasets=[{"dataset": str(tmp_path), "caption_dropout": 1.0}],
                        caption_extension=".caption", shuffle_caption=True, keep_tokens=1)
    dataset = TrainDataset(load_records(config), config, seed=0)
    assert all(dataset[(0, e)]["caption"] == "" for e in range(5))  # this dataset drops every caption
    config = DataConfig(resolution=8, datasets=[{"dataset": str(tmp_path)}], caption_extension=".caption",
                        shuffle_caption=True, keep_tokens=1)
    dataset = TrainDataset(load_records(config), config, seed=0)
    captions = {dataset[(0, e)]["caption"] for e in range(8)}
    assert len(captions) > 1 and all(c.startswith("trigger, ") for c in captions)
    assert all(sorted(c.split(", ")) == sorted("trigger, red, round, small, shiny".split(", ")) for c in captions)
    assert captions == {TrainDataset(load_records(config), config, seed=0)[(0, e)]["caption"] for e in range(8)}


# ---------------------------------------------------------------- bad input (issue 12)

def test_metadata_with_invalid_utf8_names_file_and_line(tmp_path):
    write_images(tmp_path, n=2, captions="metadata")
    meta = tmp_path / "metadata.jsonl"
    meta.write_bytes(meta.read_bytes() + b'{"file_name": "img0.png", "text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"metadata.jsonl line 3 is not valid UTF-8"):
        load_records(cfg(tmp_path))
    meta.unlink()
    (tmp_path / "metadata.csv").write_bytes(b"file_name,text\nimg0.png,ok\nimg1.png,caf\xe9\n")
    with pytest.raises(UserError, match=r"metadata.csv line 3 is not valid UTF-8"):
        load_records(cfg(tmp_path))


@pytest.mark.parametrize("value, message", [(5, "'file_name' must be a file name in quotes \\(got 5\\)"),
                                            ("../outside.png", "'file_name' '../outside.png' points outside")])
def test_metadata_file_name_not_a_name(tmp_path, value, message):
    write_images(tmp_path, n=1, captions="none")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": value, "text": "x"}) + "\n")
    with pytest.raises(UserError, match=rf"metadata.jsonl line 1: {message}") as e:
        load_records(cfg(tmp_path))
    assert "\n" not in str(e.value)


def test_high_depth_images_are_converted_by_their_range(tmp_path):
    ramp = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "grey16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "float.tif")
    Image.fromarray((ramp * 4000 + 1000).astype(np.int32)).save(tmp_path / "int32.tif")
    records = load_records(cfg(tmp_path, instance_prompt="x"))
    assert len(records) == 3
    for record in records:
        image = record.load_image()
        assert image.mode == "RGB" and image.getextrema()[0] == (0, 255), record.name
        assert abs(np.asarray(image)[8, 8, 0] - 255 * ramp[8, 8]) <= 2, record.name  # mid-grey stays mid-grey
