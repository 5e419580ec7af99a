"""Omniglot: loader, safety of the archive handling, the MAML split and
episodes, one-query-at-a-time evaluation, and the shipped checkpoints.

The data come from ``$MLBOOK_DATA`` or ``<repo>/../shared/data`` (CI sets the
former); tests that need them skip only when neither holds ``omniglot/``.
Nothing here touches the network: downloads are replaced by a fake.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mlbook as ml
import mlbook.fewshot as fs
from mlbook import omniglot_repro, zoo
from mlbook.data import omniglot

REPO = Path(__file__).resolve().parents[1]


def _data_root():
    env = os.environ.get("MLBOOK_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (candidate / "omniglot" / "images_background.zip").exists():
            return candidate
    return None


@pytest.fixture(scope="module")
def root():
    found = _data_root()
    if found is None:
        pytest.skip("no Omniglot data: set MLBOOK_DATA to a folder holding "
                    "omniglot/images_background.zip and images_evaluation.zip")
    return found


@pytest.fixture(scope="module")
def data(root):
    # Uses (and on the first run builds) the cache in $MLBOOK_CACHE or
    # ~/.cache/mlbook, never the data folder.
    return omniglot.load(root, download_missing=False, progress=False)


# -- the loader -------------------------------------------------------------------
def test_loader_counts(data):
    assert data.images.shape == (1623, 20, 28, 28)
    assert data.images.dtype == torch.uint8
    assert data.num_alphabets == 50
    for split, alphabets, characters in (("background", 30, 964),
                                         ("evaluation", 20, 659)):
        idx = [i for i, s in enumerate(data.split) if s == split]
        assert len(idx) == characters
        assert data.images[idx].shape[:2].numel() == characters * 20  # 19,280 / 13,180
        assert len({data.alphabet[i] for i in idx}) == alphabets
    # strokes are bright on a dark background, every image has some ink
    assert data.images.float().mean() < 60
    assert (data.images.flatten(2).amax(2) > 128).all()


def test_shared_archives_accepted_by_contents(root):
    # The shared zips were rebuilt (another MD5); SHA256SUMS beside them vouches.
    for archive in omniglot.ARCHIVES:
        check = omniglot.verify(root / "omniglot" / archive.filename, archive)
        assert check["accepted"] in ("sha256sums", "official-md5")


def test_cache_never_in_data_folder(root, data):
    assert not (root / "omniglot" / "omniglot28.pt").exists()


# -- the MAML protocol --------------------------------------------------------------
def test_split_sizes():
    split = fs.maml_split()
    assert {k: len(v) for k, v in split.items()} == {"train": 1100, "val": 100,
                                                     "test": 423}
    everything = torch.cat(list(split.values()))
    assert sorted(everything.tolist()) == list(range(1623))
    # fixed and documented: numpy RandomState(1)
    assert split["train"][:5].tolist() == np.random.RandomState(1).permutation(
        1623)[:5].tolist()
    assert torch.equal(fs.maml_split()["test"], split["test"])


def test_split_classes_with_rotations(data):
    sizes = {s: fs.omniglot(s, 5, data=data).num_classes
             for s in ("train", "val", "test", "train+val")}
    assert sizes == {"train": 4400, "val": 400, "test": 1692, "train+val": 4800}
    assert fs.omniglot("test", 5, rotations=False, data=data).num_classes == 423


def test_rotation_classes_are_rotations_of_the_same_drawing(data):
    images = data.images[:3]  # [3, 20, 28, 28]
    rotated = fs.rotate(images)  # [12, 20, 28, 28]
    assert rotated.shape == (12, 20, 28, 28)
    for c in range(3):
        for r in range(4):
            assert torch.equal(rotated[4 * c + r], torch.rot90(images[c], r, (-2, -1)))
        # the four classes are distinct images of one drawing
        flat = rotated[4 * c: 4 * c + 4, 0].flatten(1)
        assert len({tuple(v.tolist()) for v in flat}) == 4


def test_episode_shapes_and_labels(data):
    tasks = fs.omniglot("train", 5, data=data)
    g = torch.Generator().manual_seed(0)
    batch = tasks.sample(4, 2, 3, generator=g)
    assert batch.x_support.shape == (4, 10, 1, 28, 28)
    assert batch.x_query.shape == (4, 15, 1, 28, 28)
    assert batch.x_support.dtype == torch.float32
    assert batch.y_support.dtype == batch.y_query.dtype == torch.int64
    assert 0 <= batch.x_support.min() and batch.x_support.max() <= 1
    assert batch.y_support[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert batch.y_query[0].tolist() == [i for i in range(5) for _ in range(3)]
    classes = batch.info["classes"]  # [4, 5]
    assert all(len(set(row.tolist())) == 5 for row in classes)
    # every image of label j is a drawing of class classes[t, j], none repeated
    t, j = 1, 3
    pool = tasks.images[classes[t, j], :, 0].float() / 255  # [20, 28, 28]
    shown = torch.cat([batch.x_support[t, 2 * j: 2 * j + 2, 0],
                       batch.x_query[t, 3 * j: 3 * j + 3, 0]])
    hits = [int(((pool - img).abs().flatten(1).sum(1) == 0).nonzero()[0])
            for img in shown]
    assert len(set(hits)) == 5


def test_episodes_reproducible_from_a_generator(data):
    tasks = fs.omniglot("test", 5, data=data)
    a = tasks.sample(3, 1, 1, generator=torch.Generator().manual_seed(7))
    b = tasks.sample(3, 1, 1, generator=torch.Generator().manual_seed(7))
    c = tasks.sample(3, 1, 1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.x_support, b.x_support) and torch.equal(a.x_query, b.x_query)
    assert not torch.equal(a.x_support, c.x_support)


def test_classes_are_the_first_columns_of_a_random_permutation(data):
    # sample picks each task's classes by topk of uniform noise: the episodes
    # earlier versions drew by argsort, from the same seed (no ties here)
    tasks = fs.omniglot("train", 5, data=data)
    for seed in range(5):
        got = tasks.sample(32, 1, 1, generator=torch.Generator().manual_seed(seed))
        noise = torch.rand(32, tasks.num_classes,
                           generator=torch.Generator().manual_seed(seed))
        assert noise.sort(1).values[:, :6].diff(1).ne(0).all()  # no ties
        assert torch.equal(got.info["classes"], noise.argsort(1)[:, :5])


def test_sample_rejects_too_many_shots(data):
    with pytest.raises(ValueError, match="only 20"):
        fs.omniglot("test", 5, data=data).sample(1, 10, 11)


def test_one_query_at_a_time_matches_a_plain_loop():
    torch.manual_seed(0)
    # each class a pattern of its own plus noise: after a few steps the
    # predictions depend on the image, so scoring the wrong one shows
    pattern = torch.randint(0, 200, (12, 1, 28, 28))
    images = (pattern + torch.randint(0, 56, (12, 20, 28, 28))).to(torch.uint8)
    tasks = fs.FewShot(images, 3)
    maml = ml.MAML(ml.models.Conv4(1, 3), F.cross_entropy, inner_lr=0.4)
    ev = fs.evaluate_one_query_at_a_time(maml, tasks, steps=(0, 5), num_tasks=4,
                                         k_support=2, k_query=3, seed=3)
    assert ev.values.shape == (2, 4)
    batch = tasks.sample(4, 2, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # as evaluation adapts (float32 rounding alike)
        fast = maml.adapt(batch.x_support, batch.y_support, steps=5)
    scored_elsewhere = []
    for t in range(4):
        params = {k: v[t] for k, v in fast.items()}
        logits = [maml.predict(params, torch.cat([batch.x_support[t],
                                                  batch.x_query[t, q: q + 1]]))
                  for q in range(9)]  # [N*K + 1, n_way] each: the query last
        right = [z[-1].argmax() == batch.y_query[t, q] for q, z in enumerate(logits)]
        assert ev.values[1, t].item() == pytest.approx(sum(right).item() / 9)
        # what scoring the wrong row (a support image) would give
        scored_elsewhere.append(sum(z[0].argmax() == batch.y_query[t, q]
                                    for q, z in enumerate(logits)).item() / 9)
    assert ev.values[1].tolist() != pytest.approx(scored_elsewhere)  # can tell


def test_episodes_draw_support_and_query_images_alike():
    # image j of every class is filled with the value j: the pixels say which
    # drawing an episode took, and every drawing should be as likely in the
    # support set as in the query set (none favoured by its index)
    images = torch.arange(20, dtype=torch.uint8)[None, :, None, None]
    tasks = fs.FewShot(images.expand(6, 20, 28, 28).contiguous(), 3)
    b = tasks.sample(2000, 1, 1, generator=torch.Generator().manual_seed(0))
    drawn = [(x[:, :, 0, 0, 0] * 255).round() for x in (b.x_support, b.x_query)]
    for index in drawn:  # [2000, 3] drawing indices, uniform over 0..19
        assert set(index.unique().tolist()) == set(range(20))
        assert abs(index.mean().item() - 9.5) < 0.3  # its standard error: 0.075


# -- archive safety --------------------------------------------------------------------
def _zip(path, members):
    """Write a zip with ``members``: {name: bytes} or {name: (bytes, mode)}."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            info = zipfile.ZipInfo(name)
            if isinstance(content, tuple):
                content, mode = content
                info.external_attr = mode << 16
            zf.writestr(info, content)
    return path


