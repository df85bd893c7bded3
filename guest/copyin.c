/* COPY_IN: a tar stream from the host, unpacked under one destination path.
 *
 * The archive arrives in COPY_DATA frames (an empty one ends it) and is parsed
 * incrementally: at most one 512-byte header and one PAX header (<= 16 KiB) are
 * held, file data goes straight to the file. The path rules are those of layer
 * application on the host (sporevm/build/tarsafety.py split_name, with the
 * limits of its Limits): no "..", no NUL, names <= 4096 bytes, components <= 255,
 * depth <= 256, "." and empty components ignored; copy archives are stricter in
 * one point: an absolute name is refused, not stripped. Every member is created
 * with *at() calls from directory descriptors opened O_NOFOLLOW below the
 * destination, so a symlink already in the guest (or made by an earlier member)
 * is never written through; a member's own final symlink is replaced, never
 * followed. tests/test_copy_agent.py checks both sides refuse the same names. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"
#include "copy.h"
#include "stream.h"

enum { S_HDR, S_PAX, S_DATA, S_PAD, S_END, S_TAIL };

struct cin {
    char *dest;
    uid_t uid;
    gid_t gid;
    int failed; /* ERROR sent: swallow data until the end frame */
    int state;
    uint8_t hdr[512];
    uint32_t hlen;
    char *pax;           /* PAX extended header being collected */
    uint32_t paxlen, paxneed;
    char *pax_path, *pax_link;
    int pax_has_size;
    uint64_t pax_size;
    uint64_t remaining; /* data bytes of the current member */
    uint32_t pad;
    int fd;      /* regular file being written, -1 otherwise */
    mode_t mode; /* of that file, applied when its data is complete */
    int64_t mtime;
    int root;    /* destination directory fd; -1 before the root member or for a file root */
    int rootkind; /* 0 none yet, 'd' directory, 'f' anything else (no further members) */
    char *cdir;  /* relative path of the cached parent directory */
    int cfd;     /* its descriptor (owned), -1 if none */
    uint64_t entries;
};

static int fail(struct stream *s, uint16_t code, int err, const char *what, const char *name)
{
    struct cin *c = s->copy;
    send_error(s->id, code, err, "copy-in to %.400s: %.500s%s%s%s%s", c->dest, name ? name : "",
               name ? ": " : "", what, err ? ": " : "", err ? strerror(err) : "");
    c->failed = 1;
    return -1;
}

void copyin_free(struct stream *s)
{
    struct cin *c = s->copy;
    if (!c)
        return;
    if (c->fd >= 0)
        close(c->fd);
    if (c->root >= 0)
        close(c->root);
    if (c->cfd >= 0)
        close(c->cfd);
    free(c->dest);
    free(c->pax);
    free(c->pax_path);
    free(c->pax_link);
    free(c->cdir);
    free(c);
    s->copy = NULL;
}

void on_copy_in(uint32_t id, struct rd *r)
{
    char *dest = rd_str(r, MAX_PATH_LEN);
    uint32_t uid = rd_u32(r), gid = rd_u32(r);
    if (rd_end(r) < 0 || !dest || dest[0] != '/' || uid == (uint32_t)-1 || gid == (uint32_t)-1) {
        free(dest);
        send_error(id, E_BAD_PAYLOAD, 0, "COPY_IN: bad payload (dest must be absolute)");
        return;
    }
    struct cin *c = calloc(1, sizeof *c);
    struct stream *s = c ? alloc_stream(id) : NULL;
    if (!s) {
        if (!c)
            send_error(id, E_SYSTEM, ENOMEM, "COPY_IN: out of memory");
        free(c);
        free(dest);
        return;
    }
    s->kind = K_COPYIN;
    s->copy = c;
    c->dest = dest;
    c->uid = uid;
    c->gid = gid;
    c->fd = c->root = c->cfd = -1;
}

/* mkdir -p, following the image's own links (only the destination's parents). */
int mkdir_p(char *path, mode_t mode)
{
    for (char *p = path + 1;; p++) {
        if (*p == '/' || !*p) {
            char saved = *p;
            *p = 0;
            int rc = mkdir(path, mode);
            *p = saved;
            if (rc < 0 && errno != EEXIST)
                return -1;
            if (!saved)
                return 0;
        }
    }
}

/* ---- names: the layer rules (tarsafety.split_name) ---- */

/* Split a member name into components in place; NULL-terminated vector in comps.
 * Returns the count, or -1 with *why set. */
