/* A small server for the descriptor tests (tests/test_apply_fds.py).
 *
 * A TCP server on 127.0.0.1 (an ephemeral port, printed as "PORT p") in one epoll loop with
 * stdin. Clients send lines: "get" -> the current value and "\n"; "set X" -> the value
 * becomes X, answered "ok". A client that hangs up is closed and forgotten.
 *
 * Commands on stdin (each answered with one line):
 *   open PATH MODE    open PATH (MODE r, w, rw, a: O_RDONLY, O_WRONLY, O_RDWR,
 *                     O_WRONLY|O_APPEND; "c" suffix: O_CLOEXEC)   -> "FD n"
 *   seek FD N         lseek(FD, N, SEEK_SET)                      -> "POS n"
 *   read FD N         read N bytes                                -> "DATA <bytes> POS n"
 *   close FD          close(FD)                                   -> "OK"
 *   replace FD PATH   open PATH O_RDONLY and dup2 it onto FD       -> "OK"
 *   nonblock FD       fcntl(F_SETFL, |O_NONBLOCK)                 -> "OK"
 *   dup FD            dup(FD)                                     -> "FD n"
 *   pipe              pipe2(O_CLOEXEC) with "queued" written      -> "PIPE r w"
 *   pos FD            lseek(FD, 0, SEEK_CUR)                      -> "POS n"
 *   nfds              entries of /proc/self/fd                    -> "NFDS n"
 *   value             the server's value                          -> "VALUE v"
 *   ping                                                          -> "PONG"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static char value[256] = "initial";
static char inbuf[4096];
static size_t inlen;

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...) {
    char buf[4200];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (write(1, buf, (size_t)n) < 0) _exit(3);
}

static int count_fds(void) {
    DIR *d = opendir("/proc/self/fd");
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n - 1; /* the directory's own descriptor */
}

static void command(char *line) {
    char a[1024], b[1024];
    int fd;
    long n;
    if (sscanf(line, "open %1023s %1023s", a, b) == 2) {
        int flags = 0;
        if (b[0] == 'r' && b[1] == 'w') flags = O_RDWR;
        else if (b[0] == 'r') flags = O_RDONLY;
        else if (b[0] == 'w') flags = O_WRONLY | O_CREAT;
        else if (b[0] == 'a') flags = O_WRONLY | O_APPEND | O_CREAT;
        if (strchr(b, 'c')) flags |= O_CLOEXEC;
        out("FD %d\n", open(a, flags, 0644));
    } else if (sscanf(line, "seek %d %ld", &fd, &n) == 2) {
        out("POS %ld\n", (long)lseek(fd, n, SEEK_SET));
    } else if (sscanf(line, "read %d %ld", &fd, &n) == 2) {
        char data[1024] = {0};
        ssize_t got = read(fd, data, n < 1023 ? (size_t)n : 1023);
        out("DATA %s POS %ld\n", got > 0 ? data : "-", (long)lseek(fd, 0, SEEK_CUR));
    } else if (sscanf(line, "close %d", &fd) == 1) {
        out(close(fd) == 0 ? "OK\n" : "ERR\n");
    } else if (sscanf(line, "replace %d %1023s", &fd, a) == 2) {
        int tmp = open(a, O_RDONLY);
        out(tmp >= 0 && dup2(tmp, fd) == fd && close(tmp) == 0 ? "OK\n" : "ERR\n");
    } else if (sscanf(line, "nonblock %d", &fd) == 1) {
        out(fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) == 0 ? "OK\n" : "ERR\n");
    } else if (sscanf(line, "dup %d", &fd) == 1) {
        out("FD %d\n", dup(fd));
    } else if (strcmp(line, "pipe") == 0) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) || write(p[1], "queued", 6) != 6) out("ERR\n");
        else out("PIPE %d %d\n", p[0], p[1]);
    } else if (sscanf(line, "pos %d", &fd) == 1) {
        out("POS %ld\n", (long)lseek(fd, 0, SEEK_CUR));
    } else if (strcmp(line, "nfds") == 0) {
        out("NFDS %d\n", count_fds());
    } else if (strcmp(line, "value") == 0) {
        out("VALUE %s\n", value);
    } else if (strcmp(line, "ping") == 0) {
        out("PONG\n");
    } else {
        out("ERR unknown\n");
    }
}

static void client(int ep, int fd) {
    char buf[512];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    if (n <= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
        close(fd);
        return;
    }
    buf[n] = 0;
    char *nl = strchr(buf, '\n');
    if (nl) *nl = 0;
    char reply[300];
    if (strncmp(buf, "set ", 4) == 0) {
        snprintf(value, sizeof value, "%s", buf + 4);
        snprintf(reply, sizeof reply, "ok\n");
    } else {
        snprintf(reply, sizeof reply, "%s\n", value);
    }
    if (write(fd, reply, strlen(reply)) < 0) { /* the peer went away */ }
}

int main(void) {
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 16) ||
        getsockname(ls, (struct sockaddr *)&sa, &len))
        return 2;
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    ev.data.fd = 0;
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
    out("PORT %d\n", ntohs(sa.sin_port));
    for (;;) {
        struct epoll_event evs[16];
        int n = epoll_wait(ep, evs, 16, -1);
        if (n < 0 && errno == EINTR) continue;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
                if (c >= 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
            } else if (fd == 0) {
                ssize_t got = read(0, inbuf + inlen, sizeof inbuf - 1 - inlen);
                if (got <= 0) return 0;
                inlen += (size_t)got;
                char *nl;
                while ((nl = memchr(inbuf, '\n', inlen)) != NULL) {
                    *nl = 0;
                    command(inbuf);
                    size_t used = (size_t)(nl - inbuf) + 1;
                    memmove(inbuf, nl + 1, inlen - used);
                    inlen -= used;
                }
            } else {
                client(ep, fd);
            }
        }
    }
}
