/* Commands: decoding, environment, posix_spawn. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

static const char *const default_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    NULL,
};

void cmd_free(struct cmd *c)
{
    free(c->cwd);
    strv_free(c->argv);
    strv_free(c->env);
    memset(c, 0, sizeof *c);
}

int cmd_read(struct rd *r, struct cmd *c, const char **why)
{
    uint32_t argc = 0, envc = 0;
    memset(c, 0, sizeof *c);
    uint8_t mode = rd_u8(r);
    c->cwd = rd_str(r, MAX_PATH_LEN);
    if (!r->bad)
        c->argv = rd_strv(r, &argc);
    if (!r->bad)
        c->env = rd_strv(r, &envc);
    if (r->bad) {
        *why = "truncated or oversized command fields";
        goto bad;
    }
    if (mode > 1) {
        *why = "unknown exec mode";
        goto bad;
    }
    c->shell = mode == 1;
    if (c->cwd[0] != '/') {
        *why = "working directory is not absolute";
        goto bad;
    }
    if (argc == 0 || (c->shell && argc != 1) || c->argv[0][0] == 0) {
        *why = "argv must be non-empty (exactly one string in shell mode)";
        goto bad;
    }
    for (uint32_t i = 0; i < envc; i++) {
        const char *eq = strchr(c->env[i], '=');
        if (!eq || eq == c->env[i]) {
            *why = "environment entry is not KEY=VALUE";
            goto bad;
        }
    }
    return 0;
bad:
    cmd_free(c);
    return -1;
}

static size_t keylen(const char *kv)
{
    const char *eq = strchr(kv, '=');
    return eq ? (size_t)(eq - kv) : strlen(kv);
}

/* defaults (unless clear_env), then overrides; a later KEY replaces an earlier one */
static char **build_env(char **over, int clear_env)
{
    size_t n = 0, cap = 0;
    for (char **p = over; p && *p; p++)
        cap++;
    cap += sizeof default_env / sizeof default_env[0];
    char **env = calloc(cap + 1, sizeof(char *));
    if (!env)
        return NULL;
    if (!clear_env)
        for (const char *const *d = default_env; *d; d++)
            env[n++] = (char *)*d;
    for (char **p = over; p && *p; p++) {
        size_t k = keylen(*p), i;
        for (i = 0; i < n; i++)
            if (keylen(env[i]) == k && strncmp(env[i], *p, k) == 0)
                break;
        env[i] = *p;
        if (i == n)
            n++;
    }
    env[n] = NULL;
    return env;
}

extern char **environ;

/* Signals the agent ignores (SIGPIPE at least): a command starts with them at
 * their defaults. Caught handlers need no reset; exec drops them. Recorded once
 * at agent start, so spawning costs no per-signal syscalls: on a software
 * hypervisor every guest syscall is expensive. */
static sigset_t ignored;

void spawn_init(void)
{
    sigemptyset(&ignored);
    for (int s = 1; s < NSIG; s++) {
        struct sigaction sa;
        if (sigaction(s, NULL, &sa) == 0 && sa.sa_handler == SIG_IGN)
            sigaddset(&ignored, s);
    }
}

/* Which step failed, for the error message: posix_spawn only returns an errno. */
static int failed_phase(const struct cmd *c)
{
    struct stat st;
    if (stat(c->cwd, &st) < 0 || !S_ISDIR(st.st_mode) || access(c->cwd, X_OK) < 0)
        return SPAWN_CHDIR;
    return SPAWN_EXEC;
}

/* execvp's PATH search done with stat() instead of one failed execve per entry:
 * before Linux 6.8 a failed execve first builds a whole new mm and copies argv
 * and envp into it, which a software hypervisor makes cost tens of ms. Same
 * result as musl's execvp: the first regular, executable file along PATH.
 * Returns 1 with the path in out, 0 to let posix_spawnp search (and say why). */
static int resolve_path(const char *file, char **env, char *out, size_t cap)
{
    const char *path = NULL;
    size_t k = strlen(file);
    if (strchr(file, '/') || k == 0)
        return 0;
    for (char **e = env; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            path = *e + 5;
    if (!path)
        return 0;
    for (const char *p = path;; p++) {
        const char *z = strchrnul(p, ':');
        size_t l = (size_t)(z - p);
        if (l == 0 || *p != '/')
            return 0; /* relative entries depend on the command's cwd: leave them to exec */
        if (l + 1 + k < cap) {
            memcpy(out, p, l);
            out[l] = '/';
            memcpy(out + l + 1, file, k + 1);
            struct stat st;
            if (stat(out, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111) &&
                access(out, X_OK) == 0)
                return 1;
        }
        if (!*z)
            return 0;
        p = z;
    }
}

/* posix_spawn (musl: vfork-style clone, no copy of the agent's page tables):
 * own session, empty signal mask, stdin /dev/null, the given stdout/stderr,
 * cwd, then exec. Synchronous: when it returns 0 the command has exec'd. */
pid_t spawn(const struct cmd *c, int clear_env, int out, int err, int *phase)
{
    *phase = SPAWN_SYSTEM;
    char **env = build_env(c->env, clear_env);
    if (!env)
        return -1;
    posix_spawnattr_t attr;
    posix_spawn_file_actions_t fa;
    sigset_t none;
    sigemptyset(&none);
    int rc = posix_spawnattr_init(&attr);
    if (rc == 0) {
        rc = posix_spawn_file_actions_init(&fa);
        if (rc != 0)
            posix_spawnattr_destroy(&attr);
    }
    if (rc != 0) {
        free(env);
        errno = rc;
        return -1;
    }
    rc = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK |
                                             POSIX_SPAWN_SETSIGDEF);
    if (!rc)
        rc = posix_spawnattr_setsigmask(&attr, &none);
    if (!rc)
        rc = posix_spawnattr_setsigdefault(&attr, &ignored);
    if (!rc)
        rc = posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDWR, 0);
    if (!rc)
        rc = posix_spawn_file_actions_adddup2(&fa, out >= 0 ? out : 0, 1);
    if (!rc)
        rc = posix_spawn_file_actions_adddup2(&fa, err >= 0 ? err : 0, 2);
    if (!rc)
        rc = posix_spawn_file_actions_addchdir_np(&fa, c->cwd);
    pid_t pid = -1;
    static char found[MAX_PATH_LEN];
    if (!rc) {
        /* posix_spawnp searches the PATH of the current environ: make it the
         * command's own for the call (the agent is single-threaded). */
        char **saved = environ;
        environ = env;
        if (c->shell) {
            char *sh[] = {"/bin/sh", "-c", c->argv[0], NULL};
            rc = posix_spawn(&pid, sh[0], &fa, &attr, sh, env);
        } else if (resolve_path(c->argv[0], env, found, sizeof found)) {
            rc = posix_spawn(&pid, found, &fa, &attr, c->argv, env);
        } else {
            rc = posix_spawnp(&pid, c->argv[0], &fa, &attr, c->argv, env);
        }
        environ = saved;
        if (rc)
            *phase = failed_phase(c);
    }
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&attr);
    free(env); /* only the vector: strings belong to c or default_env */
    if (rc) {
        errno = rc;
        return -1;
    }
    return pid;
}
