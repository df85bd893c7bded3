/* Live streams (commands and probes), shared by agent.c and probe.c. */
#ifndef SPORE_STREAM_H
#define SPORE_STREAM_H

#include <sys/resource.h>

#include "agent.h"

enum kind { K_FREE = 0, K_EXEC, K_PROBE, K_COPYIN, K_COPYOUT };

struct stream {
    enum kind kind;
    uint32_t id;
    pid_t pid;          /* exec child, or the running command-probe attempt */
    int fd[2];          /* stdout, stderr read ends (-1 when closed) */
    int reaped;
    int status;
    struct rusage ru;
    int timed_out;
    uint64_t t0, deadline; /* monotonic ns; deadline 0 = none */
    /* probe */
    uint8_t pkind;
    uint64_t next;
    uint32_t interval_ms, attempts;
    int32_t last;
    char *path;
    uint16_t port;
    struct cmd cmd;
    void *copy; /* copyin.c / copyout.c state */
};

extern struct wr wbuf;
struct stream *alloc_stream(uint32_t id);
struct stream *find_stream(uint32_t id);
void free_stream(struct stream *s);
uint64_t ms_to_ns(uint32_t ms);
void probe_step(struct stream *s, uint64_t now);
void on_probe(uint32_t id, struct rd *r);

#endif