static int split(char *name, size_t len, char **comps, const char **why)
{
    if (len == 0 || memchr(name, 0, len)) {
        *why = len ? "name contains a NUL byte" : "name is empty";
        return -1;
    }
    if (len > MAX_PATH_LEN) {
        *why = "name is over 4096 bytes";
        return -1;
    }
    if (name[0] == '/') {
        *why = "name is absolute; copy archives name paths below the destination";
        return -1;
    }
    int n = 0;
    char *p = name, *end = name + len;
    while (p < end) {
        char *q = memchr(p, '/', (size_t)(end - p));
        if (!q)
            q = end;
        *q = 0;
        size_t l = (size_t)(q - p);
        if (l && !(l == 1 && p[0] == '.')) {
            if (l == 2 && p[0] == '.' && p[1] == '.') {
                *why = "name contains '..'";
                return -1;
            }
            if (l > 255) {
                *why = "a name component is over 255 bytes";
                return -1;
            }
            if (n >= COPY_MAX_DEPTH) {
                *why = "name is more than 256 levels deep";
                return -1;
            }
            comps[n++] = p;
        }
        p = q + 1;
    }
    comps[n] = NULL;
    return n;
}

/* Descriptor of the parent of comps[0..n-1] (n >= 1), created as needed, never via
 * a symlink. The last parent is cached: members arrive in walk order. */
