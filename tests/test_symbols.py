"""FUNCTION -> address in a live process (applier/symbols.py), checked against the addresses
the process itself prints (``&fn``, dlsym, dlvsym) and against binutils' readelf."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from applier import symbols
from applier.errors import ApplierError
from applier.symbols import (
    AddressSpec,
    AmbiguousSymbol,
    IfuncUnresolved,
    NameSpec,
    NotExecutable,
    ProcessNotFound,
    Symbol,
    SymbolError,
    SymbolSpecError,
    TargetUnavailable,
    UnknownLibrary,
    UnknownSymbol,
    parse_spec,
    resolve,
)
from injector.maps import read_maps
from tests.procs import BUILD, TARGETS, Target, build_c, spawn

pytestmark = pytest.mark.live

# The version script of tests/targets/sym_lib.c (sym_versioned@VERS_1 and @@VERS_2).
VERSION_SCRIPT = """\
VERS_1 {
    global: sym_shared_name; sym_versioned; sym_lib_only; sym_mixed; sym_lib_bound_ifunc;
            sym_lib_unbound_ifunc; sym_lib_bound_address; sym_lib_resolvers;
            sym_lib_lazy_ifunc; sym_lib_call_lazy;
    local: *;
};
VERS_2 {
    global: sym_versioned;
} VERS_1;
"""
SONAME = "libsymtest.so.1"

VARIANTS = {
    "pie": (),
    "nopie": ("-no-pie",),
    "stripped": ("-s", "-rdynamic"),  # .symtab gone; -rdynamic puts the functions in .dynsym
}


def build_lib(*extra: str) -> Path:
    """tests/targets/sym_lib.c as a shared library with soname libsymtest.so.1."""
    # The script's path holds its hash, so build_c's cache key changes with its text.
    script = BUILD / f"sym_lib-{hashlib.sha256(VERSION_SCRIPT.encode()).hexdigest()[:16]}.map"
    BUILD.mkdir(parents=True, exist_ok=True)
    if not script.exists():
        tmp = script.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(VERSION_SCRIPT)
        tmp.rename(script)
    return build_c(
        "sym_lib.c",
        "-shared",
        "-fPIC",
        *extra,
        f"-Wl,-soname,{SONAME}",
        f"-Wl,--version-script={script}",
    )


@pytest.fixture(scope="module")
def lib() -> Path:
    """The library, loaded wherever ld.so likes (lowest p_vaddr 0)."""
    return build_lib()


LINKED_AT = 0x40000000  # where the "based" library asks to be loaded


@pytest.fixture(scope="module")
def based_lib() -> Path:
    """The library linked to load at LINKED_AT: its lowest PT_LOAD p_vaddr is not 0."""
    return build_lib(f"-Wl,-Ttext-segment={LINKED_AT:#x}")


def exe(variant: str) -> Path:
    return build_c("sym_target.c", *VARIANTS[variant])


def addresses(target: Target) -> dict[str, int]:
    """The target's ``addr WHAT ADDRESS`` lines up to ``ready``."""
    result: dict[str, int] = {}
    while True:
        words = target.readline().split()
        if words == ["ready"]:
            return result
        assert words[0] == "addr", words
        assert words[2] != "(nil)", f"the target found no {words[1]}"
        result[words[1]] = int(words[2], 16)


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def running(lib: Path) -> Iterator[tuple[Target, dict[str, int]]]:
    """A PIE sym_target with sym_lib loaded, and the addresses it printed."""
    with spawn(exe("pie"), str(lib)) as target:
        yield target, addresses(target)


def readelf(*args: str) -> str:
    return subprocess.run(
        ["readelf", "-W", *args], check=True, capture_output=True, text=True
    ).stdout


