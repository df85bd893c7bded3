/* The agent loop: one poll() multiplexes the host channel, SIGCHLD (signalfd),
 * every child's stdout/stderr/error pipe and the nearest timer (exec timeouts,
 * probe attempts). Backpressure: child pipes are read only while the queue
 * towards the host is short, and host input is read only while replies fit. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "copy.h"
#include "stream.h"

#define PIPE_LIMIT (256u << 10) /* stop reading children above this much queued output */
#define INPUT_LIMIT (1u << 20)  /* stop reading host requests above this much queued output */
#define CHUNK 32768u

static struct stream streams[MAX_STREAMS];
static int orphans[MAX_ORPHANS]; /* pipes still held by descendants after EXIT: drained */
static const struct agent_opts *opt;
static uint8_t inbuf[HDR_SIZE + MAX_PAYLOAD];
static uint32_t inlen;
static int resyncing; /* after a framing error: skip to the next magic, report once */
static int input_eof;
static int shutting_down;
struct wr wbuf; /* scratch payload for replies (single-threaded) */

struct stream *find_stream(uint32_t id)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].kind != K_FREE && streams[i].id == id)
            return &streams[i];
    return NULL;
}

struct stream *alloc_stream(uint32_t id)
{
    if (id == 0) {
        send_error(id, E_BAD_STREAM, 0, "stream id 0 is reserved");
        return NULL;
    }
    if (find_stream(id)) {
        send_error(id, E_BAD_STREAM, 0, "stream %u is already in use", id);
        return NULL;
    }
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].kind == K_FREE) {
            struct stream *s = &streams[i];
            memset(s, 0, sizeof *s);
            s->id = id;
            s->fd[0] = s->fd[1] = -1;
            s->t0 = mono_ns();
            return s;
        }
    send_error(id, E_BUSY, 0, "too many live streams (limit %d)", MAX_STREAMS);
    return NULL;
}

static void add_orphan(int fd)
{
    for (int i = 0; i < MAX_ORPHANS; i++)
        if (orphans[i] < 0) {
            orphans[i] = fd;
            return;
        }
    close(fd); /* too many: the holders get EPIPE, the agent stays bounded */
}

void free_stream(struct stream *s)
{
    for (int i = 0; i < 2; i++)
        if (s->fd[i] >= 0)
            add_orphan(s->fd[i]);
    if (s->kind == K_COPYIN)
        copyin_free(s);
    else if (s->kind == K_COPYOUT)
        copyout_free(s);
    free(s->path);
    cmd_free(&s->cmd);
    memset(s, 0, sizeof *s);
    s->fd[0] = s->fd[1] = -1;
}

uint64_t ms_to_ns(uint32_t ms) { return (uint64_t)ms * 1000000u; }

/* ---- exec ---- */

static int make_pipe(int *rd_end, int *wr_end)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0)
        return -1;
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    *rd_end = p[0];
    *wr_end = p[1];
    return 0;
}

static void on_exec(uint32_t id, struct rd *r)
{
    struct cmd c;
    const char *why = "bad fields";
    uint8_t flags = rd_u8(r);
    uint32_t timeout_ms = rd_u32(r);
    if (r->bad || (flags & ~3u) || cmd_read(r, &c, &why) < 0) {
        send_error(id, E_BAD_PAYLOAD, 0, "EXEC: %s", (flags & ~3u) ? "unknown flags" : why);
        return;
    }
    if (rd_end(r) < 0) {
        cmd_free(&c);
        send_error(id, E_BAD_PAYLOAD, 0, "EXEC: trailing bytes");
        return;
    }
    struct stream *s = alloc_stream(id);
    if (!s) {
        cmd_free(&c);
        return;
    }
    s->kind = K_EXEC;
    int w[2] = {-1, -1};
    if (make_pipe(&s->fd[0], &w[0]) < 0 || make_pipe(&s->fd[1], &w[1]) < 0) {
        int e = errno;
        if (w[0] >= 0)
            close(w[0]);
        send_error(id, E_SYSTEM, e, "pipe: %s", strerror(e));
        cmd_free(&c);
        free_stream(s);
        return;
    }
    int phase;
    s->pid = spawn(&c, flags & 2, w[0], w[1], &phase);
    int e = errno;
    close(w[0]);
    close(w[1]);
    if (s->pid < 0) {
        if (phase == SPAWN_SYSTEM)
            send_error(id, E_SYSTEM, e, "spawn: %s", strerror(e));
        else
            send_error(id, E_EXEC_FAILED, e, "%s %s: %s", phase == SPAWN_CHDIR ? "chdir" : "exec",
                       phase == SPAWN_CHDIR ? c.cwd : (c.shell ? "/bin/sh" : c.argv[0]),
                       strerror(e));
        cmd_free(&c);
        free_stream(s);
        return;
    }
    cmd_free(&c);
    if (timeout_ms)
        s->deadline = s->t0 + ms_to_ns(timeout_ms);
    wr_init(&wbuf);
    wr_u32(&wbuf, (uint32_t)s->pid);
    out_frame(T_STARTED, s->id, wbuf.buf, wbuf.len);
}

