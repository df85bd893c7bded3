/* Loopback: the kernel creates `lo` down and without an address, and nothing
 * else in a spore guest would bring it up (the rootfs is the user's image, with
 * no init scripts and maybe no `ip`), so connect(127.0.0.1:…) would fail with
 * ENETUNREACH: `ready: {tcp: …}` probes and every local service need it. Plain
 * ioctls on an AF_INET socket, no netlink: six syscalls, once, at boot. The
 * state is the kernel's, so every snapshot, restore and fork keeps it. */
#define _GNU_SOURCE
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "agent.h"

static int set_in(int fd, unsigned long req, struct ifreq *ifr, uint32_t addr)
{
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(addr)};
    memcpy(&ifr->ifr_addr, &sin, sizeof sin); /* ifr_addr is a struct sockaddr */
    return ioctl(fd, req, ifr);
}

int loopback_up(void)
{
    /* A kernel without INET (machine.kernel: a user's bzImage) fails here. */
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, "lo", 3);
    int rc = -1;
    if (set_in(fd, SIOCSIFADDR, &ifr, INADDR_LOOPBACK) < 0 ||
        set_in(fd, SIOCSIFNETMASK, &ifr, 0xff000000u) < 0 || /* 127.0.0.0/8 */
        ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
        goto out;
    /* Up also gives lo ::1 where the kernel has IPv6 (addrconf does that itself);
     * the managed kernel has none (CONFIG_IPV6 is off). */
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
out:;
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* NET_CONFIG: the NIC, configured statically by the host's values (docs/network.md):
 * address/prefix, MTU, up, a default route via the gateway, and /etc/resolv.conf in
 * the overlay naming the gateway's DNS. Sent before the first step and again after
 * every restore and fork; every part is idempotent (the same address, mask and MTU
 * again change nothing, the route already there is kept). The interface is the one
 * that is not `lo`: the board has at most one NIC. */
#include <arpa/inet.h>
#include <fcntl.h>
#include <net/route.h>
#include <stdio.h>
#include <sys/stat.h>

static int first_nic(char name[IF_NAMESIZE])
{
    struct if_nameindex *all = if_nameindex();
    if (!all)
        return -1;
    int found = -1;
    for (struct if_nameindex *i = all; i->if_index; i++)
        if (strcmp(i->if_name, "lo") != 0 && strlen(i->if_name) < IF_NAMESIZE) {
            memcpy(name, i->if_name, strlen(i->if_name) + 1);
            found = 0;
            break;
        }
    if_freenameindex(all);
    if (found < 0)
        errno = ENODEV;
    return found;
}

static int default_route(int fd, const char *dev, uint32_t gw)
{
    struct rtentry rt;
    memset(&rt, 0, sizeof rt);
    struct sockaddr_in any = {.sin_family = AF_INET};
    struct sockaddr_in via = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(gw)};
    memcpy(&rt.rt_dst, &any, sizeof any);
    memcpy(&rt.rt_genmask, &any, sizeof any);
    memcpy(&rt.rt_gateway, &via, sizeof via);
    rt.rt_flags = RTF_UP | RTF_GATEWAY;
    rt.rt_dev = (char *)dev;
    if (ioctl(fd, SIOCADDRT, &rt) < 0 && errno != EEXIST)
        return -1;
    return 0;
}

static int write_resolv(uint32_t dns)
{
    char body[64];
    struct in_addr a = {.s_addr = htonl(dns)};
    char text[INET_ADDRSTRLEN];
    if (!inet_ntop(AF_INET, &a, text, sizeof text))
        return -1;
    int n = snprintf(body, sizeof body, "nameserver %s\n", text);
    mkdir("/etc", 0755);
    /* tmp + rename: a reader never sees half a file; a symlink there (systemd's stub)
     * is replaced, not followed. */
    int fd = open("/etc/.resolv.conf.spore", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW,
                  0644);
    if (fd < 0)
        return -1;
    ssize_t w = write(fd, body, (size_t)n);
    int e = errno;
    close(fd);
    if (w != n) {
        errno = w < 0 ? e : EIO;
        return -1;
    }
    return rename("/etc/.resolv.conf.spore", "/etc/resolv.conf");
}

void on_net_config(uint32_t id, struct rd *r, const struct agent_opts *o)
{
    uint32_t addr = rd_u32(r);
    uint8_t prefix = rd_u8(r);
    uint32_t gw = rd_u32(r), dns = rd_u32(r), mtu = rd_u32(r);
    uint32_t mask = prefix ? 0xffffffffu << (32 - prefix) : 0;
    if (rd_end(r) < 0 || prefix < 8 || prefix > 30 || !addr || !gw || addr == gw ||
        (addr & mask) != (gw & mask) || mtu < 68 || mtu > 65522) {
        send_error(id, E_BAD_PAYLOAD, 0, "NET_CONFIG: malformed or inconsistent fields");
        return;
    }
    if (o->sandbox) { /* never the host's network: checked, not applied */
        send_done(id);
        return;
    }
    char dev[IF_NAMESIZE];
    if (first_nic(dev) < 0) {
        send_error(id, E_SYSTEM, errno, "NET_CONFIG: no network interface besides lo");
        return;
    }
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        send_error(id, E_SYSTEM, errno, "NET_CONFIG: socket: %s", strerror(errno));
        return;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    memcpy(ifr.ifr_name, dev, strlen(dev) + 1);
    const char *step = "SIOCSIFADDR";
    if (set_in(fd, SIOCSIFADDR, &ifr, addr) < 0)
        goto fail;
    step = "SIOCSIFNETMASK";
    if (set_in(fd, SIOCSIFNETMASK, &ifr, mask) < 0)
        goto fail;
    step = "SIOCSIFMTU";
    ifr.ifr_mtu = (int)mtu;
    if (ioctl(fd, SIOCSIFMTU, &ifr) < 0)
        goto fail;
    step = "SIOCSIFFLAGS";
    if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
        goto fail;
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
        goto fail;
    step = "SIOCADDRT (default route)";
    if (default_route(fd, dev, gw) < 0)
        goto fail;
    close(fd);
    if (write_resolv(dns) < 0) {
        send_error(id, E_SYSTEM, errno, "NET_CONFIG: /etc/resolv.conf: %s", strerror(errno));
        return;
    }
    send_done(id);
    return;
fail:;
    int e = errno;
    close(fd);
    send_error(id, E_SYSTEM, e, "NET_CONFIG: %s on %s: %s", step, dev, strerror(e));
}