def readelf_symbol(path: Path, name: str) -> tuple[int, int]:
    """(st_value, st_size) of the function ``name`` as readelf lists it."""
    for line in readelf("--syms", "--dyn-syms", str(path)).splitlines():
        words = line.split()
        if len(words) >= 8 and words[7].split("@")[0] == name and words[3] in ("FUNC", "IFUNC"):
            return int(words[1], 16), int(words[2], 0)
    raise AssertionError(f"readelf lists no {name} in {path}")


def readelf_build_id(path: Path | str) -> str:
    match = re.search(r"Build ID: ([0-9a-f]+)", readelf("-n", str(path)))
    assert match is not None
    return match.group(1)


def libc_path(pid: int) -> str:
    paths = {m.path for m in read_maps(pid) if m.path and m.path.endswith("/libc.so.6")}
    assert len(paths) == 1
    return paths.pop()


# --- the FUNCTION syntax ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x401000", AddressSpec(0x401000)),
        ("0XdeadBEEF", AddressSpec(0xDEADBEEF)),
        ("getpid", NameSpec("getpid")),
        ("libc:getpid", NameSpec("getpid", lib="libc")),
        ("getpid@GLIBC_2.2.5", NameSpec("getpid", version="GLIBC_2.2.5")),
        ("getpid@@GLIBC_2.2.5", NameSpec("getpid", version="GLIBC_2.2.5", default_only=True)),
        ("libc.so.6:memcpy@@GLIBC_2.14", NameSpec("memcpy", "libc.so.6", "GLIBC_2.14", True)),
        # the last ':' ends LIB: a library path may hold one
        ("/opt/a:b/libx.so:f", NameSpec("f", lib="/opt/a:b/libx.so")),
        ("_ZN3foo3barEv", NameSpec("_ZN3foo3barEv")),
        ("foo.cold", NameSpec("foo.cold")),
    ],
)
def test_parse_spec_accepts(text: str, expected: AddressSpec | NameSpec) -> None:
    """Addresses, names, LIB: prefixes and @/@@ versions parse to their parts and back."""
    parsed = parse_spec(text)
    assert parsed == expected
    if isinstance(parsed, NameSpec):
        assert str(parsed) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "no symbol name"),
        ("0x", "0x followed by hex digits"),
        ("0x12g4", "0x followed by hex digits"),
        ("0x 12", "0x followed by hex digits"),
        ("4096", "addresses start with 0x"),
        (":getpid", "nothing before ':'"),
        ("libc:", "no symbol name"),
        ("getpid@", "no version after '@'"),
        ("getpid@@", "no version after '@'"),
        ("get pid", "no symbol name"),
        ("@GLIBC_2.2.5", "no symbol name"),
    ],
)
def test_parse_spec_rejects(text: str, reason: str) -> None:
    """A FUNCTION that is neither form is a usage error saying what is wrong."""
    with pytest.raises(SymbolSpecError, match=re.escape(reason)) as info:
        parse_spec(text)
    assert info.value.spec == text
    assert info.value.exit_code == 2


# --- names in the executable -----------------------------------------------------------------


def test_executable_functions_have_the_printed_addresses(lib: Path, variant: str) -> None:
    """PIE, -no-pie and stripped executables: the addresses the program prints for its own
    functions, the size readelf lists, the file's build id, and the table it came from."""
    binary = exe(variant)
    with spawn(binary, str(lib)) as target:
        printed = addresses(target)
        for name in ("sym_alpha", "sym_beta"):
            sym = resolve(target.pid, name)
            assert sym.address == printed[name]
            assert sym.name == name
            assert sym.path == str(binary)
            assert sym.size == readelf_symbol(binary, name)[1]
            assert sym.build_id == readelf_build_id(binary)
            assert sym.table == ("dynsym" if variant == "stripped" else "symtab")
            assert sym.binding == "global"
            assert sym.ifunc_resolver is None
        # the program's .dynsym lists read as undefined: that entry is no definition
        read = resolve(target.pid, "read")
        assert (read.address, read.path) == (printed["read"], libc_path(target.pid))


