"""The tests' S3 store (SeaweedFS, tests/objectstore.py): what is uploaded comes back unchanged."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)


def test_folder_round_trip(object_store, tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "nested").mkdir(parents=True)
    files = {
        "config.json": b'{"r": 8}\n',
        # Over boto3's 8 MiB multipart threshold and the filer's 4 MiB chunk size.
        "nested/weights.bin": os.urandom(9 * 2**20),
        "empty.txt": b"",
    }
    for name, content in files.items():
        (source / name).write_bytes(content)

    object_store.create_bucket("roundtrip")
    keys = object_store.upload_folder(source, "roundtrip", "adapters/demo/")

    client = object_store.client()
    listed = client.list_objects_v2(Bucket="roundtrip", Prefix="adapters/")
    assert (
        sorted(o["Key"] for o in listed["Contents"])
        == sorted(keys)
        == sorted(f"adapters/demo/{name}" for name in files)
    )
    # How Ray Serve LLM finds adapters: the "folders" under its dynamic LoRA path.
    folders = client.list_objects_v2(Bucket="roundtrip", Prefix="adapters/", Delimiter="/")
    assert [p["Prefix"] for p in folders["CommonPrefixes"]] == ["adapters/demo/"]
    for name, content in files.items():
        target = tmp_path / "back" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file("roundtrip", f"adapters/demo/{name}", str(target))
        assert target.read_bytes() == content, name
