/* Target that never stops creating short-lived threads (each lives about 200 us), so threads
 * appear and vanish while a tracer attaches. Prints "ready" once the first wave runs, and
 * "spawned <n>" on every line read from stdin. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long spawned;

static void *short_lived(void *arg) {
    (void)arg;
    struct timespec ts = {0, 200 * 1000};
    nanosleep(&ts, NULL);
    return NULL;
}

static void *spawner(void *arg) {
    (void)arg;
    for (;;) {
        pthread_t t;
        if (pthread_create(&t, NULL, short_lived, NULL) == 0) {
            pthread_detach(t);
            spawned++;
        }
        struct timespec ts = {0, 20 * 1000};
        nanosleep(&ts, NULL);
    }
    return NULL;
}

int main(void) {
    pthread_t t;
    for (int i = 0; i < 2; i++) pthread_create(&t, NULL, spawner, NULL);
    while (spawned < 100) usleep(1000);
    dprintf(1, "ready\n");
    char buf[256];
    while (read(0, buf, sizeof buf) > 0) dprintf(1, "spawned %lu\n", spawned);
    return 0;
}
