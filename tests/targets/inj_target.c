/* Target for tests/test_injector_*.py: threads in every kind of wait, plus memory with known
 * contents and protections.
 *
 * usage: inj_target [busy N] [read N] [sleep N] [futex N]
 * stdout lines: "ready <rw> <ro> <none> <threads>" (addresses in hex), then replies.
 * stdin commands (one per line, read with raw read(2) by the main thread, so the main thread
 * is itself a thread blocked in read()):
 *   ping                 -> "pong"
 *   hex <addr> <len>     -> "hex <bytes as hex>"; PROT_NONE/read-only pages are read after a
 *                           temporary mprotect(PROT_READ) and restored to what /proc says
 *   feed <i> <word>      -> writes <word> into reader thread i's pipe; that thread then prints
 *                           "piperead <i> <n> <data>"
 *   wake                 -> wakes the futex waiters; each prints "futexwoke <i>"
 *   ticks                -> "ticks <sum of busy counters> <sum of sleep counters>"
 *   brk                  -> "brk <sbrk(0)>"
 * Any syscall that returns EINTR prints "EINTR <where>": the tests treat that as a failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAXT 64
static volatile unsigned long busy_ticks[MAXT];
static volatile unsigned long sleep_ticks[MAXT];
static int pipes[MAXT][2];
static volatile int futex_word;

static void *busy(void *arg) {
    long i = (long)arg;
    for (;;) busy_ticks[i]++;
    return NULL;
}

static void *reader(void *arg) {
    long i = (long)arg;
    char buf[256];
    for (;;) {
        ssize_t n = read(pipes[i][0], buf, sizeof buf - 1);
        if (n < 0) {
            dprintf(1, "EINTR read%ld errno=%d\n", i, errno);
            continue;
        }
        buf[n] = 0;
        dprintf(1, "piperead %ld %zd %s\n", i, n, buf);
    }
    return NULL;
}

static void *sleeper(void *arg) {
    long i = (long)arg;
    for (;;) {
        struct timespec ts = {0, 50 * 1000 * 1000};
        if (nanosleep(&ts, NULL) != 0) dprintf(1, "EINTR nanosleep%ld errno=%d\n", i, errno);
        sleep_ticks[i]++;
    }
    return NULL;
}

static void *waiter(void *arg) {
    long i = (long)arg;
    while (futex_word == 0) {
        long r = syscall(SYS_futex, &futex_word, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
        if (r != 0 && errno == EINTR) dprintf(1, "EINTR futex%ld\n", i);
    }
    dprintf(1, "futexwoke %ld\n", i);
    return NULL;
}

static int prot_of(uintptr_t addr) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    int prot = PROT_READ | PROT_WRITE;
    while (f && fgets(line, sizeof line, f)) {
        uintptr_t s, e;
        char p[5];
        if (sscanf(line, "%lx-%lx %4s", &s, &e, p) == 3 && s <= addr && addr < e) {
            prot = (p[0] == 'r' ? PROT_READ : 0) | (p[1] == 'w' ? PROT_WRITE : 0) |
                   (p[2] == 'x' ? PROT_EXEC : 0);
            break;
        }
    }
    if (f) fclose(f);
    return prot;
}

static void do_hex(uintptr_t addr, size_t len) {
    uintptr_t page = addr & ~(uintptr_t)4095;
    size_t span = ((addr + len + 4095) & ~(uintptr_t)4095) - page;
    int prot = prot_of(addr);
    if (!(prot & PROT_READ)) mprotect((void *)page, span, PROT_READ);
    char *out = malloc(len * 2 + 1);
    for (size_t i = 0; i < len; i++) sprintf(out + 2 * i, "%02x", ((unsigned char *)addr)[i]);
    out[len * 2] = 0;
    if (!(prot & PROT_READ)) mprotect((void *)page, span, prot);
    dprintf(1, "hex %s\n", out);
    free(out);
}

static void command(char *line) {
    uintptr_t a;
    size_t n;
    long i;
    char word[200];
    if (strcmp(line, "ping") == 0) {
        dprintf(1, "pong\n");
    } else if (sscanf(line, "hex %lx %zu", &a, &n) == 2) {
        do_hex(a, n);
    } else if (sscanf(line, "feed %ld %199s", &i, word) == 2) {
        if (write(pipes[i][1], word, strlen(word)) < 0) dprintf(1, "EINTR feed\n");
    } else if (strcmp(line, "wake") == 0) {
        futex_word = 1;
        syscall(SYS_futex, &futex_word, FUTEX_WAKE_PRIVATE, MAXT, NULL, NULL, 0);
    } else if (strcmp(line, "ticks") == 0) {
        unsigned long b = 0, s = 0;
        for (int k = 0; k < MAXT; k++) b += busy_ticks[k], s += sleep_ticks[k];
        dprintf(1, "ticks %lu %lu\n", b, s);
    } else if (strcmp(line, "brk") == 0) {
        dprintf(1, "brk %lx\n", (unsigned long)syscall(SYS_brk, 0));
    } else {
        dprintf(1, "unknown %s\n", line);
    }
}

int main(int argc, char **argv) {
    long threads = 0;
    for (int k = 1; k + 1 < argc; k += 2) {
        long count = atol(argv[k + 1]);
        void *(*fn)(void *) = strcmp(argv[k], "busy") == 0    ? busy
                              : strcmp(argv[k], "read") == 0  ? reader
                              : strcmp(argv[k], "sleep") == 0 ? sleeper
                                                              : waiter;
        for (long j = 0; j < count && threads < MAXT; j++, threads++) {
            pthread_t t;
            if (fn == reader && pipe(pipes[threads]) != 0) return 2;
            pthread_create(&t, NULL, fn, (void *)threads);
        }
    }
    unsigned char *rw = mmap(NULL, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *ro = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    unsigned char *none = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int k = 0; k < 4 * 4096; k++) rw[k] = (unsigned char)(k * 7);
    memset(ro, 0xA5, 4096);
    memset(none, 0x5A, 4096);
    mprotect(ro, 4096, PROT_READ);
    mprotect(none, 4096, PROT_NONE);
    dprintf(1, "ready %lx %lx %lx %ld\n", (unsigned long)rw, (unsigned long)ro, (unsigned long)none, threads);

    char buf[4096];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, buf + have, sizeof buf - 1 - have);
        if (n < 0) {
            dprintf(1, "EINTR stdin errno=%d\n", errno);
            continue;
        }
        if (n == 0) return 0;
        have += (size_t)n;
        buf[have] = 0;
        char *start = buf, *nl;
        while ((nl = strchr(start, '\n')) != NULL) {
            *nl = 0;
            command(start);
            start = nl + 1;
        }
        have = strlen(start);
        memmove(buf, start, have);
    }
}
