/* PROBE: readiness polling in the guest (file exists, TCP port accepts on
 * 127.0.0.1, command exits 0). One PROBE_RESULT per request, success or timeout. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"
#include "stream.h"

static void probe_result(struct stream *s, int ok)
{
    wr_init(&wbuf);
    wr_u8(&wbuf, (uint8_t)ok);
    wr_u32(&wbuf, s->attempts);
    wr_u64(&wbuf, mono_ns() - s->t0);
    wr_u32(&wbuf, (uint32_t)s->last);
    out_frame(T_PROBE_RESULT, s->id, wbuf.buf, wbuf.len);
    if (s->pid > 0 && !s->reaped)
        kill(-s->pid, SIGKILL); /* a still-running attempt; reaped as an orphan */
    free_stream(s);
}

static int tcp_attempt(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return errno;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    int rc = connect(fd, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : errno;
    if (rc == EINPROGRESS) { /* loopback normally answers at once; bound the wait */
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        socklen_t l = sizeof rc;
        if (poll(&p, 1, 50) == 1)
            getsockopt(fd, SOL_SOCKET, SO_ERROR, &rc, &l);
        else
            rc = ETIMEDOUT;
    }
    close(fd);
    return rc;
}

void probe_step(struct stream *s, uint64_t now)
{
    if (s->pid > 0) { /* a command attempt is running */
        if (!s->reaped) {
            if (now >= s->deadline) {
                s->last = -1;
                probe_result(s, 0);
            }
            return;
        }
        s->pid = 0;
        int ok = WIFEXITED(s->status) && WEXITSTATUS(s->status) == 0;
        s->last = WIFEXITED(s->status) ? WEXITSTATUS(s->status) : 128 + WTERMSIG(s->status);
        if (ok) {
            probe_result(s, 1);
            return;
        }
    } else if (now >= s->next) {
        s->attempts++;
        if (s->pkind == 1) {
            struct stat st;
            s->last = stat(s->path, &st) == 0 ? 0 : errno;
        } else if (s->pkind == 2) {
            s->last = tcp_attempt(s->port);
        } else {
            s->reaped = 0;
            int phase;
            s->pid = spawn(&s->cmd, 0, -1, -1, &phase);
            if (s->pid < 0) {
                /* a command that cannot start reads as the shell's "not found" */
                s->last = phase == SPAWN_SYSTEM ? errno : 127;
                s->pid = 0;
            } else {
                s->next = now + ms_to_ns(s->interval_ms);
                return;
            }
        }
        if (s->last == 0) {
            probe_result(s, 1);
            return;
        }
        s->next = now + ms_to_ns(s->interval_ms);
    }
    if (now >= s->deadline)
        probe_result(s, 0);
}

void on_probe(uint32_t id, struct rd *r)
{
    uint8_t kind = rd_u8(r);
    uint32_t timeout_ms = rd_u32(r), interval_ms = rd_u32(r);
    char *path = NULL;
    uint16_t port = 0;
    struct cmd c;
    memset(&c, 0, sizeof c);
    const char *why = "bad fields";
    if (kind == 1) {
        path = rd_str(r, MAX_PATH_LEN);
        if (path && path[0] != '/')
            why = "probe path is not absolute", r->bad = 1;
    } else if (kind == 2) {
        port = rd_u16(r);
        if (port == 0)
            why = "tcp port 0", r->bad = 1;
    } else if (kind == 3) {
        if (cmd_read(r, &c, &why) < 0)
            r->bad = 1;
    } else {
        why = "unknown probe kind";
        r->bad = 1;
    }
    if (rd_end(r) < 0) {
        free(path);
        cmd_free(&c);
        send_error(id, E_BAD_PAYLOAD, 0, "PROBE: %s", why);
        return;
    }
    struct stream *s = alloc_stream(id);
    if (!s) {
        free(path);
        cmd_free(&c);
        return;
    }
    s->kind = K_PROBE;
    s->pkind = kind;
    s->path = path;
    s->port = port;
    s->cmd = c;
    s->interval_ms = interval_ms < 10 ? 10 : (interval_ms > 10000 ? 10000 : interval_ms);
    s->deadline = s->t0 + ms_to_ns(timeout_ms);
    s->next = s->t0;
    probe_step(s, s->t0);
}

