/* Commands: decoding, environment, fork + exec with an error pipe. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
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

/* Runs in the child only: async-signal-safe calls, then exec or report. */
static void child(const struct cmd *c, char **env, int out, int err, int ep)
{
    struct { int32_t phase, err; } rep;
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int s = 1; s < NSIG; s++)
        signal(s, SIG_DFL); /* the agent ignores SIGPIPE; commands must not inherit that */
    setsid(); /* own process group: SIGNAL and timeouts hit the whole group */
    int nul = open("/dev/null", O_RDWR);
    if (nul >= 0 && nul != 0)
        dup2(nul, 0);
    else if (nul < 0)
        close(0);
    dup2(out >= 0 ? out : nul, 1);
    dup2(err >= 0 ? err : nul, 2);
    if (nul > 2)
        close(nul);
    rep.phase = 1;
    if (chdir(c->cwd) < 0)
        goto fail;
    rep.phase = 2;
    environ = env;
    if (c->shell) {
        char *sh[] = {"/bin/sh", "-c", c->argv[0], NULL};
        execv(sh[0], sh);
    } else {
        execvp(c->argv[0], c->argv);
    }
fail:
    rep.err = errno;
    ssize_t ignored = write(ep, &rep, sizeof rep);
    (void)ignored;
    _exit(127);
}

pid_t spawn(const struct cmd *c, int clear_env, int out, int err, int *errpipe_rd)
{
    int ep[2];
    char **env = build_env(c->env, clear_env);
    if (!env)
        return -1;
    if (pipe2(ep, O_CLOEXEC) < 0) {
        free(env);
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0)
        child(c, env, out, err, ep[1]);
    int saved = errno;
    free(env); /* only the vector: strings belong to c or default_env */
    close(ep[1]);
    if (pid < 0) {
        close(ep[0]);
        errno = saved;
        return -1;
    }
    fcntl(ep[0], F_SETFL, O_NONBLOCK);
    *errpipe_rd = ep[0];
    return pid;
}