@pytest.mark.parametrize("evil", ["../evil.txt", "/tmp/mlbook-evil-abs.txt",
                                  "ok/../../evil.txt", "C:/evil.txt"])
def test_extract_refuses_members_outside_the_target(tmp_path, evil):
    archive = _zip(tmp_path / "a.zip", {"images_background/fine.txt": b"x",
                                         evil: b"pwned"})
    dest = tmp_path / "sub" / "out"
    with pytest.raises(omniglot.OmniglotError, match="refusing"):
        omniglot.extract(archive, dest)
    assert not dest.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" /
                                                         "evil.txt").exists()
    assert not Path("/tmp/mlbook-evil-abs.txt").exists()
    assert not (tmp_path / "sub").exists() or list((tmp_path / "sub").iterdir()) == []
    with pytest.raises(omniglot.OmniglotError, match="refusing"):
        omniglot.read_archive(archive, omniglot.ARCHIVES[0])


def test_extract_refuses_symlinks(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"link": (b"/etc/passwd",
                                                 stat.S_IFLNK | 0o777)})
    with pytest.raises(omniglot.OmniglotError, match="symbolic link"):
        omniglot.extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_safe_archive(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"d/": b"", "d/e/f.txt": b"hello"})
    out = omniglot.extract(archive, tmp_path / "out")
    assert (out / "d" / "e" / "f.txt").read_bytes() == b"hello"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_truncated_zip_gives_a_clear_error(tmp_path):
    good = _zip(tmp_path / "good.zip", {f"d/{i}.txt": os.urandom(2000)
                                        for i in range(5)})
    partial = tmp_path / "partial.zip"
    partial.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(omniglot.OmniglotError, match="truncated or corrupt"):
        omniglot.extract(partial, tmp_path / "out")
    with pytest.raises(omniglot.OmniglotError, match="truncated or corrupt"):
        omniglot.read_archive(partial, omniglot.ARCHIVES[0])
    assert not (tmp_path / "out").exists()


