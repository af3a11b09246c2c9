/* failsys: make chosen operating-system calls fail inside `sshspec serve`.
 *
 * Loaded with LD_PRELOAD into the server subprocess by tests/test_codes_live.py
 * (built there with `gcc -shared -fPIC -o failsys.so failsys.c -ldl`). Every
 * call passes through to libc unless its environment variable says otherwise:
 *
 *   FAILSYS_REUSEADDR=ERRNO    setsockopt(SOL_SOCKET, SO_REUSEADDR) fails with
 *                              ERRNO (a number; anything else: ENOPROTOOPT).
 *   FAILSYS_LISTEN_CLOSE=ERRNO close() of a listening socket (SO_ACCEPTCONN)
 *                              really closes it, then reports ERRNO (a number;
 *                              anything else: EIO), as Linux does when close()
 *                              fails: the descriptor is gone either way.
 *   FAILSYS_SEND_FLAG=PATH     while the file PATH exists (checked on every
 *                              call), send/sendto/sendmsg/write/writev on a TCP
 *                              socket fail with EPIPE and send nothing. The test
 *                              (or the server's own handler) arms it by creating
 *                              the file at the moment a send must fail.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int (*real_setsockopt)(int, int, int, const void *, socklen_t);
static int (*real_close)(int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);

/* libc's own function, looked up on first use (even before constructors ran). */
#define RESOLVE(var, name)                       \
    do {                                         \
        if ((var) == NULL)                       \
            (var) = dlsym(RTLD_NEXT, name);      \
    } while (0)

/* The errno named by variable NAME: 0 when unset, FALLBACK when not a number. */
static int wanted_errno(const char *name, int fallback) {
    const char *value = getenv(name);
    if (value == NULL || *value == '\0')
        return 0;
    char *end;
    long number = strtol(value, &end, 10);
    return (*end == '\0' && number > 0 && number < 4096) ? (int)number : fallback;
}

static int is_listening(int fd) {
    int saved = errno, on = 0;
    socklen_t len = sizeof on;
    int ok = getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &on, &len) == 0 && on;
    errno = saved;
    return ok;
}

static int is_tcp(int fd) {
    int saved = errno, type = 0;
    socklen_t len = sizeof type;
    struct sockaddr_storage addr;
    socklen_t alen = sizeof addr;
    int ok = getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == 0 && type == SOCK_STREAM
             && getsockname(fd, (struct sockaddr *)&addr, &alen) == 0
             && (addr.ss_family == AF_INET || addr.ss_family == AF_INET6);
    errno = saved;
    return ok;
}

/* True while the flag file exists and fd is a TCP socket. */
static int send_fails(int fd) {
    const char *flag = getenv("FAILSYS_SEND_FLAG");
    if (flag == NULL || *flag == '\0' || !is_tcp(fd))
        return 0;
    int saved = errno;
    int armed = access(flag, F_OK) == 0;
    errno = saved;
    return armed;
}

int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen) {
    if (level == SOL_SOCKET && optname == SO_REUSEADDR) {
        int err = wanted_errno("FAILSYS_REUSEADDR", ENOPROTOOPT);
        if (err) {
            errno = err;
            return -1;
        }
    }
    RESOLVE(real_setsockopt, "setsockopt");
    return real_setsockopt(fd, level, optname, optval, optlen);
}

int close(int fd) {
    RESOLVE(real_close, "close");
    int err = wanted_errno("FAILSYS_LISTEN_CLOSE", EIO);
    if (err && is_listening(fd)) {
        real_close(fd);
        errno = err;
        return -1;
    }
    return real_close(fd);
}

#define FAIL_IF_ARMED(fd)        \
    do {                         \
        if (send_fails(fd)) {    \
            errno = EPIPE;       \
            return -1;           \
        }                        \
    } while (0)

ssize_t send(int fd, const void *buf, size_t len, int flags) {
    FAIL_IF_ARMED(fd);
    RESOLVE(real_send, "send");
    return real_send(fd, buf, len, flags);
}

ssize_t sendto(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to,
               socklen_t tolen) {
    FAIL_IF_ARMED(fd);
    RESOLVE(real_sendto, "sendto");
    return real_sendto(fd, buf, len, flags, to, tolen);
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    FAIL_IF_ARMED(fd);
    RESOLVE(real_sendmsg, "sendmsg");
    return real_sendmsg(fd, msg, flags);
}

ssize_t write(int fd, const void *buf, size_t len) {
    FAIL_IF_ARMED(fd);
    RESOLVE(real_write, "write");
    return real_write(fd, buf, len);
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    FAIL_IF_ARMED(fd);
    RESOLVE(real_writev, "writev");
    return real_writev(fd, iov, iovcnt);
}
