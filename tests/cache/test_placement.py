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


def test_a_file_system_that_cannot_reserve_blocks_still_maps_the_store(tmp_path, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported, raising=False)
    store, info = placement.allocate(SHAPE, torch.float32, CPU, tmp_path / "spill", "disk", zeroed=True)
    assert info.place == "disk" and tuple(store.shape) == SHAPE and not store.any()
