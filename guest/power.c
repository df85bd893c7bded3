/* Ending the VM. The spore board has no ACPI, so reboot(RB_POWER_OFF) could only
 * halt; the clean path is the spore power port (0x510, sporevm/vmm/devices/power.py):
 * a 32-bit write powers off with that value as the exit status. It is used only
 * after reading its magic ("SPOR"), so on any other machine nothing is written. */
#define _GNU_SOURCE
#include <stdint.h>
#include <sys/io.h>
#include <sys/reboot.h>
#include <unistd.h>

#include "agent.h"

#define POWER_PORT 0x510
#define POWER_MAGIC 0x524f5053u /* "SPOR" little-endian */

static uint32_t in32(uint16_t port)
{
    uint32_t v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static void out32(uint16_t port, uint32_t v)
{
    __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port));
}

void power_off(uint32_t status, int reboot_instead)
{
    sync();
    if (reboot_instead) {
        reboot(RB_AUTOBOOT);
    } else if (ioperm(POWER_PORT, 4, 1) == 0 && in32(POWER_PORT) == POWER_MAGIC) {
        out32(POWER_PORT, status);
    }
    reboot(RB_POWER_OFF); /* elsewhere (or if the port did not stop us): halt */
    _exit((int)status);
}
