/* A canned-reply MongoDB wire backend in C, for benchmarking dvara (and haproxy) against
 * a server that costs next to nothing per message.
 *
 *     cc -O2 -o canned_backend scripts/canned_backend.c
 *     canned_backend PORT HELLO_BSON_FILE
 *
 * HELLO_BSON_FILE holds one BSON document: the hello answer (scripts/bench.py writes it,
 * naming 127.0.0.1:PORT as the only member). On 127.0.0.1:PORT, one thread, one epoll
 * loop: an OP_MSG or OP_QUERY whose command is hello/isMaster/ismaster gets that document
 * (OP_MSG or OP_REPLY, in the request's protocol); any other OP_MSG gets {ok: 1.0}, any
 * other OP_QUERY an OP_REPLY {ok: 1.0}; OP_MSG with moreToCome and the legacy writes get
 * nothing. responseTo echoes the request's requestID. It prints "canned backend ready"
 * once it listens and exits on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FRAME (48 * 1000 * 1000)
#define OP_REPLY 1
#define OP_QUERY 2004
#define OP_MSG 2013
#define MORE_TO_COME 2u

struct conn { int fd; char *buf; size_t len, cap; };

static char *hello_doc; static size_t hello_len;
static const char ok_doc[] = {17, 0, 0, 0, 1, 'o', 'k', 0, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0};
static int32_t next_id = 1;

static int32_t rd32(const char *p) { int32_t v; memcpy(&v, p, 4); return v; }
static void wr32(char *p, int32_t v) { memcpy(p, &v, 4); }

static int is_hello(const char *doc, size_t room) {
    static const char *names[] = {"hello", "isMaster", "ismaster"};
    if (room < 6) return 0;
    const char *key = doc + 5;                 /* int32 size, one type byte, then the key */
    for (int i = 0; i < 3; i++) {
        size_t n = strlen(names[i]) + 1;
        if (room >= 5 + n && memcmp(key, names[i], n) == 0) return 1;
    }
    return 0;
}

static void send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) { if (errno == EINTR) continue; return; }
        p += k; n -= (size_t)k;
    }
}

static void reply(int fd, const char *req, int32_t len) {
    int32_t op = rd32(req + 12), rid = rd32(req + 4);
    char out[16 + 20 + 4096];
    const char *doc = ok_doc; size_t dlen = sizeof ok_doc;
    if (op == OP_MSG) {
        uint32_t flags; memcpy(&flags, req + 16, 4);
        if (flags & MORE_TO_COME) return;
        if (len > 21 && req[20] == 0 && is_hello(req + 21, (size_t)len - 21)) {
            doc = hello_doc; dlen = hello_len;
        }
        size_t total = 16 + 4 + 1 + dlen;
        wr32(out, (int32_t)total); wr32(out + 4, next_id++); wr32(out + 8, rid);
        wr32(out + 12, OP_MSG); wr32(out + 16, 0); out[20] = 0;
        memcpy(out + 21, doc, dlen);
        send_all(fd, out, total);
    } else if (op == OP_QUERY) {
        const char *ns = req + 20;
        size_t nslen = strnlen(ns, (size_t)len - 20);
        const char *q = ns + nslen + 1 + 8;
        if (q + 6 <= req + len && is_hello(q, (size_t)(req + len - q))) {
            doc = hello_doc; dlen = hello_len;
        }
        size_t total = 16 + 20 + dlen;
        wr32(out, (int32_t)total); wr32(out + 4, next_id++); wr32(out + 8, rid);
        wr32(out + 12, OP_REPLY); memset(out + 16, 0, 20); wr32(out + 32, 1);
        memcpy(out + 36, doc, dlen);
        send_all(fd, out, total);
    }
}

/* Consume every whole frame in c's buffer; -1 to close the connection. */
static int serve(struct conn *c) {
    size_t pos = 0;
    while (c->len - pos >= 4) {
        int32_t len = rd32(c->buf + pos);
        if (len < 16 || len > MAX_FRAME) return -1;
        if (c->len - pos < (size_t)len) break;
        reply(c->fd, c->buf + pos, len);
        pos += (size_t)len;
    }
    memmove(c->buf, c->buf + pos, c->len - pos);
    c->len -= pos;
    return 0;
}

static int readable(struct conn *c) {
    for (;;) {
        if (c->cap - c->len < 65536) {
            c->cap = c->cap * 2 + 65536;
            c->buf = realloc(c->buf, c->cap);
            if (!c->buf) return -1;
        }
        ssize_t k = recv(c->fd, c->buf + c->len, c->cap - c->len, MSG_DONTWAIT);
        if (k == 0) return -1;
        if (k < 0) return (errno == EAGAIN || errno == EINTR) ? serve(c) : -1;
        c->len += (size_t)k;
        if ((size_t)k < 65536) return serve(c);
    }
}

static int listen_on(int port) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) || listen(fd, 4096)) { perror("listen"); exit(1); }
    return fd;
}

static void load_hello(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(1); }
    hello_doc = malloc(4096);
    hello_len = fread(hello_doc, 1, 4096, f);
    fclose(f);
    if (hello_len < 5 || (size_t)rd32(hello_doc) != hello_len) {
        fprintf(stderr, "%s: not one BSON document under 4 KB\n", path); exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: %s PORT HELLO_BSON_FILE\n", argv[0]); return 2; }
    load_hello(argv[2]);
    int lfd = listen_on(atoi(argv[1])), ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    printf("canned backend ready on 127.0.0.1:%s\n", argv[1]);
    fflush(stdout);
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (c == NULL) {
                int fd, one = 1;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                }
            } else if (readable(c) < 0) {
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd); free(c->buf); free(c);
            }
        }
    }
}
