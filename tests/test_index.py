"""Image collections (polymodal.index): incremental indexing, bad files, the model check, the
three FAISS index kinds, near-duplicates, clusters named by keywords, and the commands end to end."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import polymodal
from polymodal.checkpoints.pretrained import save_pretrained
from polymodal.cli import app
from polymodal.config import CLIPConfig, ImageTransformConfig, TextConfig, VisionConfig
from polymodal.index import Collection, ModelMismatch, ann, build
from polymodal.index.ann import ANN
from polymodal.index.cluster import kmeans
from polymodal.models.clip import CLIP
from polymodal.processing.tokenizer import clip_tokenizer


def tiny_clip(path, seed=0, dim=16):
    torch.manual_seed(seed)
    cfg = CLIPConfig(vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64),
                     text=TextConfig(width=32, layers=1, heads=2, mlp_dim=64), embed_dim=dim,
                     image_transform=ImageTransformConfig(size=32, resize=32))
    return save_pretrained(CLIP(cfg), path, clip_tokenizer())


def make_images(folder, n, seed=0):
    """n small pictures, each a different random pattern (and size), in two sub-folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        h, w = 24 + int(rng.integers(0, 24)), 24 + int(rng.integers(0, 24))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"{i:03d}.png")
    return folder


def run(*args, code=0):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="module")
def embedder(model_dir):
    return polymodal.load(model_dir, device="cpu")


class Counting:
    """The embedder, counting the images it embeds."""

    def __init__(self, embedder):
        self.inner, self.embedded = embedder, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _image_vectors(self, pixels):
        self.embedded += len(pixels)
        return self.inner._image_vectors(pixels)


def snapshot(db):
    with Collection.open(db) as c:
        ids, vecs = c.vectors()
        recs = c.records()
    return {r.path: (r.hash, r.size, r.mtime, r.width, r.height, r.model) for r in recs}, \
        {r.path: v for r, v in zip(recs, vecs, strict=True)}


def test_incremental_index(tmp_path, model_dir, embedder):
    images = make_images(tmp_path / "images", 20)
    (images / "notes.png").write_text("not an image\n")
    (images / "empty.jpg").write_bytes(b"")
    (images / "readme.txt").write_text("not an image file name: never read\n")
    db, counter = tmp_path / "db", Counting(embedder)

    r = build(images, db, counter, report=tmp_path / "bad.jsonl", progress=False, workers=0, batch_size=6)
    assert (r.files, r.added, r.total, counter.embedded) == (22, 20, 20, 20)
    assert sorted(b["path"].rsplit("/", 1)[1] for b in r.bad) == ["empty.jpg", "notes.png"]
    bad = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()]
    assert {b["path"] for b in bad} == {str(images / "notes.png"), str(images / "empty.jpg")}
    assert all(b["error"].startswith(b["path"]) for b in bad)

    # A rerun reads nothing new, embeds nothing, and still reports the bad files.
    r = build(images, db, counter, progress=False, workers=0)
    assert (r.added, r.unchanged, r.reused, len(r.bad), counter.embedded) == (0, 20, 0, 2, 20)

    before, vec_before = snapshot(db)
    changed, gone, copied, touched = images / "a/001.png", images / "b/002.png", images / "a/copy.png", images / "b/004.png"
    Image.fromarray(np.full((30, 30, 3), 200, np.uint8)).save(changed)          # new content
    gone.unlink()                                                                # deleted
    shutil.copy(images / "b/000.png", copied)                                    # known content, new path
    os.utime(touched, (1e9, 1e9))                                                # mtime only
    (images / "notes.png").write_bytes((images / "b/006.png").read_bytes())      # a bad file mended
    r = build(images, db, counter, progress=False, workers=0)
    assert (r.added, r.reused, r.removed, r.unchanged) == (1, 2, 1, 18)
    assert counter.embedded == 21  # only the changed file went through the model
    after, vec_after = snapshot(db)
    assert set(after) == set(before) - {str(gone)} | {str(copied), str(images / "notes.png")}
    assert after[str(changed)][0] != before[str(changed)][0]
    assert after[str(touched)][2] == 1e9 and after[str(touched)][0] == before[str(touched)][0]
    np.testing.assert_array_equal(vec_after[str(copied)], vec_before[str(images / "b/000.png")])
    assert len(r.bad) == 1

    with Collection.open(db, embedder) as c:  # built from a model object: given again
        assert len(c) == 21 and c.kind == "flat"
        hit = c.search_image(str(changed), k=3)[0]  # the image finds itself
        assert hit.path == str(changed) and hit.score == pytest.approx(1.0, abs=1e-5)
        assert (hit.width, hit.height) == (30, 30)
        assert c.get(str(changed)).id == hit.id and c.get(hit.id).path == str(changed)
        assert c.get("/no/such.png") is None
        dup = c.near_duplicates(str(copied), threshold=0.999999)
        assert [h.path for h in dup] == [str(images / "b/000.png")]
        text_hits = c.search_text("a photo of a dog", k=5)
        assert len(text_hits) == 5 and all(a.score >= b.score for a, b in zip(text_hits, text_hits[1:], strict=False))
        ranked = c.rank_texts(hit.id, ["a cat", "a dog", "a car"])
        expected = c.embedder.encode_text(["a cat", "a dog", "a car"]) @ c.store.vector(hit.id)
        assert [s for _, s in ranked] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-6)


