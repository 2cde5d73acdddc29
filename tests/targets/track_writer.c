/* Test target for dirty-page tracking: writes exactly the pages it is told to.
 *
 * One command per stdin line, one reply line on stdout. No stdio and no malloc, so the
 * target's own bookkeeping never touches the memory the tests look at.
 *
 *   map N            mmap N private anonymous pages (untouched)  -> "map ADDR"
 *   fill ADDR N      write every one of N pages from ADDR         -> "ok"
 *   touch ADDR...    add 1 to the byte at each ADDR               -> "ok"
 *   stride ADDR N S  add 1 to the first byte of N pages, every S-th -> "ok"
 *   pipe ADDR LEN    the kernel writes LEN bytes at ADDR (read() from a pipe) -> "ok"
 *   brk N            grow the heap by N pages (untouched)         -> "brk OLD NEW"
 *   madv ADDR N      madvise(MADV_DONTNEED) N pages                -> "ok"
 *   remap ADDR N     munmap + mmap at the same address           -> "ok"
 *   mremap ADDR N M  move/grow N pages to M pages                 -> "mremap ADDR"
 *   ownuffd ADDR N   register N pages with a userfaultfd of its own (missing mode,
 *                    pages should be populated)                   -> "ok"
 *   ping                                                          -> "pong"
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE 4096UL

static char line[4096];
static char reply[256];
static unsigned char junk[65536];
static unsigned char counter;

static void say(const char *s) {
    size_t n = strlen(s);
    while (n) {
        ssize_t w = write(1, s, n);
        if (w <= 0) _exit(3);
        s += w;
        n -= (size_t)w;
    }
}

static char *hex(char *p, unsigned long v) {
    static const char digits[] = "0123456789abcdef";
    char tmp[32];
    int i = 0;
    do { tmp[i++] = digits[v & 15]; v >>= 4; } while (v);
    *p++ = '0';
    *p++ = 'x';
    while (i) *p++ = tmp[--i];
    return p;
}

static void say_hex(const char *key, unsigned long a, int two, unsigned long b) {
    char *p = reply;
    size_t k = strlen(key);
    memcpy(p, key, k);
    p += k;
    *p++ = ' ';
    p = hex(p, a);
    if (two) { *p++ = ' '; p = hex(p, b); }
    *p++ = '\n';
    *p = 0;
    say(reply);
}

static int read_line(void) {
    size_t n = 0;
    while (n < sizeof(line) - 1) {
        ssize_t r = read(0, line + n, 1);
        if (r <= 0) return 0;
        if (line[n] == '\n') break;
        n++;
    }
    line[n] = 0;
    return 1;
}

int main(void) {
    say("ready\n");
    while (read_line()) {
        char *p = line, *end;
        char *cmd = p;
        while (*p && *p != ' ') p++;
        if (*p) *p++ = 0;
        unsigned long a = strtoul(p, &end, 0);
        unsigned long b = strtoul(end, &end, 0);
        unsigned long c = strtoul(end, &end, 0);
        if (!strcmp(cmd, "ping")) {
            say("pong\n");
        } else if (!strcmp(cmd, "ownuffd")) {
            int fd = (int)syscall(SYS_userfaultfd, UFFD_USER_MODE_ONLY);
            struct uffdio_api api = {.api = UFFD_API};
            struct uffdio_register reg = {.range = {a, b * PAGE}, .mode = UFFDIO_REGISTER_MODE_MISSING};
            if (fd < 0 || ioctl(fd, UFFDIO_API, &api) || ioctl(fd, UFFDIO_REGISTER, &reg)) _exit(13);
            say("ok\n");
        } else if (!strcmp(cmd, "map")) {
            void *m = mmap(NULL, a * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (m == MAP_FAILED) _exit(4);
            say_hex("map", (unsigned long)m, 0, 0);
        } else if (!strcmp(cmd, "fill")) {
            for (unsigned long i = 0; i < b; i++) ((volatile unsigned char *)a)[i * PAGE] += 1;
            say("ok\n");
        } else if (!strcmp(cmd, "stride")) {
            for (unsigned long i = 0; i < b; i++) ((volatile unsigned char *)a)[i * c * PAGE] += 1;
            say("ok\n");
        } else if (!strcmp(cmd, "touch")) {
            char *q = p;
            for (;;) {
                unsigned long addr = strtoul(q, &end, 0);
                if (end == q) break;
                *(volatile unsigned char *)addr += 1;
                q = end;
            }
            say("ok\n");
        } else if (!strcmp(cmd, "pipe")) {
            int fds[2];
            if (pipe(fds) || b > sizeof(junk)) _exit(5);
            counter++;
            memset(junk, counter ^ 0x5a, b);
            if (write(fds[1], junk, b) != (ssize_t)b) _exit(6);
            if (read(fds[0], (void *)a, b) != (ssize_t)b) _exit(7);
            close(fds[0]);
            close(fds[1]);
            say("ok\n");
        } else if (!strcmp(cmd, "brk")) {
            void *old = sbrk(0);
            if (sbrk((intptr_t)(a * PAGE)) == (void *)-1) _exit(8);
            say_hex("brk", (unsigned long)old, 1, (unsigned long)sbrk(0));
        } else if (!strcmp(cmd, "madv")) {
            if (madvise((void *)a, b * PAGE, MADV_DONTNEED)) _exit(9);
            say("ok\n");
        } else if (!strcmp(cmd, "pageout")) {
            if (madvise((void *)a, b * PAGE, 21 /* MADV_PAGEOUT */)) _exit(14);
            say("ok\n");
        } else if (!strcmp(cmd, "remap")) {
            if (munmap((void *)a, b * PAGE)) _exit(10);
            void *m = mmap((void *)a, b * PAGE, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
            if (m != (void *)a) _exit(11);
            say("ok\n");
        } else if (!strcmp(cmd, "mremap")) {
            void *m = mremap((void *)a, b * PAGE, c * PAGE, MREMAP_MAYMOVE);
            if (m == MAP_FAILED) _exit(12);
            say_hex("mremap", (unsigned long)m, 0, 0);
        } else {
            say("error unknown command\n");
        }
    }
    return 0;
}
