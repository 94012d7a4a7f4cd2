/* Closed-loop tcp_table load generator, compiled by the bench driver with gcc.
 *
 * Each connection sends "get KEY\n", waits for the whole reply line, then sends
 * the next request: one request in flight per connection, as Postfix's dict_tcp
 * client behaves. One epoll loop per thread, so the generator costs a few
 * microseconds of CPU per request and is not what limits a Python server.
 *
 *   loadgen run  HOST PORT KEYFILE CONNS WARMUP_S SECONDS [THREADS]
 *       prints one line of key=value pairs: lookups, rate, latency percentiles
 *       (microseconds, of requests completed inside the measured window) and
 *       how many replies were 2xx, 5xx, anything else, and connection errors.
 *   loadgen hold HOST PORT KEYFILE CONNS
 *       opens CONNS connections (at most 64 connecting at once), one lookup on
 *       each so the server has really taken it, prints "ready N", then keeps
 *       them open, idle, until standard input is closed.
 *   loadgen cold HOST PORT KEY
 *       one connect and one lookup; prints the microseconds from just before
 *       connect() to the end of the reply line.
 *
 * With LOADGEN_SOCKETMAP=NAME in the environment, "run" speaks socketmap_table(5)
 * instead: each request is the netstring "NAME KEY", each reply a netstring.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define REPLY_MAX 4200 /* tcp_table(5): a reply is at most 4096 bytes with its LF */

static struct sockaddr_in server;
static char **requests; /* "get KEY\n", prebuilt */
static size_t *request_len;
static size_t nrequests;
static const char *sockmap; /* LOADGEN_SOCKETMAP: the map name, or NULL for tcp_table */

static void die(const char *what) {
    perror(what);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void raise_nofile(size_t wanted) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) die("getrlimit");
    if (rl.rlim_cur >= wanted) return;
    rl.rlim_cur = wanted;
    if (rl.rlim_max < wanted) rl.rlim_max = wanted; /* root may raise the hard limit */
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) die("setrlimit RLIMIT_NOFILE");
}

static void load_keys(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) die(path);
    size_t cap = 1 << 16;
    requests = malloc(cap * sizeof *requests);
    request_len = malloc(cap * sizeof *request_len);
    char line[2048];
    while (fgets(line, sizeof line, f)) {
        size_t n = strcspn(line, "\r\n");
        if (n == 0) continue;
        if (nrequests == cap) {
            cap *= 2;
            requests = realloc(requests, cap * sizeof *requests);
            request_len = realloc(request_len, cap * sizeof *request_len);
        }
        if (sockmap) {
            size_t payload = strlen(sockmap) + 1 + n;
            char *r = malloc(payload + 32);
            int len = snprintf(r, payload + 32, "%zu:%s %.*s,", payload, sockmap, (int)n, line);
            requests[nrequests] = r;
            request_len[nrequests++] = (size_t)len;
            continue;
        }
        char *r = malloc(n + 5);
        memcpy(r, "get ", 4);
        memcpy(r + 4, line, n);
        r[n + 4] = '\n';
        requests[nrequests] = r;
        request_len[nrequests++] = n + 5;
    }
    fclose(f);
    if (nrequests == 0) {
        fprintf(stderr, "loadgen: no keys in %s\n", path);
        exit(2);
    }
}

static int connect_to(int nonblocking) {
    int fd = socket(AF_INET, SOCK_STREAM | (nonblocking ? SOCK_NONBLOCK : 0), 0);
    if (fd < 0) die("socket");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)&server, sizeof server) != 0 && errno != EINPROGRESS)
        die("connect");
    return fd;
}

/* --- run: the closed loop ------------------------------------------------- */

struct conn {
    int fd;
    size_t next;     /* index of the next request to send */
    uint64_t sent;   /* when the request in flight was sent */
    size_t have;     /* reply bytes buffered */
    char buf[REPLY_MAX];
};

struct worker {
    pthread_t thread;
    struct conn *conns;
    int nconns;
    uint64_t start, end;      /* measured window: replies completed in [start, end) */
    uint32_t *lat;            /* nanoseconds, one per measured reply */
    size_t nlat, caplat;
    uint64_t ok, notfound, other, errors, total;
};

static void send_request(struct worker *w, struct conn *c) {
    size_t i = c->next;
    c->next = (i + 1) % nrequests;
    c->sent = now_ns();
    ssize_t n = send(c->fd, requests[i], request_len[i], MSG_NOSIGNAL);
    if (n != (ssize_t)request_len[i]) { /* one short line never fills the socket */
        w->errors++;
        close(c->fd);
        c->fd = -1;
    }
}

