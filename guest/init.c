/* spore guest init. As PID 1: mount /proc, /sys, /dev; mount the read-only
 * rootfs under a tmpfs-backed overlay; move the API filesystems into it and
 * switch root (mount --move + chroot: pivot_root cannot leave an initramfs);
 * bring the loopback interface up (net.c); then serve the host on the agent
 * channel. With --serve-fd N it skips all of that and serves on fd N as an
 * ordinary process (tests). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "agent.h"

#define CMDLINE_MAX 4096

static void fatal(const char *what)
{
    logmsg("fatal: %s: %s; powering off", what, strerror(errno));
    power_off(1, 0);
}

static void must_mount(const char *src, const char *dst, const char *type, unsigned long fl,
                       const char *data)
{
    mkdir(dst, 0755);
    if (mount(src, dst, type, fl, data) < 0) {
        char what[256];
        snprintf(what, sizeof what, "mount %s on %s (%s)", src, dst, type);
        fatal(what);
    }
}

/* Value of key=... in the kernel cmdline: a /dev/ path or, if allow_name, a
 * virtio port name ([A-Za-z0-9._-]). */
static int cmdline_dev(const char *cmdline, const char *key, char *out, size_t outsz,
                       int allow_name)
{
    size_t kl = strlen(key);
    for (const char *p = cmdline; *p;) {
        while (*p == ' ' || *p == '\n')
            p++;
        const char *e = p;
        while (*e && *e != ' ' && *e != '\n')
            e++;
        if ((size_t)(e - p) > kl && strncmp(p, key, kl) == 0 && p[kl] == '=') {
            size_t vl = (size_t)(e - p) - kl - 1;
            const char *v = p + kl + 1;
            if (vl >= outsz || vl == 0)
                return -1;
            memcpy(out, v, vl);
            out[vl] = 0;
            if (strncmp(out, "/dev/", 5) == 0)
                return vl < 6 || strstr(out, "..") ? -1 : 0;
            if (!allow_name || vl > 64)
                return -1;
            for (size_t i = 0; i < vl; i++)
                if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
                            out[i]))
                    return -1;
            return 0;
        }
        p = e;
    }
    return 1; /* absent */
}

static void wait_for(const char *path)
{
    /* built-in virtio drivers usually probe before init runs; allow 10 s */
    for (int i = 0; i < 1000; i++) {
        if (access(path, F_OK) == 0)
            return;
        usleep(10000);
    }
    errno = ENOENT;
    fatal(path);
}

/* The virtio port whose /sys/class/virtio-ports/<port>/name is `name`: its
 * /dev/<port> into dev. The driver creates the name attribute once the host
 * named the port (docs/devices.md). */
static int find_port(const char *name, char *dev, size_t devsz)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return -1;
    int found = -1;
    struct dirent *e;
    while (found < 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.' || strlen(e->d_name) > 64)
            continue;
        char path[128], got[80];
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, got, sizeof got - 1);
        close(fd);
        if (n <= 0)
            continue;
        got[n] = 0;
        got[strcspn(got, "\n")] = 0;
        if (strcmp(got, name) == 0) {
            snprintf(dev, devsz, "/dev/%s", e->d_name);
            found = 0;
        }
    }
    closedir(d);
    return found;
}

