"""Checkpoint file helpers that the training tests do not reach on this file system."""
import os

from nbhelpers.vit.checkpoint import link_or_copy


def test_link_or_copy_hard_links_where_it_can(tmp_path):
    source, target = tmp_path / "last.pt", tmp_path / "best.pt"
    source.write_bytes(b"checkpoint bytes")
    link_or_copy(source, target)
    assert target.read_bytes() == b"checkpoint bytes" and os.path.samefile(source, target)


def test_link_or_copy_streams_a_copy_when_hard_links_fail(tmp_path, monkeypatch):
    # Drive mounts and some Kaggle input folders refuse hard links: the fallback must still give the same bytes,
    # atomically (no temp file left behind, an existing target replaced whole).
    source, target = tmp_path / "last.pt", tmp_path / "best.pt"
    payload = os.urandom(3 * 1024 * 1024 + 17)  # larger than copyfileobj's buffer: several chunks
    source.write_bytes(payload)
    target.write_bytes(b"an older best.pt")

    def refuse(*args, **kwargs):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", refuse)
    link_or_copy(source, target)
    assert target.read_bytes() == payload and not os.path.samefile(source, target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "last.pt"]
