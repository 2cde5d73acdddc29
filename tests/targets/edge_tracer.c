// A second tracer for tests/test_apply_edges.py: PTRACE_SEIZEs every tid given on the command
// line (the threads keep running: a seize does not stop them), answers "seized <own pid>",
// then holds them until stdin closes or it is killed (the kernel detaches them when it exits).
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        pid_t tid = (pid_t)atoi(argv[i]);
        if (ptrace(PTRACE_SEIZE, tid, 0, 0)) {
            printf("failed %d %s\n", tid, strerror(errno));
            fflush(stdout);
            return 1;
        }
    }
    printf("seized %d\n", getpid());
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0) {
    }
    return 0;
}
