// Target with shared memory: an 8-page MAP_SHARED|MAP_ANONYMOUS area (pages 0 and 2 written,
// the rest holes) and a 4-page memfd mapping (page 1 written). Commands on stdin:
//   scribble -> writes every page of both; "done"
//   sum      -> "sum <fnv of both areas>"
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static uint64_t fnv(const unsigned char *p, size_t n, uint64_t h) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}

int main(void) {
    long pg = sysconf(_SC_PAGESIZE);
    unsigned char *shm = mmap(NULL, 8 * pg, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int fd = memfd_create("applier-test", 0);
    if (shm == MAP_FAILED || fd < 0 || ftruncate(fd, 4 * pg)) return 2;
    unsigned char *mfd = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (mfd == MAP_FAILED) return 2;
    memset(shm, 0x51, pg);
    memset(shm + 2 * pg, 0x52, pg);
    memset(mfd + pg, 0x61, pg);
    printf("ready %p %p\n", (void *)shm, (void *)mfd);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "scribble", 8)) {
            memset(shm, 0xEE, 8 * pg);
            memset(mfd, 0xDD, 4 * pg);
            printf("done\n");
        } else if (!strncmp(line, "sum", 3)) {
            uint64_t h = fnv(shm, 8 * (size_t)pg, 1469598103934665603ULL);
            printf("sum %016llx\n", (unsigned long long)fnv(mfd, 4 * (size_t)pg, h));
        }
        fflush(stdout);
    }
    return 0;
}
