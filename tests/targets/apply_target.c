// Target for apply tests. Line commands on stdin, answers on stdout:
//   info      -> "info <globals> <heap> <anon> <ro> <gone> <stackvar>" (hex addresses)
//   scribble  -> changes heap, stack, globals, a read-only page, maps new memory, unmaps
//                old memory, grows the heap (brk + malloc), changes protections; "done"
//   sum       -> "sum <checksum of globals+heap+anon+ro+gone+stackvar>"
//   threads N -> starts N threads that sleep in nanosleep / block in read on a pipe; "threads"
//   touch     -> writes a few bytes of globals and heap (safe to repeat); "touched"
//   quit      -> exits
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>

static unsigned char globals[3 * 4096] __attribute__((aligned(4096)));
static unsigned char *heap, *anon, *ro, *gone, *fresh;
static volatile uint64_t *stackvar;
static int blockpipe[2];
static volatile int started;

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}

static void *sleeper(void *arg) {
    (void)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) { struct timespec ts = {1000, 0}; nanosleep(&ts, NULL); }
    return NULL;
}

static void *reader(void *arg) {
    (void)arg;
    char c;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) if (read(blockpipe[0], &c, 1) <= 0) pause();
    return NULL;
}

static void answer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void answer(const char *fmt, ...) {
    char buf[512];
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, (size_t)n) < 0) _exit(3);
}

int main(void) {
    volatile uint64_t local[512];
    long pg = sysconf(_SC_PAGESIZE);
    for (int i = 0; i < 512; i++) local[i] = 0x5700000000000000ULL + (uint64_t)i;
    stackvar = local;
    for (size_t i = 0; i < sizeof globals; i++) globals[i] = (unsigned char)('G' + i % 13);
    heap = malloc(64 * 1024);
    for (int i = 0; i < 64 * 1024; i++) heap[i] = (unsigned char)(i * 7);
    anon = mmap(NULL, 16 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int p = 0; p < 16; p += 2) memset(anon + p * pg, 0xA0 + p, pg);  // odd pages untouched
    ro = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(ro, 0xC3, pg);
    mprotect(ro, pg, PROT_READ);
    gone = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(gone, 0xD4, 4 * pg);
    if (pipe(blockpipe)) return 2;
    answer("ready %d\n", getpid());
    char line[128];
    size_t used = 0;
    for (;;) {
        ssize_t n = read(0, line + used, sizeof line - 1 - used);
        if (n <= 0) return 0;
        used += (size_t)n;
        char *nl;
        while ((nl = memchr(line, '\n', used)) != NULL) {
            *nl = 0;
            if (!strcmp(line, "info")) {
                answer("info %p %p %p %p %p %p\n", (void *)globals, (void *)heap, (void *)anon,
                       (void *)ro, (void *)gone, (void *)stackvar);
            } else if (!strcmp(line, "scribble")) {
                memset(globals + 100, 'X', 5000);
                memset(heap + 10, 0xEE, 30000);
                for (int p = 0; p < 16; p++) anon[p * pg + 5] = 0x11;  // also touches odd pages
                mprotect(ro, pg, PROT_READ | PROT_WRITE);
                memset(ro, 0x3C, 64);
                mprotect(ro, pg, PROT_READ);
                for (int i = 0; i < 512; i += 3) stackvar[i] = 0xdeadbeef;
                munmap(gone, 4 * pg);
                fresh = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                memset(fresh, 0xF5, 8 * pg);
                mprotect(anon + 4 * pg, 2 * pg, PROT_READ);
                void *grown = sbrk(256 * 1024);
                if (grown != (void *)-1) memset(grown, 0x77, 256 * 1024);
                unsigned char *big = malloc(1 << 20);
                if (big) memset(big, 0x66, 1 << 20);
                answer("done\n");
            } else if (!strcmp(line, "sum")) {
                uint64_t h = 1469598103934665603ULL;
                h = fnv(globals, sizeof globals, h);
                h = fnv(heap, 64 * 1024, h);
                h = fnv(anon, 16 * (size_t)pg, h);
                h = fnv(ro, (size_t)pg, h);
                h = fnv(gone, 4 * (size_t)pg, h);
                h = fnv((const unsigned char *)stackvar, 512 * 8, h);
                answer("sum %016llx\n", (unsigned long long)h);
            } else if (!strncmp(line, "threads ", 8)) {
                int k = atoi(line + 8), goal = started + k;
                for (int i = 0; i < k; i++) {
                    pthread_t t;
                    pthread_create(&t, NULL, i % 2 ? reader : sleeper, NULL);
                }
                while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < goal) usleep(100);
                answer("threads\n");
            } else if (!strcmp(line, "touch")) {
                globals[7] ^= 0x5a;
                heap[4096 * 3 + 9] ^= 0xa5;
                answer("touched\n");
            } else if (!strcmp(line, "quit")) {
                return 0;
            }
            used -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, used);
        }
    }
}