def test_worker_processes_match_in_process(tmp_path, embedder):
    images = make_images(tmp_path / "images", 12, seed=3)
    build(images, tmp_path / "db0", embedder, progress=False, workers=0, batch_size=5)
    build(images, tmp_path / "db2", embedder, progress=False, workers=2, batch_size=5)
    (a, va), (b, vb) = snapshot(tmp_path / "db0"), snapshot(tmp_path / "db2")
    assert a == b
    for p in va:
        np.testing.assert_allclose(va[p], vb[p], atol=1e-6)


def test_another_model_is_refused(tmp_path, model_dir, embedder):
    images = make_images(tmp_path / "images", 4)
    db = tmp_path / "db"
    build(images, db, str(model_dir), progress=False, workers=0)
    other = tiny_clip(tmp_path / "other", seed=1)            # same shapes, other weights
    wider = tiny_clip(tmp_path / "wider", seed=0, dim=24)    # another dimension
    for m in (other, wider):
        with pytest.raises(ModelMismatch, match="built with model clip@"):
            Collection.open(db, str(m))
        with pytest.raises(ModelMismatch):
            build(images, db, str(m), progress=False, workers=0)
        err = run("index", images, "--db", db, "--model", m, code=2).stderr.strip().splitlines()
        assert len(err) == 1 and "built with model" in err[0]
    # No --model: the recorded one is used, and a collection opened without a model loads it.
    assert build(images, db, progress=False, workers=0).unchanged == 4
    with Collection.open(db) as c:
        assert c.embedder.dim == 16 and c.model_id.startswith("clip@")
        with pytest.raises(ValueError, match="16-d collection"):
            c.search_vector(np.ones(24, np.float32))


