import io
import tarfile
from pathlib import Path

import pytest

from kws import download
from kws.cli import main
from kws.labels import WORDS
from kws.errors import KwsError


def add(tar, name, data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data))


def make_archive(path, extra=()):
    """A tiny archive in the official layout: one clip per word and the two split lists."""
    with tarfile.open(path, "w:gz") as tar:
        for word in WORDS:
            add(tar, f"./{word}/0a1b2c3d_nohash_0.wav", b"RIFF" + word.encode())
        add(tar, "./validation_list.txt", b"yes/0a1b2c3d_nohash_0.wav\n")
        add(tar, "./testing_list.txt", b"no/0a1b2c3d_nohash_0.wav\n")
        for name, fields in extra:
            add(tar, name, b"x", **fields)
    return path


def test_download_from_a_file_url_unpacks_the_official_layout(tmp_path, capsys):
    archive = make_archive(tmp_path / "sc.tar.gz")
    dest = tmp_path / "data"
    assert main(["data", "download", str(dest), "--url", archive.as_uri()]) == 0
    assert (dest / "marvin" / "0a1b2c3d_nohash_0.wav").read_bytes() == b"RIFFmarvin"
    assert (dest / "validation_list.txt").read_text() == "yes/0a1b2c3d_nohash_0.wav\n"
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []  # temp file gone
    assert "MB" in capsys.readouterr().err


@pytest.mark.parametrize("name, fields", [
    ("../evil.txt", {}),
    ("/tmp/evil.txt", {}),
    ("yes/../../evil.txt", {}),
    ("link", {"type": tarfile.SYMTYPE, "linkname": "../../etc/passwd"}),
    ("link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}),
    ("hard", {"type": tarfile.LNKTYPE, "linkname": "../outside"}),
    ("dev", {"type": tarfile.CHRTYPE}),
])
def test_malicious_members_are_refused_before_anything_is_written(tmp_path, name, fields):
    archive = make_archive(tmp_path / "bad.tar.gz", extra=[(name, fields)])
    dest = tmp_path / "a" / "data"
    with pytest.raises(KwsError, match="outside the target folder|not a file or folder"):
        download.unpack(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "a" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_a_link_inside_the_folder_is_allowed(tmp_path):
    archive = make_archive(tmp_path / "ok.tar.gz",
                           extra=[("yes/alias.wav", {"type": tarfile.SYMTYPE,
                                                     "linkname": "0a1b2c3d_nohash_0.wav"})])
    download.unpack(archive, tmp_path / "data")
    assert (tmp_path / "data" / "yes" / "alias.wav").read_bytes() == b"RIFFyes"


def test_an_archive_without_the_layout_is_reported(tmp_path):
    archive = tmp_path / "other.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "yes/a.wav", b"x")
    with pytest.raises(KwsError, match="missing validation_list.txt.*missing word folders: no.*nothing was put in"):
        download.download(tmp_path / "data", archive.as_uri(), stream=io.StringIO())
    assert list((tmp_path / "data").iterdir()) == []  # neither its files nor the temporary folder


def test_a_download_into_a_dataset_folder_replaces_its_files_and_keeps_the_others(tmp_path):
    dest = tmp_path / "data"
    (dest / "yes").mkdir(parents=True)
    (dest / "yes" / "0a1b2c3d_nohash_0.wav").write_bytes(b"old")
    (dest / "yes" / "mine.wav").write_bytes(b"kept")
    archive = make_archive(tmp_path / "sc.tar.gz")
    download.download(dest, archive.as_uri(), stream=io.StringIO())
    assert (dest / "yes" / "0a1b2c3d_nohash_0.wav").read_bytes() == b"RIFFyes"
    assert (dest / "yes" / "mine.wav").read_bytes() == b"kept"
    assert download.check_layout(dest) == []


def test_a_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "corrupt.tar.gz"
    archive.write_bytes(b"not a tar file")
    with pytest.raises(KwsError, match="not a readable .tar.gz archive"):
        download.unpack(archive, tmp_path / "data")


@pytest.mark.parametrize("url", ["file:///no/such/archive.tar.gz", "http://127.0.0.1:9/x.tar.gz",
                                 "not a url"])
def test_network_failure_is_a_one_line_error(tmp_path, capsys, url):
    assert main(["data", "download", str(tmp_path / "data"), "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kws: error: cannot download") and "Traceback" not in err


def test_a_folder_it_cannot_write_in_is_one_line_before_the_download(tmp_path, monkeypatch, capsys):
    access = download.os.access  # as for a user without the right to write in tmp_path
    monkeypatch.setattr(download.os, "access", lambda path, mode: Path(path) != tmp_path and access(path, mode))
    monkeypatch.setattr(download, "fetch", lambda *a: pytest.fail("downloaded before the check"))
    assert main(["data", "download", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"kws: error: cannot write in the folder {tmp_path}: permission denied\n"


def test_a_download_that_is_not_an_archive_is_one_line(tmp_path, capsys):
    (tmp_path / "page.html").write_text("<html>not an archive</html>")
    assert main(["data", "download", str(tmp_path / "data"), "--url", (tmp_path / "page.html").as_uri()]) == 2
    err = capsys.readouterr().err  # after the download's progress line
    assert err.endswith("\nkws: error: the download is not a readable .tar.gz archive (ReadError)\n"), err
