/* COPY_IN / COPY_OUT: tar archives between the host and the guest's overlay
 * (docs/agent-protocol.md, "Copies"). */
#ifndef SPORE_COPY_H
#define SPORE_COPY_H

#include "agent.h"

#define COPY_MAX_DEPTH 256          /* path components, as tarsafety.Limits.max_depth */
#define COPY_MAX_ENTRIES 1000000u   /* copy-in members, as Limits.max_entries */
#define COPY_MAX_PAX 16384u         /* one PAX header: path + linkpath fit with room */
#define COPY_CHUNK 61440u           /* archive bytes per COPY_OUT_DATA frame */

struct stream;
struct rd;
void on_copy_in(uint32_t id, struct rd *r);
void on_copy_data(uint32_t id, const uint8_t *p, uint32_t len);
void on_copy_out(uint32_t id, struct rd *r);
/* Produce archive bytes while the queue towards the host has room. */
void copyout_step(struct stream *s, size_t room_below);
void copyin_free(struct stream *s);
void copyout_free(struct stream *s);
int mkdir_p(char *path, mode_t mode);

#endif
