"""Where a feature store is put: the device, RAM or a file mapped from the spill folder; no room is one line."""

import errno
import os
from types import SimpleNamespace

import pytest
import torch

from freezetune.cache import placement
from freezetune.errors import ResourceError

CPU = SimpleNamespace(device=torch.device("cpu"))
SHAPE = (2, 256, 64)  # 128 KiB of float32


def test_a_spilled_store_reserves_its_blocks_before_it_is_mapped(tmp_path, monkeypatch):
    # the file was sparse: a disk another job filled while the store was written killed the run with SIGBUS, rc 135
    # and not a word; its blocks are now taken before a page is written, and the store still reads as zeros
    reserved, unlink = [], placement._unlink_mapped

    def seen(path):
        reserved.append(os.stat(path).st_blocks * 512)
        unlink(path)

    monkeypatch.setattr(placement, "_unlink_mapped", seen)
    store, info = placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "disk", zeroed=True)
    assert info.place == "disk" and reserved[0] >= info.bytes == 2 * 256 * 64 * 4
    assert not store.any() and not (tmp_path / "spill").exists()  # mapped, then unlinked: nothing left behind
    store.fill_(1)  # the mapping outlives its file's name
    assert store.sum().item() == 2 * 256 * 64


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "No space left on device"), (errno.EFBIG, "File too large")])
def test_a_spill_file_the_disk_has_no_room_for_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code, said):
    # another job filling the disk after the free space was checked, or ulimit -f: SIGBUS, or torch's traceback
    # "unable to resize file ... File too large (27)"; a ResourceError the run stops on (--cache disk, memory) or
    # streams its batches instead of (--cache auto: FeaturePath)
    def full(fd, offset, length):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    with pytest.raises(ResourceError) as info:
        placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "disk")
    assert str(info.value) == (f"no room for the feature cache's file (0.1 MiB) in '{tmp_path / 'spill'}': {said}; "
                               "train into an --out on a disk with room, or pass --cache off")  # fmt: skip
    assert not (tmp_path / "spill").exists()


def test_a_stop_while_the_spill_file_is_reserved_leaves_no_file(tmp_path, monkeypatch):
    # SIGTERM raises at once during a cache build: reserving tens of GB takes a while, and the whole file stayed
    from freezetune.run.interrupt import RunInterrupted

    def stopped(fd, offset, length):
        raise RunInterrupted(15, "stopped by SIGTERM while the feature cache was built")

    monkeypatch.setattr(os, "posix_fallocate", stopped, raising=False)
    with pytest.raises(RunInterrupted):
        placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "disk")
    assert not (tmp_path / "spill" / "feature_cache.bin").exists()


def test_a_file_system_that_cannot_reserve_blocks_still_maps_the_store(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    store, info = placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "disk", zeroed=True)
    assert info.place == "disk" and tuple(store.shape) == SHAPE and not store.any()


def _no_memory_for(shape, monkeypatch, error: BaseException, at: str) -> list[str]:
    """``torch.empty``/``torch.zeros`` of ``shape`` in place ``at`` ("gpu", "pinned", "cpu") raise ``error``, as the
    allocator does when memory runs out; returns where each store was asked for."""
    asked = []

    def failing(real):
        def make(*args, device=None, pin_memory=False, **kw):
            if tuple(args[0]) == shape:
                asked.append("gpu" if device is not None else "pinned" if pin_memory else "cpu")
                if asked[-1] == at:
                    raise error
            return real(*args, **kw)  # (no CUDA here: a pinned store is made in plain RAM)

        return make

    monkeypatch.setattr(torch, "empty", failing(torch.empty))
    monkeypatch.setattr(torch, "zeros", failing(torch.zeros))
    return asked


RAM_GONE = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                        "you tried to allocate 131072 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip


@pytest.mark.parametrize("place", ["auto", "memory"])
def test_a_store_ram_cannot_allocate_within_its_budget_spills_to_disk(tmp_path, monkeypatch, caplog, place):
    # under ulimit -v the store's allocation failed within the RAM budget, and the run ended in the out-of-memory line
    # of a training step: "the machine ran out of memory (RAM) at batch size 32; try --batch-size 16", which the
    # store does not depend on. It takes the next place, a file mapped from disk, as a store over the budget does
    asked = _no_memory_for(SHAPE, monkeypatch, RAM_GONE, at="cpu")
    with caplog.at_level("INFO", logger=placement.log.name):
        store, info = placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", place, zeroed=True)
    assert asked == ["cpu"] and info.place == "disk" and not store.any()
    (said,) = [r for r in caplog.records if "could not allocate" in r.getMessage()]
    assert said.getMessage() == "feature cache needs 0 MiB, which RAM could not allocate: spilling to disk"
    assert said.levelname == ("WARNING" if place == "memory" else "INFO")  # memory was asked for: said aloud


def test_a_store_no_memory_holds_even_mapped_from_disk_is_one_line(tmp_path, monkeypatch):
    # a limit on the process's memory counts a mapping too: torch's "unable to mmap ... Cannot allocate memory (12)"
    _no_memory_for(SHAPE, monkeypatch, RAM_GONE, at="cpu")

    def unmappable(path, shared, size, dtype):
        raise RuntimeError(f"unable to mmap {size * 4} bytes from file <{path}>: Cannot allocate memory (12)")

    monkeypatch.setattr(torch, "from_file", unmappable)
    with pytest.raises(ResourceError) as info:
        placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "memory")
    assert str(info.value) == ("the feature cache (0.1 MiB) does not fit in this process's memory, not even mapped "
                               f"from a file in '{tmp_path / 'spill'}': Cannot allocate memory; pass --cache off")  # fmt: skip
    assert not (tmp_path / "spill").exists()


def test_a_store_the_gpu_cannot_allocate_within_its_budget_goes_to_pinned_ram(tmp_path, monkeypatch):
    # the GPU's free memory, read a moment before, taken by another process: CUDA's out-of-memory error ended the run
    gone = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 128.00 KiB")
    asked = _no_memory_for(SHAPE, monkeypatch, gone, at="gpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**40, 2**40))
    cuda = SimpleNamespace(device=torch.device("cuda"))
    _, info = placement.allocate(SHAPE, torch.float32, cuda, tmp_path / "spill", "auto")
    assert asked == ["gpu", "pinned"] and info.place == "pinned"
