/* sshspec-agent: the docker backend's guest agent (docker.agent), run inside the
 * container as the process of every program's exec.
 *
 * The engine's exec API reports an exit code only: a program killed by signal N
 * reads 128+N there, as does one that ran `exit 128+N`. Only the program's parent
 * sees the difference, and without this agent that parent is the engine's. With
 * it, the agent is the parent: it tells what it saw to the backend.
 *
 *   sshspec-agent run STATUS -- PROGRAM [ARG...]
 *       Forks PROGRAM (execvp) and waits for it. The child leads a process group of
 *       its own and, on a terminal, is its foreground group (Ctrl-C and SIGWINCH
 *       reach it, not the agent); it prints its pid and a newline on stdout before
 *       it becomes PROGRAM (the backend's pid line: its signals go to that group).
 *       Signals sent to the agent are forwarded to the child, as tini does. The
 *       agent exits as the child did: its exit code, or 128+N if killed by signal
 *       N. Whenever that is above 128 it first writes the file STATUS (created, not
 *       followed if a link, mode 0600): "signal NAME CORE" (NAME without SIG, a
 *       number for signals without one; CORE 0 or 1) or "exit CODE".
 *   sshspec-agent status STATUS
 *       Prints the file STATUS and removes it: exit 0; 1 if there is none.
 *   sshspec-agent signal NAME PID
 *       Sends signal NAME (RFC 4254's names, without SIG) to the process group PID,
 *       or to the process PID if it leads no group: exit 0; 1 if neither could be
 *       signalled; 2 for a name it does not know.
 *
 * Usage errors exit 2 with a message on stderr; a PROGRAM that cannot be run exits
 * 127 (not found) or 126, as a shell's exec does. Build: `make agent` (gcc -static).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

static const struct {
    int number;
    const char *name;
} SIGNALS[] = {
    {SIGHUP, "HUP"},     {SIGINT, "INT"},       {SIGQUIT, "QUIT"},   {SIGILL, "ILL"},
    {SIGTRAP, "TRAP"},   {SIGABRT, "ABRT"},     {SIGBUS, "BUS"},     {SIGFPE, "FPE"},
    {SIGKILL, "KILL"},   {SIGUSR1, "USR1"},     {SIGSEGV, "SEGV"},   {SIGUSR2, "USR2"},
    {SIGPIPE, "PIPE"},   {SIGALRM, "ALRM"},     {SIGTERM, "TERM"},   {SIGSTKFLT, "STKFLT"},
    {SIGCHLD, "CHLD"},   {SIGCONT, "CONT"},     {SIGSTOP, "STOP"},   {SIGTSTP, "TSTP"},
    {SIGTTIN, "TTIN"},   {SIGTTOU, "TTOU"},     {SIGURG, "URG"},     {SIGXCPU, "XCPU"},
    {SIGXFSZ, "XFSZ"},   {SIGVTALRM, "VTALRM"}, {SIGPROF, "PROF"},   {SIGWINCH, "WINCH"},
    {SIGIO, "IO"},       {SIGPWR, "PWR"},       {SIGSYS, "SYS"},
};
#define NSIGNALS (sizeof SIGNALS / sizeof SIGNALS[0])

/* The signals a fault of the agent's own raises: never blocked, so a bug kills it. */
static const int SYNCHRONOUS[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS};

static int usage(const char *why) {
    fprintf(stderr,
            "sshspec-agent: %s\n"
            "usage: sshspec-agent run STATUS -- PROGRAM [ARG...]\n"
            "       sshspec-agent status STATUS\n"
            "       sshspec-agent signal NAME PID\n",
            why);
    return 2;
}

static int write_all(int fd, const char *data, size_t size) {
    while (size > 0) {
        ssize_t n = write(fd, data, size);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        data += n;
        size -= (size_t)n;
    }
    return 0;
}