/* Read one chunk from a child pipe: 1 data, 0 empty for now, -1 closed. */
static int pump_pipe(struct stream *s, int i)
{
    static uint8_t buf[CHUNK];
    if (s->fd[i] < 0)
        return -1;
    ssize_t n = read(s->fd[i], buf, sizeof buf);
    if (n > 0) {
        if (s->kind == K_EXEC)
            out_frame(i ? T_STDERR : T_STDOUT, s->id, buf, (uint32_t)n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    close(s->fd[i]);
    s->fd[i] = -1;
    return -1;
}

static void send_exit(struct stream *s)
{
    int st = s->status;
    int sig = WIFSIGNALED(st);
    wr_init(&wbuf);
    wr_u8(&wbuf, (uint8_t)sig);
    wr_u8(&wbuf, (uint8_t)s->timed_out);
    wr_u32(&wbuf, (uint32_t)(sig ? WTERMSIG(st) : WEXITSTATUS(st)));
    wr_u64(&wbuf, mono_ns() - s->t0);
    wr_u64(&wbuf, (uint64_t)s->ru.ru_utime.tv_sec * 1000000u + (uint64_t)s->ru.ru_utime.tv_usec);
    wr_u64(&wbuf, (uint64_t)s->ru.ru_stime.tv_sec * 1000000u + (uint64_t)s->ru.ru_stime.tv_usec);
    out_frame(T_EXIT, s->id, wbuf.buf, wbuf.len);
}

/* After the direct child is reaped: forward what it left in the pipes, then EXIT.
 * Pipes still open after that are held by descendants and become orphans. */
static void finish_exec(struct stream *s)
{
    for (int i = 0; i < 2; i++) {
        int rc;
        while (out_pending() < PIPE_LIMIT && (rc = pump_pipe(s, i)) > 0)
            ;
        if (out_pending() >= PIPE_LIMIT)
            return; /* backpressure: finish on a later turn */
    }
    send_exit(s);
    free_stream(s);
}

/* ---- other requests ---- */

static void on_signal(uint32_t id, struct rd *r)
{
    uint32_t sig = rd_u32(r);
    if (rd_end(r) < 0 || sig < 1 || sig >= (uint32_t)NSIG) {
        send_error(id, E_BAD_PAYLOAD, 0, "SIGNAL: bad signal number");
        return;
    }
    struct stream *s = find_stream(id);
    if (s && s->kind == K_COPYOUT) { /* the host refused the archive: stop sending it */
        free_stream(s);
        send_done(id);
        return;
    }
    if (!s || s->kind != K_EXEC || s->pid <= 0) {
        send_error(id, E_BAD_STREAM, ESRCH, "no running command on stream %u", id);
        return;
    }
    if (kill(-s->pid, (int)sig) < 0 && kill(s->pid, (int)sig) < 0) {
        send_error(id, E_SYSTEM, errno, "kill: %s", strerror(errno));
        return;
    }
    send_done(id);
}

static void on_hello(uint32_t id, struct rd *r)
{
    uint64_t nonce = (uint64_t)rd_i64(r);
    (void)rd_u32(r); /* host capabilities: none defined yet */
    if (rd_end(r) < 0) {
        send_error(id, E_BAD_PAYLOAD, 0, "HELLO: bad payload");
        return;
    }
    wr_init(&wbuf);
    wr_u64(&wbuf, nonce);
    wr_bytes(&wbuf, AGENT_VERSION, sizeof AGENT_VERSION - 1);
    wr_u64(&wbuf, AGENT_CAPS);
    out_frame(T_ACK, id, wbuf.buf, wbuf.len);
}

static void on_set_time(uint32_t id, struct rd *r)
{
    int64_t sec = rd_i64(r);
    uint32_t nsec = rd_u32(r);
    if (rd_end(r) < 0 || nsec >= 1000000000u || sec < 0) {
        send_error(id, E_BAD_PAYLOAD, 0, "SET_TIME: bad time");
        return;
    }
    if (!opt->sandbox) {
        struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
        if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
            send_error(id, E_SYSTEM, errno, "clock_settime: %s", strerror(errno));
            return;
        }
    }
    send_done(id);
}

static void kill_all_streams(void)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (streams[i].kind != K_FREE && streams[i].pid > 0 && !streams[i].reaped)
            kill(-streams[i].pid, SIGKILL);
}