def test_non_pie_executable_has_no_load_bias(lib: Path) -> None:
    """An ET_EXEC file runs at its link addresses: the address is st_value itself."""
    binary = exe("nopie")
    assert "EXEC (Executable file)" in readelf("-h", str(binary))
    with spawn(binary, str(lib)) as target:
        addresses(target)
        assert resolve(target.pid, "sym_alpha").address == readelf_symbol(binary, "sym_alpha")[0]


def test_pie_executable_is_biased(lib: Path) -> None:
    """A PIE's address is st_value plus where the kernel put the file's first page."""
    binary = exe("pie")
    with spawn(binary, str(lib)) as target:
        printed = addresses(target)
        first = min(m.start for m in read_maps(target.pid) if m.path == str(binary))
        value = readelf_symbol(binary, "sym_alpha")[0]
        assert first != 0
        assert resolve(target.pid, "sym_alpha").address == first + value == printed["sym_alpha"]


def test_library_linked_at_a_base_address(based_lib: Path) -> None:
    """A library whose first segment is linked at LINKED_AT but loaded elsewhere: the bias
    is its first mapping minus that p_vaddr, not the mapping's start."""
    program = readelf("-l", str(based_lib))
    assert re.search(rf"LOAD\s+0x0+ 0x0*{LINKED_AT:x} ", program), program
    with spawn(exe("pie"), str(based_lib), f"block={LINKED_AT:x}") as target:
        printed = addresses(target)
        first = min(m.start for m in read_maps(target.pid) if m.path == str(based_lib))
        assert first != LINKED_AT  # the target reserved that address first
        for name in ("sym_lib_only", "sym_versioned"):
            assert (
                resolve(target.pid, f"libsymtest:{name}").address
                == printed[f"lib:{name}" if name == "sym_lib_only" else "lib:sym_versioned@VERS_2"]
            )
        value = readelf_symbol(based_lib, "sym_lib_only")[0]
        assert printed["lib:sym_lib_only"] == value - LINKED_AT + first


def test_static_function_is_found_in_symtab_only(lib: Path, variant: str) -> None:
    """A static function is a local .symtab entry: found unless the file is stripped."""
    with spawn(exe(variant), str(lib)) as target:
        printed = addresses(target)
        if variant == "stripped":
            with pytest.raises(UnknownSymbol):
                resolve(target.pid, "sym_static_helper")
        else:
            sym = resolve(target.pid, "sym_static_helper")
            assert (sym.address, sym.binding, sym.table) == (
                printed["sym_static_helper"],
                "local",
                "symtab",
            )


# --- libraries, lib:, versions ---------------------------------------------------------------


def test_libc_function_matches_dlsym(running: tuple[Target, dict[str, int]]) -> None:
    """getpid, under every spelling of libc and of its version, is where dlsym finds it."""
    target, printed = running
    for spec in (
        "getpid",
        "libc:getpid",
        "libc.so:getpid",
        "libc.so.6:getpid",
        f"{libc_path(target.pid)}:getpid",
        "getpid@GLIBC_2.2.5",
        "getpid@@GLIBC_2.2.5",
    ):
        sym = resolve(target.pid, spec)
        assert sym.address == printed["getpid"], spec
        assert sym.version == "GLIBC_2.2.5"
        assert sym.table == "dynsym"
    sym = resolve(target.pid, "getpid")
    assert sym.path == libc_path(target.pid)
    assert sym.build_id == readelf_build_id(sym.path)


def test_plain_name_is_the_default_version(running: tuple[Target, dict[str, int]]) -> None:
    """pthread_cond_wait is @@GLIBC_2.3.2 unless @GLIBC_2.2.5 is asked for (as dlvsym)."""
    target, printed = running
    default = resolve(target.pid, "pthread_cond_wait")
    assert (default.address, default.version) == (printed["pthread_cond_wait"], "GLIBC_2.3.2")
    old = resolve(target.pid, "pthread_cond_wait@GLIBC_2.2.5")
    assert old.address == printed["pthread_cond_wait@GLIBC_2.2.5"] != default.address
    with pytest.raises(UnknownSymbol, match=r"pthread_cond_wait@@GLIBC_2\.3\.2"):
        resolve(target.pid, "pthread_cond_wait@@GLIBC_2.2.5")