static int parent_fd(struct cin *c, char **comps, int n, const char **why)
{
    char rel[MAX_PATH_LEN + 1];
    size_t l = 0;
    rel[0] = 0;
    for (int i = 0; i < n - 1; i++) {
        size_t k = strlen(comps[i]);
        if (l + k + 2 > sizeof rel) {
            *why = "name is over 4096 bytes";
            return -1;
        }
        if (l)
            rel[l++] = '/';
        memcpy(rel + l, comps[i], k);
        l += k;
        rel[l] = 0;
    }
    if (c->cfd >= 0 && c->cdir && strcmp(c->cdir, rel) == 0)
        return c->cfd;
    int fd = dup(c->root);
    if (fd < 0) {
        *why = "dup failed";
        return -1;
    }
    for (int i = 0; i < n - 1; i++) {
        int nfd = openat(fd, comps[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (nfd < 0 && errno == ENOENT) {
            if (mkdirat(fd, comps[i], 0755) < 0 && errno != EEXIST) {
                close(fd);
                *why = "cannot create a parent directory";
                return -1;
            }
            fchownat(fd, comps[i], 0, 0, AT_SYMLINK_NOFOLLOW);
            nfd = openat(fd, comps[i], O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        }
        if (nfd < 0) {
            int e = errno;
            close(fd);
            *why = (e == ELOOP || e == ENOTDIR)
                       ? "a parent is a symlink or not a directory; copies never write through links"
                       : "cannot open a parent directory";
            errno = e;
            return -1;
        }
        close(fd);
        fd = nfd;
    }
    if (c->cfd >= 0)
        close(c->cfd);
    free(c->cdir);
    c->cdir = strdup(rel);
    c->cfd = c->cdir ? fd : -1;
    if (!c->cdir) {
        close(fd);
        *why = "out of memory";
        return -1;
    }
    return fd;
}

/* Remove a non-directory at name so it can be replaced; directories are refused. */
static int clear_slot(int dfd, const char *name, int want_dir, const char **why)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? 0 : -1;
    if (S_ISDIR(st.st_mode)) {
        if (want_dir)
            return 1; /* merge into the existing directory */
        *why = "a directory is in the way";
        errno = EISDIR;
        return -1;
    }
    return unlinkat(dfd, name, 0);
}

/* ---- members ---- */

static uint64_t octal(const uint8_t *f, int n, int *bad)
{
    uint64_t v = 0;
    int i = 0, digits = 0;
    while (i < n && f[i] == ' ')
        i++;
    for (; i < n && f[i] >= '0' && f[i] <= '7'; i++, digits++)
        v = v * 8 + (uint64_t)(f[i] - '0');
    for (; i < n; i++)
        if (f[i] != 0 && f[i] != ' ')
            *bad = 1;
    if (!digits || digits > 21)
        *bad = 1;
    return v;
}

/* Create the member; type is the tar typeflag. 0 or -1 (error already sent). */
static int member(struct stream *s, char *name, size_t nlen, uint8_t type, const char *link)
{
    struct cin *c = s->copy;
    char shown[600];
    snprintf(shown, sizeof shown, "%.*s", (int)(nlen < 512 ? nlen : 512), name);
    char *comps[COPY_MAX_DEPTH + 1];
    const char *why = "";
    int n = split(name, nlen, comps, &why);
    if (n < 0)
        return fail(s, E_COPY, 0, why, shown);
    if (++c->entries > COPY_MAX_ENTRIES)
        return fail(s, E_COPY, 0, "more than 1000000 entries", NULL);
    int isdir = type == '5', isreg = type == '0' || type == 0, islnk = type == '2';
    if (!isdir && !isreg && !islnk)
        return fail(s, E_COPY, 0, "only files, directories and symlinks are copied in", shown);
    if (islnk && (!link || !*link || strlen(link) > MAX_PATH_LEN))
        return fail(s, E_COPY, 0, "symlink target is empty or too long", shown);

    int dfd;
    const char *leaf;
    char *slash = NULL;
    if (n == 0) { /* the root member: the destination itself */
        if (c->rootkind)
            return fail(s, E_COPY, 0, "a second root member", shown);
        c->rootkind = isdir ? 'd' : 'f';
        /* The destination's parents may be the image's own links (/var/run ...);
         * below the destination nothing is followed. */
        slash = strrchr(c->dest, '/');
        *slash = 0;
        if (slash != c->dest && mkdir_p(c->dest, 0755) < 0) {
            int e = errno;
            *slash = '/';
            return fail(s, E_SYSTEM, e, "cannot create the destination's parent", NULL);
        }
        dfd = open(slash == c->dest ? "/" : c->dest, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        *slash = '/';
        leaf = slash + 1;
        if (dfd < 0)
            return fail(s, E_SYSTEM, errno, "cannot open the destination's parent", NULL);
        if (!*leaf) {
            close(dfd);
            return fail(s, E_COPY, 0, "the destination names no entry", NULL);
        }
    } else {
        if (c->rootkind != 'd')
            return fail(s, E_COPY, 0, "members after a root that is not a directory", shown);
        dfd = parent_fd(c, comps, n, &why);
        if (dfd < 0)
            return fail(s, (errno == ELOOP || errno == ENOTDIR) ? E_COPY : E_SYSTEM, errno, why,
                        shown);
        leaf = comps[n - 1];
    }
    int rc = clear_slot(dfd, leaf, isdir, &why);
    int err = errno;
    if (rc >= 0 && isdir) {
        if (rc == 0 && mkdirat(dfd, leaf, 0700) < 0)
            rc = -1, err = errno, why = "mkdir";
        int fd = rc < 0 ? -1 : openat(dfd, leaf, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (rc >= 0 && fd < 0)
            rc = -1, err = errno, why = "cannot open the directory";
        if (fd >= 0) {
            if (fchown(fd, c->uid, c->gid) < 0 || fchmod(fd, c->mode & 07777) < 0)
                rc = -1, err = errno, why = "chown/chmod";
            if (n == 0 && rc >= 0)
                c->root = fd;
            else
                close(fd);
        }
    } else if (rc >= 0 && isreg) {
        c->fd = openat(dfd, leaf, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (c->fd < 0)
            rc = -1, err = errno, why = "cannot create the file";
    } else if (rc >= 0) {
        if (symlinkat(link, dfd, leaf) < 0 ||
            fchownat(dfd, leaf, c->uid, c->gid, AT_SYMLINK_NOFOLLOW) < 0)
            rc = -1, err = errno, why = "cannot create the symlink";
        else {
            struct timespec t[2] = {{c->mtime, 0}, {c->mtime, 0}};
            utimensat(dfd, leaf, t, AT_SYMLINK_NOFOLLOW);
        }
    }
    if (n == 0)
        close(dfd);
    if (rc < 0)
        return fail(s, err == EISDIR ? E_COPY : E_SYSTEM, err, why, shown);
    return 0;
}

/* The metadata of a regular file, once all its data is written. */
static int finish_file(struct stream *s)
{
    struct cin *c = s->copy;
    int bad = fchown(c->fd, c->uid, c->gid) < 0 || fchmod(c->fd, c->mode & 07777) < 0;
    struct timespec t[2] = {{c->mtime, 0}, {c->mtime, 0}};
    futimens(c->fd, t);
    int e = errno;
    close(c->fd);
    c->fd = -1;
    return bad ? fail(s, E_SYSTEM, e, "chown/chmod failed", NULL) : 0;
}

/* Parse PAX records for path, linkpath and size (the only keys the host writes
 * that matter; others are ignored). */
static int parse_pax(struct stream *s)
{
    struct cin *c = s->copy;
    char *p = c->pax, *end = c->pax + c->paxneed;
    while (p < end) {
        char *sp = memchr(p, ' ', (size_t)(end - p) < 21 ? (size_t)(end - p) : 21);
        if (!sp || sp == p)
            return fail(s, E_COPY, 0, "malformed PAX record", NULL);
        uint64_t len = 0;
        for (char *d = p; d < sp; d++) {
            if (*d < '0' || *d > '9')
                return fail(s, E_COPY, 0, "malformed PAX record length", NULL);
            len = len * 10 + (uint64_t)(*d - '0');
        }
        if (len > (uint64_t)(end - p) || p + len <= sp + 2 || p[len - 1] != '\n')
            return fail(s, E_COPY, 0, "malformed PAX record length", NULL);
        char *key = sp + 1, *rec_end = p + len - 1;
        char *eq = memchr(key, '=', (size_t)(rec_end - key));
        if (!eq || eq == key)
            return fail(s, E_COPY, 0, "malformed PAX record: no keyword", NULL);
        size_t klen = (size_t)(eq - key), vlen = (size_t)(rec_end - eq - 1);
        char **slot = klen == 4 && !memcmp(key, "path", 4)       ? &c->pax_path
                      : klen == 8 && !memcmp(key, "linkpath", 8) ? &c->pax_link
                                                                 : NULL;
        if (slot) {
            if (memchr(eq + 1, 0, vlen))
                return fail(s, E_COPY, 0, "PAX path contains a NUL byte", NULL);
            free(*slot);
            *slot = strndup(eq + 1, vlen);
            if (!*slot)
                return fail(s, E_SYSTEM, ENOMEM, "out of memory", NULL);
        } else if (klen == 4 && !memcmp(key, "size", 4)) {
            uint64_t v = 0;
            if (!vlen || vlen > 19)
                return fail(s, E_COPY, 0, "bad PAX size", NULL);
            for (size_t i = 0; i < vlen; i++) {
                char d = eq[1 + i];
                if (d < '0' || d > '9')
                    return fail(s, E_COPY, 0, "bad PAX size", NULL);
                v = v * 10 + (uint64_t)(d - '0');
            }
            c->pax_has_size = 1;
            c->pax_size = v;
        }
        p += len;
    }
    return 0;
}

static int header(struct stream *s)
{
    struct cin *c = s->copy;
    const uint8_t *h = c->hdr;
    int zero = 1;
    for (int i = 0; i < 512 && zero; i++)
        zero = h[i] == 0;
    if (zero) {
        if (c->pax_path || c->pax_link || c->pax_has_size)
            return fail(s, E_COPY, 0, "PAX header without a member", NULL);
        c->state = S_END;
        return 0;
    }
    int bad = 0;
    uint64_t sum = octal(h + 148, 8, &bad), mine = 0;
    for (int i = 0; i < 512; i++)
        mine += (i >= 148 && i < 156) ? ' ' : h[i];
    if (bad || sum != mine || memcmp(h + 257, "ustar\0", 6) != 0)
        return fail(s, E_COPY, 0, "corrupt tar header (checksum or magic)", NULL);
    uint64_t size = octal(h + 124, 12, &bad);
    c->mode = (mode_t)(octal(h + 100, 8, &bad) & 07777);
    uint64_t mt = octal(h + 136, 12, &bad);
    c->mtime = mt > INT64_MAX / 2 ? 0 : (int64_t)mt;
    uint8_t type = h[156];
    if (bad)
        return fail(s, E_COPY, 0, "corrupt tar header (numeric field)", NULL);
    if (type == 'x') {
        if (c->pax_path || c->pax_link || c->pax_has_size)
            return fail(s, E_COPY, 0, "chained PAX headers", NULL);
        if (size == 0 || size > COPY_MAX_PAX)
            return fail(s, E_COPY, 0, "PAX header over 16 KiB", NULL);
        c->pax = malloc(size);
        if (!c->pax)
            return fail(s, E_SYSTEM, ENOMEM, "out of memory", NULL);
        c->paxneed = (uint32_t)size;
        c->paxlen = 0;
        c->pad = (uint32_t)((512 - size % 512) % 512);
        c->state = S_PAX;
        return 0;
    }
    if (c->pax_has_size)
        size = c->pax_size;
    char name[MAX_PATH_LEN + 260], link[101];
    size_t nlen;
    if (c->pax_path) {
        nlen = strlen(c->pax_path);
        if (nlen > MAX_PATH_LEN)
            return fail(s, E_COPY, 0, "name is over 4096 bytes", NULL);
        memcpy(name, c->pax_path, nlen + 1);
    } else {
        size_t pl = strnlen((const char *)h + 345, 155), bl = strnlen((const char *)h, 100);
        nlen = 0;
        if (pl) {
            memcpy(name, h + 345, pl);
            name[pl] = '/';
            nlen = pl + 1;
        }
        memcpy(name + nlen, h, bl);
        nlen += bl;
        name[nlen] = 0;
    }
    while (nlen > 1 && name[nlen - 1] == '/')
        name[--nlen] = 0; /* directories carry a trailing slash */
    size_t ll = strnlen((const char *)h + 157, 100);
    memcpy(link, h + 157, ll);
    link[ll] = 0;
    int rc = member(s, name, nlen, type, c->pax_link ? c->pax_link : link);
    free(c->pax_path);
    free(c->pax_link);
    c->pax_path = c->pax_link = NULL;
    c->pax_has_size = 0;
    if (rc < 0)
        return -1;
    if (type != '0' && type != 0)
        size = 0; /* directories and links carry no data */
    c->remaining = size;
    c->pad = (uint32_t)((512 - size % 512) % 512);
    c->state = S_DATA;
    if (!size && c->fd >= 0 && finish_file(s) < 0)
        return -1;
    if (!size)
        c->state = c->pad ? S_PAD : S_HDR;
    return 0;
}

/* Feed archive bytes; 0 or -1 (ERROR sent). */
static int feed(struct stream *s, const uint8_t *p, uint32_t n)
{
    struct cin *c = s->copy;
    while (n) {
        uint32_t k;
        switch (c->state) {
        case S_HDR:
        case S_END:
            k = 512 - c->hlen < n ? 512 - c->hlen : n;
            memcpy(c->hdr + c->hlen, p, k);
            c->hlen += k;
            p += k, n -= k;
            if (c->hlen == 512) {
                c->hlen = 0;
                if (c->state == S_END) {
                    for (int i = 0; i < 512; i++)
                        if (c->hdr[i])
                            return fail(s, E_COPY, 0, "data after a zero block", NULL);
                    c->state = S_TAIL;
                } else if (header(s) < 0) {
                    return -1;
                }
            }
            break;
        case S_PAX:
            k = c->paxneed - c->paxlen < n ? c->paxneed - c->paxlen : n;
            memcpy(c->pax + c->paxlen, p, k);
            c->paxlen += k;
            p += k, n -= k;
            if (c->paxlen == c->paxneed) {
                int rc = parse_pax(s);
                free(c->pax);
                c->pax = NULL;
                if (rc < 0)
                    return -1;
                c->state = c->pad ? S_PAD : S_HDR;
            }
            break;
        case S_DATA:
            k = c->remaining < n ? (uint32_t)c->remaining : n;
            for (uint32_t done = 0; done < k;) {
                ssize_t w = write(c->fd, p + done, k - done);
                if (w < 0 && errno == EINTR)
                    continue;
                if (w <= 0)
                    return fail(s, E_SYSTEM, errno, "write failed", NULL);
                done += (uint32_t)w;
            }
            c->remaining -= k;
            p += k, n -= k;
            if (!c->remaining) {
                if (finish_file(s) < 0)
                    return -1;
                c->state = c->pad ? S_PAD : S_HDR;
            }
            break;
        case S_PAD:
            k = c->pad < n ? c->pad : n;
            c->pad -= k;
            p += k, n -= k;
            if (!c->pad)
                c->state = S_HDR;
            break;
        default: /* S_TAIL: the record padding after the end marker must be zero */
            for (uint32_t i = 0; i < n; i++)
                if (p[i])
                    return fail(s, E_COPY, 0, "data after the end-of-archive marker", NULL);
            n = 0;
        }
    }
    return 0;
}

void on_copy_data(uint32_t id, const uint8_t *p, uint32_t len)
{
    struct stream *s = find_stream(id);
    if (!s || s->kind != K_COPYIN) {
        send_error(id, E_BAD_STREAM, 0, "no copy-in on stream %u", id);
        return;
    }
    struct cin *c = s->copy;
    if (len) {
        if (!c->failed)
            feed(s, p, len);
        return;
    }
    /* the end of the archive */
    if (!c->failed) {
        if (c->state != S_TAIL)
            fail(s, E_COPY, 0, "the archive ends early (no end-of-archive marker)", NULL);
        else if (!c->rootkind)
            fail(s, E_COPY, 0, "the archive is empty", NULL);
        else
            send_done(id);
    }
    copyin_free(s);
    free_stream(s);
}
