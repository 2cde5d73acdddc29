"""Turn a FUNCTION argument (``name``, ``lib:name``, ``name@VER``, ``0xADDR``) into an address
in a live process, from the ELF symbol tables of the files the process has mapped.

Which files: every file with an executable mapping in /proc/PID/maps (the executable, ld.so,
each shared library, dlopen()ed ones too). A file is opened by its path when that path still
names the mapped inode, otherwise (deleted, replaced, another mount namespace) through
/proc/PID/map_files/START-END.

Where: the kernel maps an ET_EXEC file at its link addresses and an ET_DYN file (PIE, shared
library) at a load bias (``fs/binfmt_elf.c`` ``load_elf_binary``, glibc
``elf/dl-map-segments.h``). The bias is the start of the mapping of the lowest PT_LOAD segment
(the one at file offset 0) minus that segment's p_vaddr rounded down to a page.

Which symbol: defined STT_FUNC and STT_GNU_IFUNC entries of ``.dynsym`` and ``.symtab``;
a plain name means the default version (``name@@VER``) as in glibc's ``elf/dl-lookup.c``;
global and weak definitions win over local ones. An IFUNC is followed to the implementation
its resolver chose, read from a GOT slot that ld.so filled in. docs/symbols.md has the rules.

Parsed files are cached in-process, keyed by (dev, inode, size, mtime) and checked against
their GNU build id on every use.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Literal

import attrs
from elftools.common.exceptions import ELFError
from elftools.elf.dynamic import DynamicSegment
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerNeedSection, GNUVerSymSection
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from applier.errors import TargetGone, UsageError
from injector.maps import Mapping, find, read_maps

__all__ = [
    "AddressSpec",
    "AmbiguousSymbol",
    "CacheInfo",
    "IfuncUnresolved",
    "NameSpec",
    "NotExecutable",
    "ProcessNotFound",
    "Symbol",
    "SymbolError",
    "SymbolSpecError",
    "TargetUnavailable",
    "UnknownLibrary",
    "UnknownSymbol",
    "cache_info",
    "clear_cache",
    "parse_spec",
    "resolve",
]

Table = Literal["symtab", "dynsym"]
Binding = Literal["global", "weak", "local"]

PAGE_SIZE = mmap.PAGESIZE
CACHE_SIZE = 128  # parsed files kept; a big process maps a few hundred

# pyelftools names STT_GNU_IFUNC and STB_GNU_UNIQUE (both 10) by their range start, *_LOOS.
_IFUNC_TYPES = frozenset({"STT_GNU_IFUNC", "STT_LOOS"})
_BINDINGS: dict[str, Binding] = {
    "STB_GLOBAL": "global",
    "STB_WEAK": "weak",
    "STB_LOCAL": "local",
    "STB_GNU_UNIQUE": "global",
    "STB_LOOS": "global",
}
# versym: the low 15 bits index a version, bit 15 marks a hidden (non-default) one;
# 0 and 1 are "local" and "global, unversioned" (elf.h VER_NDX_*, VERSYM_HIDDEN).
_VERSYM_HIDDEN = 0x8000
_VER_NDX_GLOBAL = 1
# x86_64 relocation types whose slot ends up holding a function's address (elf.h R_X86_64_*).
_R_X86_64_64 = 1
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
_R_X86_64_IRELATIVE = 37
_ELF_MAGIC = b"\x7fELF"
# Sections of PLT stubs (binutils: .plt, .plt.sec with IBT, .plt.got, .iplt in static links).
_PLT_SECTIONS = frozenset({".plt", ".plt.sec", ".plt.got", ".iplt"})


# --- errors ----------------------------------------------------------------------------------


class SymbolError(UsageError):
    """FUNCTION could not be turned into an address: a usage error (exit code 2)."""

    exit_code = 2


class SymbolSpecError(SymbolError, ValueError):
    """FUNCTION is neither ``0xADDR`` nor ``[LIB:]NAME[@VER|@@VER]``."""

    def __init__(self, spec: str, reason: str) -> None:
        self.spec = spec
        super().__init__(f"bad function {spec!r}: {reason}")


class UnknownSymbol(SymbolError, LookupError):
    """No loaded file defines the function (or none matches the LIB: part)."""

    def __init__(self, pid: int, spec: str, searched: Sequence[str], hints: Sequence[str]) -> None:
        self.pid = pid
        self.spec = spec
        self.searched = tuple(searched)
        self.hints = tuple(hints)
        where = ", ".join(os.path.basename(p) for p in self.searched) or "no files"
        text = f"pid {pid}: no function {spec!r} in {len(self.searched)} files: {where}"
        if self.hints:
            text += "; " + "; ".join(self.hints)
        super().__init__(text)


class UnknownLibrary(UnknownSymbol):
    """The LIB: part names no file loaded in the process."""

    def __init__(self, pid: int, spec: str, lib: str, loaded: Sequence[str]) -> None:
        self.lib = lib
        self.loaded = tuple(loaded)
        SymbolError.__init__(
            self,
            f"pid {pid}: no loaded file is {lib!r} (in {spec!r}); loaded: "
            + (", ".join(os.path.basename(p) for p in self.loaded) or "none"),
        )
        self.pid = pid
        self.spec = spec
        self.searched = ()
        self.hints = ()


class AmbiguousSymbol(SymbolError, LookupError):
    """More than one loaded definition fits the name; ``candidates`` lists them."""

    def __init__(self, pid: int, spec: str, candidates: Sequence[Symbol]) -> None:
        self.pid = pid
        self.spec = spec
        self.candidates = tuple(candidates)
        places = ", ".join(
            f"{os.path.basename(c.path or '?')} ({c.table} {c.binding} at {c.address:#x})"
            for c in self.candidates
        )
        files = {c.path for c in self.candidates}
        if len(files) > 1:
            first = os.path.basename(self.candidates[0].path or "")
            how = f"name the file as LIB:NAME, e.g. {first}:{self.candidates[0].name}"
        else:
            how = "the file defines it more than once: give the address instead"
        super().__init__(f"pid {pid}: {spec!r} is defined in {places}: {how}")


class NotExecutable(SymbolError, ValueError):
    """The address (given, or computed from a symbol) is not in an executable mapping."""

    def __init__(self, pid: int, address: int, what: str, mapping: Mapping | None) -> None:
        self.pid = pid
        self.address = address
        self.mapping = mapping
        if mapping is None:
            where = "nothing is mapped there"
        else:
            where = (
                f"it is in {mapping.start:#x}-{mapping.end:#x} {mapping.perms} "
                f"{mapping.path or '[anonymous]'}"
            )
        super().__init__(f"pid {pid}: {what} {address:#x} is not executable: {where}")


class IfuncUnresolved(SymbolError, LookupError):
    """An IFUNC whose chosen implementation cannot be read from the process."""

    def __init__(self, pid: int, name: str, path: str, resolver: int, reason: str) -> None:
        self.pid = pid
        self.name = name
        self.path = path
        self.resolver = resolver
        super().__init__(
            f"pid {pid}: {name} in {os.path.basename(path)} is an IFUNC (its symbol is the "
            f"resolver at {resolver:#x}, not the function) and {reason}; "
            f"give the implementation's address instead"
        )


class TargetUnavailable(TargetGone, SymbolError):
    """The process cannot be looked at: gone, no rights, no mappings (exit code 5: the exit
    code table finds ``TargetGone`` first)."""

    exit_code = 5

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        super().__init__(f"pid {pid}: {reason}")


class ProcessNotFound(TargetUnavailable, ProcessLookupError):
    """The pid does not exist."""


# --- the FUNCTION argument -------------------------------------------------------------------


@attrs.frozen
class AddressSpec:
    """``0xADDR``: an address that must lie in an executable mapping."""

    address: int

    def __str__(self) -> str:
        return f"{self.address:#x}"


@attrs.frozen
class NameSpec:
    """``[LIB:]NAME[@VER|@@VER]``: ``default_only`` for ``@@`` (the default version only)."""

    name: str
    lib: str | None = None
    version: str | None = None
    default_only: bool = False

    def __str__(self) -> str:
        text = f"{self.lib}:" if self.lib is not None else ""
        text += self.name
        if self.version is not None:
            text += ("@@" if self.default_only else "@") + self.version
        return text


_WORD = re.compile(r"[^\s@:]+")
_HEX = re.compile(r"[0-9a-fA-F]+")


def parse_spec(text: str) -> AddressSpec | NameSpec:
    """Parse FUNCTION: ``0x`` and hex digits, or ``[LIB:]NAME[@VER|@@VER]``."""
    if text[:2].lower() == "0x":
        if not _HEX.fullmatch(text[2:]):
            raise SymbolSpecError(text, "an address is 0x followed by hex digits")
        return AddressSpec(int(text[2:], 16))
    # Symbol names never hold ':', a library path may: the last ':' ends LIB.
    lib, colon, rest = text.rpartition(":")
    if colon and not lib:
        raise SymbolSpecError(text, "nothing before ':' (the form is LIB:NAME)")
    name, at, version = rest.partition("@")
    default_only = at != "" and version.startswith("@")
    if default_only:
        version = version[1:]
    if not _WORD.fullmatch(name):
        raise SymbolSpecError(text, "no symbol name (the form is [LIB:]NAME[@VER|@@VER])")
    if name[0].isdigit():
        raise SymbolSpecError(text, "a name cannot start with a digit; addresses start with 0x")
    if at and not _WORD.fullmatch(version):
        raise SymbolSpecError(text, "no version after '@'")
    return NameSpec(
        name=name, lib=lib or None, version=version if at else None, default_only=default_only
    )


# --- the result ------------------------------------------------------------------------------


@attrs.frozen
class Symbol:
    """A function in a live process: its address and the file entry it comes from.

    ``name`` is without version (``version`` holds it); for an address spec that starts no
    known function it is the address in hex, and ``size``, ``table``, ``binding`` are 0/None.
    ``path`` is the file as /proc/PID/maps names it (a pseudo name such as ``[vdso]``, or
    None for anonymous memory). For an IFUNC, ``address`` is the implementation its resolver
    chose and ``ifunc_resolver`` the resolver's own address.
    """

    name: str
    address: int
    size: int
    path: str | None
    build_id: str | None
    table: Table | None
    binding: Binding | None = None
    version: str | None = None
    ifunc_resolver: int | None = None

    def describe(self) -> str:
        """One line for messages: ``getpid@GLIBC_2.2.5 at 0x7f... in /usr/lib/... (dynsym)``."""
        name = self.name if self.version is None else f"{self.name}@{self.version}"
        text = f"{name} at {self.address:#x} in {self.path or '[anonymous]'}"
        if self.table is not None:
            text += f" ({self.table})"
        if self.ifunc_resolver is not None:
            text += f", chosen by the IFUNC resolver at {self.ifunc_resolver:#x}"
        return text


# --- one ELF file, parsed --------------------------------------------------------------------


@attrs.frozen
class _FileKey:
    dev: int
    inode: int
    size: int
    mtime_ns: int


@attrs.frozen
class _Def:
    """One defined function of one file; ``value`` is the file's own (unbiased) st_value."""

    name: str
    value: int
    size: int
    ifunc: bool
    binding: Binding
    version: str | None
    default: bool  # a plain name finds it: unversioned, or the default version (name@@VER)
    table: Table