def test_library_versions(running: tuple[Target, dict[str, int]]) -> None:
    """A library's own versioned symbol: plain and @@ give the default, @ picks either."""
    target, printed = running
    v2 = printed["lib:sym_versioned@VERS_2"]
    v1 = printed["lib:sym_versioned@VERS_1"]
    assert resolve(target.pid, "sym_versioned").address == v2
    assert resolve(target.pid, "sym_versioned@@VERS_2").address == v2
    assert resolve(target.pid, "sym_versioned@VERS_2").address == v2
    old = resolve(target.pid, "sym_versioned@VERS_1")
    assert (old.address, old.version, old.table) == (v1, "VERS_1", "dynsym")
    with pytest.raises(UnknownSymbol, match="sym_versioned@VERS_1"):
        resolve(target.pid, "sym_versioned@@VERS_1")


def test_same_name_in_executable_and_library_is_ambiguous(
    lib: Path, running: tuple[Target, dict[str, int]]
) -> None:
    """sym_shared_name is global in both files: an error naming both, until lib: picks one."""
    target, printed = running
    binary = exe("pie")
    with pytest.raises(AmbiguousSymbol) as info:
        resolve(target.pid, "sym_shared_name")
    err = info.value
    assert err.exit_code == 2
    assert {c.address for c in err.candidates} == {
        printed["sym_shared_name"],
        printed["lib:sym_shared_name"],
    }
    assert {c.path for c in err.candidates} == {str(binary), str(lib)}
    assert binary.name in str(err)
    assert lib.name in str(err)
    assert "LIB:NAME" in str(err)
    for spec in ("libsymtest", "libsymtest.so", SONAME, lib.name, str(lib)):
        sym = resolve(target.pid, f"{spec}:sym_shared_name")
        assert sym.address == printed["lib:sym_shared_name"], spec
        assert sym.path == str(lib)
    assert (
        resolve(target.pid, f"{binary.name}:sym_shared_name").address
        == (printed["sym_shared_name"])
    )


def test_global_definition_wins_over_static_one(running: tuple[Target, dict[str, int]]) -> None:
    """sym_mixed is static in the executable and global in the library: the global one,
    unless the executable is named, where the static one is all there is."""
    target, printed = running
    sym = resolve(target.pid, "sym_mixed")
    assert (sym.address, sym.binding) == (printed["lib:sym_mixed"], "global")
    own = resolve(target.pid, f"{exe('pie').name}:sym_mixed")
    assert (own.address, own.binding) == (printed["sym_mixed"], "local")


def test_static_functions_in_two_files_are_ambiguous(
    running: tuple[Target, dict[str, int]],
) -> None:
    """sym_static_twice is static in both files: no global one to prefer, so an error."""
    target, printed = running
    with pytest.raises(AmbiguousSymbol) as info:
        resolve(target.pid, "sym_static_twice")
    assert all(c.binding == "local" for c in info.value.candidates)
    assert printed["sym_static_twice"] in {c.address for c in info.value.candidates}


# --- IFUNCs ----------------------------------------------------------------------------------


def test_executable_ifunc_resolves_to_the_chosen_implementation(lib: Path, variant: str) -> None:
    """An IFUNC of the executable: the implementation from its IRELATIVE GOT slot."""
    with spawn(exe(variant), str(lib)) as target:
        printed = addresses(target)
        sym = resolve(target.pid, "sym_ifunc")
        assert sym.address == printed["sym_ifunc_impl"]
        assert sym.ifunc_resolver == printed["sym_ifunc_resolver"]


