"""AppendFile: staged appends (O_DIRECT where the file system allows it), patches at close, errors surfaced."""
from __future__ import annotations

import os

import numpy as np
import pytest

from writers.appendfile import ALIGN, AppendFile


def _direct_io_possible(folder) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        os.close(os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | flag, 0o644))
    except OSError:
        return False
    finally:
        (folder / "probe").unlink(missing_ok=True)
    return True


@pytest.mark.parametrize("direct", [True, False])
def test_appends_and_patches_give_exactly_the_expected_bytes(tmp_path, direct):
    rng = np.random.default_rng(1)
    chunks = [rng.integers(0, 256, int(n), dtype=np.uint8).tobytes() for n in rng.integers(0, 9000, 60)]
    chunks.append(b"x")  # an odd total length: the last block is padded for O_DIRECT, then truncated
    expected = bytearray(b"".join(chunks))
    out = AppendFile(tmp_path / "f.bin", block=2 * ALIGN, buffers=2, direct=direct)
    if direct:
        assert out.direct == _direct_io_possible(tmp_path)
    total = 0
    for c in chunks:
        assert out.write(c) == len(c)
        total += len(c)
        assert out.tell() == total
    out.patch(3, b"HEAD")
    out.patch(len(expected) - 5, b"TAIL!")
    with pytest.raises(ValueError, match="outside"):
        out.patch(len(expected) - 2, b"toolong")
    out.close()
    expected[3:7] = b"HEAD"
    expected[-5:] = b"TAIL!"
    assert (tmp_path / "f.bin").read_bytes() == bytes(expected)
    with pytest.raises(ValueError, match="already closed"):
        out.write(b"more")


def test_empty_file_and_numpy_input(tmp_path):
    with AppendFile(tmp_path / "empty.bin"):
        pass
    assert (tmp_path / "empty.bin").read_bytes() == b""
    arr = np.arange(10000, dtype=np.uint16)
    with AppendFile(tmp_path / "arr.bin", block=ALIGN) as out:
        out.write(arr)
    assert (tmp_path / "arr.bin").read_bytes() == arr.tobytes()


def test_abort_is_idempotent_and_a_write_error_surfaces_as_the_os_error(tmp_path):
    out = AppendFile(tmp_path / "a.bin", block=ALIGN)
    out.write(b"1" * (3 * ALIGN))
    out.abort()
    out.abort()
    assert (tmp_path / "a.bin").exists()  # removing it is the owner's business (the writers do)
    bad = AppendFile(tmp_path / "b.bin", block=ALIGN, buffers=2)
    os.close(bad.fd)  # the background write now fails with EBADF
    bad.fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(OSError):
        for _ in range(8):
            bad.write(b"2" * ALIGN)
        bad.close()
    bad.abort()