@attrs.frozen
class _Tables:
    functions: dict[str, tuple[_Def, ...]]
    by_value: dict[int, tuple[_Def, ...]]
    others: dict[str, str]  # defined symbols that are not functions: name -> STT_* (for hints)


@attrs.frozen
class _GotSlots:
    """Slots ld.so fills with a function address: IRELATIVE ones by resolver (file value),
    symbol ones (GLOB_DAT, JUMP_SLOT, 64) by name with the version they ask for; ``plt``
    the file's PLT sections, where a lazy JUMP_SLOT points until it is first called."""

    irelative: dict[int, tuple[int, ...]]
    by_name: dict[str, tuple[tuple[int, str | None], ...]]
    plt: tuple[tuple[int, int], ...] = ()

    def in_plt(self, value: int) -> bool:
        return any(start <= value < end for start, end in self.plt)


class _NotElf(Exception):
    """The mapped file is no ELF file (a JIT's memfd, a data file): nothing to search."""


@attrs.define(eq=False)
class _ElfFile:
    """What is known about one ELF file: header facts at once, tables when first asked."""

    key: _FileKey
    build_id: str | None
    build_id_at: tuple[int, int] | None  # file offset and length of the build id bytes
    elf_type: str
    machine: str
    soname: str | None
    load_vaddr: int  # p_vaddr of the lowest PT_LOAD, rounded down to a page
    load_offset: int  # its p_offset, rounded down the same way: the offset of its mapping
    _tables: _Tables | None = None
    _got: _GotSlots | None = None

    def tables(self, stream: IO[bytes]) -> _Tables:
        if self._tables is None:
            self._tables = _parse_tables(ELFFile(stream))
        return self._tables

    def got(self, stream: IO[bytes]) -> _GotSlots:
        if self._got is None:
            self._got = _parse_got(ELFFile(stream))
        return self._got


