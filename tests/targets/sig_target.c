// Target for the signal part. It sets up what tests/data/state-criu-4.2 shows (handlers,
// masks, an itimer), then answers line commands on stdin:
//   info     -> "info <h1> <h2> <h3>": the addresses of the handlers
//   change   -> SIGUSR1 to on_usr1b, SIGQUIT ignored, SIGUSR2 blocked in main, worker
//               unblocks SIGTERM and blocks SIGUSR1; "changed"
//   raise    -> raise(SIGUSR1) in main, then "counts <a> <b>": calls of on_usr1 / on_usr1b
//   masks    -> "masks <main blocked> <worker blocked>" (hex)
//   pend     -> blocks SIGUSR2 in main, raises it (left pending); "pending"
//   quit     -> exits 0
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t calls_a, calls_b;
static int to_worker[2], from_worker[2];

static void on_usr1(int s) { (void)s; calls_a++; }
static void on_usr1b(int s) { (void)s; calls_b++; }
static void on_usr2(int s, siginfo_t *i, void *c) { (void)s; (void)i; (void)c; }

static void answer(const char *fmt, ...) {
    char buf[256];
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, (size_t)n) < 0) _exit(3);
}

static uint64_t mask_word(const sigset_t *m) {
    uint64_t w = 0;
    for (int s = 1; s <= 64; s++) if (sigismember(m, s) == 1) w |= 1ULL << (s - 1);
    return w;
}

static void *worker(void *arg) {
    (void)arg;
    sigset_t m; sigemptyset(&m); sigaddset(&m, SIGTERM); sigaddset(&m, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    char c;
    while (read(to_worker[0], &c, 1) == 1) {
        if (c == 'c') {
            sigset_t u; sigemptyset(&u); sigaddset(&u, SIGTERM);
            pthread_sigmask(SIG_UNBLOCK, &u, NULL);
            sigset_t b; sigemptyset(&b); sigaddset(&b, SIGUSR1);
            pthread_sigmask(SIG_BLOCK, &b, NULL);
        }
        sigset_t now; pthread_sigmask(SIG_BLOCK, NULL, &now);
        uint64_t w = mask_word(&now);
        if (write(from_worker[1], &w, sizeof w) != sizeof w) _exit(4);
    }
    return NULL;
}

static uint64_t ask_worker(char c) {
    uint64_t w = 0;
    if (write(to_worker[1], &c, 1) != 1 || read(from_worker[0], &w, sizeof w) != sizeof w) _exit(5);
    return w;
}

int main(void) {
    struct sigaction sa = { .sa_handler = on_usr1 }; sigemptyset(&sa.sa_mask); sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct sigaction sb = { .sa_sigaction = on_usr2 }; sigemptyset(&sb.sa_mask);
    sigaddset(&sb.sa_mask, SIGINT); sb.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR2, &sb, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGQUIT, SIG_DFL);
    sigset_t blk; sigemptyset(&blk); sigaddset(&blk, SIGWINCH); sigaddset(&blk, SIGALRM);
    sigprocmask(SIG_BLOCK, &blk, NULL);
    struct itimerval iv = { .it_interval = {3, 0}, .it_value = {300, 0} };
    setitimer(ITIMER_REAL, &iv, NULL);
    if (pipe(to_worker) || pipe(from_worker)) return 1;
    pthread_t t; pthread_create(&t, NULL, worker, NULL);
    ask_worker('?');  // the worker has set its mask
    answer("ready\n");
    char line[128];
    for (;;) {
        ssize_t n = read(0, line, sizeof line - 1);
        if (n <= 0) return 0;
        line[n] = 0;
        if (!strncmp(line, "info", 4)) {
            answer("info %p %p %p\n", (void *)on_usr1, (void *)on_usr1b, (void *)on_usr2);
        } else if (!strncmp(line, "change", 6)) {
            struct sigaction s2 = { .sa_handler = on_usr1b }; sigemptyset(&s2.sa_mask);
            sigaction(SIGUSR1, &s2, NULL);
            signal(SIGQUIT, SIG_IGN);
            sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR2);
            sigprocmask(SIG_BLOCK, &m, NULL);
            ask_worker('c');
            answer("changed\n");
        } else if (!strncmp(line, "raise", 5)) {
            raise(SIGUSR1);
            answer("counts %d %d\n", (int)calls_a, (int)calls_b);
        } else if (!strncmp(line, "masks", 5)) {
            sigset_t now; sigprocmask(SIG_BLOCK, NULL, &now);
            answer("masks %llx %llx\n", (unsigned long long)mask_word(&now),
                   (unsigned long long)ask_worker('?'));
        } else if (!strncmp(line, "pend", 4)) {
            sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR2);
            sigprocmask(SIG_BLOCK, &m, NULL);
            raise(SIGUSR2);
            answer("pending\n");
        } else if (!strncmp(line, "quit", 4)) {
            return 0;
        }
    }
}
