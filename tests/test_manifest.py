from __future__ import annotations

import json

import pytest

import edgelm
from edgelm.errors import EdgelmError
from edgelm.fsutil import atomic_dir, sha256_file
from edgelm.manifest import MANIFEST, read_manifest, write_manifest


def _artifact(tmp_path):
    d = tmp_path / "art"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x01\x02\x03" * 100)
    (d / "sub").mkdir()
    (d / "sub" / "tok.json").write_text('{"a": 1}')
    return d


def test_manifest_records_files_and_versions(tmp_path):
    d = _artifact(tmp_path)
    m = write_manifest(d, "test", source={"x": 1})
    assert m["edgelm_version"] == edgelm.__version__
    assert m["files"]["weights.bin"] == {"size": 300, "sha256": sha256_file(d / "weights.bin")}
    assert "sub/tok.json" in m["files"]
    assert m["total_bytes"] == 300 + 8
    assert read_manifest(d)["source"] == {"x": 1}


def test_tampered_file_is_refused(tmp_path):
    d = _artifact(tmp_path)
    write_manifest(d, "test")
    (d / "weights.bin").write_bytes(b"\x01\x02\x04" * 100)  # same size, other bytes
    with pytest.raises(EdgelmError, match="does not match the sha256"):
        read_manifest(d)


def test_missing_file_and_schema_mismatch_are_refused(tmp_path):
    d = _artifact(tmp_path)
    write_manifest(d, "test")
    (d / "sub" / "tok.json").unlink()
    with pytest.raises(EdgelmError, match="missing"):
        read_manifest(d)
    m = json.loads((d / MANIFEST).read_text())
    m["schema_version"] = 999
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EdgelmError, match="schema version 999"):
        read_manifest(d, verify=False)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_existing_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("precious")
    with pytest.raises(EdgelmError, match="--force"):
        with atomic_dir(target):
            pass
    assert (target / "keep").read_text() == "precious"
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in target.iterdir()) == ["new"]


@pytest.mark.parametrize("name", ["../outside.bin", "sub/../../outside.bin", "/etc/passwd", "..", "a\\..\\b", ""])
def test_file_names_may_not_leave_the_folder(tmp_path, name):
    d = _artifact(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    write_manifest(d, "test")
    m = json.loads((d / MANIFEST).read_text())
    m["files"][name] = {"size": 6, "sha256": sha256_file(tmp_path / "outside.bin")}
    (d / MANIFEST).write_text(json.dumps(m))
    for verify in (True, False):
        with pytest.raises(EdgelmError, match="leaves the artifact folder|not a plain relative path"):
            read_manifest(d, verify=verify)


def test_a_link_out_of_the_folder_is_refused(tmp_path):
    d = _artifact(tmp_path)
    (tmp_path / "outside.bin").write_bytes(b"secret")
    (d / "link.bin").symlink_to(tmp_path / "outside.bin")
    write_manifest(d, "test")
    with pytest.raises(EdgelmError, match="a link out of the artifact folder"):
        read_manifest(d)


@pytest.mark.parametrize("text, what", [
    ("[]", "schema version None"),
    ('{"schema_version": 1, "files": []}', "'files' is not an object"),
    ('{"schema_version": 1, "files": {"weights.bin": 300}}', "needs an integer 'size' and a string 'sha256'"),
    ('{"schema_version": 1, "files": {"weights.bin": {"size": "300", "sha256": "x"}}}', "needs an integer 'size'"),
    ('{"schema_version": 1, "files": {"weights.bin": {"size": 300}}}', "needs an integer 'size' and a string"),
    ('{"schema_version": 1, "kind": 7}', "'kind' is not a string"),
    ("\xff\xfe", "is not valid JSON"),
])
def test_a_malformed_manifest_is_one_line(tmp_path, text, what):
    d = _artifact(tmp_path)
    (d / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(EdgelmError, match=what) as e:
        read_manifest(d)
    assert "\n" not in str(e.value)
