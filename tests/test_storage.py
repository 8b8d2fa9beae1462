"""pipeline.io.storage: a job's files reached through one ``Files`` object, which no code path can
leave out: no module but storage touches fsspec, and every loader that takes ``files`` gets it."""

import ast
import pickle
from pathlib import Path

import pytest

from pipeline.errors import StorageError
from pipeline.io.storage import Files

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"
# Functions that read through ``files`` and default to no options for library users: inside the
# package every call must pass the job's.
LOADERS = {"load_pretrained", "open_pairs", "load_benchmark", "build_upscaler"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def test_no_module_but_storage_reaches_files_on_its_own():
    for name, tree in _modules():
        if name == "io/storage.py":
            continue
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] in ("fsspec", "s3fs", "boto3", "botocore")}, name


def test_every_loader_call_in_the_package_passes_the_jobs_files():
    calls = []
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if func in LOADERS:
                    calls.append((name, node.lineno, func, {k.arg for k in node.keywords}))
    assert len(calls) >= 8  # the upscale, eval and train jobs, the CLI
    # ``**kwargs`` (keyword None): PAN.from_pretrained, the library's entry, hands the caller's on
    assert [c for c in calls if not c[3] & {"files", None}] == []


def test_files_travel_as_their_options_and_never_show_secrets():
    files = Files({"key": "AKIA-SECRET", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x"}})
    again = pickle.loads(pickle.dumps(files))
    assert again == files and again.options["secret"] == "s3cr3t"
    assert "s3cr3t" not in repr(files) and "AKIA" not in repr(files) and "secret" in repr(files)


def test_the_options_reach_the_filesystem_of_a_url_and_of_a_chained_url(monkeypatch):
    files = Files({"anon": True})
    fs, path = files.filesystem("s3://bucket/a.png")
    assert fs.anon and path == "bucket/a.png"
    seen = {}
    monkeypatch.setattr("fsspec.core.url_to_fs", lambda url, **kwargs: seen.update(kwargs) or (fs, url))
    files.filesystem("zip://a.png::s3://bucket/a.zip")  # an archive member (datasets' imagefolder)
    assert seen == {"s3": {"anon": True}}  # the options belong to the store holding the archive


def test_a_store_without_atomic_create_is_refused(tmp_path):
    assert Files().create_exclusive(str(tmp_path / "a"), b"1")
    with pytest.raises(StorageError, match="no atomic create"):
        Files().create_exclusive("memory://bucket/lease", b"1")