static void write_status(const char *path, int wstatus) {
    char line[64];
    int size;
    if (WIFSIGNALED(wstatus)) {
        int number = WTERMSIG(wstatus);
        const char *name = NULL;
        for (size_t i = 0; i < NSIGNALS; i++)
            if (SIGNALS[i].number == number)
                name = SIGNALS[i].name;
        if (name != NULL)
            size = snprintf(line, sizeof line, "signal %s %d\n", name, WCOREDUMP(wstatus) ? 1 : 0);
        else
            size = snprintf(line, sizeof line, "signal %d %d\n", number, WCOREDUMP(wstatus) ? 1 : 0);
    } else {
        size = snprintf(line, sizeof line, "exit %d\n", WEXITSTATUS(wstatus));
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0)
        return; /* the backend finds no status and says so (DOCKER_AGENT_READ_FAILED) */
    if (write_all(fd, line, (size_t)size) < 0 || close(fd) < 0)
        unlink(path);
}

static void child(char **argv, const sigset_t *original) {
    /* A process group of its own: the backend signals it as a whole (its pid line). */
    setpgid(0, 0);
    /* On the terminal (the exec's tty, whose session the agent leads), the child's group
     * is the foreground one. SIGTTOU is blocked here, so tcsetpgrp is allowed from what is
     * still a background group. */
    if (isatty(STDIN_FILENO) && tcgetpgrp(STDIN_FILENO) != -1)
        tcsetpgrp(STDIN_FILENO, getpgrp());
    char line[32];
    int size = snprintf(line, sizeof line, "%ld\n", (long)getpid());
    if (write_all(STDOUT_FILENO, line, (size_t)size) < 0)
        _exit(126);
    sigprocmask(SIG_SETMASK, original, NULL);
    execvp(argv[0], argv);
    int err = errno;
    fprintf(stderr, "sshspec-agent: %s: %s\n", argv[0], strerror(err));
    _exit(err == ENOENT ? 127 : 126);
}

static int run(const char *status, char **argv) {
    sigset_t all, original;
    sigfillset(&all);
    for (size_t i = 0; i < sizeof SYNCHRONOUS / sizeof SYNCHRONOUS[0]; i++)
        sigdelset(&all, SYNCHRONOUS[i]);
    sigprocmask(SIG_BLOCK, &all, &original);

    pid_t pid = fork();
    if (pid < 0) {
        fprintf(stderr, "sshspec-agent: fork: %s\n", strerror(errno));
        return 126;
    }
    if (pid == 0)
        child(argv, &original);
    setpgid(pid, pid); /* (either side may do it first; the other's call then fails) */

    /* The agent never reads: its stdin goes, so a writer to the program's stdin sees
     * the program close it (EPIPE) as it would without the agent. */
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        close(null);
    }

    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0)
            continue; /* EINTR */
        if (sig != SIGCHLD) {
            kill(pid, sig);
            continue;
        }
        int wstatus;
        pid_t done = waitpid(pid, &wstatus, WNOHANG);
        if (done != pid)
            continue;
        int code = WIFSIGNALED(wstatus) ? 128 + WTERMSIG(wstatus) : WEXITSTATUS(wstatus);
        if (code > 128)
            write_status(status, wstatus);
        return code;
    }
}

static int status(const char *path) {
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return 1;
        fprintf(stderr, "sshspec-agent: %s: %s\n", path, strerror(errno));
        return 2;
    }
    char buffer[64];
    ssize_t n = read(fd, buffer, sizeof buffer);
    close(fd);
    unlink(path);
    if (n < 0 || write_all(STDOUT_FILENO, buffer, (size_t)n) < 0)
        return 2;
    return 0;
}

static int send_signal(const char *name, const char *pid_text) {
    int number = 0;
    for (size_t i = 0; i < NSIGNALS; i++)
        if (strcmp(SIGNALS[i].name, name) == 0)
            number = SIGNALS[i].number;
    if (number == 0)
        return usage("unknown signal name");
    char *end;
    long pid = strtol(pid_text, &end, 10);
    if (*pid_text == '\0' || *end != '\0' || pid < 2)
        return usage("PID must be a process id above 1");
    if (kill((pid_t)-pid, number) == 0 || kill((pid_t)pid, number) == 0)
        return 0;
    fprintf(stderr, "sshspec-agent: signal %s to %ld: %s\n", name, pid, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc >= 5 && strcmp(argv[1], "run") == 0 && strcmp(argv[3], "--") == 0)
        return run(argv[2], argv + 4);
    if (argc == 3 && strcmp(argv[1], "status") == 0)
        return status(argv[2]);
    if (argc == 4 && strcmp(argv[1], "signal") == 0)
        return send_signal(argv[2], argv[3]);
    return usage("bad arguments");
}
