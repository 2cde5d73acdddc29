// Target of the kill tests: N MiB of private memory it can rewrite, hash and re-lay out.
// stdin commands, one answer line each:
//   fill <seed>   rewrite every page from the seed           -> "filled"
//   hash          FNV-1a of the region, and of the extra map  -> "hash <hex>"
//   layout        map an 8 MiB region and unmap the region's last 4 MiB -> "layout"
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static unsigned char *mem, *extra;
static size_t len, mapped;

static uint64_t fnv(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i += 64) { h ^= p[i]; h *= 1099511628211ULL; }
    return h;
}

int main(int argc, char **argv) {
    len = (argc > 1 ? strtoull(argv[1], NULL, 10) : 128) << 20;
    mapped = len;
    mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) return 2;
    printf("ready %p\n", (void *)mem);
    fflush(stdout);
    char line[128];
    while (fgets(line, sizeof line, stdin)) {
        unsigned seed;
        if (sscanf(line, "fill %u", &seed) == 1) {
            for (size_t i = 0; i < mapped; i += 8) *(uint64_t *)(mem + i) = (i * 2654435761u) ^ seed;
            puts("filled");
        } else if (!strncmp(line, "hash", 4)) {
            uint64_t h = fnv(1469598103934665603ULL, mem, mapped);
            if (extra) h = fnv(h, extra, 8 << 20);
            printf("hash %016llx %zu %d\n", (unsigned long long)h, mapped, extra != NULL);
        } else if (!strncmp(line, "layout", 6)) {
            extra = mmap(NULL, 8 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(extra, 0x5a, 8 << 20);
            munmap(mem + len - (4 << 20), 4 << 20);
            mapped = len - (4 << 20);
            puts("layout");
        }
        fflush(stdout);
    }
    return 0;
}