def test_corrupt_member_gives_a_clear_error_and_no_output(tmp_path):
    payload = b"A" * 5000
    archive = _zip(tmp_path / "a.zip", {"d/a.txt": b"fine", "d/b.txt": payload})
    raw = bytearray(archive.read_bytes())
    at = raw.find(payload[:100]) if payload[:100] in raw else None
    # ZIP_STORED: the payload is stored as is; flip bytes in it to break its CRC
    assert at is not None
    raw[at + 10: at + 20] = b"B" * 10
    archive.write_bytes(bytes(raw))
    with pytest.raises(omniglot.OmniglotError, match="corrupt"):
        omniglot.extract(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- checksums and contents ------------------------------------------------------------
def _png(size=105):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (size, size), 1).save(buf, format="PNG")
    return buf.getvalue()


def _fake_omniglot(folder, size=105):
    """Two small archives with the right layout but far too few characters."""
    folder.mkdir(parents=True, exist_ok=True)
    for archive in omniglot.ARCHIVES:
        top = f"images_{archive.split}"
        _zip(folder / archive.filename,
             {f"{top}/Alpha/character01/0001_{d:02d}.png": _png(size)
              for d in range(1, 21)})
    return folder


def test_download_with_wrong_md5_is_rejected(tmp_path, monkeypatch):
    calls = []

    def fake_fetch(url, dest):  # no network: "download" a wrong file
        calls.append(url)
        _zip(dest, {"images_background/x.png": b"not omniglot"})

    monkeypatch.setattr(omniglot, "_fetch", fake_fetch)
    with pytest.raises(omniglot.OmniglotError, match="MD5"):
        omniglot.load(tmp_path / "data", cache=tmp_path / "cache", progress=False)
    assert calls == [omniglot.ARCHIVES[0].url]
    assert calls[0].startswith("https://github.com/brendenlake/omniglot/raw/master/")
    folder = tmp_path / "data" / "omniglot"
    assert list(folder.iterdir()) == []  # no archive, no temporary file left