def _parse_header(stream: IO[bytes], key: _FileKey) -> _ElfFile:
    stream.seek(0)
    if stream.read(4) != _ELF_MAGIC:
        raise _NotElf
    elf = ELFFile(stream)
    loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
    if not loads:
        raise ELFError("no PT_LOAD segment")
    first = min(loads, key=lambda seg: seg["p_vaddr"])
    build_id: str | None = None
    build_id_at: tuple[int, int] | None = None
    soname: str | None = None
    for seg in elf.iter_segments():
        if isinstance(seg, NoteSegment) and build_id is None:
            for note in seg.iter_notes():
                if note["n_type"] == "NT_GNU_BUILD_ID" and note["n_name"] == "GNU":
                    build_id = str(note["n_desc"])
                    # the descriptor follows the 12-byte header and the 4-aligned name
                    start = note["n_offset"] + 12 + (note["n_namesz"] + 3) // 4 * 4
                    build_id_at = (start, int(note["n_descsz"]))
                    break
        elif isinstance(seg, DynamicSegment):
            for tag in seg.iter_tags("DT_SONAME"):
                # set from the string table by pyelftools for DT_SONAME tags
                soname = str(getattr(tag, "soname", "")) or None
    return _ElfFile(
        key=key,
        build_id=build_id,
        build_id_at=build_id_at,
        elf_type=str(elf["e_type"]),
        machine=str(elf["e_machine"]),
        soname=soname,
        load_vaddr=first["p_vaddr"] // PAGE_SIZE * PAGE_SIZE,
        load_offset=first["p_offset"] // PAGE_SIZE * PAGE_SIZE,
    )


