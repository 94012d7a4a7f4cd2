/* The ceiling: a tcp_table server that answers every request line "500 " without
 * looking anything up, compiled by the bench driver with gcc.
 *
 * It has the architecture of tcpmap-server (one thread, one event loop over all
 * connections, TCP_NODELAY, one recv and one send per batch of complete lines)
 * minus every instruction of parsing, lookup and Python. Whatever separates
 * tcpmap-server from it is the server's own cost per request, not the
 * kernel's or the load generator's.
 *
 *   trivial HOST PORT      (PORT 0: any; logs "listening on HOST:PORT" to stderr)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define REPLY "500 \n"
#define REPLY_LEN (sizeof REPLY - 1)

static void die(const char *what) {
    perror(what);
    exit(2);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: trivial HOST PORT\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) die("inet_pton");
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* inherited by accepted */
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0) die("bind");
    if (listen(lfd, 1024) != 0) die("listen");
    socklen_t len = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &len);
    fprintf(stderr, "trivial: listening on %s:%d\n", argv[1], ntohs(addr.sin_port));

    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    static char in[65536];
    static char out[65536 * REPLY_LEN]; /* every byte read could be an LF */
    for (size_t i = 0; i < sizeof in; i++) memcpy(out + i * REPLY_LEN, REPLY, REPLY_LEN);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("epoll_wait");
        }
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t got = recv(fd, in, sizeof in, 0);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN) continue;
                close(fd); /* also leaves the epoll set */
                continue;
            }
            size_t lines = 0;
            for (char *p = in; (p = memchr(p, '\n', (size_t)(in + got - p))) != NULL; p++) lines++;
            if (lines && send(fd, out, lines * REPLY_LEN, MSG_NOSIGNAL) < 0 && errno != EAGAIN)
                close(fd);
        }
    }
}