/* Bytes of the complete reply at the start of BUF: 0 while incomplete, -1 if malformed. */
static long reply_end(const char *buf, size_t have) {
    if (!sockmap) {
        const char *lf = memchr(buf, '\n', have);
        return lf ? lf - buf + 1 : 0;
    }
    size_t len = 0, i = 0;
    for (; i < have && buf[i] >= '0' && buf[i] <= '9'; i++) len = len * 10 + (size_t)(buf[i] - '0');
    if (i == have) return 0;
    if (buf[i] != ':' || i == 0) return -1;
    size_t end = i + 1 + len;
    if (have <= end) return 0;
    return buf[end] == ',' ? (long)(end + 1) : -1;
}

static void record(struct worker *w, struct conn *c, uint64_t t) {
    w->total++;
    if (t < w->start) return;
    if (w->nlat == w->caplat) {
        w->caplat = w->caplat ? 2 * w->caplat : 1 << 20;
        w->lat = realloc(w->lat, w->caplat * sizeof *w->lat);
        if (!w->lat) die("realloc");
    }
    uint64_t d = t - c->sent;
    w->lat[w->nlat++] = d > UINT32_MAX ? UINT32_MAX : (uint32_t)d;
    const char *status = c->buf;
    if (sockmap) status = (const char *)memchr(c->buf, ':', c->have) + 1;
    switch (status[0]) {
    case '2': case 'O': w->ok++; break;       /* 200, OK */
    case '5': case 'N': w->notfound++; break; /* 500, NOTFOUND */
    default: w->other++;
    }
}

static void *run_worker(void *arg) {
    struct worker *w = arg;
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (int i = 0; i < w->nconns; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &w->conns[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, w->conns[i].fd, &ev) != 0) die("epoll_ctl");
        send_request(w, &w->conns[i]);
    }
    struct epoll_event events[256];
    int live = w->nconns;
    while (live > 0) {
        int n = epoll_wait(ep, events, 256, 100);
        if (n < 0 && errno != EINTR) die("epoll_wait");
        uint64_t t = now_ns();
        if (t >= w->end) break;
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->fd < 0) continue;
            ssize_t got = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                w->errors++;
                close(c->fd);
                c->fd = -1;
                live--;
                continue;
            }
            c->have += (size_t)got;
            long end = reply_end(c->buf, c->have);
            if (end <= 0) {
                if (end < 0 || c->have == sizeof c->buf) { /* malformed, or over the limit */
                    w->errors++;
                    close(c->fd);
                    c->fd = -1;
                    live--;
                }
                continue;
            }
            if ((size_t)end != c->have) w->other++; /* bytes past the reply */
            record(w, c, t);
            c->have = 0;
            send_request(w, c);
            if (c->fd < 0) live--;
        }
    }
    close(ep);
    return NULL;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static double percentile_us(const uint32_t *sorted, size_t n, double p) {
    if (n == 0) return 0.0;
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return sorted[i] / 1000.0;
}

static int cmd_run(int conns, double warmup, double seconds, int threads) {
    if (threads < 1) threads = 1;
    if (threads > conns) threads = conns;
    raise_nofile((size_t)conns + 64);
    struct conn *all = calloc((size_t)conns, sizeof *all);
    if (!all) die("calloc");
    for (int i = 0; i < conns; i++) {
        all[i].fd = connect_to(0); /* blocking connect, then non-blocking I/O */
        int on = 1;
        if (ioctl(all[i].fd, FIONBIO, &on) != 0) die("FIONBIO");
        /* spread the connections over the key list */
        all[i].next = (size_t)((double)i * (double)nrequests / conns);
    }
    struct worker *ws = calloc((size_t)threads, sizeof *ws);
    uint64_t t0 = now_ns();
    uint64_t start = t0 + (uint64_t)(warmup * 1e9), end = start + (uint64_t)(seconds * 1e9);
    int at = 0;
    for (int t = 0; t < threads; t++) {
        int k = conns / threads + (t < conns % threads);
        ws[t].conns = all + at;
        ws[t].nconns = k;
        ws[t].start = start;
        ws[t].end = end;
        at += k;
        if (pthread_create(&ws[t].thread, NULL, run_worker, &ws[t]) != 0) die("pthread_create");
    }
    size_t nlat = 0;
    uint64_t ok = 0, notfound = 0, other = 0, errors = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(ws[t].thread, NULL);
        nlat += ws[t].nlat;
        ok += ws[t].ok;
        notfound += ws[t].notfound;
        other += ws[t].other;
        errors += ws[t].errors;
    }
    uint32_t *lat = malloc((nlat ? nlat : 1) * sizeof *lat);
    size_t k = 0;
    for (int t = 0; t < threads; t++) {
        if (ws[t].nlat) memcpy(lat + k, ws[t].lat, ws[t].nlat * sizeof *lat);
        k += ws[t].nlat;
    }
    qsort(lat, nlat, sizeof *lat, cmp_u32);
    printf("lookups=%zu seconds=%.3f rate=%.1f p50_us=%.1f p99_us=%.1f p999_us=%.1f "
           "max_us=%.1f ok=%lu notfound=%lu other=%lu errors=%lu\n",
           nlat, seconds, nlat / seconds, percentile_us(lat, nlat, 0.50),
           percentile_us(lat, nlat, 0.99), percentile_us(lat, nlat, 0.999),
           nlat ? lat[nlat - 1] / 1000.0 : 0.0, (unsigned long)ok, (unsigned long)notfound,
           (unsigned long)other, (unsigned long)errors);
    for (int i = 0; i < conns; i++)
        if (all[i].fd >= 0) close(all[i].fd);
    return errors ? 1 : 0;
}

