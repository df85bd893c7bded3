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
