"""The destination's layout: PNG writes whose writer dies leave nothing in the PNG tree."""

import multiprocessing
import os

from pipeline.batch import sinks
from pipeline.io.storage import Files

FILES = Files()  # no storage options: local files and the loopback S3 of the environment


def _killed_mid_write(dest: str) -> None:
    """A PNG writer killed between writing its temporary and renaming it into place (as when a
    node is lost under a write task)."""
    os.replace = lambda *args: os._exit(9)  # this child process only
    sinks.write_png(dest, "c0/baby.png", b"\x89PNG...", FILES)


def test_a_writer_killed_mid_write_leaves_nothing_in_the_png_tree(tmp_path):
    dest = str(tmp_path / "out")
    sinks.write_png(dest, "c0/bird.png", b"\x89PNG bird", FILES)
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(dest,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 9
    files = FILES.list_files(dest)
    # the PNG tree holds the finished file only; the dead writer's temporary is in the staging folder
    assert [f for f in files if not f.startswith("_")] == ["c0/bird.png"]
    assert [f.split("/")[0] for f in files if f.startswith("_")] == [sinks.STAGING_DIR]
    # a run finishing (or the next one starting) clears it, and the finished file stays
    sinks.finish_dest(dest, sinks.DestinationRecord(2, "w", "0" * 64), FILES, None)
    assert FILES.list_files(dest) == ["c0/bird.png"]
    child = multiprocessing.get_context("fork").Process(target=_killed_mid_write, args=(dest,))
    child.start()
    child.join(timeout=60)
    sinks.prepare_dest(dest, ("png",), overwrite=False, after_crash=False, files=FILES)
    assert FILES.list_files(dest) == ["c0/bird.png"]
    assert (tmp_path / "out/c0/bird.png").read_bytes() == b"\x89PNG bird"


def test_a_staging_folder_on_another_filesystem_still_writes_in_place(tmp_path, monkeypatch):
    """A rename cannot cross filesystems (EXDEV): the temporary then goes beside the target."""
    import errno

    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(os.path.dirname(src)) == sinks.STAGING_DIR:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_replace(src, dst)

    monkeypatch.setattr("pipeline.io.storage.os.replace", replace)
    dest = str(tmp_path / "out")
    sinks.write_png(dest, "c0/bird.png", b"\x89PNG bird", FILES)
    assert (tmp_path / "out/c0/bird.png").read_bytes() == b"\x89PNG bird"
    assert [f for f in FILES.list_files(dest) if not f.startswith("_")] == ["c0/bird.png"]
