"""The C++ extension loader: its cache folder, the stale-lock cleanup, and every way a build can
fail falling back to PyTorch with one warning line instead of an exception."""

import logging
import os
import shutil
import time

import pytest

from slimlm.core import cpp_ext

# load_cpp without its per-process cache, so each test really runs it
load_cpp = cpp_ext.load_cpp.__wrapped__


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cpp_ext.__name__ and r.levelno >= logging.WARNING]


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch waits forever on the lock of a build that was killed; slimlm clears locks older than any build."""
    lock = tmp_path / "lock"
    lock.touch()
    cpp_ext._clear_stale_lock(tmp_path)
    assert lock.exists()  # young: a build may be running in another process
    old = time.time() - cpp_ext.STALE_LOCK_SECONDS - 10
    os.utime(lock, (old, old))
    cpp_ext._clear_stale_lock(tmp_path)
    assert not lock.exists()
    cpp_ext._clear_stale_lock(tmp_path)  # no lock at all: nothing to do


def test_the_build_cache_follows_slimlm_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpp_ext.cache_dir() == tmp_path / "mine" / "extensions"
    monkeypatch.delenv("SLIMLM_CACHE")
    assert cpp_ext.cache_dir() == tmp_path / "xdg" / "slimlm" / "extensions"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cpp_ext.cache_dir() == tmp_path / "home" / ".cache" / "slimlm" / "extensions"


@pytest.fixture
def compiler(monkeypatch):
    """A C++ compiler on PATH (else the loader stops before reading the source) and SLIMLM_NO_CPP unset."""
    if not (shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")):
        pytest.skip("no C++ compiler here")
    monkeypatch.delenv("SLIMLM_NO_CPP", raising=False)


def test_a_missing_source_falls_back_with_one_warning(tmp_path, monkeypatch, caplog, compiler):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.WARNING, logger=cpp_ext.__name__):
        assert load_cpp("slimlm_test_missing", tmp_path / "gone.cpp", ("f",)) is None
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "slimlm_test_missing" in lines[0] and "gone.cpp" in lines[0]
    assert "\n" not in lines[0]


def test_a_source_that_does_not_compile_falls_back_with_one_warning(tmp_path, monkeypatch, caplog, compiler):
    pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("#error this source is broken on purpose\n")  # fails before any header is parsed
    with caplog.at_level(logging.WARNING, logger=cpp_ext.__name__):
        assert load_cpp("slimlm_test_broken", source, ("f",)) is None
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "slimlm_test_broken" in lines[0] and "\n" not in lines[0]
    built = list((tmp_path / "cache" / "extensions").iterdir())  # one folder per module, made by slimlm
    assert len(built) == 1 and built[0].name.startswith("slimlm_test_broken_")


def test_a_first_build_says_so_in_one_line_and_a_cached_one_is_silent(tmp_path, monkeypatch, capsys, compiler):
    pytest.importorskip("torch.utils.cpp_extension")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "broken.cpp"
    source.write_text("#error this source is broken on purpose\n")
    load_cpp("slimlm_test_first", source, ("f",))
    err = capsys.readouterr().err
    assert err.count("slimlm: compiling slimlm_test_first for this CPU") == 1
    (folder,) = (tmp_path / "cache" / "extensions").iterdir()
    (folder / f"{folder.name}.so").write_bytes(b"")  # as if built: not announced again
    load_cpp("slimlm_test_first", source, ("f",))
    assert "compiling" not in capsys.readouterr().err


def test_an_unwritable_cache_falls_back_with_one_warning(tmp_path, monkeypatch, caplog, compiler):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the cache folder cannot be made under a file, even as root
    monkeypatch.setenv("SLIMLM_CACHE", str(blocker))
    source = tmp_path / "ok.cpp"
    source.write_text("int f() { return 1; }\n")
    with caplog.at_level(logging.WARNING, logger=cpp_ext.__name__):
        assert load_cpp("slimlm_test_unwritable", source, ("f",)) is None
    lines = warnings_of(caplog)
    assert len(lines) == 1 and "slimlm_test_unwritable" in lines[0]


def test_slimlm_no_cpp_turns_extensions_off_without_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SLIMLM_NO_CPP", "1")
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger=cpp_ext.__name__):
        assert load_cpp("slimlm_test_off", tmp_path / "gone.cpp", ("f",)) is None
    assert not [r for r in caplog.records if r.name == cpp_ext.__name__]
    assert not (tmp_path / "cache").exists()  # nothing read, nothing built


def test_a_cpu_without_the_needed_flags_gets_no_extension(tmp_path, monkeypatch, compiler):
    monkeypatch.setattr(cpp_ext, "cpu_flags", lambda: frozenset({"sse2"}))
    assert load_cpp("slimlm_test_flags", tmp_path / "gone.cpp", ("f",), ("avx512f",)) is None


def test_the_fallback_never_raises_on_an_error_without_a_message():
    assert cpp_ext._first_line(RuntimeError()) == "RuntimeError"
    assert len(cpp_ext._first_line(RuntimeError("x" * 5000))) <= 300
    assert cpp_ext._first_line(RuntimeError("\n\n  second\nthird")) == "second"
    torch_error = RuntimeError("Error building extension 'x_1': [1/2] c++ -MMD " + "-I/a " * 100 + "\nmain.cpp:2: error")
    assert cpp_ext._first_line(torch_error).startswith("Error building extension 'x_1' (")