def _version_names(
    elf: ELFFile, versym: GNUVerSymSection | None
) -> tuple[list[int], dict[int, str]]:
    """The versym index of each dynsym entry and the name of each version index."""
    if versym is None:
        return [], {}
    data = versym.data()
    order: Literal["little", "big"] = "little" if elf.little_endian else "big"
    indexes = [int.from_bytes(data[i : i + 2], order) for i in range(0, len(data), 2)]
    names: dict[int, str] = {}
    for section in elf.iter_sections():
        if isinstance(section, GNUVerDefSection):
            for verdef, verdaux in section.iter_versions():
                first = next(verdaux, None)
                if first is not None:
                    names[int(verdef["vd_ndx"])] = str(first.name)
        elif isinstance(section, GNUVerNeedSection):
            for _, auxes in section.iter_versions():
                for aux in auxes:
                    names[int(aux["vna_other"])] = str(aux.name)
    return indexes, names


def _find_versym(elf: ELFFile, table: SymbolTableSection) -> GNUVerSymSection | None:
    """The .gnu.version section that belongs to ``table`` (linked by sh_link)."""
    for section in elf.iter_sections():
        # pyelftools makes a new object per call; sections compare equal by header
        if isinstance(section, GNUVerSymSection) and section.symboltable == table:
            return section
    return None


def _parse_tables(elf: ELFFile) -> _Tables:
    defs: list[_Def] = []
    others: dict[str, str] = {}
    tables = [s for s in elf.iter_sections() if isinstance(s, SymbolTableSection)]
    # .dynsym first: a name that both tables hold is reported as the dynamic linker sees it.
    tables.sort(key=lambda s: s["sh_type"] != "SHT_DYNSYM")
    seen: set[tuple[str, int]] = set()
    for table in tables:
        kind: Table = "dynsym" if table["sh_type"] == "SHT_DYNSYM" else "symtab"
        indexes, names = (
            _version_names(elf, _find_versym(elf, table))
            if kind == "dynsym"
            else (
                [],
                {},
            )
        )
        for i, sym in enumerate(table.iter_symbols()):
            shndx = sym["st_shndx"]
            raw_name = sym.name
            if not raw_name or shndx in ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON"):
                continue
            info = sym["st_info"]
            stype = str(info["type"])
            binding = _BINDINGS.get(str(info["bind"]))
            version: str | None = None
            default = True
            if kind == "dynsym":
                name = raw_name
                if i < len(indexes) and (indexes[i] & ~_VERSYM_HIDDEN) > _VER_NDX_GLOBAL:
                    version = names.get(indexes[i] & ~_VERSYM_HIDDEN)
                    default = not indexes[i] & _VERSYM_HIDDEN
            else:
                # binutils >= 2.35 writes versioned names into .symtab: name@VER, name@@VER
                name, at, version_text = raw_name.partition("@")
                if at:
                    default = version_text.startswith("@")
                    version = version_text.lstrip("@")
            if stype != "STT_FUNC" and stype not in _IFUNC_TYPES:
                others.setdefault(name, stype)
                continue
            if binding is None or (name, sym["st_value"]) in seen:
                continue
            seen.add((name, sym["st_value"]))
            defs.append(
                _Def(
                    name=name,
                    value=sym["st_value"],
                    size=sym["st_size"],
                    ifunc=stype in _IFUNC_TYPES,
                    binding=binding,
                    version=version,
                    default=default,
                    table=kind,
                )
            )
    functions: dict[str, list[_Def]] = collections.defaultdict(list)
    by_value: dict[int, list[_Def]] = collections.defaultdict(list)
    for d in defs:
        functions[d.name].append(d)
        by_value[d.value].append(d)
    for name in functions:
        others.pop(name, None)
    return _Tables(
        functions={k: tuple(v) for k, v in functions.items()},
        by_value={k: tuple(v) for k, v in by_value.items()},
        others=others,
    )


