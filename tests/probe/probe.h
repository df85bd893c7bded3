/* The probe guest: freestanding helpers shared by every probe test file.
 *
 * A test is a function registered with PROBE_TEST(name); the cmdline option
 * probe.tests=a,b,c runs them in that order. Each returns 0 on success or a
 * small failure code, printed as "probe: <name> FAIL <code>".
 */
#ifndef PROBE_H
#define PROBE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

/* Board constants (docs/vmm.md). */
#define COM1 0x3f8
#define SPORE_POWER_PORT 0x510
#define PROBE_TEST_PORT 0x520 /* registered by tests/test_probe_guest.py */
#define BOOT_PARAMS_HDR_MAGIC 0x53726448u /* "HdrS" */

struct probe_test {
    const char *name;
    int (*fn)(void);
};

#define PROBE_TEST(n)                                                              \
    static int probe_test_##n(void);                                               \
    static const struct probe_test probe_entry_##n                                 \
        __attribute__((used, section(".probe_tests"), aligned(8))) = {#n, probe_test_##n}; \
    static int probe_test_##n(void)

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(p)); }
static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u16 inw(u16 p) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }

static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_w64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_r64(u64 a) { return *(volatile u64 *)a; }

/* probe.c */
extern u8 *probe_boot_params;
void putc_(char c);
void puts_(const char *s);
void puthex(u64 v);
void power_off(u32 status) __attribute__((noreturn));
/* Value of "key=" on the cmdline (points into the cmdline; ends at ' ' or NUL), or 0. */
const char *cmdline_get(const char *key);
/* Parse a 0x-hex or decimal number at s; *end (if given) gets the first unparsed char. */
u64 parse_num(const char *s, const char **end);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

#endif