/* `chan`: a /dev/ path (a tty such as hvc0 is set raw) or a virtio port name. */
static int open_channel(const char *chan)
{
    char dev[128];
    if (strncmp(chan, "/dev/", 5) == 0) {
        snprintf(dev, sizeof dev, "%s", chan);
    } else {
        int i = 0;
        for (; i < 1000 && find_port(chan, dev, sizeof dev) < 0; i++)
            usleep(10000); /* built-in drivers name their ports during boot; allow 10 s */
        if (i == 1000) {
            errno = ENOENT;
            fatal("no virtio port named by spore.agent=");
        }
    }
    wait_for(dev); /* devtmpfs may create the node a moment after sysfs shows it */
    int fd = open(dev, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (fd < 0)
        fatal(dev);
    struct termios t;
    if (tcgetattr(fd, &t) == 0) { /* a tty (hvc): raw bytes, no echo, no line discipline */
        cfmakeraw(&t);
        t.c_cc[VMIN] = 1;
        t.c_cc[VTIME] = 0;
        if (tcsetattr(fd, TCSANOW, &t) < 0)
            fatal("tcsetattr on the agent channel");
    }
    return fd;
}

static void boot(char *chan_dev, size_t chan_sz)
{
    char cmdline[CMDLINE_MAX + 1] = "", root[256] = "/dev/vda";
    must_mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
    must_mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, CMDLINE_MAX);
        cmdline[n > 0 ? n : 0] = 0;
        close(fd);
    }
    if (cmdline_dev(cmdline, "spore.root", root, sizeof root, 0) < 0 ||
        cmdline_dev(cmdline, "spore.agent", chan_dev, chan_sz, 1) < 0) {
        errno = EINVAL;
        fatal("spore.root= must be /dev/<name>, spore.agent= /dev/<name> or a port name");
    }
    wait_for(root);
    must_mount("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    mkdir("/run/spore", 0755);
    must_mount(root, "/run/spore/lower", "ext4", MS_RDONLY, NULL);
    must_mount("tmpfs", "/run/spore/rw", "tmpfs", 0, "mode=0755");
    mkdir("/run/spore/rw/upper", 0755);
    mkdir("/run/spore/rw/work", 0755);
    must_mount("overlay", "/newroot", "overlay", 0,
               "lowerdir=/run/spore/lower,upperdir=/run/spore/rw/upper,workdir=/run/spore/rw/work");
    /* the rootfs image may lack the mount points; the overlay makes them writable */
    const char *api[] = {"/dev", "/proc", "/sys", "/run"};
    for (size_t i = 0; i < sizeof api / sizeof api[0]; i++) {
        char dst[64];
        snprintf(dst, sizeof dst, "/newroot%s", api[i]);
        mkdir(dst, 0755);
        if (mount(api[i], dst, NULL, MS_MOVE, NULL) < 0)
            fatal(dst);
    }
    if (chdir("/newroot") < 0)
        fatal("chdir /newroot");
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
        fatal("mount --move /newroot /");
    if (chroot(".") < 0 || chdir("/") < 0)
        fatal("chroot");
    mkdir("/dev/pts", 0755);
    mkdir("/dev/shm", 01777);
    mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666");
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mkdir("/tmp", 01777);
    /* Not fatal: a user's kernel (machine.kernel) may have no IPv4 at all; the
     * console line explains a tcp probe that then never succeeds. */
    if (loopback_up() < 0)
        logmsg("loopback: cannot bring lo up with 127.0.0.1/8: %s", strerror(errno));
}

static void usage(void)
{
    fprintf(stderr, "usage: init                          (as PID 1)\n"
                    "       init --serve-fd N [--run-dir DIR] [--sandbox]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    struct agent_opts o = {.chan = -1, .run_dir = "/run/spore"};
    /* fds 0-2 must exist so pipes never land on them */
    int nul;
    while ((nul = open("/dev/null", O_RDWR)) >= 0 && nul <= 2)
        ;
    if (nul > 2)
        close(nul);
    if (getpid() == 1) {
        char chan[256] = "org.spore.agent";
        o.pid1 = 1;
        boot(chan, sizeof chan);
        o.chan = open_channel(chan);
        setsid();
        agent_serve(&o);
        fatal("agent loop ended");
    }
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--serve-fd") == 0 && i + 1 < argc) {
            char *end;
            long v = strtol(argv[++i], &end, 10);
            if (*end || v < 0 || v > 65535)
                usage();
            o.chan = (int)v;
        } else if (strcmp(argv[i], "--run-dir") == 0 && i + 1 < argc) {
            o.run_dir = argv[++i];
        } else if (strcmp(argv[i], "--sandbox") == 0) {
            o.sandbox = 1;
        } else {
            usage();
        }
    }
    if (o.chan < 0 || fcntl(o.chan, F_GETFD) < 0)
        usage();
    /* like PID 1, adopt orphaned descendants so background trees are reaped */
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    return agent_serve(&o);
}