def _parse_got(elf: ELFFile) -> _GotSlots:
    irelative: dict[int, list[int]] = collections.defaultdict(list)
    by_name: dict[str, list[tuple[int, str | None]]] = collections.defaultdict(list)
    if elf["e_machine"] != "EM_X86_64":
        return _GotSlots({}, {})
    plt: list[tuple[int, int]] = []
    for section in elf.iter_sections():
        if section.name in _PLT_SECTIONS:
            plt.append((section["sh_addr"], section["sh_addr"] + section["sh_size"]))
        if not isinstance(section, RelocationSection) or not section.is_RELA():
            continue
        symtab = elf.get_section(section["sh_link"])
        if not isinstance(symtab, SymbolTableSection):
            continue
        indexes, names = _version_names(elf, _find_versym(elf, symtab))
        for rel in section.iter_relocations():
            rtype = rel["r_info_type"]
            if rtype == _R_X86_64_IRELATIVE:
                irelative[rel["r_addend"]].append(rel["r_offset"])
            elif rtype in (_R_X86_64_GLOB_DAT, _R_X86_64_JUMP_SLOT, _R_X86_64_64):
                index = rel["r_info_sym"]
                if index == 0 or (rtype == _R_X86_64_64 and rel["r_addend"] != 0):
                    continue
                version: str | None = None
                if index < len(indexes) and (indexes[index] & ~_VERSYM_HIDDEN) > _VER_NDX_GLOBAL:
                    version = names.get(indexes[index] & ~_VERSYM_HIDDEN)
                by_name[symtab.get_symbol(index).name].append((rel["r_offset"], version))
    return _GotSlots(
        irelative={k: tuple(v) for k, v in irelative.items()},
        by_name={k: tuple(v) for k, v in by_name.items()},
        plt=tuple(plt),
    )


# --- the cache -------------------------------------------------------------------------------


@attrs.frozen
class CacheInfo:
    """Counters of the parsed-file cache: ``hits`` reused a parsed file, ``misses`` parsed."""

    hits: int
    misses: int
    size: int
    capacity: int


_CACHE: collections.OrderedDict[_FileKey, _ElfFile] = collections.OrderedDict()
_LOCK = threading.Lock()
_counts = {"hits": 0, "misses": 0}


def cache_info() -> CacheInfo:
    """How the parsed-file cache has done since the last ``clear_cache()``."""
    with _LOCK:
        return CacheInfo(_counts["hits"], _counts["misses"], len(_CACHE), CACHE_SIZE)


def clear_cache() -> None:
    """Forget every parsed file and reset the counters."""
    with _LOCK:
        _CACHE.clear()
        _counts["hits"] = _counts["misses"] = 0


def _load(stream: IO[bytes]) -> _ElfFile:
    """The parsed file behind ``stream``: from the cache if its stat and build id match."""
    st = os.fstat(stream.fileno())
    key = _FileKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _LOCK:
        cached = _CACHE.get(key)
        if cached is not None:
            _CACHE.move_to_end(key)
    if cached is not None:
        at = cached.build_id_at
        if at is None or os.pread(stream.fileno(), at[1], at[0]).hex() == cached.build_id:
            with _LOCK:
                _counts["hits"] += 1
            return cached
    parsed = _parse_header(stream, key)
    with _LOCK:
        _counts["misses"] += 1
        _CACHE[key] = parsed
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return parsed