def blobs(n_per, centres, noise, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([c + noise * rng.standard_normal((n_per, len(c))) for c in centres]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), np.repeat(np.arange(len(centres)), n_per)


def add_synthetic(db, embedder, vectors, kind=None):
    c = Collection.create(db, embedder, index_kind=kind)
    rows = [(f"/synthetic/{i}.png", f"h{i}", 1, 0.0, 8, 8, c.model_id) for i in range(len(vectors))]
    for s in range(0, len(rows), 5000):
        c.add_vectors(rows[s:s + 5000], vectors[s:s + 5000])
    return c


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_index_kinds_against_exact_search(tmp_path, embedder, kind, monkeypatch):
    monkeypatch.setattr(ann, "IVFPQ_MIN", 1000)  # training an ivfpq index on 10,000 takes seconds
    rng = np.random.default_rng(1)
    x, _ = blobs(15, rng.standard_normal((200, 16)), 0.3)  # 3,000 vectors
    c = add_synthetic(tmp_path / "db", embedder, x, kind)
    q = x[rng.choice(len(x), 50, replace=False)] + 0.05 * rng.standard_normal((50, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth = np.argsort(-(q @ x.T), axis=1)[:, :10] + 1  # ids start at 1
    got = [[h.id for h in hits] for hits in c.search_vectors(q, 10)]
    recall = np.mean([len(set(g) & set(t)) / 10 for g, t in zip(got, truth, strict=True)])
    assert c.kind == kind
    assert recall == 1.0 if kind == "flat" else recall >= 0.9, recall
    hits = c.search_vector(q[0], 10)
    np.testing.assert_allclose([h.score for h in hits], q[0] @ x[[h.id - 1 for h in hits]].T, atol=1e-5)
    c.close()


def test_index_cache_is_extended_rebuilt_and_survives_corruption(tmp_path, embedder):
    x, _ = blobs(50, np.eye(16)[:4] * 3, 0.3)
    db = tmp_path / "db"
    c = add_synthetic(db, embedder, x[:100])
    assert len(c.ann) == 100 and [p.name for p in db.glob("*.faiss")] == ["vectors.g1.d0.m100.flat.faiss"]
    c.add_vectors([(f"/synthetic/{i}.png", f"h{i}", 1, 0.0, 8, 8, c.model_id) for i in range(100, 200)], x[100:])
    c.close()
    with Collection.open(db) as c:  # behind by one batch: extended from SQLite, saved
        assert len(c.ann) == 200 and [p.name for p in db.glob("*.faiss")] == ["vectors.g2.d0.m200.flat.faiss"]
        assert c.search_vector(x[150], 1)[0].id == 151
        c.store.remove(["/synthetic/150.png"])
        assert len(c.ann) == 199 and c.search_vector(x[150], 1)[0].id != 151  # rebuilt after a deletion
    (db / "vectors.g9.d1.m999.flat.faiss").write_bytes(b"garbage")
    with Collection.open(db) as c:
        assert len(c.ann) == 199 and c.search_vector(x[10], 1)[0].id == 11


def test_dedup_and_near_duplicates(tmp_path, embedder):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    # Two groups: row 0 with two near copies and an exact one (ids 41-43); row 5 with one (44).
    extra = [x[0] + 0.01 * rng.standard_normal(16), x[0] + 0.01 * rng.standard_normal(16), x[0],
             x[5] + 0.02 * rng.standard_normal(16)]
    extra = np.array(extra, np.float32)
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)
    c = add_synthetic(tmp_path / "db", embedder, np.concatenate([x, extra]))
    groups = c.dedup(0.98)
    assert [[h.id for h in g] for g in groups] == [[1, 41, 42, 43], [6, 44]]
    assert groups[0][0].score == pytest.approx(1.0) and all(h.score >= 0.98 for g in groups for h in g)
    assert [h.id for h in c.near_duplicates(43, 0.99999)] == [1]  # an exact copy
    assert c.dedup(1.01) == []


def test_clusters_are_found_and_named(tmp_path, embedder):
    words = ["a cat", "a truck", "the sea", "a guitar"]
    centres = embedder.encode_text([f"a photo of a {w}." for w in words])
    x, labels = blobs(30, centres[:3], 0.005)  # images around the first three captions' vectors
    assert kmeans(x, 3)[1].tolist() == kmeans(x, 3)[1].tolist()
    c = add_synthetic(tmp_path / "db", embedder, x)
    clusters = c.cluster(3, keywords=words)
    assert sorted(cl.size for cl in clusters) == [30, 30, 30]
    for cl in clusters:
        truth = labels[np.array(cl.members) - 1]
        assert (truth == truth[0]).all()  # pure
        assert cl.names[0][0] == words[truth[0]]
    with pytest.raises(ValueError, match="cannot make 200 clusters of 90"):
        c.cluster(200, keywords=words)


def test_commands_end_to_end(tmp_path, model_dir):
    images = make_images(tmp_path / "images", 10)
    shutil.copy(images / "b/000.png", images / "b/dup.png")
    (images / "bad.png").write_text("nope")
    db, report = tmp_path / "db", tmp_path / "bad.jsonl"
    out = run("index", images, "--db", db, "--model", model_dir, "--report", report, "--workers", 1, "--json")
    doc = json.loads(out.stdout)
    assert (doc["added"], doc["reused"], doc["total"], doc["index_kind"]) == (10, 1, 11, "flat")
    assert out.stderr.strip() == f"skipped: {images / 'bad.png'}: not an image (cannot identify image file)"
    assert [json.loads(line)["path"] for line in report.read_text().splitlines()] == [str(images / "bad.png")]
    assert "0 embedded" in run("index", images, "--db", db).stdout

    hits = json.loads(run("search", "--db", db, "a red square", "--k", 3, "--json").stdout)["hits"]
    assert len(hits) == 3 and set(hits[0]) == {"id", "path", "score", "width", "height"}
    hits = json.loads(run("search", "--db", db, "--image", images / "a/003.png", "--json").stdout)["hits"]
    assert hits[0]["path"] == str(images / "a/003.png") and len(hits) == 10
    (tmp_path / "captions.txt").write_text("a cat\na dog\n\na car\n")
    ranked = json.loads(run("search", "--db", db, "--image", images / "a/003.png", "--texts",
                            tmp_path / "captions.txt", "--json").stdout)["texts"]
    assert sorted(t["text"] for t in ranked) == ["a car", "a cat", "a dog"]
    groups = json.loads(run("dedup", "--db", db, "--threshold", 0.99999, "--json").stdout)["groups"]
    assert [sorted(h["path"] for h in g) for g in groups] == [[str(images / "b/000.png"), str(images / "b/dup.png")]]
    (tmp_path / "words.txt").write_text("# colours\nred\ngreen\nblue\n")
    doc = json.loads(run("cluster", "--db", db, "--k", 2, "--keywords", tmp_path / "words.txt",
                         "--map", tmp_path / "map.png", "--json").stdout)
    assert sum(c["size"] for c in doc["clusters"]) == 11
    assert all({n["keyword"] for n in c["names"]} == {"red", "green", "blue"} for c in doc["clusters"])
    assert Image.open(tmp_path / "map.png").size == (1400, 1000)
    assert "cluster" in run("cluster", "--db", db, "--k", 2, "--map", tmp_path / "m2.png").stdout

    for args, message in [(("search", "--db", tmp_path / "nowhere", "x"), "not a polymodal collection"),
                          (("search", "--db", db), "give a text query or --image"),
                          (("search", "--db", db, "--image", tmp_path / "no.png"), "no such file"),
                          (("cluster", "--db", db, "--k", 50), "cannot make 50 clusters of 11"),
                          (("index", tmp_path / "none", "--db", db), "not a folder"),
                          (("index", images, "--db", db, "--index-kind", "tree"), "known kinds are")]:
        err = run(*args, code=2).stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def test_ann_kind_choice():
    from polymodal.index.ann import choose_kind, effective_kind, pq_bytes

    assert [choose_kind(n) for n in (10, 49_999, 50_000, 499_999, 500_000, 10**7)] == \
        ["flat", "flat", "hnsw", "hnsw", "ivfpq", "ivfpq"]
    assert effective_kind("ivfpq", 500) == "flat" and pq_bytes(512) == 64 and pq_bytes(24) == 8 and pq_bytes(20) == 5
    with pytest.raises(ValueError, match="unknown index kind"):
        ANN.empty("tree", 8)


def test_shards_merge_into_the_whole(tmp_path, model_dir, monkeypatch):
    images = make_images(tmp_path / "images", 15, seed=5)
    (images / "bad.png").write_text("nope")
    whole = tmp_path / "whole"
    build(images, whole, str(model_dir), progress=False, workers=0)
    # Three "machines" (torchrun ranks), each its share into its own part; then one merge.
    parts = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        doc = json.loads(run("index", images, "--db", tmp_path / "parts/part-{rank}", "--model", model_dir,
                             "--shard", "auto", "--workers", 0, "--json").stdout)
        parts.append(doc["added"])
    assert sum(parts) == 15 and all(parts)  # disjoint shares that cover the folder
    doc = json.loads(run("merge", *sorted((tmp_path / "parts").iterdir()), "--db", tmp_path / "merged",
                         "--json").stdout)
    assert (doc["copied"], doc["total"]) == (15, 15)
    want, vw = snapshot(whole)
    got, vg = snapshot(tmp_path / "merged")
    assert got == want
    for p in want:
        np.testing.assert_allclose(vg[p], vw[p], atol=1e-6)
    # A rerun copies nothing; a shard of another model is refused.
    assert json.loads(run("merge", tmp_path / "parts/part-0", "--db", tmp_path / "merged", "--json").stdout)["copied"] == 0
    other = tiny_clip(tmp_path / "other", seed=1)
    build(images, tmp_path / "other-part", str(other), progress=False, workers=0, shard=(0, 3))
    err = run("merge", tmp_path / "other-part", "--db", tmp_path / "merged", code=2).stderr.strip().splitlines()
    assert len(err) == 1 and "shards must share one model" in err[0]
    with Collection.open(tmp_path / "merged") as c:
        assert c.search_image(str(images / "b/004.png"), 1)[0].path == str(images / "b/004.png")


def test_searches_from_many_threads(tmp_path, embedder):
    from concurrent.futures import ThreadPoolExecutor

    x, _ = blobs(40, np.eye(16)[:5] * 3, 0.3)
    add_synthetic(tmp_path / "db", embedder, x).close()
    with Collection.open(tmp_path / "db", embedder) as c:
        want = [c.search_vector(q, 5) for q in x[:40]]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda q: c.search_vector(q, 5), list(x[:40]) * 3))
        assert got == want * 3
        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(lambda t: c.search_text(t, 3), ["a cat", "a dog"] * 4))
        assert texts[::2] == [texts[0]] * 4 and texts[1::2] == [texts[1]] * 4
