/* Shared library for tests/test_symbols.py, dlopen()ed by sym_target.c.
 *
 * Built with -shared -fPIC, a soname (libsymtest.so.1) and the version script that
 * tests/test_symbols.py writes (VERS_1, VERS_2). It defines names the executable defines too
 * (sym_shared_name global in both, sym_mixed global here and static there, sym_static_twice
 * static in both), a symbol with two versions, and two IFUNCs: sym_lib_bound_ifunc, whose
 * address this library takes (so ld.so fills a GLOB_DAT slot with the chosen implementation),
 * sym_lib_unbound_ifunc, which nothing references (no slot knows its implementation), and
 * sym_lib_lazy_ifunc, called by sym_lib_call_lazy() through the PLT: with RTLD_LAZY its
 * JUMP_SLOT points back into the PLT until that first call.
 */
#define EXPORT __attribute__((visibility("default"), noinline))
#define STATIC static __attribute__((noinline, used))

EXPORT int sym_shared_name(int x) { return x + 2; }
EXPORT int sym_lib_only(int x) { return x * 3; }
EXPORT int sym_mixed(int x) { return x + 4; }
STATIC int sym_static_twice(int x) { return x + 5; }

EXPORT int sym_versioned_1(int x) { return x + 10; }
EXPORT int sym_versioned_2(int x) { return x + 20; }
__asm__(".symver sym_versioned_1, sym_versioned@VERS_1");
__asm__(".symver sym_versioned_2, sym_versioned@@VERS_2");

STATIC int bound_impl(int x) { return x + 30; }
STATIC void *bound_resolver(void) { return (void *)bound_impl; }
EXPORT int sym_lib_bound_ifunc(int x) __attribute__((ifunc("bound_resolver")));

STATIC int unbound_impl(int x) { return x + 40; }
STATIC void *unbound_resolver(void) { return (void *)unbound_impl; }
EXPORT int sym_lib_unbound_ifunc(int x) __attribute__((ifunc("unbound_resolver")));

STATIC int lazy_impl(int x) { return x + 50; }
STATIC void *lazy_resolver(void) { return (void *)lazy_impl; }
EXPORT int sym_lib_lazy_ifunc(int x) __attribute__((ifunc("lazy_resolver")));
EXPORT int sym_lib_call_lazy(int x) { return sym_lib_lazy_ifunc(x) + 1; }

/* The address of sym_lib_bound_ifunc as this library sees it: through its GOT. */
EXPORT void *sym_lib_bound_address(void) { return (void *)sym_lib_bound_ifunc; }

EXPORT void *sym_lib_resolvers(int which) {
    void *resolvers[] = {(void *)bound_resolver, (void *)unbound_resolver, (void *)lazy_resolver};
    return resolvers[which];
}