# --- the files loaded in a process -----------------------------------------------------------


@attrs.frozen(eq=False)
class _Object:
    """One ELF file loaded at one place in the process (open while a resolve() runs)."""

    path: str
    elf: _ElfFile
    stream: IO[bytes]
    bias: int
    executable: tuple[Mapping, ...]  # its executable mappings

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def tables(self, notes: list[str]) -> _Tables:
        """Its symbol tables; empty (and a note saying why) if they cannot be parsed."""
        try:
            return self.elf.tables(self.stream)
        except (OSError, ELFError) as exc:
            notes.append(f"could not read the symbols of {self.path}: {exc}")
            return _Tables({}, {}, {})

    def got(self, notes: list[str]) -> _GotSlots:
        """Its GOT slots; none (and a note saying why) if the relocations cannot be parsed."""
        try:
            return self.elf.got(self.stream)
        except (OSError, ELFError) as exc:
            notes.append(f"could not read the relocations of {self.path}: {exc}")
            return _GotSlots({}, {})

    def holds(self, address: int) -> bool:
        return any(m.contains(address) for m in self.executable)

    def matches(self, lib: str) -> bool:
        """LIB names this file: its path, basename or soname, or a prefix of either up to
        a '.' (``libc`` and ``libc.so`` for ``libc.so.6``)."""
        if "/" in lib:
            return lib == self.path
        names = [self.name] + ([self.elf.soname] if self.elf.soname else [])
        return any(n == lib or n.startswith(lib + ".") for n in names)


def _open_mapped(pid: int, procfs: Path, mapping: Mapping) -> IO[bytes]:
    """The file behind ``mapping``: by path if that still names the same inode, else through
    map_files (deleted or replaced files, paths of another mount namespace)."""
    if not mapping.deleted and mapping.path is not None and mapping.path.startswith("/"):
        try:
            stream = open(mapping.path, "rb")  # noqa: SIM115 (the caller closes it)
        except OSError:
            pass
        else:
            st = os.fstat(stream.fileno())
            if (st.st_dev, st.st_ino) == (mapping.dev, mapping.inode):
                return stream
            stream.close()
    return open(procfs / str(pid) / "map_files" / f"{mapping.start:x}-{mapping.end:x}", "rb")


def _loaded_objects(
    pid: int,
    procfs: Path,
    maps: Sequence[Mapping],
    stack: contextlib.ExitStack,
    *,
    notes: list[str],
    only: Mapping | None = None,
) -> list[_Object]:
    """Every ELF file with an executable mapping (just the one holding ``only`` if given),
    once per place it is loaded at; files that cannot be read are described in ``notes``."""
    files: dict[tuple[int, int], list[Mapping]] = {}
    for m in maps:
        if m.is_file and m.path is not None:
            files.setdefault((m.dev, m.inode), []).append(m)
    objects: list[_Object] = []
    for (dev, inode), group in files.items():
        executable = [m for m in group if m.executable]
        if not executable or (only is not None and (only.dev, only.inode) != (dev, inode)):
            continue
        path = executable[0].path or "?"
        try:
            stream = stack.enter_context(_open_mapped(pid, procfs, executable[0]))
            elf = _load(stream)
        except _NotElf:
            continue
        except (OSError, ELFError) as exc:
            notes.append(f"could not read {path}: {exc}")
            continue
        # The mapping of the first PT_LOAD; the file may be loaded more than once (dlmopen),
        # so each executable mapping belongs to the nearest such mapping below it.
        bases = sorted((m for m in group if m.offset == elf.load_offset), key=lambda m: m.start)
        loads: dict[int, tuple[Mapping, list[Mapping]]] = {}
        for m in executable:
            below = [b for b in bases if b.start <= m.start]
            if not below:
                notes.append(
                    f"{path}: {m.start:#x}-{m.end:#x} has no mapping of file offset "
                    f"{elf.load_offset:#x} below it (load bias unknown)"
                )
                continue
            loads.setdefault(below[-1].start, (below[-1], []))[1].append(m)
        for base, members in loads.values():
            # ET_EXEC is mapped at its link addresses: no bias (fs/binfmt_elf.c).
            bias = 0 if elf.elf_type == "ET_EXEC" else base.start - elf.load_vaddr
            objects.append(_Object(path, elf, stream, bias, tuple(members)))
    objects.sort(key=lambda o: o.executable[0].start)
    return objects