def test_missing_archive_without_download(tmp_path):
    with pytest.raises(omniglot.OmniglotError, match="missing"):
        omniglot.load(tmp_path, cache=tmp_path / "c", download_missing=False)


def test_local_archive_with_wrong_md5_and_invalid_contents(tmp_path):
    folder = _fake_omniglot(tmp_path / "data" / "omniglot")
    with pytest.raises(omniglot.OmniglotError, match="not \\(all of\\) the Omniglot"):
        omniglot.load(tmp_path / "data", cache=tmp_path / "cache",
                      download_missing=False, progress=False)
    assert not (tmp_path / "cache" / "omniglot28.pt").exists()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        a.filename for a in omniglot.ARCHIVES)


def test_wrong_image_size_is_rejected(tmp_path):
    folder = _fake_omniglot(tmp_path / "o", size=64)
    with pytest.raises(omniglot.OmniglotError, match="105x105"):
        omniglot.read_archive(folder / "images_background.zip", omniglot.ARCHIVES[0])


def test_sha256sums_mismatch_is_rejected(tmp_path):
    folder = _fake_omniglot(tmp_path / "o")
    (folder / "SHA256SUMS").write_text("0" * 64 + "  images_background.zip\n")
    with pytest.raises(omniglot.OmniglotError, match="SHA256SUMS"):
        omniglot.verify(folder / "images_background.zip", omniglot.ARCHIVES[0])


def test_interrupted_cache_is_not_used(tmp_path, data):
    sources = {"background": {"file": "x", "sha256": "y", "accepted": "z"}}
    small = omniglot.Omniglot(data.images[:2], data.alphabet[:2], data.character[:2],
                              data.split[:2])
    omniglot._save_cache(tmp_path, small, sources)
    assert omniglot._load_cache(tmp_path, sources) is not None
    assert omniglot._load_cache(tmp_path, {"other": {}}) is None  # other archives
    pt = tmp_path / "omniglot28.pt"
    pt.write_bytes(pt.read_bytes()[:1000])  # as if a run died while writing it
    assert omniglot._load_cache(tmp_path, sources) is None
    manifest = json.loads((tmp_path / "omniglot28.json").read_text())
    assert manifest["shape"] == [2, 20, 28, 28]


