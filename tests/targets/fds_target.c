/* Target for tests/test_injector_fds_live.py: one descriptor of every kind injector.fds
 * reads, plus signal state, each set up to known values that it prints.
 *
 * usage: fds_target <work dir> [netns|userns]
 *   netns: first unshare(CLONE_NEWNET) and bring up lo, so every socket but one ("early",
 *   a TCP listener made before) lives in a network namespace that is not the test's (needs
 *   CAP_SYS_ADMIN);
 *   userns: the same from a new user namespace that maps only our own uid and gid (works
 *   unprivileged).
 * It closes every inherited descriptor above 2, sets umask 027, chdir()s into <work dir> and
 * creates its files there. stdout lines (all numbers decimal unless said):
 *   "fd <label> <fd> <inode> <more...>" for every descriptor (see the printf calls),
 *   "timer <id1> <id2>" (POSIX timer ids), "tid <worker tid>", then "ready".
 * stdin commands, read with read(2) by the main thread (so it idles in read()):
 *   close <fd>  -> closes it, "closed <fd>"
 *   ping        -> "pong"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define CHECK(x)                                                                              \
    do {                                                                                      \
        if ((x) < 0) {                                                                        \
            printf("fail %s: %s\n", #x, strerror(errno));                                     \
            fflush(stdout);                                                                   \
            exit(1);                                                                          \
        }                                                                                     \
    } while (0)

static unsigned long ino_of(int fd) {
    struct stat st;
    CHECK(fstat(fd, &st));
    return (unsigned long)st.st_ino;
}

static void on_usr2(int s) { (void)s; }

static volatile pid_t worker_tid;

static void *worker(void *arg) {
    (void)arg;
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, SIGTERM);
    sigaddset(&m, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &m, NULL);
    worker_tid = (pid_t)syscall(SYS_gettid);
    for (;;) pause();
    return NULL;
}

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY);
    CHECK(fd);
    CHECK(write(fd, text, strlen(text)));
    close(fd);
}

static void enter_userns(void) {
    char map[64];
    uid_t uid = getuid();
    gid_t gid = getgid();
    CHECK(unshare(CLONE_NEWUSER | CLONE_NEWNET));
    write_file("/proc/self/setgroups", "deny");
    snprintf(map, sizeof map, "%u %u 1", (unsigned)uid, (unsigned)uid);
    write_file("/proc/self/uid_map", map);
    snprintf(map, sizeof map, "%u %u 1", (unsigned)gid, (unsigned)gid);
    write_file("/proc/self/gid_map", map);
}

static void lo_up(void) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct ifreq ifr;
    CHECK(s);
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    CHECK(ioctl(s, SIOCGIFFLAGS, &ifr));
    ifr.ifr_flags |= IFF_UP;
    CHECK(ioctl(s, SIOCSIFFLAGS, &ifr));
    close(s);
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    close_range(3, ~0U, 0);
    if (argc > 2) {
        /* a socket made before leaving the network namespace stays in the old one */
        int early = socket(AF_INET, SOCK_STREAM, 0);
        CHECK(early);
        struct sockaddr_in ea = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        CHECK(bind(early, (struct sockaddr *)&ea, sizeof ea));
        CHECK(listen(early, 2));
        socklen_t eal = sizeof ea;
        CHECK(getsockname(early, (struct sockaddr *)&ea, &eal));
        printf("fd early %d %lu %d\n", early, ino_of(early), ntohs(ea.sin_port));
    }
    if (argc > 2 && strcmp(argv[2], "netns") == 0) {
        CHECK(unshare(CLONE_NEWNET));
        lo_up();
    } else if (argc > 2 && strcmp(argv[2], "userns") == 0) {
        enter_userns();
        lo_up();
    }
    umask(027);
    CHECK(chdir(argv[1]));
    char buf[8192];
    memset(buf, 'x', sizeof buf);

    /* regular files */
    int data = open("data file.txt", O_RDWR | O_CREAT | O_TRUNC, 0644);
    CHECK(data);
    CHECK(write(data, buf, 5000));
    CHECK(lseek(data, 1234, SEEK_SET));
    printf("fd data %d %lu\n", data, ino_of(data));
    int logf = open("log.txt", O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0600);
    CHECK(logf);
    CHECK(write(logf, "hello\n", 6));
    printf("fd log %d %lu\n", logf, ino_of(logf));
    int cfd = open("cloexec.txt", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0640);
    CHECK(cfd);
    CHECK(write(cfd, "0123456789", 10));
    CHECK(lseek(cfd, 3, SEEK_SET));
    printf("fd cloexec %d %lu\n", cfd, ino_of(cfd));
    int gone = open("gone.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(gone);
    CHECK(write(gone, buf, 100));
    CHECK(unlink("gone.txt"));
    printf("fd deleted %d %lu\n", gone, ino_of(gone));
    /* a file whose real name ends in " (deleted)", and one unlinked but linked elsewhere */
    int odd = open("odd (deleted)", O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(odd);
    printf("fd oddname %d %lu\n", odd, ino_of(odd));
    int moved = open("linked.txt", O_RDWR | O_CREAT | O_TRUNC, 0600);
    CHECK(moved);
    CHECK(link("linked.txt", "other name.txt"));
    CHECK(unlink("linked.txt"));
    printf("fd elsewhere %d %lu\n", moved, ino_of(moved));
    int dirfd = open(".", O_RDONLY | O_DIRECTORY);
    CHECK(dirfd);
    printf("fd dir %d %lu\n", dirfd, ino_of(dirfd));
    CHECK(mkfifo("fifo", 0600));
    int fifo = open("fifo", O_RDWR | O_NONBLOCK);
    CHECK(fifo);
    CHECK(write(fifo, "fifo", 4));
    printf("fd fifo %d %lu\n", fifo, ino_of(fifo));

    /* pipe with bytes queued */
    int p[2];
    CHECK(pipe2(p, O_NONBLOCK));
    CHECK(write(p[1], "pipe-data", 9));
    CHECK(fcntl(p[0], F_SETOWN, getpid())); /* SIGIO owner: SIGUSR2 to us */
    CHECK(fcntl(p[0], F_SETSIG, SIGUSR2));
    printf("fd pipe_r %d %lu\n", p[0], ino_of(p[0]));
    printf("fd pipe_w %d %lu\n", p[1], ino_of(p[1]));

    /* unix sockets: a stream pair with 5 bytes queued towards sv[0] and sv[1] shut down
     * for writing; a listening socket bound to a path; an abstract datagram socket */
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv));
    CHECK(write(sv[1], "hello", 5));
    CHECK(shutdown(sv[1], SHUT_WR));
    printf("fd upair0 %d %lu\n", sv[0], ino_of(sv[0]));
    printf("fd upair1 %d %lu\n", sv[1], ino_of(sv[1]));
    int ul = socket(AF_UNIX, SOCK_STREAM, 0);
    CHECK(ul);
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    strcpy(un.sun_path, "my sock");
    CHECK(bind(ul, (struct sockaddr *)&un, sizeof un));
    CHECK(listen(ul, 5));
    struct stat sst;
    CHECK(stat("my sock", &sst));
    printf("fd ulisten %d %lu %lu\n", ul, ino_of(ul), (unsigned long)sst.st_ino);
    int ud = socket(AF_UNIX, SOCK_DGRAM, 0);
    CHECK(ud);
    struct sockaddr_un ua = {.sun_family = AF_UNIX};
    int alen = snprintf(ua.sun_path + 1, sizeof ua.sun_path - 1, "applier-fds-%d", getpid());
    CHECK(bind(ud, (struct sockaddr *)&ua, offsetof(struct sockaddr_un, sun_path) + 1 + alen));
    printf("fd uabstract %d %lu applier-fds-%d\n", ud, ino_of(ud), getpid());

    /* TCP: a listener on 127.0.0.1 port 0 and a connected pair on it */
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(ls);
    int one = 1;
    CHECK(setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    CHECK(bind(ls, (struct sockaddr *)&a, sizeof a));
    CHECK(listen(ls, 8));
    socklen_t al = sizeof a;
    CHECK(getsockname(ls, (struct sockaddr *)&a, &al));
    int lport = ntohs(a.sin_port);
    printf("fd tcplisten %d %lu %d\n", ls, ino_of(ls), lport);
    int cl = socket(AF_INET, SOCK_STREAM, 0);
    CHECK(cl);
    CHECK(setsockopt(cl, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one));
    CHECK(connect(cl, (struct sockaddr *)&a, sizeof a));
    struct sockaddr_in ca;
    socklen_t cal = sizeof ca;
    CHECK(getsockname(cl, (struct sockaddr *)&ca, &cal));
    int sv_fd = accept(ls, NULL, NULL);
    CHECK(sv_fd);
    CHECK(write(cl, "tcp!", 4));
    for (int queued = 0; queued < 4;) CHECK(ioctl(sv_fd, FIONREAD, &queued));
    printf("fd tcpclient %d %lu %d %d\n", cl, ino_of(cl), ntohs(ca.sin_port), lport);
    printf("fd tcpserver %d %lu %d %d\n", sv_fd, ino_of(sv_fd), lport, ntohs(ca.sin_port));
    /* UDP on IPv6 loopback, if there is one */
    int u6 = socket(AF_INET6, SOCK_DGRAM, 0);
    CHECK(u6);
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    if (bind(u6, (struct sockaddr *)&a6, sizeof a6) == 0) {
        socklen_t a6l = sizeof a6;
        CHECK(getsockname(u6, (struct sockaddr *)&a6, &a6l));
        printf("fd udp6 %d %lu %d\n", u6, ino_of(u6), ntohs(a6.sin6_port));
    } else {
        printf("noipv6 %s\n", strerror(errno));
    }

    /* anon inodes */
    int ev = eventfd(7, EFD_NONBLOCK);
    CHECK(ev);
    printf("fd eventfd %d %lu 7\n", ev, ino_of(ev));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    CHECK(ep);
    struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = 0x1111};
    struct epoll_event e2 = {.events = EPOLLIN | EPOLLET, .data.u64 = 0x2222};
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e1));
    CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e2));
    printf("fd epoll %d %lu\n", ep, ino_of(ep));
    sigset_t sm;
    sigemptyset(&sm);
    sigaddset(&sm, SIGWINCH);
    sigaddset(&sm, SIGUSR2);
    int sfd = signalfd(-1, &sm, SFD_NONBLOCK);
    CHECK(sfd);
    printf("fd signalfd %d %lu\n", sfd, ino_of(sfd));
    int tfd = timerfd_create(CLOCK_MONOTONIC, 0);
    CHECK(tfd);
    struct itimerspec its = {.it_interval = {5, 0}, .it_value = {100, 0}};
    CHECK(timerfd_settime(tfd, 0, &its, NULL));
    printf("fd timerfd %d %lu\n", tfd, ino_of(tfd));
    int tfa = timerfd_create(CLOCK_REALTIME, TFD_NONBLOCK);
    CHECK(tfa);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct itimerspec ita = {.it_interval = {0, 250000000}, .it_value = {now.tv_sec + 1000, 0}};
    CHECK(timerfd_settime(tfa, TFD_TIMER_ABSTIME, &ita, NULL));
    printf("fd timerfd_abs %d %lu\n", tfa, ino_of(tfa));
    int in = inotify_init1(IN_NONBLOCK);
    CHECK(in);
    int wd1 = inotify_add_watch(in, ".", IN_CREATE | IN_DELETE);
    CHECK(wd1);
    int wd2 = inotify_add_watch(in, "log.txt", IN_MODIFY);
    CHECK(wd2);
    struct stat dst, lst;
    CHECK(stat(".", &dst));
    CHECK(stat("log.txt", &lst));
    printf("fd inotify %d %lu %d %lu %d %lu\n", in, ino_of(in), wd1, (unsigned long)dst.st_ino, wd2,
           (unsigned long)lst.st_ino);
    int mfd = memfd_create("applier memfd", MFD_ALLOW_SEALING);
    CHECK(mfd);
    CHECK(write(mfd, buf, 3000));
    CHECK(fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW));
    printf("fd memfd %d %lu\n", mfd, ino_of(mfd));
    int pfd = (int)syscall(SYS_pidfd_open, getpid(), 0);
    CHECK(pfd);
    printf("fd pidfd %d %lu %d\n", pfd, ino_of(pfd), getpid());

    /* signal state: SIGUSR2 caught, SIGPIPE ignored, SIGUSR1 and SIGWINCH blocked; SIGUSR1
     * pending for the process, SIGWINCH pending for the main thread only */
    struct sigaction sa = {.sa_handler = on_usr2};
    sigemptyset(&sa.sa_mask);
    CHECK(sigaction(SIGUSR2, &sa, NULL));
    signal(SIGPIPE, SIG_IGN);
    sigset_t blk;
    sigemptyset(&blk);
    sigaddset(&blk, SIGUSR1);
    sigaddset(&blk, SIGWINCH);
    CHECK(sigprocmask(SIG_BLOCK, &blk, NULL));
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) != 0) return 1;
    while (!worker_tid) usleep(1000);
    /* POSIX timers: SIGUSR2 to the process with value 0x1234 on CLOCK_MONOTONIC, and
     * SIGUSR2 to the worker thread with value 0x5678 on CLOCK_REALTIME */
    int timer1, timer2;
    struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR2};
    sev.sigev_value.sival_ptr = (void *)0x1234;
    CHECK(syscall(SYS_timer_create, CLOCK_MONOTONIC, &sev, &timer1));
    struct sigevent sev2 = {.sigev_notify = SIGEV_THREAD_ID, .sigev_signo = SIGUSR2};
    sev2.sigev_value.sival_ptr = (void *)0x5678;
    sev2._sigev_un._tid = worker_tid;
    CHECK(syscall(SYS_timer_create, CLOCK_REALTIME, &sev2, &timer2));
    struct itimerspec tv = {.it_value = {500, 0}};
    CHECK(syscall(SYS_timer_settime, timer1, 0, &tv, NULL));
    printf("timer %d %d\n", timer1, timer2);
    CHECK(kill(getpid(), SIGUSR1));
    CHECK(syscall(SYS_tgkill, getpid(), getpid(), SIGWINCH));
    printf("tid %d\n", (int)worker_tid);
    printf("ready\n");
    fflush(stdout);

    char line[128];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, line + have, sizeof line - 1 - have);
        if (n <= 0) return 0;
        have += (size_t)n;
        char *nl;
        while ((nl = memchr(line, '\n', have)) != NULL) {
            *nl = 0;
            int fd;
            if (sscanf(line, "close %d", &fd) == 1) {
                close(fd);
                printf("closed %d\n", fd);
            } else if (strcmp(line, "ping") == 0) {
                printf("pong\n");
            }
            fflush(stdout);
            size_t used = (size_t)(nl - line) + 1;
            memmove(line, nl + 1, have - used);
            have -= used;
        }
    }
}
