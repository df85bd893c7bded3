/* COPY_OUT: one guest path as a tar stream towards the host.
 *
 * The walk never follows a symlink (fstatat AT_SYMLINK_NOFOLLOW, openat
 * O_NOFOLLOW); links are archived as links, FIFOs and device nodes as what they
 * are (the host refuses them; docs/cli.md), sockets are skipped. The host's
 * bounds come with the request and are checked before a byte of an entry is
 * sent, so an honest agent stops with one ERROR instead of streaming a file the
 * host would refuse; the host checks them again (the guest is not trusted).
 * Archive bytes are produced only while the queue towards the host is short:
 * a slow host slows the walk, guest memory stays bounded. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "agent.h"
#include "copy.h"
#include "stream.h"

struct cout {
    char *src;
    uint64_t max_bytes, max_entries, bytes, entries;
    DIR *dirs[COPY_MAX_DEPTH + 1];
    size_t plen[COPY_MAX_DEPTH + 1]; /* length of path for the entries of dirs[i] */
    int depth;
    char path[MAX_PATH_LEN + 512];
    int fd;             /* regular file being sent, -1 otherwise */
    uint64_t remaining; /* of its data */
    uint32_t pad;
    int started;
    uint8_t buf[COPY_CHUNK];
    uint32_t blen;
};

void copyout_free(struct stream *s)
{
    struct cout *c = s->copy;
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    for (int i = 0; i < c->depth; i++)
        closedir(c->dirs[i]);
    free(c->src);
    free(c);
    s->copy = NULL;
}

static void fail(struct stream *s, uint16_t code, int err, const char *fmt, const char *arg)
{
    struct cout *c = s->copy;
    char what[700];
    snprintf(what, sizeof what, fmt, arg);
    send_error(s->id, code, err, "copy-out of %.400s: %s%s%s", c->src, what, err ? ": " : "",
               err ? strerror(err) : "");
    copyout_free(s);
    free_stream(s);
}

void on_copy_out(uint32_t id, struct rd *r)
{
    char *src = rd_str(r, MAX_PATH_LEN);
    uint64_t max_bytes = (uint64_t)rd_i64(r), max_entries = (uint64_t)rd_i64(r);
    if (rd_end(r) < 0 || !src || src[0] != '/') {
        free(src);
        send_error(id, E_BAD_PAYLOAD, 0, "COPY_OUT: bad payload (path must be absolute)");
        return;
    }
    struct cout *c = calloc(1, sizeof *c);
    struct stream *s = c ? alloc_stream(id) : NULL;
    if (!s) {
        if (!c)
            send_error(id, E_SYSTEM, ENOMEM, "COPY_OUT: out of memory");
        free(c);
        free(src);
        return;
    }
    s->kind = K_COPYOUT;
    s->copy = c;
    c->src = src;
    c->max_bytes = max_bytes;
    c->max_entries = max_entries;
    c->fd = -1;
}

static void flush_frame(struct stream *s)
{
    struct cout *c = s->copy;
    if (c->blen)
        out_frame(T_COPY_OUT_DATA, s->id, c->buf, c->blen);
    c->blen = 0;
}

static void put(struct stream *s, const void *p, size_t n)
{
    struct cout *c = s->copy;
    const uint8_t *q = p;
    while (n) {
        size_t k = COPY_CHUNK - c->blen < n ? COPY_CHUNK - c->blen : n;
        if (q)
            memcpy(c->buf + c->blen, q, k);
        else
            memset(c->buf + c->blen, 0, k);
        c->blen += (uint32_t)k;
        n -= k;
        if (q)
            q += k;
        if (c->blen == COPY_CHUNK)
            flush_frame(s);
    }
}

static void field(uint8_t *h, int off, int width, uint64_t v)
{
    /* width-1 octal digits and a NUL, as ustar wants */
    for (int i = width - 2; i >= 0; i--, v >>= 3)
        h[off + i] = (uint8_t)('0' + (v & 7));
    h[off + width - 1] = 0;
}

static size_t pax_record(char *out, size_t cap, const char *key, const char *val)
{
    size_t body = strlen(key) + strlen(val) + 3; /* ' ' '=' '\n' */
    size_t len = body + 1;
    while (len != body + (size_t)snprintf(NULL, 0, "%zu", len))
        len = body + (size_t)snprintf(NULL, 0, "%zu", len);
    if (len > cap)
        return 0;
    snprintf(out, cap, "%zu %s=%s\n", len, key, val);
    return len;
}

