"""The data layer: pairs from a folder, tar shards, the training stream and augmentation.

Small synthetic data sets made with PIL in temporary folders; everything on the CPU.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from polymodal.config import ImageTransformConfig
from polymodal.data import (
    AugmentConfig,
    PairDataset,
    ShardReader,
    TrainStream,
    augment_rng,
    expand_braces,
    iter_samples,
    list_shards,
    read_manifest,
    write_shards,
)
from polymodal.data.augment import augment
from polymodal.processing.tokenizer import clip_tokenizer

CFG = ImageTransformConfig(size=16, resize=16)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


def _image(path: Path, seed: int, size=(24, 20)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _folder(root: Path, images: int, captions: int = 1, split: bool = False) -> Path:
    """`images` PNGs under root/img, `captions` records each in captions.jsonl."""
    lines = []
    for i in range(images):
        _image(root / "img" / f"{i:03d}.png", i, (20 + i % 7, 18 + i % 5))
        for c in range(captions):
            record = {"image": f"img/{i:03d}.png", "text": f"photo number {i} caption {c}" + " word" * (i % 4)}
            if split:
                record["split"] = "test" if i % 4 == 0 else "train"
            lines.append(json.dumps(record))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# --- pairs ----------------------------------------------------------------------------------------


def test_jsonl_several_captions_per_image_and_splits(tmp_path):
    _folder(tmp_path, images=8, captions=3, split=True)
    data = PairDataset(tmp_path)
    assert len(data) == 24 and len(data.images()) == 8 and data.problems == []
    path, text = data[4]
    assert path == tmp_path / "img/001.png" and text.startswith("photo number 1 caption 1")
    assert data.images()[0] == tmp_path / "img/000.png"
    for image in ("img/002.png", tmp_path / "img/002.png", data.images()[2]):
        assert [t[:24] for t in data.captions_of(image)] == [f"photo number 2 caption {c}" for c in range(3)]
    assert data.captions_of("img/999.png") == []
    assert data.pairs[0].meta == {"split": "test"}
    train, test = PairDataset(tmp_path, split="train"), PairDataset(tmp_path, split="test")
    assert (len(train), len(test)) == (18, 6)
    assert {p.image for p in train.pairs}.isdisjoint({p.image for p in test.pairs})
    assert all(p.meta["split"] == "test" for p in test.pairs)


def test_split_is_ignored_when_records_have_none(tmp_path):
    _folder(tmp_path, images=3)
    data = PairDataset(tmp_path, split="train")
    assert len(data) == 3 and data.split is None


def test_csv_with_quotes_commas_newlines_and_extra_columns(tmp_path):
    for i in range(3):
        _image(tmp_path / f"{i}.jpg", i)
    with open(tmp_path / "captions.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "split"])
        w.writerow(["0.jpg", 'a cat, "quoted", sitting', "train"])
        w.writerow(["0.jpg", "two\nlines", "train"])
        w.writerow(["1.jpg", "café", "test"])
        w.writerow(["2.jpg", "too", "many", "fields"])  # line 6: the record before spans two lines
        w.writerow(["../2.jpg", "escape", "train"])  # line 7
        w.writerow(["2.jpg", "last", "train"])
    with pytest.warns(UserWarning, match="skipped 2 bad record"):
        data = PairDataset(tmp_path)
    assert [(p.image, p.text, p.line) for p in data.pairs] == [
        ("0.jpg", 'a cat, "quoted", sitting', 2), ("0.jpg", "two\nlines", 3), ("1.jpg", "café", 5),
        ("2.jpg", "last", 8),
    ]  # fmt: skip
    assert [line for line, _ in data.problems] == [6, 7]
    assert "4 fields" in data.problems[0][1]
    assert data.captions_of("0.jpg") == ['a cat, "quoted", sitting', "two\nlines"]
    assert len(_quiet(PairDataset, tmp_path, split="train")) == 3


def test_malformed_jsonl_lines_are_skipped_and_reported(tmp_path):
    _image(tmp_path / "a.png", 0)
    lines = [
        json.dumps({"image": "a.png", "text": "good"}),
        "{not json",
        json.dumps({"image": "a.png"}),
        json.dumps(["a.png", "text"]),
        json.dumps({"image": "a.png", "text": 7}),
        "",
        json.dumps({"image": "a.png", "text": "also good", "source": "web"}),
    ]
    raw = ("\n".join(lines) + "\n").encode() + b'{"image": "a.png", "text": "\xff\xfe"}\n'
    (tmp_path / "captions.jsonl").write_bytes(raw)
    with pytest.warns(UserWarning, match=r"captions.jsonl: skipped 5 bad record.*line 2: bad JSON"):
        data = PairDataset(tmp_path)
    assert [p.text for p in data.pairs] == ["good", "also good"]
    assert data.pairs[1].meta == {"source": "web"}
    reasons = dict(data.problems)
    assert sorted(reasons) == [2, 3, 4, 5, 8]
    assert "missing 'text'" in reasons[3] and "not an object" in reasons[4]
    assert "not a string" in reasons[5] and "UTF-8" in reasons[8]


@pytest.mark.parametrize(
    "path",
    ["../outside.png", "img/../../outside.png", "/etc/passwd", "\\\\server\\share.png", "C:\\x.png",
     "..\\outside.png", "", "."],
)  # fmt: skip
def test_path_traversal_refused(tmp_path, path):
    _image(tmp_path / "ok.png", 0)
    lines = [json.dumps({"image": path, "text": "bad"}), json.dumps({"image": "./ok.png", "text": "fine"})]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    with pytest.warns(UserWarning):
        data = PairDataset(tmp_path)
    assert [(p.image, p.text) for p in data.pairs] == [("ok.png", "fine")]
    assert data.problems[0][0] == 1


# --- shards ---------------------------------------------------------------------------------------


def _read_back(source) -> list[tuple[bytes, str]]:
    reader = ShardReader(source)
    samples = list(reader)
    assert reader.skipped == 0
    return sorted((s.image, s.text) for s in samples)


def test_shards_read_back_equal_to_the_folder(tmp_path):
    data = _folder(tmp_path / "data", images=7, captions=2, split=True)
    data = PairDataset(data)
    paths = write_shards(data, tmp_path / "shards", per_shard=4)
    assert [p.name for p in paths] == [f"{i:06d}.tar" for i in range(4)]
    expected = sorted((path.read_bytes(), text) for path, text in (data[i] for i in range(len(data))))
    assert _read_back(tmp_path / "shards") == expected
    samples = [s for p in paths for s in iter_samples(p)]
    keys = [s.key for s in samples]
    assert keys == sorted(keys) and len(set(keys)) == 14  # unique, sorted in writing order
    assert all(s.image_ext == "png" and s.meta["split"] in ("train", "test") for s in samples)
    assert {s.meta["image"] for s in samples} == {p.image for p in data.pairs}
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["samples"] == 14 and [s["samples"] for s in manifest["shards"]] == [4, 4, 4, 2]
    # a rerun finds the set complete and changes nothing
    before = [p.stat().st_mtime_ns for p in paths]
    assert write_shards(data, tmp_path / "shards", per_shard=4) == paths
    assert [p.stat().st_mtime_ns for p in paths] == before
    with pytest.raises(ValueError, match="other shards"):
        write_shards(data, tmp_path / "shards", per_shard=5)


def test_write_shards_skips_missing_and_empty_images(tmp_path):
    root = _folder(tmp_path / "data", images=4)
    (root / "img/001.png").unlink()
    (root / "img/002.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 of 4 pairs"):
        write_shards(root, tmp_path / "shards", per_shard=10)
    manifest = read_manifest(tmp_path / "shards")
    assert manifest["samples"] == 2
    assert sorted(s["image"] for s in manifest["skipped"]) == ["img/001.png", "img/002.png"]


def test_write_is_atomic_and_a_rerun_completes_a_killed_one(tmp_path, monkeypatch):
    data = PairDataset(_folder(tmp_path / "data", images=10))
    clean = write_shards(data, tmp_path / "clean", per_shard=3)

    real_replace, calls = os.replace, []

    def dying_replace(src, dst):  # the run is killed just before the 2nd shard's rename
        if str(dst).endswith(".tar"):
            calls.append(dst)
            if len(calls) == 2:
                Path(src).write_bytes(Path(src).read_bytes()[:700])  # and its .tmp half written
                raise KeyboardInterrupt
        return real_replace(src, dst)

    out = tmp_path / "out"
    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        write_shards(data, out, per_shard=3)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in out.iterdir()) == [".shards-plan.json", "000000.tar", "000001.tar.tmp"]
    assert [p.name for p in list_shards(out)] == ["000000.tar"]  # the .tmp is never a shard
    assert read_manifest(out) is None  # unfinished
    first = (out / "000000.tar").stat().st_mtime_ns
    paths = write_shards(data, out, per_shard=3)
    assert (out / "000000.tar").stat().st_mtime_ns == first  # kept, not rewritten
    assert sorted(p.name for p in out.iterdir()) == [p.name for p in clean] + ["shards.json"]
    for a, b in zip(paths, clean, strict=True):
        assert a.read_bytes() == b.read_bytes()  # same plan, same bytes as an uninterrupted run
    with pytest.raises(ValueError, match="written by something else"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "000000.tar").write_bytes(b"")
        write_shards(data, tmp_path / "other", per_shard=3)


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _png_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_streaming_read_of_broken_shards_skips_and_counts(tmp_path):
    members = []
    for i in range(4):
        members += [(f"k{i}.png", _png_bytes(i)), (f"k{i}.txt", f"text {i}".encode())]
    whole = _tar(tmp_path / "whole.tar", members)
    data = whole.read_bytes()
    offsets = {}
    with tarfile.open(whole) as tar:
        for m in tar.getmembers():
            offsets[m.name] = (m.offset, m.offset_data)
    cut = tmp_path / "cut.tar"  # truncated inside k2.png's data
    cut.write_bytes(data[: offsets["k2.png"][1] + 100])
    boundary = tmp_path / "boundary.tar"  # truncated between two samples: no end-of-archive block
    boundary.write_bytes(data[: offsets["k3.png"][0]])
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 40)
    header = tmp_path / "header.tar"  # a garbled header in the middle
    header.write_bytes(data[: offsets["k1.png"][0]] + b"\x07" * 512 + data[offsets["k1.png"][0] + 512 :])
    lonely = _tar(tmp_path / "lonely.tar", [("a.png", _png_bytes(0)), ("b.txt", b"no image"), ("c.png", b"x")])

    def read(path):
        reader = ShardReader(path)
        return [s.text for s in reader], reader.skipped, reader.problems

    assert read(whole)[:2] == (["text 0", "text 1", "text 2", "text 3"], 0)
    texts, skipped, problems = read(cut)
    assert (texts, skipped) == (["text 0", "text 1"], 1) and "truncated" in problems[0][1]
    texts, skipped, problems = read(boundary)
    assert (texts, skipped) == (["text 0", "text 1", "text 2"], 1) and "end-of-archive" in problems[0][1]
    assert read(garbage)[:2] == ([], 1)
    assert read(header)[:2] == (["text 0"], 1)
    texts, skipped, problems = read(lonely)
    assert (texts, skipped) == ([], 3) and {p[1] for p in problems} == {"no .txt member", "no image member"}
    reader = ShardReader([whole, cut, garbage])  # one bad shard does not stop the others
    assert len(list(reader)) == 6 and reader.skipped == 2


def test_reading_never_holds_more_than_one_member(tmp_path):
    big = _tar(tmp_path / "big.tar", [("a.png", b"\0" * 5000), ("a.txt", b"x")])
    (sample,) = iter_samples(big, max_member_bytes=4096)
    assert sample.error and "over the cap" in sample.error


def test_brace_expansion_and_shard_lists(tmp_path):
    assert expand_braces("data/{000000..000003}.tar") == [f"data/{i:06d}.tar" for i in range(4)]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{a,b{1,2}}y") == ["xay", "xb1y", "xb2y"]
    assert expand_braces("{0..10..5}") == ["0", "5", "10"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("plain{}{x}{") == ["plain{}{x}{"]
    for i in range(5):
        _tar(tmp_path / f"{i:06d}.tar", [])
    (tmp_path / "000005.tar.tmp").write_bytes(b"")
    names = [f"{i:06d}.tar" for i in range(5)]
    assert [p.name for p in list_shards(tmp_path)] == names
    assert [p.name for p in list_shards(f"{tmp_path}/*.tar*")] == names
    assert [p.name for p in list_shards(f"{tmp_path}/{{000001..000003}}.tar")] == names[1:4]
    assert len(list_shards([tmp_path / names[0], f"{tmp_path}/00000{{3,4}}.tar"])) == 3
    with pytest.raises(FileNotFoundError, match="no such shard .*000005.tar.* and 2 more"):
        list_shards(f"{tmp_path}/{{000003..000009}}.tar")
    with pytest.raises(FileNotFoundError):
        list_shards(f"{tmp_path}/*.nothing")


# --- the training stream --------------------------------------------------------------------------


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    batches = [next(it) for _ in range(n)]
    stream.close()
    return batches


def test_batch_shapes_and_dtypes(tmp_path, tokenizer):
    root = _folder(tmp_path, images=8)
    stream = TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=4)
    for batch in _take(stream, 3):
        assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].dtype == torch.float32
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape and ids.shape[0] == 4
        lengths = mask.sum(1)
        assert lengths.max() == ids.shape[1]  # padded to the longest text of the batch
        assert batch["skipped"] == 0 and len(batch["keys"]) == 4
        for key, n in zip(batch["keys"], lengths.tolist(), strict=True):
            assert len(tokenizer.encode(PairDataset(root)[int(key)][1])) == n


def _keys_of_first_epoch(source, tokenizer, world: int, workers: int, per_rank: int) -> list[list[str]]:
    keys = []
    for rank in range(world):
        stream = TrainStream(source, transform=CFG, tokenizer=tokenizer, batch_size=2, rank=rank,
                             world_size=world, workers=workers, shuffle_buffer=3)  # fmt: skip
        batches = _take(stream, per_rank)
        assert stream.state_dict()["epoch"] == 0
        keys.append([k for b in batches for k in b["keys"]])
    return keys


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_ranks_and_workers_split_without_overlap_or_loss(tmp_path, tokenizer, kind):
    source = _folder(tmp_path / "data", images=16)
    if kind == "shards":
        source = tmp_path / "shards"
        write_shards(PairDataset(tmp_path / "data"), source, per_shard=2)  # 8 shards: 2 per reader
    # 2 ranks x 2 workers, 4 pairs per reader per epoch, batches of 2: 4 batches per rank per epoch
    keys = _keys_of_first_epoch(source, tokenizer, world=2, workers=2, per_rank=4)
    every = keys[0] + keys[1]
    assert len(every) == len(set(every)) == 16
    assert set(keys[0]).isdisjoint(keys[1])


def test_uneven_shards_are_padded_so_no_shard_is_left_out(tmp_path, tokenizer):
    write_shards(PairDataset(_folder(tmp_path / "data", images=10)), tmp_path / "shards", per_shard=2)
    # 5 shards for 2 readers: each reads 3 shards an epoch, one shard twice in all
    stream = TrainStream(tmp_path / "shards", transform=CFG, tokenizer=tokenizer, batch_size=2, workers=2)
    keys = [k for b in _take(stream, 6) for k in b["keys"]]
    assert stream.state_dict()["consumers"] == [[0, 2, 2], [0, 2, 2]]  # 3rd shard (slot 2) read to its end
    assert len(keys) == 12 and len(set(keys)) == 10


def test_drop_last_false_gives_the_partial_batch(tmp_path, tokenizer):
    root = _folder(tmp_path, images=10)
    stream = TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=4, drop_last=False)
    assert [len(b["keys"]) for b in _take(stream, 6)] == [4, 4, 2, 4, 4, 2]
    with pytest.raises(ValueError, match="fewer than batch_size"):
        TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=4, world_size=2, rank=1, workers=2)


def test_split_of_shards_follows_the_records(tmp_path, tokenizer):
    write_shards(PairDataset(_folder(tmp_path / "data", images=8, captions=2, split=True)), tmp_path / "s", 3)
    split_of = {f"{p.name}:{s.key}": s.meta["split"] for p in list_shards(tmp_path / "s") for s in iter_samples(p)}
    stream = TrainStream(tmp_path / "s", transform=CFG, tokenizer=tokenizer, batch_size=2, split="test")
    keys = [k for b in _take(stream, 4) for k in b["keys"]]  # 4 test pairs: 2 batches an epoch
    assert {split_of[k] for k in keys} == {"test"} and len(set(keys)) == 4
    assert sum(b["skipped"] for b in _take(stream, 2)) == 0  # passed over, not skipped


@pytest.fixture
def messy(tmp_path):
    """24 pairs over 12 images, 5 of them bad (missing, zero-byte, corrupt, not an image, empty text)."""
    root = _folder(tmp_path / "messy", images=12, captions=2)
    (root / "img/003.png").unlink()
    (root / "img/005.png").write_bytes(b"")
    png = (root / "img/007.png").read_bytes()
    (root / "img/007.png").write_bytes(png[: len(png) // 2])
    (root / "img/009.png").write_bytes(b"GIF89a but not really")
    lines = (root / "captions.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"image": "img/000.png", "text": "   "})
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_bad_samples_are_skipped_and_counted(messy, tokenizer):
    bad = {"000000000", *(f"{2 * i + c:09d}" for i in (3, 5, 7, 9) for c in range(2))}  # 9 pairs
    stream = TrainStream(messy, transform=CFG, tokenizer=tokenizer, batch_size=3)
    batches = _take(stream, 6)  # 15 good pairs: 5 batches an epoch; the 6th is in epoch 1
    assert all(b["pixels"].shape[0] == 3 for b in batches)
    assert not bad & {k for b in batches for k in b["keys"]}
    assert sum(b["skipped"] for b in batches) == stream.skipped == len(stream.problems) >= 9
    assert {k for k, _ in list(stream.problems)[:9]} == bad  # every bad pair of epoch 0, once
    reasons = " | ".join(r for _, r in stream.problems)
    for words in ("empty text", "no such file", "empty file", "truncated or corrupt", "not an image"):
        assert words in reasons


def test_all_bad_data_fails_loudly_instead_of_spinning(tmp_path, tokenizer):
    root = _folder(tmp_path, images=4)
    for p in (root / "img").iterdir():
        p.write_bytes(b"")
    stream = TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=2)
    with pytest.raises(RuntimeError, match="gave no batch"):
        next(iter(stream))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_resume_is_bit_for_bit(messy, tmp_path, tokenizer, kind, workers):
    source = messy
    if kind == "shards":
        source = tmp_path / "shards"
        _quiet(write_shards, messy, source, per_shard=5)  # bad pairs stay in (but for the missing image)
    kwargs = dict(transform=CFG, tokenizer=tokenizer, batch_size=3, seed=7, workers=workers,
                  augment=AugmentConfig(flip=True, jitter=0.3), shuffle_buffer=4)  # fmt: skip
    straight = _take(TrainStream(source, **kwargs), 12)
    first = TrainStream(source, **kwargs)
    _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # it survives JSON (and torch.save)
    assert state["batches"] == 7
    resumed = _take(TrainStream(source, start=state, **kwargs), 5)
    for a, b in zip(straight[7:], resumed, strict=True):
        assert a["keys"] == b["keys"] and a["skipped"] == b["skipped"]
        for name in ("pixels", "input_ids", "attention_mask"):
            assert torch.equal(a[name], b[name])
    assert sum(b["skipped"] for b in straight) > 0  # the bad samples were on the way
    assert len({k for b in straight for k in b["keys"]}) > 9  # and epochs went by


def test_resume_refuses_another_setup(tmp_path, tokenizer):
    root = _folder(tmp_path, images=8)
    stream = TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=2)
    _take(stream, 1)
    state = stream.state_dict()
    with pytest.raises(ValueError, match="workers"):
        TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=2, workers=2, start=state)
    with pytest.raises(ValueError, match="seed"):
        TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=2, seed=1, start=state)


def test_epochs_reshuffle_deterministically(tmp_path, tokenizer):
    root = _folder(tmp_path, images=8)

    def order(seed):
        stream = TrainStream(root, transform=CFG, tokenizer=tokenizer, batch_size=4, seed=seed)
        return [b["keys"] for b in _take(stream, 4)]

    a = order(0)
    assert a == order(0) and a != order(1)
    assert sorted(a[0] + a[1]) == sorted(a[2] + a[3]) and a[:2] != a[2:]  # two epochs, two orders


def test_augmentation_does_not_depend_on_the_worker_count(tmp_path, tokenizer):
    root = _folder(tmp_path, images=8)
    kwargs = dict(transform=CFG, tokenizer=tokenizer, batch_size=2, augment=AugmentConfig(jitter=0.2))

    def pixels(workers):
        batches = _take(TrainStream(root, workers=workers, **kwargs), 4)
        return {k: b["pixels"][i] for b in batches for i, k in enumerate(b["keys"])}

    one, two = pixels(0), pixels(2)
    assert set(one) == set(two) and len(one) == 8
    assert all(torch.equal(one[k], two[k]) for k in one)


# --- augmentation ---------------------------------------------------------------------------------


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    cfg = AugmentConfig(jitter=0.2)

    def out(seed, epoch, index, config=cfg):
        return np.asarray(augment(image, config, augment_rng(seed, epoch, index)))

    a = out(0, 1, 2)
    assert np.array_equal(a, out(0, 1, 2))
    for other in (out(1, 1, 2), out(0, 2, 2), out(0, 1, 3)):
        assert a.shape != other.shape or not np.array_equal(a, other)
    for index in range(20):  # crop area within the scale range; aspect ratio within range (rounded)
        h, w = out(0, 0, index).shape[:2]
        assert 0.8 * 4800 - 100 <= w * h <= 4800 and 0.7 <= w / h <= 1.4
    same = AugmentConfig(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), jitter=0.0)
    assert np.array_equal(out(0, 0, 0, same), np.asarray(image))  # the identity, no flip by default
    flipped = [out(0, 0, i, AugmentConfig(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3), jitter=0.0, flip=True))
               for i in range(8)]  # fmt: skip
    assert any(np.array_equal(f, np.asarray(image)[:, ::-1]) for f in flipped)
    assert any(np.array_equal(f, np.asarray(image)) for f in flipped)
    with pytest.raises(ValueError):
        AugmentConfig(scale=(0.5, 1.5))
