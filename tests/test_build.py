"""The compiled modules share the runtime libraries of the process they load into (setup.py's
loaded_runtimes): a private static copy of the C++ runtime, as a GCC shipping only static archives
produced, crashed the process whenever an error message formatted a number."""

from __future__ import annotations

import importlib
import struct

import pytest

MODULES = {"fused_opt._C": {"libstdc++.so.6", "libgomp.so.1"}, "fused_opt._C_cuda": {"libstdc++.so.6"}}


def needed_libraries(path: str) -> set[str]:
    """DT_NEEDED of a 64-bit little-endian ELF shared object: the libraries it links dynamically."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC
    strtab_offset = sections[dynamic[6]][4]  # sh_link: its string table
    names = set()
    for at in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, value = struct.unpack_from("<qQ", data, at)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            end = data.index(b"\0", strtab_offset + value)
            names.add(data[strtab_offset + value:end].decode())
    return names


@pytest.mark.parametrize("name", MODULES)
def test_compiled_module_links_the_shared_runtimes(name):
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        pytest.skip(f"{name} is not built here: {e}")
    missing = MODULES[name] - needed_libraries(module.__file__)
    assert not missing, f"{module.__file__} does not link {sorted(missing)} dynamically (a private static copy?)"


def test_needed_libraries_reads_a_known_library():
    # The parser itself, on a library whose needs are known: torch's C extension links libtorch.
    import torch._C
    assert "libtorch_python.so" in needed_libraries(torch._C.__file__)
