import os
import time

from slimlm.core import cpp_ext


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    """torch waits forever on the lock of a build that was killed; slimlm clears locks older than any build."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory("slimlm_test_ext", False)
    lock = os.path.join(folder, "lock")
    open(lock, "w").close()
    cpp_ext._clear_stale_lock("slimlm_test_ext")
    assert os.path.exists(lock)  # young: a build may be running in another process
    old = time.time() - cpp_ext.STALE_LOCK_SECONDS - 10
    os.utime(lock, (old, old))
    cpp_ext._clear_stale_lock("slimlm_test_ext")
    assert not os.path.exists(lock)