def _read_maps(pid: int, procfs: Path) -> list[Mapping]:
    try:
        maps = read_maps(pid, procfs)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessNotFound(pid, "no such process") from exc
    except PermissionError as exc:
        raise TargetUnavailable(pid, f"not permitted to read {exc.filename}") from exc
    except OSError as exc:
        raise TargetUnavailable(pid, f"cannot read its maps: {exc}") from exc
    if not maps:
        raise TargetUnavailable(pid, "has no memory mappings (a zombie or a kernel thread?)")
    return maps


# --- lookup ----------------------------------------------------------------------------------


def resolve(
    pid: int,
    spec: str | AddressSpec | NameSpec,
    *,
    maps: Sequence[Mapping] | None = None,
    procfs: Path = Path("/proc"),
) -> Symbol:
    """The function ``spec`` names in process ``pid``.

    ``maps`` is the process's /proc/PID/maps when the caller already holds it (read while
    the target is stopped, say); otherwise it is read here. The process need not be stopped
    or traced: files are read from disk or /proc/PID/map_files, and only an IFUNC needs a
    read of process memory (/proc/PID/mem).
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    if maps is None:
        maps = _read_maps(pid, procfs)
    with contextlib.ExitStack() as stack:
        if isinstance(parsed, AddressSpec):
            return _resolve_address(pid, procfs, maps, parsed.address, stack)
        return _resolve_name(pid, procfs, maps, parsed, stack)


def _resolve_address(
    pid: int, procfs: Path, maps: Sequence[Mapping], address: int, stack: contextlib.ExitStack
) -> Symbol:
    mapping = find(maps, address)
    if mapping is None or not mapping.executable:
        raise NotExecutable(pid, address, "address", mapping)
    hex_name = f"{address:#x}"
    if not mapping.is_file:
        return Symbol(hex_name, address, 0, mapping.path, None, None)
    for obj in _loaded_objects(pid, procfs, maps, stack, notes=[], only=mapping):
        if not any(m.start == mapping.start for m in obj.executable):
            continue
        found = [d for d in obj.tables([]).by_value.get(address - obj.bias, ()) if not d.ifunc]
        # of aliases (getpid, __getpid), the exported, default, least underscored name
        found.sort(
            key=lambda d: (
                d.binding == "local",
                d.table != "dynsym",
                not d.default,
                len(d.name) - len(d.name.lstrip("_")),
                d.name,
            )
        )
        if found:
            return _symbol(obj, found[0], address)
        return Symbol(hex_name, address, 0, obj.path, obj.elf.build_id, None)
    return Symbol(hex_name, address, 0, mapping.path, None, None)


def _symbol(obj: _Object, d: _Def, address: int, resolver: int | None = None) -> Symbol:
    return Symbol(
        name=d.name,
        address=address,
        size=d.size,
        path=obj.path,
        build_id=obj.elf.build_id,
        table=d.table,
        binding=d.binding,
        version=d.version,
        ifunc_resolver=resolver,
    )


def _wanted(d: _Def, spec: NameSpec) -> bool:
    if spec.version is None:
        return d.default
    return d.version == spec.version and (d.default or not spec.default_only)


def _resolve_name(
    pid: int, procfs: Path, maps: Sequence[Mapping], spec: NameSpec, stack: contextlib.ExitStack
) -> Symbol:
    notes: list[str] = []
    loaded = _loaded_objects(pid, procfs, maps, stack, notes=notes)
    objects = loaded
    if spec.lib is not None:
        lib = spec.lib
        objects = [o for o in loaded if o.matches(lib)]
        if not objects:
            raise UnknownLibrary(pid, str(spec), lib, [o.path for o in loaded])
    found = [
        (obj, d)
        for obj in objects
        for d in obj.tables(notes).functions.get(spec.name, ())
        if _wanted(d, spec)
    ]
    # Local (static) functions count only where no file has a global or weak one.
    found = [(o, d) for o, d in found if d.binding != "local"] or found
    unique: dict[tuple[int, int], tuple[_Object, _Def]] = {}
    for obj, d in found:
        unique.setdefault((id(obj), d.value), (obj, d))
    if not unique:
        raise UnknownSymbol(
            pid, str(spec), [o.path for o in objects], _hints(spec, objects) + notes
        )
    if len(unique) > 1:
        raise AmbiguousSymbol(
            pid, str(spec), [_symbol(o, d, o.bias + d.value) for o, d in unique.values()]
        )
    obj, d = next(iter(unique.values()))
    address = obj.bias + d.value
    if not obj.holds(address):
        what = f"{spec} (st_value {d.value:#x} + load bias {obj.bias:#x} in {obj.path})"
        raise NotExecutable(pid, address, what, find(maps, address))
    if d.ifunc:
        return _symbol(obj, d, _ifunc_target(pid, procfs, obj, d, loaded), address)
    return _symbol(obj, d, address)


def _hints(spec: NameSpec, objects: Sequence[_Object]) -> list[str]:
    """Why a name was not found, where something close was."""
    hints = []
    for obj in objects:
        tables = obj.tables([])
        versions = sorted(
            {
                d.name + ("@@" if d.default else "@") + d.version
                for d in tables.functions.get(spec.name, ())
                if d.version is not None
            }
        )
        if versions:
            hints.append(f"{obj.name} has {', '.join(versions)}")
        elif spec.name in tables.others:
            hints.append(f"{obj.name} has {spec.name} as {tables.others[spec.name]}, no function")
    return hints


def _ifunc_target(
    pid: int, procfs: Path, owner: _Object, d: _Def, objects: Sequence[_Object]
) -> int:
    """The implementation an IFUNC's resolver chose, as ld.so stored it in a GOT slot:
    an IRELATIVE slot of the defining file whose addend is the resolver, or a symbol slot
    (GLOB_DAT, JUMP_SLOT, 64) of any file that names this symbol and version. A slot counts
    only if it points into the defining file's code (not the resolver itself, not a PLT stub
    of a lazy JUMP_SLOT not yet bound, not an interposed definition elsewhere)."""
    resolver = owner.bias + d.value
    if owner.elf.machine != "EM_X86_64":
        raise IfuncUnresolved(
            pid,
            d.name,
            owner.path,
            resolver,
            f"GOT slots are read on x86_64 only, not {owner.elf.machine}",
        )
    notes: list[str] = []
    mem_path = procfs / str(pid) / "mem"
    try:
        mem = os.open(mem_path, os.O_RDONLY)
    except OSError as exc:
        raise IfuncUnresolved(
            pid, d.name, owner.path, resolver, f"its GOT cannot be read: {exc}"
        ) from exc
    try:
        # IRELATIVE slots of the defining file first; slots by name (in every file, so
        # more relocations to parse) only if those say nothing.
        slots = [(owner, v) for v in owner.got(notes).irelative.get(d.value, ())]
        values = _slot_values(mem, slots, owner, resolver, notes)
        if not values:
            slots += [
                (obj, vaddr)
                for obj in objects
                for vaddr, version in obj.got(notes).by_name.get(d.name, ())
                if version == d.version or (version is None and d.default)
            ]
            values = _slot_values(mem, slots, owner, resolver, notes)
    finally:
        os.close(mem)
    also = "".join(f"; {note}" for note in notes)
    if not slots:
        raise IfuncUnresolved(
            pid, d.name, owner.path, resolver, "no GOT slot in the process refers to it" + also
        )
    if not values:
        raise IfuncUnresolved(
            pid,
            d.name,
            owner.path,
            resolver,
            f"none of the {len(slots)} GOT slots that refer to it holds an implementation "
            "(a lazy PLT slot not bound yet?)" + also,
        )
    if len(values) > 1:
        listed = ", ".join(f"{v:#x}" for v in sorted(values))
        raise IfuncUnresolved(
            pid, d.name, owner.path, resolver, f"its GOT slots disagree: {listed}"
        )
    return values.pop()


def _slot_values(
    mem: int,
    slots: Sequence[tuple[_Object, int]],
    owner: _Object,
    resolver: int,
    notes: list[str],
) -> set[int]:
    """The addresses the GOT ``slots`` (file, vaddr) hold that can be ``owner``'s chosen
    implementation: in its code, not the resolver, not a PLT stub (a lazy slot not bound)."""
    values: set[int] = set()
    for obj, vaddr in slots:
        try:
            data = os.pread(mem, 8, obj.bias + vaddr)
        except OSError as exc:
            notes.append(f"reading the GOT slot at {obj.bias + vaddr:#x} failed: {exc}")
            continue
        if len(data) != 8:
            continue
        value = int.from_bytes(data, "little")
        unbound = obj.got(notes).in_plt(value - obj.bias)
        if value != resolver and owner.holds(value) and not unbound:
            values.add(value)
    return values
