/* A warm working set for bench_spores.py: what a CI machine holds once warmed (a build
 * daemon's heap, a language server, a loaded test runner).
 *
 *   warm MIB READY_FILE
 *
 * Maps MIB MiB of anonymous memory (MAP_POPULATE: one syscall instead of a page fault
 * per page, which costs milliseconds each where guest kernel code is emulated), fills
 * every page with distinct non-zero bytes (no zero chunk, no two pages alike), writes
 * "ready" to READY_FILE and then sleeps forever, holding the memory, as a background
 * step of a Sporefile. */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: warm MIB READY_FILE\n");
        return 2;
    }
    size_t bytes = (size_t)strtoul(argv[1], NULL, 10) << 20;
    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (bytes == 0 || mem == MAP_FAILED) {
        perror("warm: mmap");
        return 1;
    }
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < bytes / sizeof *mem; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64: never zero */
        mem[i] = x;
    }
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, "ready\n", 6) != 6 || close(fd) != 0) {
        perror("warm: ready file");
        return 1;
    }
    for (;;)
        pause();
}