static void on_shutdown(uint32_t id, struct rd *r)
{
    uint8_t action = rd_u8(r);
    if (rd_end(r) < 0 || action > 1) {
        send_error(id, E_BAD_PAYLOAD, 0, "SHUTDOWN: bad action");
        return;
    }
    send_done(id);
    out_flush(1);
    if (!opt->pid1) {
        shutting_down = 1;
        return;
    }
    kill(-1, SIGTERM);
    power_off(0, action == 1);
}

static void dispatch(uint8_t type, uint32_t id, const uint8_t *p, uint32_t len)
{
    struct rd r;
    rd_init(&r, p, len);
    switch (type) {
    case T_HELLO: on_hello(id, &r); break;
    case T_EXEC: on_exec(id, &r); break;
    case T_SIGNAL: on_signal(id, &r); break;
    case T_PROBE: on_probe(id, &r); break;
    case T_SET_TIME: on_set_time(id, &r); break;
    case T_GENERATION: on_generation(id, &r, opt); break;
    case T_NET_CONFIG: on_net_config(id, &r, opt); break;
    case T_SHUTDOWN: on_shutdown(id, &r); break;
    case T_COPY_IN: on_copy_in(id, &r); break;
    case T_COPY_DATA: on_copy_data(id, p, len); break;
    case T_COPY_OUT: on_copy_out(id, &r); break;
    default: send_error(id, E_UNKNOWN_TYPE, 0, "unknown request type 0x%02x", type);
    }
}

/* Parse complete frames out of inbuf. Framing errors are reported once and the
 * parser skips ahead to the next magic: the agent never dies on host bytes. */
static void parse_input(void)
{
    uint32_t off = 0;
    while (inlen - off >= HDR_SIZE || (resyncing && inlen - off >= 4)) {
        const uint8_t *h = inbuf + off;
        if (memcmp(h, "SPAG", 4) != 0) {
            if (!resyncing)
                send_error(0, E_BAD_FRAME, 0, "bad magic at input byte offset %u", off);
            resyncing = 1;
            off++;
            continue;
        }
        if (inlen - off < HDR_SIZE)
            break;
        uint32_t stream = (uint32_t)h[8] | (uint32_t)h[9] << 8 | (uint32_t)h[10] << 16 |
                          (uint32_t)h[11] << 24;
        uint32_t len = (uint32_t)h[12] | (uint32_t)h[13] << 8 | (uint32_t)h[14] << 16 |
                       (uint32_t)h[15] << 24;
        const char *bad = h[4] != PROTO_VERSION ? "unsupported protocol version"
                          : (h[6] | h[7])      ? "reserved flags set"
                          : len > MAX_PAYLOAD  ? "payload length over 64 KiB"
                                               : NULL;
        if (bad) {
            if (!resyncing)
                send_error(stream, E_BAD_FRAME, 0, "%s (version %u, length %u)", bad, h[4], len);
            resyncing = 1;
            off++;
            continue;
        }
        if (inlen - off - HDR_SIZE < len)
            break;
        resyncing = 0;
        dispatch(h[5], stream, h + HDR_SIZE, len);
        off += HDR_SIZE + len;
        if (shutting_down)
            break;
    }
    if (resyncing && inlen - off > 3) /* keep a possible partial magic only */
        off = inlen - 3;
    memmove(inbuf, inbuf + off, inlen - off);
    inlen -= off;
}

static void reap(void)
{
    for (;;) {
        int st;
        struct rusage ru;
        pid_t pid = wait4(-1, &st, WNOHANG, &ru);
        if (pid <= 0)
            return;
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->kind != K_FREE && s->pid == pid && !s->reaped) {
                s->reaped = 1;
                s->status = st;
                s->ru = ru;
            }
        }
    }
}

