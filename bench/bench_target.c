// Benchmark target: N MiB of private anonymous memory, every page written.
// stdin: "dirty <permille> <seed>" writes one byte into that share of its pages, spread
// evenly with a seed-dependent phase; "dirtyn <count> <seed>" into that many pages, evenly
// spread; both answer "ok <pages>". "quit" exits.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    size_t len = mib << 20, pages = len / 4096;
    unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 2;
    madvise(mem, len, MADV_NOHUGEPAGE);
    for (size_t p = 0; p < pages; p++) memset(mem + p * 4096, (int)(p & 0xff), 4096);
    printf("ready %p %zu\n", (void *)mem, len);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        unsigned permille, seed;
        unsigned long count;
        if (sscanf(line, "dirtyn %lu %u", &count, &seed) == 2) {  // count pages, evenly spread
            size_t step = count ? pages / count : 1, n = 0;
            for (size_t p = seed % step; p < pages && n < count; p += step, n++) mem[p * 4096 + 100] ^= 0x5a;
            printf("ok %zu\n", n);
            fflush(stdout);
        } else if (sscanf(line, "dirty %u %u", &permille, &seed) == 2) {
            size_t n = 0;
            for (size_t p = 0; p < pages; p++) {
                if ((p * 7919 + seed) % 1000 < permille) { mem[p * 4096 + 100] ^= 0x5a; n++; }
            }
            printf("ok %zu\n", n);
            fflush(stdout);
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        }
    }
    return 0;
}