/* One member header (with a PAX header first when a field does not fit ustar). */
static int header(struct stream *s, const char *name, char type, uint64_t mode, uint64_t size,
                  int64_t mtime, const char *link, unsigned major, unsigned minor)
{
    char pax[COPY_MAX_PAX];
    size_t plen = 0, k;
    const uint64_t big = 077777777777ull;
    if (strlen(name) > 99) {
        if (!(k = pax_record(pax + plen, sizeof pax - plen, "path", name)))
            return -1;
        plen += k;
    }
    if (link && strlen(link) > 99) {
        if (!(k = pax_record(pax + plen, sizeof pax - plen, "linkpath", link)))
            return -1;
        plen += k;
    }
    if (size > big) {
        char num[24];
        snprintf(num, sizeof num, "%llu", (unsigned long long)size);
        if (!(k = pax_record(pax + plen, sizeof pax - plen, "size", num)))
            return -1;
        plen += k;
    }
    uint8_t h[512];
    if (plen) {
        memset(h, 0, sizeof h);
        memcpy(h, "././@PaxHeader", 14);
        field(h, 100, 8, 0644);
        field(h, 108, 8, 0);
        field(h, 116, 8, 0);
        field(h, 124, 12, plen);
        field(h, 136, 12, 0);
        h[156] = 'x';
        memcpy(h + 257, "ustar\0" "00", 8);
        memset(h + 148, ' ', 8);
        uint64_t sum = 0;
        for (int i = 0; i < 512; i++)
            sum += h[i];
        field(h, 148, 7, sum);
        h[155] = ' ';
        put(s, h, 512);
        put(s, pax, plen);
        put(s, NULL, (512 - plen % 512) % 512);
    }
    memset(h, 0, sizeof h);
    size_t nl = strlen(name);
    memcpy(h, name, nl > 100 ? 100 : nl);
    field(h, 100, 8, mode & 07777);
    field(h, 108, 8, 0);
    field(h, 116, 8, 0);
    field(h, 124, 12, size > big ? 0 : size);
    field(h, 136, 12, mtime < 0 ? 0 : (uint64_t)mtime > big ? big : (uint64_t)mtime);
    h[156] = (uint8_t)type;
    if (link) {
        size_t ll = strlen(link);
        memcpy(h + 157, link, ll > 100 ? 100 : ll);
    }
    memcpy(h + 257, "ustar\0" "00", 8);
    if (type == '3' || type == '4') {
        field(h, 329, 8, major);
        field(h, 337, 8, minor);
    }
    memset(h + 148, ' ', 8);
    uint64_t sum = 0;
    for (int i = 0; i < 512; i++)
        sum += h[i];
    field(h, 148, 7, sum);
    h[155] = ' ';
    put(s, h, 512);
    return 0;
}

/* Archive the entry `name` of directory dfd, known to the host as c->path. */
static int entry(struct stream *s, int dfd, const char *name)
{
    struct cout *c = s->copy;
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
        fail(s, E_SYSTEM, errno, "%.600s", c->path);
        return -1;
    }
    if (S_ISSOCK(st.st_mode))
        return 0; /* a tar cannot hold a socket; tar(1) skips them too */
    if (++c->entries > c->max_entries) {
        fail(s, E_COPY, 0, "more entries than the limit (--copy-out-max-entries)%s", "");
        return -1;
    }
    int rc = 0;
    if (S_ISDIR(st.st_mode)) {
        if (c->depth >= COPY_MAX_DEPTH) {
            fail(s, E_COPY, 0, "%.600s: more than 256 levels deep", c->path);
            return -1;
        }
        int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        DIR *d = fd < 0 ? NULL : fdopendir(fd);
        if (!d) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            fail(s, E_SYSTEM, e, "%.600s", c->path);
            return -1;
        }
        if (c->path[0])
            rc = header(s, c->path, '5', st.st_mode, 0, st.st_mtim.tv_sec, NULL, 0, 0);
        c->dirs[c->depth] = d;
        c->plen[c->depth++] = strlen(c->path);
    } else if (S_ISREG(st.st_mode)) {
        uint64_t size = (uint64_t)st.st_size;
        if (size > c->max_bytes - c->bytes) {
            fail(s, E_COPY, 0, "%.600s: more bytes than the limit (--copy-out-max-bytes)",
                 c->path);
            return -1;
        }
        c->fd = openat(dfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (c->fd < 0) {
            fail(s, E_SYSTEM, errno, "%.600s", c->path);
            return -1;
        }
        c->bytes += size;
        c->remaining = size;
        c->pad = (uint32_t)((512 - size % 512) % 512);
        rc = header(s, c->path, '0', st.st_mode, size, st.st_mtim.tv_sec, NULL, 0, 0);
    } else if (S_ISLNK(st.st_mode)) {
        char link[MAX_PATH_LEN + 1];
        ssize_t n = readlinkat(dfd, name, link, sizeof link);
        if (n < 0 || (size_t)n > MAX_PATH_LEN) {
            fail(s, n < 0 ? E_SYSTEM : E_COPY, n < 0 ? errno : 0, "%.600s: bad symlink", c->path);
            return -1;
        }
        link[n] = 0;
        rc = header(s, c->path, '2', 0777, 0, st.st_mtim.tv_sec, link, 0, 0);
    } else {
        char t = S_ISFIFO(st.st_mode) ? '6' : S_ISCHR(st.st_mode) ? '3' : '4';
        rc = header(s, c->path, t, st.st_mode, 0, st.st_mtim.tv_sec, NULL, major(st.st_rdev),
                    minor(st.st_rdev));
    }
    if (rc < 0) {
        fail(s, E_COPY, 0, "%.600s: name or link target too long", c->path);
        return -1;
    }
    return 0;
}

