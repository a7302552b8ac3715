"""How a zygote gets its context from the host: one process_vm_readv straight from the
host's object (str or pickle bytes) into ours, or a memfd the host wrote."""

from __future__ import annotations

import ctypes
import mmap
import os
import pickle
import sys


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _read_host_memory(pid: int, remote: int, local: int, size: int) -> None:
    """One copy straight from the host's object into ours (process_vm_readv)."""
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    while done < size:
        loc, rem = _Iovec(local + done, size - done), _Iovec(remote + done, size - done)
        got = libc.process_vm_readv(pid, ctypes.byref(loc), 1, ctypes.byref(rem), 1, 0)
        if got <= 0:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm_readv: {os.strerror(err)}")
        done += got


MADV_HUGEPAGE = 14


def _ask_huge_pages(addr: int, size: int) -> None:
    """Back the context with 2 MB pages: the copy takes ~500x fewer page faults and each
    worker fork copies a few page-table entries instead of one per 4 kB (docs/measurements.md).
    Best effort."""
    start, end = (addr + 4095) & ~4095, (addr + size) & ~4095
    if end - start >= 2 << 20:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_HUGEPAGE)


def load_remote(req: dict):
    """Copy the host's str (or pickle bytes) without any intermediate buffer.
    The host keeps the object alive and unchanged until we say `loaded`."""
    size = req["size"]
    if req["kind"] == "str_remote":
        new = ctypes.pythonapi.PyUnicode_New
        new.restype, new.argtypes = ctypes.py_object, [ctypes.c_ssize_t, ctypes.c_uint32]
        text = new(req["length"], req["maxchar"])  # uninitialised, canonical layout for that maxchar
        dst = id(text) + sys.getsizeof(text) - size - req["kind_size"]  # data sits before the NUL
        _ask_huge_pages(dst, size)
        _read_host_memory(req["pid"], req["addr"], dst, size)
        return text
    buf = bytearray(size)
    dst = ctypes.addressof((ctypes.c_char * size).from_buffer(buf)) if size else 0
    _read_host_memory(req["pid"], req["addr"], dst, size)
    return pickle.loads(buf)


def load_context(kind: str, fd: int, size: int) -> object:
    data: object
    if size == 0:
        data = b""
    else:
        with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
            if kind == "str":
                data = str(mm, "utf-8", "surrogatepass")
            else:
                data = pickle.loads(mm)
    os.close(fd)
    if kind == "str" and size == 0:
        return ""
    return data