def test_libc_ifunc_matches_dlsym(running: tuple[Target, dict[str, int]]) -> None:
    """strlen is an IFUNC in libc: the implementation dlsym returns, not the resolver."""
    target, printed = running
    sym = resolve(target.pid, "strlen")
    assert sym.address == printed["strlen"]
    assert sym.ifunc_resolver is not None
    assert sym.ifunc_resolver != sym.address


def test_library_ifunc_through_glob_dat(running: tuple[Target, dict[str, int]]) -> None:
    """An exported IFUNC whose address the library takes: read from its GLOB_DAT slot."""
    target, printed = running
    sym = resolve(target.pid, "sym_lib_bound_ifunc")
    assert sym.address == printed["lib:sym_lib_bound_ifunc"]
    assert sym.ifunc_resolver == printed["lib:bound_resolver"]


def test_unreferenced_ifunc_is_refused(running: tuple[Target, dict[str, int]]) -> None:
    """An IFUNC no GOT slot refers to: refused, naming the resolver's address."""
    target, printed = running
    with pytest.raises(IfuncUnresolved) as info:
        resolve(target.pid, "sym_lib_unbound_ifunc")
    assert info.value.resolver == printed["lib:unbound_resolver"]
    assert f"{printed['lib:unbound_resolver']:#x}" in str(info.value)
    assert "IFUNC" in str(info.value)
    assert info.value.exit_code == 2


def test_lazy_plt_slot_counts_once_bound(lib: Path) -> None:
    """With RTLD_LAZY the library's JUMP_SLOT for its own IFUNC points into its PLT: that is
    no implementation, so refused; after the first call through it, the slot answers."""
    with spawn(exe("pie"), str(lib), "lazy") as target:
        printed = addresses(target)
        with pytest.raises(IfuncUnresolved, match="lazy PLT slot not bound yet"):
            resolve(target.pid, "sym_lib_lazy_ifunc")
        target.send("call")
        assert target.expect("called") == ["52"]
        sym = resolve(target.pid, "sym_lib_lazy_ifunc")
        assert sym.address == printed["lib:sym_lib_lazy_ifunc"]
        assert sym.ifunc_resolver == printed["lib:lazy_resolver"]


# --- addresses -------------------------------------------------------------------------------


def test_address_spec_names_the_function_it_starts(
    running: tuple[Target, dict[str, int]],
) -> None:
    """0xADDR at a function's start carries that function's name; inside one, just the
    address (and still the file and its build id)."""
    target, printed = running
    start = resolve(target.pid, f"{printed['sym_alpha']:#x}")
    assert (start.name, start.address, start.table) == ("sym_alpha", printed["sym_alpha"], "symtab")
    getpid = resolve(target.pid, f"{printed['getpid']:#x}")
    assert (getpid.name, getpid.table) == ("getpid", "dynsym")
    inside = resolve(target.pid, f"{printed['sym_alpha'] + 1:#x}")
    assert inside == Symbol(
        name=f"{printed['sym_alpha'] + 1:#x}",
        address=printed["sym_alpha"] + 1,
        size=0,
        path=str(exe("pie")),
        build_id=readelf_build_id(exe("pie")),
        table=None,
    )


def test_address_in_vdso_is_accepted(running: tuple[Target, dict[str, int]]) -> None:
    """Executable memory that is no file (the vDSO) is a valid address with no symbol."""
    target, _ = running
    vdso = [m for m in read_maps(target.pid) if m.path == "[vdso]"]
    assert vdso and vdso[0].executable
    sym = resolve(target.pid, f"{vdso[0].start:#x}")
    assert (sym.path, sym.table, sym.build_id) == ("[vdso]", None, None)


def test_address_not_executable(running: tuple[Target, dict[str, int]]) -> None:
    """An address in data memory, or where nothing is mapped, is refused with where it is."""
    target, _ = running
    stack = next(m for m in read_maps(target.pid) if m.path == "[stack]")
    with pytest.raises(NotExecutable, match=r"rw-p \[stack\]") as info:
        resolve(target.pid, f"{stack.start + 8:#x}")
    assert info.value.mapping == stack
    with pytest.raises(NotExecutable, match="nothing is mapped there"):
        resolve(target.pid, "0x10")


