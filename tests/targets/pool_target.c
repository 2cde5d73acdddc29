// A thread pool that grows and shrinks, for the thread tests. Commands on stdin, one per line:
//   grow N    -> starts N workers (joinable pthreads waiting on a condition variable);
//                "grown <workers>"
//   shrink N  -> the N newest workers leave their loop and are joined; "shrunk <workers>"
//   ping      -> every worker must take the new round and count it, within 5 s;
//                "pong <workers> <answers> <sum of rounds seen>"
//   tids      -> "tids <tid of worker 0> <tid of worker 1> ..." (as each saw gettid())
//   alts      -> "alts <sigaltstack of worker 0> ..." (as each saw it at the last ping)
//   touch     -> writes a byte of memory; "touched"
//   quit      -> joins every worker, then exits 0 (a worker that cannot be joined hangs it)
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX 64

struct worker {
    pthread_t thread;
    int index;
    volatile int leave;
    volatile long tid;
    long rounds_seen;
    void *alt;  // its sigaltstack's ss_sp, as it saw it at its last round
};

static struct worker pool[MAX];
static int workers;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static long round_no, answers;
static unsigned char scratch[4096];

static void *work(void *arg) {
    struct worker *w = arg;
    long seen = 0;
    stack_t ss = {.ss_sp = malloc(SIGSTKSZ), .ss_size = SIGSTKSZ, .ss_flags = 0};
    sigaltstack(&ss, NULL);  // each worker its own alternate signal stack
    w->tid = syscall(SYS_gettid);
    pthread_mutex_lock(&lock);
    seen = round_no;
    for (;;) {
        while (round_no == seen && !w->leave) pthread_cond_wait(&wake, &lock);
        if (w->leave) break;
        seen = round_no;
        w->rounds_seen += 1;
        stack_t now;
        sigaltstack(NULL, &now);
        w->alt = now.ss_flags & SS_DISABLE ? NULL : now.ss_sp;
        answers += 1;
        pthread_cond_broadcast(&done);
    }
    pthread_mutex_unlock(&lock);
    return NULL;
}

static void answer(const char *fmt, long a, long b, long c) {
    printf(fmt, a, b, c);
    fflush(stdout);
}

static void shrink(int n) {
    for (int i = 0; i < n && workers > 0; i++) {
        struct worker *w = &pool[workers - 1];
        pthread_mutex_lock(&lock);
        w->leave = 1;
        pthread_cond_broadcast(&wake);
        pthread_mutex_unlock(&lock);
        pthread_join(w->thread, NULL);
        memset(w, 0, sizeof(*w));
        workers -= 1;
    }
}

int main(void) {
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "grow ", 5)) {
            int n = atoi(line + 5);
            for (int i = 0; i < n && workers < MAX; i++) {
                struct worker *w = &pool[workers];
                w->index = workers;
                w->tid = 0;
                pthread_create(&w->thread, NULL, work, w);
                while (!w->tid) usleep(100);
                workers += 1;
            }
            answer("grown %ld\n", workers, 0, 0);
        } else if (!strncmp(line, "shrink ", 7)) {
            shrink(atoi(line + 7));
            answer("shrunk %ld\n", workers, 0, 0);
        } else if (!strcmp(line, "ping\n")) {
            struct timespec until;
            long sum = 0;
            clock_gettime(CLOCK_REALTIME, &until);
            until.tv_sec += 5;
            pthread_mutex_lock(&lock);
            answers = 0;
            round_no += 1;
            pthread_cond_broadcast(&wake);
            while (answers < workers)
                if (pthread_cond_timedwait(&done, &lock, &until)) break;
            for (int i = 0; i < workers; i++) sum += pool[i].rounds_seen;
            answer("pong %ld %ld %ld\n", workers, answers, sum);
            pthread_mutex_unlock(&lock);
        } else if (!strcmp(line, "tids\n")) {
            printf("tids");
            for (int i = 0; i < workers; i++) printf(" %ld", pool[i].tid);
            printf("\n");
            fflush(stdout);
        } else if (!strcmp(line, "alts\n")) {
            printf("alts");
            for (int i = 0; i < workers; i++) printf(" %p", pool[i].alt);
            printf("\n");
            fflush(stdout);
        } else if (!strcmp(line, "touch\n")) {
            scratch[17] ^= 1;
            answer("touched\n", 0, 0, 0);
        } else if (!strcmp(line, "quit\n")) {
            shrink(workers);
            return 0;
        }
    }
    return 0;
}
