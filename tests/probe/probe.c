/* Probe guest core: serial output, cmdline, the test runner and the board tests.
 * Runs in ring 0 with the VMM's identity-mapped page tables; no interrupts. */
#include "probe.h"

u8 *probe_boot_params;
volatile u64 probe_bp_count;
extern const struct probe_test __start_probe_tests[], __stop_probe_tests[];
extern void probe_bp_stub(void);

void *memset(void *d, int c, u64 n) { u8 *p = d; while (n--) *p++ = (u8)c; return d; }
void *memcpy(void *d, const void *s, u64 n) {
    u8 *a = d; const u8 *b = s; while (n--) *a++ = *b++; return d;
}

void putc_(char c) {
    while (!(inb(COM1 + 5) & 0x20)) {} /* LSR.THRE */
    outb(COM1, (u8)c);
}
void puts_(const char *s) { while (*s) putc_(*s++); }
void puthex(u64 v) {
    char buf[19]; int i = 18; buf[i] = 0;
    do { buf[--i] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    buf[--i] = 'x'; buf[--i] = '0';
    puts_(buf + i);
}

void power_off(u32 status) {
    outl(SPORE_POWER_PORT, status);
    for (;;) __asm__ volatile("cli; hlt");
}

static const char *cmdline(void) {
    return (const char *)(u64)*(u32 *)(probe_boot_params + 0x228);
}

const char *cmdline_get(const char *key) {
    const char *s = cmdline();
    while (*s) {
        const char *k = key, *p = s;
        while (*k && *p == *k) { k++; p++; }
        if (!*k && *p == '=') return p + 1;
        while (*s && *s != ' ') s++;
        while (*s == ' ') s++;
    }
    return 0;
}

u64 parse_num(const char *s, const char **end) {
    u64 v = 0;
    if (s[0] == '0' && s[1] == 'x') {
        s += 2;
        for (;; s++) {
            int d = *s >= '0' && *s <= '9' ? *s - '0' : *s >= 'a' && *s <= 'f' ? *s - 'a' + 10 : -1;
            if (d < 0) break;
            v = v * 16 + (u64)d;
        }
    } else {
        while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
    }
    if (end) *end = s;
    return v;
}

static const struct probe_test *find_test(const char *name, u64 len) {
    for (const struct probe_test *t = __start_probe_tests; t < __stop_probe_tests; t++) {
        u64 i = 0;
        while (i < len && t->name[i] == name[i]) i++;
        if (i == len && t->name[i] == 0) return t;
    }
    return 0;
}

void probe_main(u8 *boot_params) {
    probe_boot_params = boot_params;
    puts_("probe: start\n");
    const char *list = cmdline_get("probe.tests");
    u32 failed = 0;
    while (list && *list && *list != ' ') {
        u64 n = 0;
        while (list[n] && list[n] != ',' && list[n] != ' ') n++;
        const struct probe_test *t = find_test(list, n);
        puts_("probe: ");
        for (u64 i = 0; i < n; i++) putc_(list[i]);
        if (!t) {
            puts_(" unknown\n");
            failed++;
        } else {
            puts_("\n");
            int rc = t->fn();
            puts_("probe: ");
            puts_(t->name);
            if (rc) { puts_(" FAIL "); puthex((u64)rc); puts_("\n"); failed++; }
            else puts_(" ok\n");
        }
        list += n;
        if (*list == ',') list++;
    }
    puts_("probe: done\n");
    power_off(failed);
}

/* --- board tests ------------------------------------------------------------------- */

PROBE_TEST(hello) {
    u8 *bp = probe_boot_params;
    if (*(u32 *)(bp + 0x202) != BOOT_PARAMS_HDR_MAGIC) return 1;
    if (bp[0x210] != 0xff) return 2;
    if ((bp[0x211] & 0x81) != 0x81) return 3;
    if (!cmdline_get("probe.tests")) return 4;
    u8 n = bp[0x1e8];
    if (n < 2) return 5;
    u64 ram = 0;
    for (u8 i = 0; i < n; i++) {
        u8 *e = bp + 0x2d0 + 20 * i;
        if (*(u32 *)(e + 16) == 1) ram += *(u64 *)(e + 8);
    }
    u64 sd = *(u64 *)(bp + 0x250);
    if (!sd || *(u32 *)(sd + 8) != 9 || *(u32 *)(sd + 12) != 32) return 6;
    puts_("probe: e820 ram ");
    puthex(ram);
    puts_("\n");
    return 0;
}

/* The test port device answers a read at offset 0 with (last value written) ^ 0xa5a5a5a5,
 * truncated to the access size; offset 4 is a byte FIFO for string I/O. */
PROBE_TEST(pio) {
    outb(PROBE_TEST_PORT, 0x12);
    if (inb(PROBE_TEST_PORT) != (0x12 ^ 0xa5)) return 1;
    outw(PROBE_TEST_PORT, 0x1234);
    if (inw(PROBE_TEST_PORT) != (0x1234 ^ 0xa5a5)) return 2;
    outl(PROBE_TEST_PORT, 0x12345678);
    if (inl(PROBE_TEST_PORT) != (0x12345678u ^ 0xa5a5a5a5u)) return 3;
    static const u8 msg[4] = {'s', 'p', 'o', 'r'};
    u8 back[4] = {0};
    const u8 *src = msg;
    u8 *dst = back;
    u64 cnt = 4;
    __asm__ volatile("rep outsb" : "+S"(src), "+c"(cnt) : "d"(PROBE_TEST_PORT + 4) : "memory");
    cnt = 4;
    __asm__ volatile("rep insb" : "+D"(dst), "+c"(cnt) : "d"(PROBE_TEST_PORT + 4) : "memory");
    for (int i = 0; i < 4; i++)
        if (back[i] != msg[i]) return 4;
    return 0;
}

/* probe.mmio=ADDR: a window whose device stores what is written and reads it back ^ 0x5a..5a. */
PROBE_TEST(mmio) {
    const char *a = cmdline_get("probe.mmio");
    if (!a) return 1;
    u64 base = parse_num(a, 0);
    mmio_w8(base + 1, 0x11);
    if (mmio_r8(base + 1) != (0x11 ^ 0x5a)) return 2;
    mmio_w16(base + 2, 0x2233);
    if (mmio_r16(base + 2) != (0x2233 ^ 0x5a5a)) return 3;
    mmio_w32(base + 4, 0x44556677);
    if (mmio_r32(base + 4) != (0x44556677u ^ 0x5a5a5a5au)) return 4;
    mmio_w64(base + 8, 0x8899aabbccddeeffUL);
    if (mmio_r64(base + 8) != (0x8899aabbccddeeffUL ^ 0x5a5a5a5a5a5a5a5aUL)) return 5;
    return 0;
}

/* probe.pioloop=N: N outl's of 0..N-1 to the test port (exit-rate benchmark, pause test). */
PROBE_TEST(pioloop) {
    const char *a = cmdline_get("probe.pioloop");
    u64 n = a ? parse_num(a, 0) : 1000;
    for (u64 i = 0; i < n; i++) outl(PROBE_TEST_PORT + 8, (u32)i);
    return 0;
}

/* probe.dirty=ADDR,PAGES: write one byte into each 4 KiB page (the dirty-log test). */
PROBE_TEST(dirty) {
    const char *a = cmdline_get("probe.dirty");
    if (!a) return 1;
    const char *end;
    u64 addr = parse_num(a, &end);
    u64 pages = *end == ',' ? parse_num(end + 1, 0) : 1;
    for (u64 i = 0; i < pages; i++) *(volatile u8 *)(addr + i * 4096) = (u8)(i + 1);
    return 0;
}

PROBE_TEST(loop) {
    for (;;) __asm__ volatile("pause");
    return 1;
}

PROBE_TEST(hlt) {
    __asm__ volatile("cli; hlt");
    return 1;
}

PROBE_TEST(badport) {
    outb(0x99, 1);
    return 0;
}

PROBE_TEST(ud2) {
    __asm__ volatile("ud2"); /* no IDT: #UD -> #DF -> triple fault */
    return 1;
}

PROBE_TEST(reset) {
    outb(0x64, 0xfe);
    return 1;
}

struct idt_gate { u16 off_lo, sel; u8 ist, attr; u16 off_mid; u32 off_hi, zero; };
static struct idt_gate idt[4] __attribute__((aligned(16)));

PROBE_TEST(int3) {
    u64 h = (u64)probe_bp_stub;
    idt[3] = (struct idt_gate){(u16)h, 0x10, 0, 0x8e, (u16)(h >> 16), (u32)(h >> 32), 0};
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    __asm__ volatile("int3" ::: "memory");
    __asm__ volatile("int3" ::: "memory");
    return probe_bp_count == 2 ? 0 : 1;
}

PROBE_TEST(fwait) {
    __asm__ volatile("fwait");
    __asm__ volatile("fwait");
    return 0;
}

PROBE_TEST(idle) {
    for (;;) __asm__ volatile("sti; hlt"); /* nothing is wired to interrupt us */
    return 1;
}