# --- errors ----------------------------------------------------------------------------------


def test_unknown_name_says_where_it_looked(running: tuple[Target, dict[str, int]]) -> None:
    """The error lists every file searched: executable, libc, the library, ld.so."""
    target, _ = running
    with pytest.raises(UnknownSymbol) as info:
        resolve(target.pid, "no_such_function_anywhere")
    err = info.value
    assert err.exit_code == 2
    assert isinstance(err, LookupError)
    assert str(exe("pie")) in err.searched
    assert libc_path(target.pid) in err.searched
    assert any("ld-linux" in p for p in err.searched)
    assert "libc.so.6" in str(err)
    assert f"in {len(err.searched)} files" in str(err)


def test_data_symbol_is_not_a_function(running: tuple[Target, dict[str, int]]) -> None:
    """A name that is an object (libc's environ) is reported as such, not just missing."""
    target, _ = running
    with pytest.raises(UnknownSymbol, match=r"libc\.so\.6 has environ as STT_OBJECT"):
        resolve(target.pid, "environ")


def test_unknown_library(running: tuple[Target, dict[str, int]]) -> None:
    """A LIB: that matches no loaded file lists the loaded ones; 'lib' is no prefix match."""
    target, _ = running
    for lib in ("libnosuch", "lib", "libc.so.6.1"):
        with pytest.raises(UnknownLibrary, match=r"loaded: .*libc\.so\.6") as info:
            resolve(target.pid, f"{lib}:getpid")
        assert info.value.lib == lib


def test_no_such_process() -> None:
    """A pid that cannot exist (pid_max itself) is a target error, exit code 5."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(ProcessNotFound, match=f"pid {pid}: no such process") as info:
        resolve(pid, "getpid")
    assert isinstance(info.value, ProcessLookupError)
    assert isinstance(info.value, TargetUnavailable)
    assert isinstance(info.value.__cause__, FileNotFoundError)
    assert info.value.exit_code == 5


def test_error_roots() -> None:
    """Every error is an ApplierError; the usage ones exit 2, the target ones 5."""
    assert issubclass(SymbolError, ApplierError)
    for cls in (SymbolSpecError, UnknownSymbol, UnknownLibrary, AmbiguousSymbol, NotExecutable):
        assert issubclass(cls, SymbolError)
        assert cls.exit_code == 2
    assert TargetUnavailable.exit_code == ProcessNotFound.exit_code == 5


# --- files: deleted, given maps, the cache ---------------------------------------------------


def test_deleted_library_is_read_through_map_files(lib: Path, tmp_path: Path) -> None:
    """A library unlinked after it was loaded is opened via /proc/PID/map_files."""
    copy = tmp_path / "libsymdeleted.so"
    shutil.copyfile(lib, copy)
    with spawn(exe("pie"), str(copy)) as target:
        printed = addresses(target)
        copy.unlink()
        assert any(m.deleted and m.path == str(copy) for m in read_maps(target.pid))
        sym = resolve(target.pid, "libsymdeleted:sym_lib_only")
        assert sym.address == printed["lib:sym_lib_only"]
        assert sym.path == str(copy)
        assert sym.build_id == readelf_build_id(lib)
        assert (
            resolve(target.pid, "sym_lib_bound_ifunc").address
            == (printed["lib:sym_lib_bound_ifunc"])
        )


def test_path_naming_another_file_is_not_trusted(lib: Path, tmp_path: Path) -> None:
    """In the target's own mount namespace its library path is a bind mount of the real
    library; here the same path is another build of it (other offsets, other build id).
    The path's inode differs from the mapped one, so the file is read via map_files."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    shown = tmp_path / "libsymshown.so"
    shutil.copyfile(build_lib("-O0"), shown)  # what this namespace sees at that path
    assert readelf_build_id(shown) != readelf_build_id(lib)
    assert readelf_symbol(shown, "sym_lib_only") != readelf_symbol(lib, "sym_lib_only")
    script = 'mount --bind "$1" "$2" && exec "$3" "$2"'
    with spawn(
        Path(shutil.which("unshare") or "unshare"),
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "sh",
        str(lib),
        str(shown),
        str(exe("pie")),
    ) as target:
        printed = addresses(target)
        sym = resolve(target.pid, "libsymtest:sym_lib_only")
        assert sym.address == printed["lib:sym_lib_only"]
        assert sym.path == str(shown)
        assert sym.build_id == readelf_build_id(lib)


