/* spore guest init + agent: shared declarations.
 * Wire format: docs/agent-protocol.md (host side: sporevm/vmm/agent.py). */
#ifndef SPORE_AGENT_H
#define SPORE_AGENT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define AGENT_VERSION "spore-agent/1.0"
#define PROTO_VERSION 1
#define HDR_SIZE 16
#define MAX_PAYLOAD 65536u
#define MAX_PATH_LEN 4096u
#define MAX_STREAMS 64
#define MAX_ORPHANS 64
#define MAX_ERRMSG 1024u
#define MAX_ENTROPY 1024u
#define MAX_GEN_ID 128u
#define MAX_HOSTNAME 64u

enum msg_type {
    T_HELLO = 0x01, T_EXEC = 0x02, T_SIGNAL = 0x03, T_PROBE = 0x04,
    T_SET_TIME = 0x05, T_GENERATION = 0x06, T_SHUTDOWN = 0x07,
    T_COPY_IN = 0x08, T_COPY_DATA = 0x09, T_COPY_OUT = 0x0A,
    T_NET_CONFIG = 0x0E, /* 0x08-0x0D: left to the copy messages (issue 17) */
    T_READY = 0x81, T_ACK = 0x82, T_STARTED = 0x83, T_STDOUT = 0x84,
    T_STDERR = 0x85, T_EXIT = 0x86, T_ERROR = 0x87, T_PROBE_RESULT = 0x88,
    T_DONE = 0x89, T_COPY_OUT_DATA = 0x8A,
};

enum err_code {
    E_BAD_FRAME = 1, E_UNKNOWN_TYPE = 2, E_BAD_PAYLOAD = 3, E_BAD_STREAM = 4,
    E_EXEC_FAILED = 5, E_SYSTEM = 6, E_BUSY = 7, E_UNSUPPORTED = 8,
    E_COPY = 9, /* a copy refused by its rules or bounds (a member name, a limit) */
};

/* ---- payload reader: every access bounds-checked, sticky failure flag ---- */
struct rd {
    const uint8_t *p;
    uint32_t len, pos;
    int bad;
};
void rd_init(struct rd *r, const uint8_t *p, uint32_t len);
uint8_t rd_u8(struct rd *r);
uint16_t rd_u16(struct rd *r);
uint32_t rd_u32(struct rd *r);
int64_t rd_i64(struct rd *r);
/* A length-prefixed field copied to a fresh NUL-terminated string; NULL (and
 * r->bad set) if truncated, longer than limit, or containing NUL. */
char *rd_str(struct rd *r, uint32_t limit);
/* A length-prefixed byte field by reference into the payload. */
const uint8_t *rd_bytes(struct rd *r, uint32_t limit, uint32_t *n);
/* A list of strings as a NULL-terminated, malloc'd vector (free with strv_free). */
char **rd_strv(struct rd *r, uint32_t *count);
int rd_end(struct rd *r); /* 0 if the payload was consumed exactly and nothing failed */
void strv_free(char **v);

/* ---- payload writer (bounded by MAX_PAYLOAD) ---- */
struct wr {
    uint8_t buf[MAX_PAYLOAD];
    uint32_t len;
    int bad;
};
void wr_init(struct wr *w);
void wr_u8(struct wr *w, uint8_t v);
void wr_u16(struct wr *w, uint16_t v);
void wr_u32(struct wr *w, uint32_t v);
void wr_u64(struct wr *w, uint64_t v);
void wr_bytes(struct wr *w, const void *p, uint32_t n); /* length-prefixed */

/* ---- outgoing frame queue towards the host ---- */
void out_init(int fd);
size_t out_pending(void);
void out_frame(uint8_t type, uint32_t stream, const void *payload, uint32_t len);
int out_flush(int blocking); /* -1 if the channel is gone */
void send_error(uint32_t stream, uint16_t code, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void send_done(uint32_t stream);

/* ---- spawning ---- */
struct cmd {
    int shell;
    char *cwd;
    char **argv;
    char **env; /* KEY=VALUE overrides */
};
void cmd_free(struct cmd *c);
int cmd_read(struct rd *r, struct cmd *c, const char **why);
/* Start a command; out/err: fds for its stdout/stderr (-1: /dev/null). Returns
 * its pid once it has exec'd, or -1 with errno set and *phase saying which step
 * failed. spawn_init() runs once at agent start. */
enum { SPAWN_SYSTEM = 0, SPAWN_CHDIR = 1, SPAWN_EXEC = 2 };
void spawn_init(void);
pid_t spawn(const struct cmd *c, int clear_env, int out, int err, int *phase);

/* ---- the agent loop ---- */
struct agent_opts {
    int chan;          /* the channel fd */
    int pid1;          /* we are init: power off on SHUTDOWN, reap everything */
    int sandbox;       /* do not touch host-global state (clock, hostname, entropy) */
    const char *run_dir; /* where generation.json goes */
};
int agent_serve(const struct agent_opts *o);
void on_generation(uint32_t id, struct rd *r, const struct agent_opts *o);
void on_net_config(uint32_t id, struct rd *r, const struct agent_opts *o);

/* capabilities announced in READY/ACK: bit n set = request type n understood */
#define AGENT_CAPS ((1u << T_HELLO) | (1u << T_EXEC) | (1u << T_SIGNAL) | (1u << T_PROBE) | \
                    (1u << T_SET_TIME) | (1u << T_GENERATION) | (1u << T_SHUTDOWN) | \
                    (1u << T_NET_CONFIG) | (1u << T_COPY_IN) | (1u << T_COPY_DATA) | \
                    (1u << T_COPY_OUT))

/* PID 1 at boot: lo up with 127.0.0.1/8; -1 with errno set on failure */
int loopback_up(void);

/* sync, then power off with status (spore power port) or reboot; never returns */
void power_off(uint32_t status, int reboot_instead) __attribute__((noreturn));

uint64_t mono_ns(void);
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
