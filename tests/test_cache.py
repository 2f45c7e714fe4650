import multiprocessing

import pytest

from simpo_lightning.cache import build_once


def build(path, log) -> None:
    with build_once(path) as building:
        if building is not None:
            log.put("built")
            building.mkdir()
            (building / "half").write_text("x")
            (building / "whole").write_text("y")


def test_an_entry_is_built_once_by_one_of_two_processes_and_appears_whole(tmp_path):
    log = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=build, args=(tmp_path / "entry", log)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [log.get() for _ in range(log.qsize())] == ["built"]
    assert sorted(p.name for p in (tmp_path / "entry").iterdir()) == ["half", "whole"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError, match="the build broke"), build_once(tmp_path / "entry") as building:
        building.write_text("partial")
        raise RuntimeError("the build broke")
    assert not (tmp_path / "entry").exists() and not list(tmp_path.glob("entry.tmp-*"))
    with build_once(tmp_path / "entry") as building:
        assert building is not None  # tried again
        building.write_text("done")
    with build_once(tmp_path / "entry") as building:
        assert building is None
    assert (tmp_path / "entry").read_text() == "done"
