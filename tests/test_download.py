"""`dgclip download` against a loopback HTTP server serving generated archives in the official
layouts: every dataset, resume after a cut connection, digest mismatch, Google-Drive confirmation,
corrupt and wrong archives, bad input, a second call after a failure."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile

import pytest

from dgclip.data.download import SOURCES, DownloadError, download, install, sources
from tests.download_server import IMG, Server, official_files, tar_of, zip_of


def _leftovers(root):
    """What a failed call must not leave: staging folders, and complete downloaded files in the
    cache (resumable .part files are the one thing allowed to stay)."""
    if not root.exists():
        return []
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".dgclip-staging"))
    cache = root / install.CACHE_DIR
    if cache.exists():
        left += sorted(str(p.relative_to(root)) for p in cache.rglob("*")
                       if p.is_file() and not p.name.endswith(".part"))
    return left


def _serve(server, *names):
    for n in names:
        server.files.update(official_files(n))


def _dl(name, root, server, **kw):
    return download(name, root, mirror=server.url, progress=False, backoff=0.0, **kw)


AUTOMATIC = sorted(n for n, s in SOURCES.items() if not s.manual)


@pytest.fixture
def generated_digests(monkeypatch):
    """Generated files cannot match the digests the project knows for the real ones: drop them
    (the known-digest paths have their own tests)."""
    for name, src in list(SOURCES.items()):
        if any(f.sha256 for f in src.files):
            monkeypatch.setitem(SOURCES, name, dataclasses.replace(
                src, files=tuple(dataclasses.replace(f, sha256=None) for f in src.files)))


@pytest.mark.parametrize("name", AUTOMATIC)
def test_every_dataset_downloads_and_verifies(tmp_path, name, capsys, generated_digests):
    src = SOURCES[name]
    with Server() as server:
        _serve(server, name, *src.requires)
        served = {f.name: server.files[f.name] for f in src.files}
        path = _dl(name, tmp_path, server)
    assert path == tmp_path / src.target and path.is_dir()
    problems, _ = install.check_dataset(src, tmp_path)
    assert problems == []
    manifest = json.loads((path / install.MANIFEST).read_text())
    assert {f["file"]: f["sha256"] for f in manifest["files"]} == \
        {n: hashlib.sha256(b).hexdigest() for n, b in served.items()}
    assert all(f["url"] == f"{server.url}/{f['file']}" for f in manifest["files"])
    # nothing but the datasets themselves remains
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({src.target, *(SOURCES[d].target for d in src.requires)})
    if src.catalog:  # `dgclip datasets` lists it as OK
        from dgclip.cli import main
        from dgclip.data.catalog import get_spec

        capsys.readouterr()
        assert main(["datasets", "--root", str(tmp_path)]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith(get_spec(src.catalog).name + " "))
        assert " OK: " in line, line


def test_post_extraction_steps(tmp_path, generated_digests):
    with Server() as server:
        _serve(server, "terraincognita", "domainnet", "digits-dg", "mini-domainnet", "fgvc_aircraft")
        terra = _dl("terraincognita", tmp_path, server)
        mini = _dl("mini-domainnet", tmp_path, server)  # installs DomainNet first
        digits = _dl("digits-dg", tmp_path, server)
        air = _dl("fgvc_aircraft", tmp_path, server)
    # TerraIncognita: four locations, ten classes, the others dropped
    assert sorted(p.name for p in terra.iterdir() if p.is_dir()) == \
        ["location_100", "location_38", "location_43", "location_46"]
    assert not any(terra.rglob("deer")) and not (terra / "location_7").exists()
    assert (terra / "location_38" / "bobcat" / "im38_1.jpg").is_file()
    # DomainNet: the listed duplicates are gone
    dn = tmp_path / "domain_net"
    assert not any(dn.rglob("*_dup.png")) and (dn / "clipart" / "The_Eiffel_Tower" / "clipart_001.png").is_file()
    assert (mini / "real" / "zebra" / "real_001.png").is_file()
    assert (digits / "svhn" / "7" / "val_00001.png").is_file() and (digits / "svhn" / "7" / "train_00001.png").is_file()
    assert (air / "variants.txt").is_file() and (air / "images").is_dir()


def test_datasets_command_lists_downloaded(tmp_path, capsys):
    from dgclip.cli import main

    with Server() as server:
        _serve(server, "pacs")
        assert main(["download", "pacs", "--root", str(tmp_path), "--mirror", server.url, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["datasets", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "PACS             OK: art_painting: 7" in out and "1 dataset(s) found" in out


def test_resume_after_cut_connection(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        size = len(server.files["PACS.zip"])
        server.cuts["PACS.zip"] = [size // 3, 2]  # two cut connections, then the rest
        _dl("pacs", tmp_path, server)
        ranges = server.ranges("PACS.zip")
    assert len(ranges) == 2 and ranges[0] == f"bytes={size // 3}-"
    assert install.check_dataset(SOURCES["pacs"], tmp_path)[0] == []


def test_second_call_resumes_after_giving_up(tmp_path):
    with Server() as server:
        _serve(server, "vlcs")
        size = len(server.files["VLCS.tar.gz"])
        server.cuts["VLCS.tar.gz"] = [size // 2, 1]
        with pytest.raises(DownloadError, match="next call resumes"):
            _dl("vlcs", tmp_path, server, retries=0)
        part = tmp_path / install.CACHE_DIR / "VLCS" / "VLCS.tar.gz.part"
        assert part.stat().st_size == size // 2
        assert not (tmp_path / "VLCS").exists() and _leftovers(tmp_path) == []
        _dl("vlcs", tmp_path, server, retries=0)
        assert server.ranges("VLCS.tar.gz") == [f"bytes={size // 2}-"]
    assert (tmp_path / "VLCS" / "SUN09").is_dir() and not (tmp_path / install.CACHE_DIR).exists()


def _with_digest(monkeypatch, name, digest):
    src = SOURCES[name]
    files = tuple(dataclasses.replace(f, sha256=digest) for f in src.files)
    monkeypatch.setitem(SOURCES, name, dataclasses.replace(src, files=files))


def test_digest_mismatch_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    _with_digest(monkeypatch, "pacs", "0" * 64)
    with Server() as server:
        _serve(server, "pacs")
        with pytest.raises(DownloadError, match="does not match the known 0000.*--no-verify"):
            _dl("pacs", tmp_path, server)
        assert not (tmp_path / "PACS").exists()
        assert _leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.part"))
        # a re-packed mirror copy the user trusts
        path = _dl("pacs", tmp_path, server, verify=False)
    files = json.loads((path / install.MANIFEST).read_text())["files"]
    assert files[0]["known_sha256"] == "0" * 64 and files[0]["sha256"] != "0" * 64


def test_known_digest_accepted(tmp_path, monkeypatch):
    with Server() as server:
        _serve(server, "pacs")
        _with_digest(monkeypatch, "pacs", hashlib.sha256(server.files["PACS.zip"]).hexdigest())
        assert _dl("pacs", tmp_path, server).is_dir()


def test_google_drive_confirmation_page(tmp_path):
    with Server() as server:
        _serve(server, "officehome")
        server.confirm.add("office_home.zip")
        _dl("officehome", tmp_path, server)
        paths = [p for p, _ in server.log]
    assert any(p.startswith("/confirmed/office_home.zip?") and "confirm=t0k" in p and "uuid=u-1" in p for p in paths)
    assert (tmp_path / "office_home" / "Real World").is_dir()


def test_html_page_without_confirmation_is_an_error(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        server.html_only.add("PACS.zip")
        with pytest.raises(DownloadError, match="HTML page instead of the file"):
            _dl("pacs", tmp_path, server)
    assert not (tmp_path / "PACS").exists() and _leftovers(tmp_path) == []


def test_truncated_archive_is_always_an_error_then_second_call_recovers(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        good = server.files["PACS.zip"]
        server.files["PACS.zip"] = good[: len(good) // 2]  # served whole, but the archive itself is cut
        for verify in (True, False):
            with pytest.raises(DownloadError, match="truncated|corrupt"):
                _dl("pacs", tmp_path, server, verify=verify)
            assert not (tmp_path / "PACS").exists() and _leftovers(tmp_path) == []
        server.files["PACS.zip"] = good
        assert _dl("pacs", tmp_path, server).is_dir()


def test_corrupt_tar_member_is_an_error(tmp_path):
    data = bytearray(official_files("vlcs")["VLCS.tar.gz"])
    data[len(data) // 2] ^= 0xFF
    with Server() as server:
        server.files["VLCS.tar.gz"] = bytes(data)
        with pytest.raises(DownloadError, match="truncated|corrupt"):
            _dl("vlcs", tmp_path, server)
    assert not (tmp_path / "VLCS").exists() and _leftovers(tmp_path) == []


def test_archive_without_expected_folders(tmp_path):
    with Server() as server:
        server.files["PACS.zip"] = zip_of({"pacs_v2/photo/dog/1.png": IMG})
        with pytest.raises(DownloadError, match="no 'kfold'.*pacs_v2/"):
            _dl("pacs", tmp_path, server)
        # expected folder present but a domain missing: the catalogue check refuses it
        server.files["PACS.zip"] = zip_of({f"kfold/photo/{c}/1.png": IMG for c in ("dog", "horse")})
        with pytest.raises(DownloadError, match="does not verify.*missing domain 'art_painting'"):
            _dl("pacs", tmp_path, server)
    assert not (tmp_path / "PACS").exists() and _leftovers(tmp_path) == []


def test_member_escaping_the_folder_is_refused(tmp_path):
    with Server() as server:
        server.files["PACS.zip"] = zip_of({"../escaped.png": IMG})
        with pytest.raises(DownloadError, match="outside"):
            _dl("pacs", tmp_path / "root", server)
        server.files["VLCS.tar.gz"] = tar_of({"../escaped.png": IMG})
        with pytest.raises(DownloadError):
            _dl("vlcs", tmp_path / "root", server)
    assert not (tmp_path / "escaped.png").exists()


def test_unknown_name_suggests_close_matches(tmp_path):
    with pytest.raises(DownloadError, match="did you mean pacs"):
        download("pcas", tmp_path)
    assert sources.get_source("Digits_DG").name == "digits-dg"
    assert sources.get_source("OXFORD-PETS").name == "oxford_pets"


def test_unwritable_root(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(DownloadError, match="not a folder"):
        download("pacs", blocker)
    with pytest.raises(DownloadError, match="not a folder"):
        download("pacs", blocker / "below")


def test_disk_full(tmp_path, monkeypatch):
    from dgclip.data.download import remote as fetch_mod

    monkeypatch.setattr(fetch_mod, "_free_bytes", lambda folder: 10)
    with Server() as server:
        _serve(server, "pacs")
        with pytest.raises(DownloadError, match="disk full"):
            _dl("pacs", tmp_path, server)
    assert not (tmp_path / "PACS").exists() and _leftovers(tmp_path) == []


def test_disk_full_while_writing(tmp_path, monkeypatch):
    import errno

    from dgclip.data.download import remote as fetch_mod

    real_open = open

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if str(path).endswith(".part"):
            def write(_b):
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = write
        return f

    monkeypatch.setattr(fetch_mod, "open", full_open, raising=False)
    with Server() as server:
        _serve(server, "pacs")
        with pytest.raises(DownloadError, match="disk full"):
            _dl("pacs", tmp_path, server)
    assert not (tmp_path / "PACS").exists()


def test_missing_file_on_mirror(tmp_path):
    with Server() as server:
        with pytest.raises(DownloadError, match="HTTP 404.*mirror has no file"):
            _dl("pacs", tmp_path, server)


def test_existing_target_that_does_not_verify_is_left_alone(tmp_path):
    (tmp_path / "PACS" / "photo").mkdir(parents=True)
    with pytest.raises(DownloadError, match="already exists but does not verify"):
        download("pacs", tmp_path, progress=False)
    assert (tmp_path / "PACS" / "photo").is_dir()


def test_manual_dataset_prints_what_to_fetch_then_verifies(tmp_path):
    with pytest.raises(DownloadError, match=r"(?s)image-net.org.*ILSVRC2012_img_train.tar.*images/train/<wnid>"):
        download("imagenet", tmp_path)
    base = tmp_path / "imagenet"
    for split in ("train", "val"):
        (base / "images" / split / "n01440764").mkdir(parents=True)
        (base / "images" / split / "n01440764" / "a.JPEG").write_bytes(IMG)
    with pytest.raises(DownloadError, match="missing file classnames.txt"):
        download("imagenet", tmp_path)
    (base / "classnames.txt").write_text("n01440764 tench\n")
    assert download("imagenet", tmp_path) == base


def test_zip_bad_crc_is_corrupt(tmp_path):
    data = bytearray(zip_of({"kfold/photo/dog/1.png": IMG * 50}))
    # flip a byte inside the member's data (after its local header), keep the directory intact
    with zipfile.ZipFile(__import__("io").BytesIO(bytes(data))) as zf:
        off = zf.infolist()[0].header_offset + 30 + len("kfold/photo/dog/1.png") + 5
    data[off] ^= 0xFF
    with Server() as server:
        server.files["PACS.zip"] = bytes(data)
        with pytest.raises(DownloadError, match="truncated|corrupt"):
            _dl("pacs", tmp_path, server)
    assert _leftovers(tmp_path) == []


def test_tar_cut_at_a_member_boundary_is_truncated(tmp_path):
    import io
    import tarfile

    raw = tar_of({"VLCS/a.png": IMG, "VLCS/b.png": IMG}, "w")
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        second = tf.getmembers()[1].offset
    with Server() as server:
        server.files["VLCS.tar.gz"] = __import__("gzip").compress(raw[:second])
        with pytest.raises(DownloadError, match="truncated: it ends without the tar end-of-archive marker"):
            _dl("vlcs", tmp_path, server)
    assert _leftovers(tmp_path) == []


def test_server_without_range_support_restarts_the_file(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        size = len(server.files["PACS.zip"])
        server.ignore_range = True
        server.cuts["PACS.zip"] = [size // 2, 1]
        assert _dl("pacs", tmp_path, server).is_dir()  # the 200 answer rewrote the partial file
        assert len(server.ranges("PACS.zip")) == 1


def test_complete_part_file_is_finished_not_refetched(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        cache = tmp_path / install.CACHE_DIR / "PACS"
        cache.mkdir(parents=True)
        (cache / "PACS.zip.part").write_bytes(server.files["PACS.zip"])  # killed before the rename
        assert _dl("pacs", tmp_path, server).is_dir()
        assert server.ranges("PACS.zip") == [f"bytes={len(server.files['PACS.zip'])}-"]


def test_known_digest_of_the_duplicate_list_is_checked(tmp_path):
    """DomainNet's duplicate list has a known sha256: it is fetched first, so a different file is
    refused before the large archives are fetched, and nothing of the dataset stays behind."""
    with Server() as server:
        _serve(server, "domainnet")
        with pytest.raises(DownloadError, match="domain_net_duplicates.txt: sha256 .* does not match the known a52b4ab7"):
            _dl("domainnet", tmp_path, server)
        assert [p for p, _ in server.log] == ["/domain_net_duplicates.txt"]
    assert not (tmp_path / "domain_net").exists() and _leftovers(tmp_path) == []
    assert not list(tmp_path.rglob("*.part"))


def test_retry_count_restarts_when_a_cut_transfer_made_progress(tmp_path):
    with Server() as server:
        _serve(server, "pacs")
        size = len(server.files["PACS.zip"])
        server.cuts["PACS.zip"] = [size // 5, 4]  # four cuts, each after some progress, with one retry allowed
        assert _dl("pacs", tmp_path, server, retries=1).is_dir()
        assert len(server.ranges("PACS.zip")) == 4
