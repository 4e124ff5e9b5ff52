"""Storage locations: local paths and URIs go through the same calls (pyarrow filesystems)."""

from __future__ import annotations

import pytest

from jdcl_ray import storage
from jdcl_ray.errors import UserError


@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_list_delete(tmp_path, as_uri):
    root = tmp_path.as_uri() if as_uri else str(tmp_path)
    assert storage.resolve(root) == root.rstrip("/")
    target = storage.join(root, "search", "trials", "a", "metrics.json")
    assert not storage.exists(target)
    storage.write_text(target, '{"epoch": 3}')  # parent folders are made on the way
    assert storage.exists(target)
    assert storage.read_text(target) == '{"epoch": 3}'
    assert (tmp_path / "search" / "trials" / "a" / "metrics.json").is_file()
    storage.write_bytes(storage.join(root, "search", "trials", "b", "x.bin"), b"\x00\x01")
    assert storage.list_names(storage.join(root, "search", "trials")) == ["a", "b"]
    assert storage.list_names(storage.join(root, "nothing-here")) == []
    assert (
        storage.open_bytes(storage.join(root, "search", "trials", "b", "x.bin")).read()
        == b"\x00\x01"
    )
    storage.delete(target)
    assert not storage.exists(target)


def test_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.resolve("tune_results") == str(tmp_path / "tune_results")


def test_unknown_scheme_is_one_line():
    with pytest.raises(UserError, match="storage 'nosuch://bucket/x' can't be opened"):
        storage.exists("nosuch://bucket/x")