/* --- hold: many idle connections ------------------------------------------ */

#define HOLD_CONNECTING 64 /* below every listen backlog, so no SYN is dropped */

static int cmd_hold(int conns) {
    raise_nofile((size_t)conns + 64);
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    struct conn *all = calloc((size_t)conns, sizeof *all);
    if (!all) die("calloc");
    int started = 0, done = 0, busy = 0;
    struct epoll_event events[256];
    while (done < conns) {
        while (busy < HOLD_CONNECTING && started < conns) {
            struct conn *c = &all[started];
            c->fd = connect_to(1);
            c->next = (size_t)started % nrequests;
            c->sent = 0; /* 0: connecting; 1: request sent */
            struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) die("epoll_ctl");
            started++;
            busy++;
        }
        int n = epoll_wait(ep, events, 256, 10000);
        if (n == 0) {
            fprintf(stderr, "loadgen: hold: no progress for 10 s at %d connections\n", done);
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c->sent == 0) {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err) {
                    errno = err;
                    die("connect");
                }
                size_t r = c->next;
                if (send(c->fd, requests[r], request_len[r], MSG_NOSIGNAL) != (ssize_t)request_len[r])
                    die("send");
                c->sent = 1;
                struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
                continue;
            }
            ssize_t got = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
            if (got <= 0) {
                fprintf(stderr, "loadgen: hold: connection %ld closed by the server\n",
                        (long)(c - all));
                return 1;
            }
            c->have += (size_t)got;
            if (memchr(c->buf, '\n', c->have)) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                busy--;
                done++;
            }
        }
    }
    printf("ready %d\n", done);
    fflush(stdout);
    char sink[256];
    while (read(0, sink, sizeof sink) > 0) {
    }
    return 0;
}

/* --- cold: one connect, one lookup ----------------------------------------- */

static int cmd_cold(const char *key) {
    char req[2048];
    int n = snprintf(req, sizeof req, "get %s\n", key);
    char buf[REPLY_MAX];
    size_t have = 0;
    uint64_t t0 = now_ns();
    int fd = connect_to(0);
    if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n) die("send");
    for (;;) {
        ssize_t got = recv(fd, buf + have, sizeof buf - have, 0);
        if (got <= 0) {
            fprintf(stderr, "loadgen: cold: no reply\n");
            return 1;
        }
        have += (size_t)got;
        if (memchr(buf, '\n', have)) break;
    }
    uint64_t t1 = now_ns();
    printf("first_reply_us=%.1f reply=%.3s\n", (t1 - t0) / 1000.0, buf);
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: loadgen run|hold|cold HOST PORT ...\n");
        return 2;
    }
    server.sin_family = AF_INET;
    server.sin_port = htons((uint16_t)atoi(argv[3]));
    if (inet_pton(AF_INET, argv[2], &server.sin_addr) != 1) {
        fprintf(stderr, "loadgen: bad IPv4 address %s\n", argv[2]);
        return 2;
    }
    if (strcmp(argv[1], "cold") == 0) return cmd_cold(argv[4]);
    if (strcmp(argv[1], "run") == 0) sockmap = getenv("LOADGEN_SOCKETMAP");
    load_keys(argv[4]);
    if (strcmp(argv[1], "hold") == 0 && argc == 6) return cmd_hold(atoi(argv[5]));
    if (strcmp(argv[1], "run") == 0 && (argc == 8 || argc == 9))
        return cmd_run(atoi(argv[5]), atof(argv[6]), atof(argv[7]), argc == 9 ? atoi(argv[8]) : 1);
    fprintf(stderr, "loadgen: bad arguments\n");
    return 2;
}