int agent_serve(const struct agent_opts *o)
{
    opt = o;
    for (int i = 0; i < MAX_ORPHANS; i++)
        orphans[i] = -1;
    for (int i = 0; i < MAX_STREAMS; i++)
        streams[i].fd[0] = streams[i].fd[1] = -1;
    signal(SIGPIPE, SIG_IGN);
    spawn_init();
    sigset_t chld;
    sigemptyset(&chld);
    sigaddset(&chld, SIGCHLD);
    sigprocmask(SIG_BLOCK, &chld, NULL);
    int sfd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
    fcntl(o->chan, F_SETFD, FD_CLOEXEC);
    fcntl(o->chan, F_SETFL, fcntl(o->chan, F_GETFL) | O_NONBLOCK);
    out_init(o->chan);

    struct timespec up;
    clock_gettime(CLOCK_BOOTTIME, &up);
    wr_init(&wbuf);
    wr_u32(&wbuf, PROTO_VERSION);
    wr_bytes(&wbuf, AGENT_VERSION, sizeof AGENT_VERSION - 1);
    wr_u64(&wbuf, AGENT_CAPS);
    wr_u32(&wbuf, (uint32_t)getpid());
    wr_u64(&wbuf, (uint64_t)up.tv_sec * 1000000000u + (uint64_t)up.tv_nsec);
    /* CPUs online: the host checks them against the vCPUs it gave the VM, so a
     * kernel without SMP fails loudly instead of running on one CPU. */
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    wr_u32(&wbuf, cpus > 0 ? (uint32_t)cpus : 0);
    out_frame(T_READY, 0, wbuf.buf, wbuf.len);

    struct pollfd pf[2 + MAX_STREAMS * 3 + MAX_ORPHANS];
    int pidx[MAX_STREAMS][2];
    for (;;) {
        if (out_flush(0) < 0 && !o->pid1)
            break; /* host gone */
        if (shutting_down || (input_eof && !o->pid1))
            break;
        uint64_t now = mono_ns();
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->kind == K_EXEC && s->deadline && now >= s->deadline && !s->reaped &&
                !s->timed_out) {
                kill(-s->pid, SIGKILL);
                s->timed_out = 1;
            }
            if (s->kind == K_EXEC && s->reaped)
                finish_exec(s);
            else if (s->kind == K_PROBE)
                probe_step(s, now);
            else if (s->kind == K_COPYOUT)
                copyout_step(s, PIPE_LIMIT);
        }
        if (out_flush(0) < 0 && !o->pid1)
            break;

        nfds_t n = 0;
        int timeout = -1;
        pf[n++] = (struct pollfd){.fd = o->chan,
            .events = (short)((!input_eof && out_pending() < INPUT_LIMIT ? POLLIN : 0) |
                              (out_pending() ? POLLOUT : 0))};
        pf[n++] = (struct pollfd){.fd = sfd, .events = POLLIN};
        int room = out_pending() < PIPE_LIMIT;
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            pidx[i][0] = pidx[i][1] = -1;
            if (s->kind == K_FREE)
                continue;
            if (room) {
                for (int j = 0; j < 2; j++)
                    if (s->fd[j] >= 0) {
                        pidx[i][j] = (int)n;
                        pf[n++] = (struct pollfd){.fd = s->fd[j], .events = POLLIN};
                    }
            }
            if (s->kind == K_COPYOUT && out_pending() < PIPE_LIMIT)
                timeout = 0; /* more archive to produce as soon as the queue has room */
            uint64_t due = s->kind == K_PROBE ? (s->pid > 0 ? s->deadline : s->next)
                                              : (s->timed_out ? 0 : s->deadline);
            if (s->kind == K_PROBE && s->deadline < due)
                due = s->deadline;
            if (due) {
                uint64_t ms = due <= now ? 0 : (due - now + 999999) / 1000000;
                if (ms > 60000)
                    ms = 60000;
                if (timeout < 0 || (int)ms < timeout)
                    timeout = (int)ms;
            }
        }
        int first_orphan = (int)n;
        for (int i = 0; i < MAX_ORPHANS; i++)
            if (orphans[i] >= 0)
                pf[n++] = (struct pollfd){.fd = orphans[i], .events = POLLIN};

        if (poll(pf, n, timeout) < 0 && errno != EINTR) {
            logmsg("poll: %s", strerror(errno));
            sleep(1);
            continue;
        }
        if (pf[1].revents) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) > 0)
                ;
            reap();
        }

        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR) && !input_eof) {
            /* A virtio port read returns one receive buffer (a page): drain what
             * is queued before parsing, not one page per trip round the loop. */
            ssize_t r = 1;
            while (inlen < sizeof inbuf &&
                   (r = read(o->chan, inbuf + inlen, sizeof inbuf - inlen)) > 0)
                inlen += (uint32_t)r;
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR))
                input_eof = 1;
            parse_input();
        }
        for (int i = 0; i < MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->kind == K_FREE)
                continue;
            if (s->kind == K_EXEC && !s->reaped)
                for (int j = 0; j < 2; j++)
                    if (pidx[i][j] >= 0 && pf[pidx[i][j]].revents && out_pending() < PIPE_LIMIT)
                        pump_pipe(s, j);
        }
        static uint8_t sink[CHUNK];
        for (nfds_t k = (nfds_t)first_orphan; k < n; k++) {
            if (!pf[k].revents)
                continue;
            for (int i = 0; i < MAX_ORPHANS; i++) {
                if (orphans[i] != pf[k].fd)
                    continue;
                ssize_t r = read(orphans[i], sink, sizeof sink);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(orphans[i]);
                    orphans[i] = -1;
                }
            }
        }
    }
    kill_all_streams();
    return 0;
}
