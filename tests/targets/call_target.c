// Target for applier call tests. Functions to call (global symbols), and line commands on
// stdin, answers on stdout:
//   info      -> "info <area> <heapbuf> <ticks>" (hex addresses)
//   share     -> maps 2 pages of shared anonymous memory (0x5e); "share <address>"
//   get       -> "get <counter> <area page 3 as a string> <brk>"
//   sum       -> "sum <checksum of area + heapbuf>"
//   threads N -> starts N threads that keep incrementing ticks[i]; "threads"
//   ticks     -> "ticks <sum of ticks>"
//   nap       -> starts a thread that sleeps in nanosleep (1000 s at a time); "nap"
//   naps      -> "naps <how many of its sleeps were cut short>"
//   quit      -> exits
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <pthread.h>
#include <sys/mman.h>
#include <signal.h>
#include <time.h>
#include <fcntl.h>

#define PG 4096
unsigned char area[8 * PG] __attribute__((aligned(PG)));
volatile long ticks[64] __attribute__((aligned(PG)));
unsigned char *heapbuf;
unsigned char *shared;  // MAP_SHARED | MAP_ANONYMOUS, 2 pages
unsigned char *mapped;
void *grown;
static volatile int started;

long bump(long n) {  // one page of area written
    long *c = (long *)area;
    *c += n;
    return *c;
}

long add6(long a, long b, long c, long d, long e, long f) {
    return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}

long sp_mod16(void) {  // rsp at entry, modulo 16 (the ABI says 8: after a call pushed 8)
    long sp;
    __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
    return sp & 15;
}

long heap_write(long n) {  // one heap page and one area page written
    heapbuf[2 * PG + 5] = (unsigned char)n;
    area[1 * PG + 8] = (unsigned char)(n + 1);
    return n * 2;
}

long shared_write(long n) {  // one page of shared anonymous memory
    shared[PG + 7] = (unsigned char)n;
    return n;
}

long map_more(long pages) {  // a new mapping, filled
    unsigned char *p = mmap(NULL, (size_t)pages * PG, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return -1;
    memset(p, 0x5a, (size_t)pages * PG);
    mapped = p;
    return (long)p;
}

long grow_brk(long bytes) {  // the program break moves up, the new memory is written
    void *p = sbrk(bytes);
    if (p == (void *)-1) return -1;
    memset(p, 0x77, (size_t)bytes);
    grown = p;
    return (long)sbrk(0);
}

long greet(const char *s, long times) {  // the string lands in area page 3
    size_t n = strlen(s);
    unsigned char *out = area + 3 * PG;
    out[0] = 0;
    for (long i = 0; i < times && (i + 1) * n < PG - 1; i++) strcat((char *)out, s);
    return (long)(n * (size_t)times);
}

long open_file(const char *path) {  // a descriptor the call leaves open
    return open(path, O_RDONLY);
}

long crash(long addr) {  // writes area page 4, then a store to addr
    area[4 * PG] = 0xcc;
    *(volatile long *)addr = 1;
    return 0;
}

long do_abort(void) {
    area[4 * PG + 1] = 0xab;
    abort();
}

long spin(void) {  // never returns, keeps writing area page 5
    for (;;) area[5 * PG]++;
}

long still(long ms) {  // how far the other threads got while this call slept
    long a = 0, b = 0;
    for (int i = 0; i < 64; i++) a += ticks[i];
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    for (int i = 0; i < 64; i++) b += ticks[i];
    return b - a;
}

static volatile long handled;
static void on_usr1(int sig) { (void)sig; handled++; }

long with_signal(void) {  // a signal during the call: its handler runs, the call returns
    long was = handled;
    raise(SIGUSR1);
    return handled - was;
}

static volatile long naps, nappers;
static void *napper(void *arg) {  // sleeps in clock_nanosleep; counts the sleeps cut short
    (void)arg;
    __atomic_add_fetch(&nappers, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {1000, 0};
        if (nanosleep(&ts, NULL)) naps++;
    }
    return NULL;
}

static volatile long spawned_ran;
static void *spawned(void *arg) {  // a thread a call starts: counts that it ran, then sleeps
    (void)arg;
    __atomic_add_fetch(&spawned_ran, 1, __ATOMIC_SEQ_CST);
    for (;;) {
        struct timespec ts = {1000, 0};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

long spawn_thread(void) {  // starts a detached thread; 0 on success
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    long rc = pthread_create(&t, &attr, spawned, NULL);
    pthread_attr_destroy(&attr);
    return rc;
}

long spawned_count(void) { return spawned_ran; }

static void on_urg(int sig) { (void)sig; }

long block_usr2(void) {  // blocks SIGUSR2 in the calling thread, handles SIGURG
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    signal(SIGURG, on_urg);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}

static void *worker(void *arg) {
    long i = (long)arg;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;) ticks[i]++;
    return NULL;
}

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}

static void answer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void answer(const char *fmt, ...) {
    char buf[PG + 256];
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, (size_t)n) < 0) _exit(3);
}

int main(void) {
    for (size_t i = 0; i < sizeof area; i++) area[i] = (unsigned char)('a' + i % 26);
    area[3 * PG] = 0;
    signal(SIGUSR1, on_usr1);
    heapbuf = malloc(8 * PG);
    for (int i = 0; i < 8 * PG; i++) heapbuf[i] = (unsigned char)(i * 3);
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
                answer("info %p %p %p\n", (void *)area, (void *)heapbuf, (void *)ticks);
            } else if (!strcmp(line, "share")) {
                shared = mmap(NULL, 2 * PG, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                              -1, 0);
                memset(shared, 0x5e, 2 * PG);
                answer("share %p\n", (void *)shared);
            } else if (!strcmp(line, "get")) {
                answer("get %ld %s %p\n", *(long *)area, area[3 * PG] ? (char *)area + 3 * PG : "-",
                       sbrk(0));
            } else if (!strcmp(line, "sum")) {
                uint64_t h = 1469598103934665603ULL;
                h = fnv(area, sizeof area, h);
                h = fnv(heapbuf, 8 * PG, h);
                answer("sum %016llx\n", (unsigned long long)h);
            } else if (!strncmp(line, "threads ", 8)) {
                int k = atoi(line + 8), goal = started + k;
                for (long i = 0; i < k; i++) {
                    pthread_t t;
                    pthread_create(&t, NULL, worker, (void *)(started + i));
                }
                while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < goal) usleep(100);
                answer("threads\n");
            } else if (!strcmp(line, "nap")) {
                pthread_t t;
                pthread_create(&t, NULL, napper, NULL);
                while (!__atomic_load_n(&nappers, __ATOMIC_SEQ_CST)) usleep(100);
                answer("nap\n");
            } else if (!strcmp(line, "naps")) {
                answer("naps %ld\n", naps);
            } else if (!strcmp(line, "ticks")) {
                long t = 0;
                for (int i = 0; i < 64; i++) t += ticks[i];
                answer("ticks %ld\n", t);
            } else if (!strcmp(line, "quit")) {
                return 0;
            }
            used -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, used);
        }
    }
}