# -- shipped checkpoints ---------------------------------------------------------
SHIPPED = [n for n in zoo.available() if n.startswith("omniglot-")]
TOLERANCE = 0.05  # accuracy on the record's 20 fixed check tasks (float noise only)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_reaches_its_recorded_accuracy(name, data):
    model, record = zoo.load(name)
    s = record["settings"]
    assert record["model"]["kind"] == "Conv4" and record["model"]["in_channels"] == 1
    assert record["train"]["iterations"] > 0 and "--iterations" in record["command"]
    learner = omniglot_repro.make_learner(s, model)
    test = fs.omniglot("test", s["way"], data=data)
    check = omniglot_repro.quick_check(learner, test, s,
                                       num_tasks=record["check"]["num_tasks"],
                                       seed=record["check"]["seed"])
    assert abs(check["accuracy"] - record["check"]["accuracy"]) <= TOLERANCE
    # the 20-task estimate agrees with the 600-task number, and beats chance
    assert abs(100 * check["accuracy"] - record["accuracy"]) < 12
    assert check["accuracy"] > 1 / s["way"] + 0.3


def test_download_into_a_read_only_folder_is_a_clear_error(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root ignores permissions: make mkdir fail instead
        blocker = tmp_path / "data"
        blocker.write_text("a file where the data folder should be")
        root = blocker
    else:
        root = tmp_path / "ro"
        root.mkdir()
        root.chmod(0o500)
    monkeypatch.setattr(omniglot, "_fetch", lambda url, dest: pytest.fail("no fetch"))
    with pytest.raises(omniglot.OmniglotError, match="cannot be downloaded"):
        omniglot.load(root, cache=tmp_path / "cache", progress=False)


# -- the reproduction command --------------------------------------------------------
def test_settings_follow_the_papers():
    maml = omniglot_repro.settings("maml", 5, 1)
    assert (maml["inner_lr"], maml["inner_steps"], maml["meta_batch"]) == (0.4, 1, 32)
    assert maml["iterations"] == 60_000 and maml["headline_steps"] == 10
    assert omniglot_repro.settings("maml", 20, 1)["inner_lr"] == 0.1
    assert omniglot_repro.settings("fomaml", 5, 5)["first_order"] is True
    rep = omniglot_repro.settings("reptile", 5, 1)
    assert (rep["meta_batch"], rep["iterations"], rep["headline_steps"]) == (5, 100_000,
                                                                             50)
    assert omniglot_repro.paper_numbers("reptile", 5, 1) == {
        "transductive": (97.68, 0.04), "one_query_at_a_time": (95.39, 0.09)}


def test_reproduction_command_writes_a_complete_record(tmp_path, root, data,
                                                       monkeypatch):
    monkeypatch.setitem(omniglot_repro.CHECK, "num_tasks", 2)  # keep it quick
    r = omniglot_repro.run("fomaml", 5, 1, iterations=2, meta_batch=2, out=tmp_path,
                           eval_tasks=3, root=root, progress=False)
    saved = json.loads((tmp_path / "omniglot-fomaml-5w1s" / "result.json").read_text())
    assert saved["accuracy"] == r["accuracy"] and 0 <= r["accuracy"] <= 100
    for key in ("settings", "ci95", "device", "commit", "command", "check", "eval"):
        assert key in saved
    assert saved["train"]["iterations"] == 2 and saved["train"]["wall_seconds"] >= 0
    assert saved["model"] == {"kind": "Conv4", "in_channels": 1, "num_classes": 5,
                              "hidden": 64, "image_size": 28}
    assert "--iterations 2 --meta-batch 2 --eval-tasks 3" in saved["command"]
    assert zoo.build_model(saved["model"]).head.out_features == 5
    assert "omniglot-fomaml-5w1s" in omniglot_repro.table([saved])


def test_cuda_graph_off_cuda_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    def run(*args, **kwargs):
        raise AssertionError("run() reached: the option was not checked first")

    monkeypatch.setattr(omniglot_repro, "run", run)
    with pytest.raises(SystemExit) as e:
        omniglot_repro.main(["--device", "cpu", "--cuda-graph", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--cuda-graph needs a CUDA device; this run would use cpu" in (
        capsys.readouterr().err)
    assert not any(tmp_path.iterdir())