def test_symtab_version_suffixes_are_split(tmp_path: Path) -> None:
    """.symtab names written as name@VER / name@@VER (a relocatable object from .symver)
    are the name plus a hidden or default version."""
    obj = tmp_path / "sym_lib.o"
    subprocess.run(
        ["gcc", "-O1", "-c", "-fPIC", "-o", str(obj), str(TARGETS / "sym_lib.c")], check=True
    )
    with obj.open("rb") as f:
        tables = symbols._parse_tables(ELFFile(f))
    versions = {(d.version, d.default, d.table) for d in tables.functions["sym_versioned"]}
    assert versions == {("VERS_1", False, "symtab"), ("VERS_2", True, "symtab")}
    assert "sym_versioned@VERS_1" not in tables.functions


def test_maps_given_by_the_caller(running: tuple[Target, dict[str, int]]) -> None:
    """With maps passed in, they are used instead of a fresh read."""
    target, printed = running
    maps = read_maps(target.pid)
    assert resolve(target.pid, "getpid", maps=maps).address == printed["getpid"]
    no_libc = [m for m in maps if not (m.path or "").endswith("libc.so.6")]
    with pytest.raises(UnknownSymbol):
        resolve(target.pid, "getpid", maps=no_libc)


def test_cache_reuses_parsed_files(running: tuple[Target, dict[str, int]]) -> None:
    """A second lookup parses nothing: every file comes from the cache."""
    target, printed = running
    symbols.clear_cache()
    assert resolve(target.pid, "getpid").address == printed["getpid"]
    first = symbols.cache_info()
    files = len({(m.dev, m.inode) for m in read_maps(target.pid) if m.is_file and m.executable})
    assert (first.hits, first.misses, first.size) == (0, files, files)
    assert resolve(target.pid, "getpid").address == printed["getpid"]
    second = symbols.cache_info()
    assert (second.hits, second.misses) == (files, files)


def test_cache_notices_a_changed_file(lib: Path, tmp_path: Path) -> None:
    """A new mtime is a new key; same stat but other build id bytes is caught too."""
    copy = tmp_path / "libsymcache.so"
    shutil.copyfile(lib, copy)
    with spawn(exe("pie"), str(copy)) as target:
        addresses(target)
        before = resolve(target.pid, "libsymcache:sym_lib_only")
        misses = symbols.cache_info().misses
        resolve(target.pid, "libsymcache:sym_lib_only")
        assert symbols.cache_info().misses == misses

        stat = copy.stat()
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        resolve(target.pid, "libsymcache:sym_lib_only")
        assert symbols.cache_info().misses == misses + 1

        # Flip the build id's first byte in place and put the mtime back: stat is unchanged.
        data = copy.read_bytes()
        old_id = bytes.fromhex(readelf_build_id(copy))
        at = data.index(old_id)
        stat = copy.stat()
        with copy.open("r+b") as f:
            f.seek(at)
            f.write(bytes([old_id[0] ^ 0xFF]))
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        after = resolve(target.pid, "libsymcache:sym_lib_only")
        assert symbols.cache_info().misses == misses + 2
        assert before.build_id == old_id.hex()
        assert after.build_id == readelf_build_id(copy) != before.build_id
        assert after.address == before.address
