/* GENERATION: a restored (forked) guest learns its new identity before any user
 * command runs: fresh entropy into the kernel pool, wall clock, hostname, and
 * /run/spore/generation.json for programs that want to know. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

/* Identifiers are restricted so the JSON below needs no escaping. */
static int safe_id(const char *s, const char *extra)
{
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
              strchr(extra, *s)))
            return 0;
    return 1;
}

/* struct rand_pool_info, RNDADDENTROPY and RNDRESEEDCRNG from <linux/random.h>,
 * spelled out so the agent builds against libcs that ship without kernel
 * headers (musl). */
#define SPORE_RNDADDENTROPY _IOW('R', 0x03, int[2])
#define SPORE_RNDRESEEDCRNG _IO('R', 0x07)

static int add_entropy(const uint8_t *p, uint32_t n)
{
    struct {
        int entropy_count; /* bits credited */
        int buf_size;      /* bytes */
        uint8_t buf[MAX_ENTROPY];
    } req;
    if (n == 0)
        return 0;
    req.entropy_count = (int)(n * 8);
    req.buf_size = (int)n;
    memcpy(req.buf, p, n);
    /* Kept open across generations: every guest syscall counts on a resume. */
    static int fd = -1;
    if (fd < 0 && (fd = open("/dev/urandom", O_RDWR | O_CLOEXEC)) < 0)
        return -1;
    int rc = ioctl(fd, SPORE_RNDADDENTROPY, &req);
    /* Adding to the input pool does not re-key the CRNG that /dev/urandom and
     * getrandom() read from: since Linux 5.18 that happens only on a timer
     * (seconds to a minute), so forked children would return the parent's
     * next bytes until then. Force the reseed now; it fails closed. */
    if (rc == 0)
        rc = ioctl(fd, SPORE_RNDRESEEDCRNG);
    return rc;
}

static int write_json(const char *dir, const char *body, size_t len)
{
    char path[MAX_PATH_LEN], tmp[MAX_PATH_LEN];
    if (snprintf(path, sizeof path, "%s/generation.json", dir) >= (int)sizeof path ||
        snprintf(tmp, sizeof tmp, "%s/.generation.json.tmp", dir) >= (int)sizeof tmp) {
        errno = ENAMETOOLONG;
        return -1;
    }
    /* Runtime state (a tmpfs in the guest): the rename makes the file appear whole,
     * and an fsync would buy nothing but a syscall. mkdir only when missing. */
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT && mkdir(dir, 0755) == 0)
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, body, len);
    int e = errno;
    if (w != (ssize_t)len) {
        close(fd);
        errno = w < 0 ? e : EIO;
        return -1;
    }
    close(fd);
    return rename(tmp, path);
}

void on_generation(uint32_t id, struct rd *r, const struct agent_opts *o)
{
    char *gid = rd_str(r, MAX_GEN_ID);
    char *parent = rd_str(r, MAX_GEN_ID);
    uint32_t index = rd_u32(r), count = rd_u32(r);
    char *host = rd_str(r, MAX_HOSTNAME);
    uint32_t elen = 0;
    const uint8_t *ent = rd_bytes(r, MAX_ENTROPY, &elen);
    uint8_t has_time = rd_u8(r);
    int64_t sec = rd_i64(r);
    uint32_t nsec = rd_u32(r);
    (void)ent;
    if (rd_end(r) < 0 || !gid[0] || !safe_id(gid, "._:-") || !safe_id(parent, "._:-") ||
        !safe_id(host, ".-") || has_time > 1 || nsec >= 1000000000u || sec < 0) {
        send_error(id, E_BAD_PAYLOAD, 0, "GENERATION: malformed or unsafe fields");
        goto out;
    }
    if (!o->sandbox) {
        if (add_entropy(ent, elen) < 0) {
            send_error(id, E_SYSTEM, errno, "RNDADDENTROPY/RNDRESEEDCRNG: %s", strerror(errno));
            goto out;
        }
        if (has_time) {
            struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
            if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
                send_error(id, E_SYSTEM, errno, "clock_settime: %s", strerror(errno));
                goto out;
            }
        }
        if (host[0] && sethostname(host, strlen(host)) < 0) {
            send_error(id, E_SYSTEM, errno, "sethostname: %s", strerror(errno));
            goto out;
        }
    }
    char body[1024];
    int n = snprintf(body, sizeof body,
                     "{\"generation\":\"%s\",\"parent\":\"%s\",\"index\":%u,\"count\":%u,"
                     "\"hostname\":\"%s\",\"entropy_bytes\":%u,\"applied_monotonic_ns\":%llu}\n",
                     gid, parent, index, count, host, elen, (unsigned long long)mono_ns());
    if (n < 0 || (size_t)n >= sizeof body || write_json(o->run_dir, body, (size_t)n) < 0) {
        send_error(id, E_SYSTEM, errno, "write %s/generation.json: %s", o->run_dir, strerror(errno));
        goto out;
    }
    send_done(id);
out:
    free(gid);
    free(parent);
    free(host);
}
