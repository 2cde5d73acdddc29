/* Target for tests/test_symbols.py: prints the addresses of its own functions and of a few
 * libc and library functions, as the running program sees them, then idles in read().
 *
 * usage: sym_target [LIBRARY [OPTION...]]
 *   LIBRARY is dlopen()ed (tests/targets/sym_lib.c) with RTLD_NOW, or RTLD_LAZY with option
 *   "lazy"; option "block=HEX" first reserves 1 MiB there (PROT_NONE), so that a library
 *   linked to load at HEX cannot.
 * stdout lines: "addr <what> <address>" (%p), then "ready".
 * stdin: "call" calls sym_lib_call_lazy() (binding its PLT slot) and answers "called";
 * the program exits when stdin closes.
 * Built PIE (default), -no-pie, and -s -rdynamic (stripped: only .dynsym left).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default"), noinline))
#define STATIC static __attribute__((noinline, used))

EXPORT int sym_alpha(int x) { return x + 1; }
EXPORT int sym_beta(int x) { return x * 2 + sym_alpha(x); }
/* sym_lib.c defines these two as well */
EXPORT int sym_shared_name(int x) { return x - 1; }
STATIC int sym_mixed(int x) { return x - 2; }      /* global in sym_lib.c: that one wins */
STATIC int sym_static_twice(int x) { return x - 3; } /* static in sym_lib.c too: ambiguous */
STATIC int sym_static_helper(int x) { return x ^ 5; }

/* An IFUNC of the executable, called below: ld.so fills an IRELATIVE GOT slot for it. */
STATIC int sym_ifunc_impl(int x) { return x + 7; }
STATIC void *sym_ifunc_resolver(void) { return (void *)sym_ifunc_impl; }
EXPORT int sym_ifunc(int x) __attribute__((ifunc("sym_ifunc_resolver")));

static void show(const char *what, void *address) { printf("addr %s %p\n", what, address); }

int main(int argc, char **argv) {
    void *lib = NULL;
    int mode = RTLD_NOW;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "lazy") == 0) {
            mode = RTLD_LAZY;
        } else if (strncmp(argv[i], "block=", 6) == 0) {
            void *want = (void *)strtoul(argv[i] + 6, NULL, 16);
            if (mmap(want, 1 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                     -1, 0) != want) {
                printf("error cannot reserve %p\n", want);
                return 1;
            }
        }
    }
    if (argc > 1 && (lib = dlopen(argv[1], mode | RTLD_LOCAL)) == NULL) {
        printf("error %s\n", dlerror());
        return 1;
    }
    volatile int sink = sym_beta(1) + sym_shared_name(1) + sym_mixed(1) + sym_static_twice(1) +
                        sym_static_helper(1) + sym_ifunc(1);
    (void)sink;
    show("sym_alpha", (void *)sym_alpha);
    show("sym_beta", (void *)sym_beta);
    show("sym_shared_name", (void *)sym_shared_name);
    show("sym_mixed", (void *)sym_mixed);
    show("sym_static_twice", (void *)sym_static_twice);
    show("sym_static_helper", (void *)sym_static_helper);
    show("sym_ifunc_impl", (void *)sym_ifunc_impl);
    show("sym_ifunc_resolver", (void *)sym_ifunc_resolver);
    show("getpid", dlsym(RTLD_DEFAULT, "getpid"));
    show("read", dlsym(RTLD_DEFAULT, "read")); /* the program's own .dynsym has it undefined */
    show("strlen", dlsym(RTLD_DEFAULT, "strlen")); /* an IFUNC in libc: dlsym runs the resolver */
    show("pthread_cond_wait", dlsym(RTLD_DEFAULT, "pthread_cond_wait"));
    show("pthread_cond_wait@GLIBC_2.2.5", dlvsym(RTLD_DEFAULT, "pthread_cond_wait", "GLIBC_2.2.5"));
    if (lib != NULL) {
        void *(*resolvers)(int) = (void *(*)(int))dlsym(lib, "sym_lib_resolvers");
        show("lib:sym_shared_name", dlsym(lib, "sym_shared_name"));
        show("lib:sym_lib_only", dlsym(lib, "sym_lib_only"));
        show("lib:sym_mixed", dlsym(lib, "sym_mixed"));
        show("lib:sym_versioned@VERS_1", dlvsym(lib, "sym_versioned", "VERS_1"));
        show("lib:sym_versioned@VERS_2", dlvsym(lib, "sym_versioned", "VERS_2"));
        show("lib:sym_lib_bound_ifunc", dlsym(lib, "sym_lib_bound_ifunc"));
        show("lib:bound_resolver", resolvers(0));
        show("lib:unbound_resolver", resolvers(1));
        show("lib:sym_lib_lazy_ifunc", dlsym(lib, "sym_lib_lazy_ifunc"));
        show("lib:lazy_resolver", resolvers(2));
    }
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    ssize_t n;
    while ((n = read(0, buf, sizeof buf)) > 0) {
        if (lib != NULL && n >= 4 && memcmp(buf, "call", 4) == 0) {
            int (*call)(int) = (int (*)(int))dlsym(lib, "sym_lib_call_lazy");
            printf("called %d\n", call(1));
            fflush(stdout);
        }
    }
    return 0;
}
