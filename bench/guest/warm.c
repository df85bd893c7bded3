/* A warm working set for bench_spores.py: what a CI machine holds once warmed (a build
 * daemon's heap, a language server, a loaded test runner), and a job that uses it.
 *
 *   warm MIB DIR
 *
 * Maps MIB MiB of anonymous memory (MAP_POPULATE: one syscall instead of a page fault
 * per page, which costs milliseconds each where guest kernel code is emulated), fills
 * every page with distinct non-zero bytes (no zero chunk, no two pages alike), creates
 * the FIFO DIR/warm.fifo, writes its pid to DIR/warm.pid (the ready file) and waits.
 * On SIGUSR1 it reads all of its memory (a job using the warm state: reads only, so a
 * forked child's pages stay shared) and writes the sum into the FIFO. A job, with shell
 * builtins only:  read -r p < DIR/warm.pid; kill -USR1 $p; read -r s < DIR/warm.fifo */
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static volatile sig_atomic_t asked;

static void on_usr1(int sig) {
    (void)sig;
    asked = 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: warm MIB DIR\n");
        return 2;
    }
    size_t bytes = (size_t)strtoul(argv[1], NULL, 10) << 20;
    uint64_t *mem = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (bytes == 0 || mem == MAP_FAILED) {
        perror("warm: mmap");
        return 1;
    }
    size_t words = bytes / sizeof *mem;
    uint64_t x = 0x9e3779b97f4a7c15u;
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13, x ^= x >> 7, x ^= x << 17; /* xorshift64: never zero */
        mem[i] = x;
    }
    char fifo[4096], pidfile[4096], tmp[4096], line[32];
    snprintf(fifo, sizeof fifo, "%s/warm.fifo", argv[2]);
    snprintf(pidfile, sizeof pidfile, "%s/warm.pid", argv[2]);
    snprintf(tmp, sizeof tmp, "%s/warm.pid.tmp", argv[2]);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    if (sigaction(SIGUSR1, &sa, NULL) != 0 || mkfifo(fifo, 0600) != 0) {
        perror("warm: setup");
        return 1;
    }
    int n = snprintf(line, sizeof line, "%d\n", (int)getpid());
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || write(fd, line, (size_t)n) != n || close(fd) != 0 || rename(tmp, pidfile)) {
        perror("warm: pid file");
        return 1;
    }
    for (;;) {
        while (!asked)
            sigsuspend(&old);
        asked = 0;
        uint64_t sum = 0;
        for (size_t i = 0; i < words; i++)
            sum += mem[i];
        int out = open(fifo, O_WRONLY);
        if (out >= 0) {
            n = snprintf(line, sizeof line, "%llu\n", (unsigned long long)sum);
            if (write(out, line, (size_t)n) != n)
                perror("warm: fifo");
            close(out);
        }
    }
}
