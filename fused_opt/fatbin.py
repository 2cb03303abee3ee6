"""Which GPUs a compiled CUDA module can run on, read from its fat binary.

nvcc puts one machine-code image (SASS) per architecture it was asked for, and PTX that the driver
compiles for newer GPUs, into the module's `.nv_fatbin` ELF section. The dispatch layer reads that
list once, so that on a GPU the module has no code for, `backend="auto"` takes another backend and
`backend="cuda"` says which architectures it was built for, instead of the first step failing
with "no kernel image is available for execution on the device".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

_FATBIN_MAGIC = 0xBA55ED50
_KINDS = {1: "ptx", 2: "sass"}


@dataclass(frozen=True)
class Image:
    kind: str  # "sass" (machine code) or "ptx"
    arch: int  # e.g. 90 for sm_90 / compute_90

    def __str__(self) -> str:
        return f"sm_{self.arch}" if self.kind == "sass" else f"compute_{self.arch} (PTX)"


class Section(NamedTuple):
    name: str
    kind: int  # sh_type
    offset: int
    size: int
    link: int  # sh_link: for a dynamic section, the index of its string table


def elf_sections(data: bytes) -> list[Section]:
    """The section headers of a 64-bit little-endian ELF file, in index order."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = headers[shstrndx][4]
    return [Section(data[names + name_at:data.index(b"\0", names + name_at)].decode(), kind, offset, size, link)
            for name_at, kind, _, _, offset, size, link, *_ in headers]


def images(path: str) -> list[Image]:
    """The SASS and PTX images in the fat binaries of the shared object at `path` (empty: none)."""
    with open(path, "rb") as f:
        data = f.read()
    section = next((s for s in elf_sections(data) if s.name == ".nv_fatbin"), None)
    if section is None:
        return []
    at, end, found = section.offset, section.offset + section.size, []
    while at + 16 <= end:
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, at)
        if magic != _FATBIN_MAGIC:  # fat binaries are 8-byte aligned: padding between them
            at += 8
            continue
        entry, stop = at + header_size, at + header_size + fat_size
        while entry < stop:
            kind, _, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            arch, = struct.unpack_from("<I", data, entry + 28)
            if kind in _KINDS:
                found.append(Image(_KINDS[kind], arch))
            entry += entry_header + padded
        at = stop
    return sorted(set(found), key=lambda i: (i.kind != "sass", i.arch))  # machine code first


def runs_on(found: list[Image], capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability can run the code: SASS for sm_XY runs on X.Y and
    later GPUs of the same major version; PTX for compute_XY is compiled by the driver for any
    GPU from X.Y on."""
    major, minor = capability
    arch = major * 10 + minor
    return any((i.kind == "sass" and i.arch // 10 == major and i.arch <= arch) or
               (i.kind == "ptx" and i.arch <= arch) for i in found)
