// The demo target of `applier demo`: a small "server" that keeps changing its memory.
// Every 100 ms it counts, appends a line to a journal on the heap (realloc: the heap grows)
// and every 5 ticks maps a fresh 64 KiB block. On "state\n" (stdin) it prints one line:
//   state counter=<n> journal=<bytes> blocks=<n> checksum=<fnv of journal>
#define _GNU_SOURCE
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned long counter;
static char *journal;
static size_t journal_len, journal_cap;
static void *blocks[4096];
static int nblocks;

static uint64_t fnv(const char *p, size_t n) {
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) { h ^= (unsigned char)p[i]; h *= 1099511628211ULL; }
    return h;
}

static void tick(void) {
    char line[64];
    int n = snprintf(line, sizeof line, "tick %lu\n", ++counter);
    if (journal_len + (size_t)n > journal_cap) {
        journal_cap = journal_cap ? journal_cap * 2 : 256;
        journal = realloc(journal, journal_cap);
        if (!journal) _exit(3);
    }
    memcpy(journal + journal_len, line, (size_t)n);
    journal_len += (size_t)n;
    if (counter % 5 == 0 && nblocks < 4096) {
        void *b = mmap(NULL, 65536, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (b != MAP_FAILED) { memset(b, (int)counter, 65536); blocks[nblocks++] = b; }
    }
}

int main(void) {
    char buf[256];
    size_t used = 0;
    printf("ready %d\n", getpid());
    fflush(stdout);
    for (;;) {
        struct pollfd p = {0, POLLIN, 0};
        int r = poll(&p, 1, 100);
        if (r == 0) { tick(); continue; }
        if (r < 0) continue;
        ssize_t n = read(0, buf + used, sizeof buf - 1 - used);
        if (n <= 0) return 0;
        used += (size_t)n;
        char *nl;
        while ((nl = memchr(buf, '\n', used)) != NULL) {
            *nl = 0;
            if (!strcmp(buf, "state")) {
                printf("state counter=%lu journal=%zu blocks=%d checksum=%016llx\n", counter,
                       journal_len, nblocks, (unsigned long long)fnv(journal, journal_len));
                fflush(stdout);
            }
            used -= (size_t)(nl + 1 - buf);
            memmove(buf, nl + 1, used);
        }
    }
}