static int start(struct stream *s)
{
    struct cout *c = s->copy;
    char *slash = strrchr(c->src, '/');
    const char *leaf = slash[1] ? slash + 1 : ".";
    *slash = 0;
    int dfd = open(slash == c->src ? "/" : c->src, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    *slash = '/';
    if (dfd < 0) {
        fail(s, E_SYSTEM, errno, "%s", "cannot open its directory");
        return -1;
    }
    struct stat st;
    int rc = fstatat(dfd, leaf, &st, AT_SYMLINK_NOFOLLOW);
    if (rc < 0) {
        int e = errno;
        close(dfd);
        fail(s, E_SYSTEM, e, "%s", "cannot stat it");
        return -1;
    }
    /* A directory's entries go into the host directory; anything else arrives as
     * one member named like it. */
    if (S_ISDIR(st.st_mode))
        c->path[0] = 0;
    else if (strlen(leaf) > 255)
        rc = -1;
    else
        strcpy(c->path, leaf);
    if (rc < 0) {
        close(dfd);
        fail(s, E_COPY, 0, "%s", "name too long");
        return -1;
    }
    rc = entry(s, dfd, leaf);
    close(dfd);
    if (rc < 0)
        return -1; /* the stream is gone */
    c->started = 1;
    return 0;
}

void copyout_step(struct stream *s, size_t room_below)
{
    struct cout *c = s->copy;
    static uint8_t tmp[COPY_CHUNK];
    uint64_t budget = 1u << 20; /* per turn, so other streams and the host are served */
    while (budget && out_pending() < room_below) {
        if (!c->started) {
            if (start(s) < 0)
                return;
            continue;
        }
        if (c->fd >= 0) {
            size_t k = c->remaining < sizeof tmp ? (size_t)c->remaining : sizeof tmp;
            ssize_t n = k ? read(c->fd, tmp, k) : 0;
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                fail(s, E_SYSTEM, errno, "%.600s: read failed", c->path);
                return;
            }
            if (n == 0 && k) { /* the file shrank while being read: keep the archive whole */
                memset(tmp, 0, k);
                n = (ssize_t)k;
            }
            put(s, tmp, (size_t)n);
            c->remaining -= (uint64_t)n;
            budget = budget > (uint64_t)n ? budget - (uint64_t)n : 0;
            if (!c->remaining) {
                put(s, NULL, c->pad);
                close(c->fd);
                c->fd = -1;
            }
            continue;
        }
        if (!c->depth) {
            put(s, NULL, 1024); /* end-of-archive marker */
            flush_frame(s);
            send_done(s->id);
            copyout_free(s);
            free_stream(s);
            return;
        }
        DIR *d = c->dirs[c->depth - 1];
        errno = 0;
        struct dirent *de = readdir(d);
        if (!de) {
            if (errno) {
                fail(s, E_SYSTEM, errno, "%s", "readdir failed");
                return;
            }
            closedir(d);
            c->depth--;
            continue;
        }
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        size_t base = c->plen[c->depth - 1], nl = strlen(de->d_name);
        if (base + nl + 2 > MAX_PATH_LEN) {
            fail(s, E_COPY, 0, "%s", "a name is over 4096 bytes");
            return;
        }
        if (base)
            c->path[base++] = '/';
        memcpy(c->path + base, de->d_name, nl + 1);
        if (entry(s, dirfd(d), de->d_name) < 0)
            return;
        budget = budget > 512 ? budget - 512 : 0;
    }
}
