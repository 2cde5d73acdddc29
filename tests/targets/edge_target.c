// Target for tests/test_apply_edges.py. Line commands on stdin, answers on stdout:
//   info     -> "info <data> <gone> <ro> <brk>" (hex): a data page, a region "unmap" removes,
//               a page "prot" makes read-only, the program break now
//   poke     -> fills the data page with 0x5a; "poked"
//   map      -> maps 4 new pages filled with 0xf5; "mapped <addr>"
//   unmap    -> unmaps the "gone" region; "unmapped"
//   prot     -> makes the "ro" page read-only (it is read-write at start); "protected"
//   grow     -> grows the heap by 64 KiB with sbrk and fills it with 0x77; "grew <old> <new>"
//   argdown  -> moves the argument area (PR_SET_MM_MAP) to a new page below the stack
//   argup    -> moves the argument area into the environment area, strictly above it
//               (both answer "moved <arg_start> <arg_end>", or "mmfail <errno>")
//   threads N -> starts N threads blocked in read() on a pipe; "threads"
//   wake     -> lets every such thread read one byte (and block again); "woke"
//   quit     -> exits
// A line without its newline (a partial command) is kept until the newline comes.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/prctl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <unistd.h>

static unsigned char data[2 * 4096] __attribute__((aligned(4096)));
static unsigned char *gone, *ro;
static int blockpipe[2];
static volatile int started;

static void answer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void answer(const char *fmt, ...) {
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, (size_t)n) < 0) _exit(3);
}

static void *reader(void *arg) {
    (void)arg;
    char c;
    __atomic_add_fetch(&started, 1, __ATOMIC_SEQ_CST);
    for (;;)
        if (read(blockpipe[0], &c, 1) <= 0) pause();
    return NULL;
}

// /proc/self/stat fields 1..52 into out[] (out[0] unused), read without malloc (no heap growth).
static void stat_fields(unsigned long out[53]) {
    char buf[2048];
    int fd = open("/proc/self/stat", O_RDONLY);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : 0;
    if (fd >= 0) close(fd);
    buf[n > 0 ? n : 0] = 0;
    memset(out, 0, 53 * sizeof out[0]);
    char *p = strrchr(buf, ')');
    for (int field = 2; p && *p && field < 52; p++)
        if (*p == ' ') out[++field] = strtoul(p + 1, NULL, 10);
}

// PR_SET_MM_MAP: every mm field at once, checked as a whole (no CAP_SYS_RESOURCE needed,
// unlike the one-field PR_SET_MM_ARG_START & co.). Only the argument area changes.
static void set_args(unsigned long start, unsigned long end) {
    unsigned long f[53];
    stat_fields(f);
    struct prctl_mm_map m;
    memset(&m, 0, sizeof m);
    m.start_code = f[26], m.end_code = f[27], m.start_stack = f[28];
    m.start_data = f[45], m.end_data = f[46], m.start_brk = f[47];
    m.brk = (unsigned long)sbrk(0);
    m.arg_start = start, m.arg_end = end, m.env_start = f[50], m.env_end = f[51];
    m.exe_fd = (__u32)-1;
    if (prctl(PR_SET_MM, PR_SET_MM_MAP, (unsigned long)&m, sizeof m, 0)) {
        answer("mmfail %d\n", errno);
        return;
    }
    stat_fields(f);
    answer("moved %lx %lx\n", f[48], f[49]);
}

static void command(const char *line, long pg) {
    if (!strcmp(line, "info")) {
        answer("info %p %p %p %p\n", (void *)data, (void *)gone, (void *)ro, sbrk(0));
    } else if (!strcmp(line, "poke")) {
        memset(data, 0x5a, sizeof data);
        answer("poked\n");
    } else if (!strcmp(line, "map")) {
        unsigned char *p =
            mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memset(p, 0xf5, 4 * pg);
        answer("mapped %p\n", (void *)p);
    } else if (!strcmp(line, "unmap")) {
        munmap(gone, 4 * pg);
        answer("unmapped\n");
    } else if (!strcmp(line, "prot")) {
        mprotect(ro, pg, PROT_READ);
        answer("protected\n");
    } else if (!strcmp(line, "grow")) {
        void *old = sbrk(0);
        unsigned char *p = sbrk(64 * 1024);
        if (p != (void *)-1) memset(p, 0x77, 64 * 1024);
        answer("grew %p %p\n", old, sbrk(0));
    } else if (!strcmp(line, "argdown")) {
        char *p = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        strcpy(p, "moved-args");
        set_args((unsigned long)p, (unsigned long)p + 11);
    } else if (!strcmp(line, "argup")) {
        unsigned long f[53];
        stat_fields(f);
        set_args(f[50] + 1, f[51]);  // strictly above the old end
    } else if (!strncmp(line, "threads ", 8)) {
        int k = atoi(line + 8), goal = started + k;
        for (int i = 0; i < k; i++) {
            pthread_t t;
            pthread_create(&t, NULL, reader, NULL);
        }
        while (__atomic_load_n(&started, __ATOMIC_SEQ_CST) < goal) usleep(100);
        answer("threads\n");
    } else if (!strcmp(line, "wake")) {
        for (int i = 0; i < started; i++)
            if (write(blockpipe[1], "w", 1) != 1) _exit(4);
        answer("woke\n");
    } else if (!strcmp(line, "quit")) {
        _exit(0);
    }
}

int main(void) {
    long pg = sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < sizeof data; i++) data[i] = (unsigned char)('D' + i % 7);
    gone = mmap(NULL, 4 * pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(gone, 0xd4, 4 * pg);
    ro = mmap(NULL, pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(ro, 0xc3, pg);
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
            command(line, pg);
            used -= (size_t)(nl + 1 - line);
            memmove(line, nl + 1, used);
        }
    }
}
