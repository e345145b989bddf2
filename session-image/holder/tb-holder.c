/*
 * tb-holder: keeps a termbridge session's shell alive between gateway connections.
 *
 *   tb-holder serve [-- COMMAND...]   the container's main process (run by the entrypoint as root)
 *   tb-holder attach [--offset N] [--repaint] [--framed --size COLSxROWS]
 *                                     attach to the session's shell (starting it on first use)
 *
 * The holder owns the shell's pty, keeps the last RING_SIZE bytes of its output with an absolute
 * byte count, and serves attach clients on a unix socket. An attach client hands the holder its
 * own stdin and stdout (SCM_RIGHTS): the holder then moves bytes between the shell's pty and the
 * client's terminal itself, so the hot path is one process and no terminal emulation; the client
 * only forwards window changes and exits with the shell's status.
 *
 * Two ways to attach. On a terminal (a person, `ssh -t`): the client sets it raw and forwards
 * SIGWINCH. `--framed` (the gateway: an SSH channel without a pty, so no second terminal on the
 * byte path): stdin carries frames, [type][length, 2 bytes big-endian][payload]: 'd' input
 * bytes, 'w' a new size (rows, cols: 2 bytes big-endian each); stdout is the raw output.
 *
 * The attach client's output starts with one header, an APC string a terminal ignores:
 *   ESC _ tb-holder 1 offset=N lost=M shell=new|running ESC \
 * N: the absolute offset of the next byte (the one asked for, or the oldest kept, or the end);
 * M: bytes asked for that are gone. Then raw output. Exit status: the shell's (128+signal when a
 * signal ended it, 129 when the holder hung it up: idle, lifetime, docker stop); killed by
 * SIGUSR1: it was let go for taking no output while a buffer behind (attach again); before any
 * header, 2 usage, 3 no holder, 4 refused (not the session's user, no account yet, ending, full),
 * 255 the holder went away.
 *
 * Why not dtach/abduco/tmux: tmux and screen re-render every byte; dtach keeps nothing while
 * nobody is attached, has no absolute offsets and no idle or lifetime limits.
 *
 * Everything between the two halves is one binary, so the messages are plain structs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <inttypes.h>
#include <poll.h>
#include <pty.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define SOCK_DIR "/run/termbridge/holder"
#define SOCK_PATH SOCK_DIR "/holder.sock"
#define RING_SIZE (1u << 20)
#define CHUNK (64u * 1024)
/* The pty is not read while every attached client is this far behind: the fastest client sets
 * the pace (like sshd's own flow control). A slower one (a replay) may fall behind up to the
 * ring's size; there it holds the pty too while it takes output, and is dropped once it took
 * nothing for STALL_MS, so one stuck client does not stop the others for long. */
#define FLOW_HIGH (256u * 1024)
#define STALL_MS 3000
#define MAX_CLIENTS 16
#define MAX_MSG 4096
/* termbridge-adduser writes the session account's uid here once the account is complete. */
#define ACCOUNT_FILE "/run/termbridge/account"
/* ... and then sends SIGUSR1 to the pid written here, so the account can attach at once. */
#define PID_FILE "/run/termbridge/holder.pid"
#define HANGUP_GRACE_MS 2000
#define FINISH_MS 5000

/* Exit statuses of `attach` when it never got to the shell (after the header: the shell's). */
#define EXIT_USAGE 2
#define EXIT_NO_HOLDER 3
#define EXIT_REFUSED 4
#define EXIT_HOLDER_LOST 255

enum msg_type { MSG_HELLO = 1, MSG_WINCH, MSG_EXIT, MSG_DROP, MSG_ERROR };
enum { HELLO_REPAINT = 1, HELLO_FRAMED = 2 };
enum { FRAME_DATA = 'd', FRAME_WINCH = 'w' };

struct msg_hello {
    uint8_t type, flags;
    uint16_t rows, cols;
    uint64_t offset;
    char env[]; /* NAME=VALUE\0 ... for a new shell: TERM, LANG, LC_* */
};
struct msg_winch { uint8_t type; uint16_t rows, cols; };
struct msg_exit { uint8_t type; int32_t status; };
struct msg_text { uint8_t type; char text[256]; };

static void logf_(const char *fmt, ...) {
    va_list ap;
    char line[512];
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    dprintf(2, "tb-holder: %s\n", line);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

/* ---------------------------------------------------------------------------------------------- */
/* serve                                                                                           */

struct client {
    int ctl, in, out; /* -1: not open */
    uint64_t pos;     /* absolute offset of the next output byte this client gets */
    char hdr[160];
    size_t hdr_len, hdr_off;
    uint16_t rows, cols;
    const char *gone; /* why it is detached at the end of this poll round, or NULL */
    int64_t progress_at; /* when it last took output */
    int framed;
    uint8_t fhdr[3], fctl[4]; /* the frame being read: its header, a control frame's payload */
    size_t fhdr_len, fctl_len, fleft;
};

static struct {
    char ring[RING_SIZE];
    uint64_t total; /* bytes ever read from the shell's pty */
    struct client clients[MAX_CLIENTS];
    int nclients;
    int listen_fd, sig_fd, master;
    pid_t shell, companion;
    int shell_status, shell_done, master_done;
    uid_t session_uid; /* (uid_t)-1 until the account exists */
    int root_mode;
    uint16_t rows, cols;
    /* input read from a client that the pty did not take yet; client input waits meanwhile */
    char pending[CHUNK];
    size_t pending_len, pending_off;
    int64_t started, claimed, last_activity, idle_ms, lifetime_ms;
    int64_t finish_by;
    const char *ending;
} H = {.listen_fd = -1, .sig_fd = -1, .master = -1, .shell = -1, .companion = -1};

static uint64_t ring_start(void) { return H.total > RING_SIZE ? H.total - RING_SIZE : 0; }

static void send_msg(int fd, const void *msg, size_t len) {
    if (send(fd, msg, len, MSG_NOSIGNAL | MSG_DONTWAIT) < 0 && errno != EPIPE && errno != ECONNRESET)
        logf_("message to a client failed: %s", strerror(errno));
}

static void send_text(int fd, uint8_t type, const char *text) {
    struct msg_text m = {.type = type};
    snprintf(m.text, sizeof m.text, "%s", text);
    send_msg(fd, &m, 1 + strlen(m.text) + 1);
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

static void detach(int i, const char *why) {
    struct client *c = &H.clients[i];
    if (why) logf_("client %d detached: %s", c->ctl, why);
    close_fd(&c->ctl);
    if (c->in != c->out) close_fd(&c->in);
    c->in = -1;
    close_fd(&c->out);
    H.clients[i] = H.clients[--H.nclients];
    H.last_activity = now_ms();
}

static void set_size(uint16_t rows, uint16_t cols) {
    if (!rows || !cols || H.master < 0 || (rows == H.rows && cols == H.cols)) return;
    struct winsize ws = {.ws_row = rows, .ws_col = cols};
    if (ioctl(H.master, TIOCSWINSZ, &ws) == 0) H.rows = rows, H.cols = cols;
}

/* A full-screen program redraws on SIGWINCH. The kernel sends one to the foreground job on every
 * real size change, so the size changes by a column and back: the holder has no CAP_KILL over the
 * user's processes, and needs none. */
static void nudge_repaint(void) {
    struct winsize ws = {.ws_row = H.rows, .ws_col = H.cols > 1 ? H.cols - 1 : H.cols + 1};
    if (H.master < 0 || ioctl(H.master, TIOCSWINSZ, &ws)) return;
    ws.ws_col = H.cols;
    ioctl(H.master, TIOCSWINSZ, &ws);
}

static const char *allowed_env(const char *kv) {
    static const char *const names[] = {"TERM=", "LANG=", "LC_", NULL};
    for (const char *const *n = names; *n; n++)
        if (strncmp(kv, *n, strlen(*n)) == 0 && strchr(kv, '=') && strlen(kv) < 256) return kv;
    return NULL;
}

static int spawn_shell(const struct client *c, const char *env, size_t env_len) {
    struct passwd *pw = getpwuid(H.session_uid);
    if (!pw) return -1;
    struct winsize ws = {.ws_row = c->rows ? c->rows : 24, .ws_col = c->cols ? c->cols : 80};
    char home[512], shell[512], name[256], mail[300];
    snprintf(home, sizeof home, "%s", pw->pw_dir);
    snprintf(shell, sizeof shell, "%s", pw->pw_shell && *pw->pw_shell ? pw->pw_shell : "/bin/sh");
    snprintf(name, sizeof name, "%s", pw->pw_name);
    snprintf(mail, sizeof mail, "/var/mail/%s", name);
    gid_t gid = pw->pw_gid;
    struct group *tty = getgrnam("tty");
    gid_t tty_gid = tty ? tty->gr_gid : gid;
    int master;
    pid_t pid = forkpty(&master, NULL, NULL, &ws);
    if (pid < 0) return -1;
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        /* the terminal belongs to the user, as sshd hands it over (mode first: root is not its owner after) */
        if (fchmod(0, 0620) || fchown(0, H.session_uid, tty_gid)) dprintf(2, "tb-holder: tty owner: %m\r\n");
        if (initgroups(name, gid) || setgid(gid) || setuid(H.session_uid) ||
            (H.session_uid != 0 && setuid(0) == 0)) {
            dprintf(2, "tb-holder: cannot become %s: %m\r\n", name);
            _exit(126);
        }
        if (chdir(home)) chdir("/");
        clearenv();
        setenv("HOME", home, 1);
        setenv("USER", name, 1);
        setenv("LOGNAME", name, 1);
        setenv("SHELL", shell, 1);
        setenv("MAIL", mail, 1);
        setenv("PATH", H.session_uid == 0 ? "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
                                          : "/usr/local/bin:/usr/bin:/bin:/usr/games", 1);
        setenv("TERM", "xterm-256color", 1);
        for (size_t off = 0; off < env_len;) {
            const char *kv = env + off;
            size_t len = strnlen(kv, env_len - off);
            if (off + len < env_len && allowed_env(kv)) putenv((char *)kv);
            off += len + 1;
        }
        const char *base = strrchr(shell, '/');
        char argv0[520];
        snprintf(argv0, sizeof argv0, "-%s", base ? base + 1 : shell);
        execl(shell, argv0, (char *)NULL);
        dprintf(2, "tb-holder: cannot run %s: %m\r\n", shell);
        _exit(127);
    }
    fcntl(master, F_SETFD, FD_CLOEXEC);
    set_nonblock(master);
    H.master = master;
    H.shell = pid;
    H.rows = ws.ws_row, H.cols = ws.ws_col;
    H.last_activity = now_ms();
    logf_("shell %d started for %s", pid, name);
    return 0;
}

/* The session's account exists (at start, or once a pooled container is claimed): from now on
 * its user may reach the socket (the directory's group becomes the account's) and attach. */
static int claimed(void) {
    if (H.claimed) return 1;
    if (!H.root_mode) {
        FILE *f = fopen(ACCOUNT_FILE, "re");
        unsigned long uid = 0;
        int ok = f && fscanf(f, "%lu", &uid) == 1 && uid >= 1000 && uid < (uid_t)-1;
        if (f) fclose(f);
        struct passwd *pw = ok ? getpwuid((uid_t)uid) : NULL;
        if (!pw) return 0;
        if (chown(SOCK_DIR, 0, pw->pw_gid) || chown(SOCK_PATH, 0, pw->pw_gid) || chmod(SOCK_DIR, 0750))
            logf_("cannot open %s to the session's group: %s", SOCK_DIR, strerror(errno));
        H.session_uid = (uid_t)uid;
    }
    H.claimed = now_ms();
    return 1;
}

static void handle_hello(int fd, const struct msg_hello *m, size_t len, const int *fds, int nfds, uid_t uid) {
    if (nfds != 2 || len < sizeof *m) {
        send_text(fd, MSG_ERROR, "bad attach request");
        goto refuse;
    }
    if (H.shell_done || H.ending) {
        send_text(fd, MSG_ERROR, "the session is ending");
        goto refuse;
    }
    if (H.nclients == MAX_CLIENTS) {
        send_text(fd, MSG_ERROR, "too many attachments");
        goto refuse;
    }
    struct client *c = &H.clients[H.nclients];
    *c = (struct client){.ctl = fd, .in = fds[0], .out = fds[1], .rows = m->rows, .cols = m->cols,
                         .framed = (m->flags & HELLO_FRAMED) != 0, .progress_at = now_ms()};
    const char *state = "running";
    if (H.shell < 0) {
        if (!claimed() || spawn_shell(c, m->env, len - sizeof *m) < 0) {
            send_text(fd, MSG_ERROR, "no account for the session's shell yet");
            logf_("attach by uid %u refused: cannot start the shell (%s)", uid, strerror(errno));
            goto refuse;
        }
        state = "new";
    }
    set_nonblock(c->in);
    set_nonblock(c->out);
    uint64_t lost = 0, from = m->offset;
    if (from < ring_start()) lost = ring_start() - from, from = ring_start();
    if (from > H.total) from = H.total;
    c->pos = from;
    c->hdr_len = (size_t)snprintf(c->hdr, sizeof c->hdr, "\033_tb-holder 1 offset=%" PRIu64 " lost=%" PRIu64
                                  " shell=%s\033\\", from, lost, state);
    H.nclients++;
    H.last_activity = now_ms();
    int resized = m->rows && m->cols && (m->rows != H.rows || m->cols != H.cols);
    set_size(m->rows, m->cols);
    if (!resized && (lost || (m->flags & HELLO_REPAINT))) nudge_repaint();
    logf_("client %d attached (uid %u, offset %" PRIu64 ", lost %" PRIu64 ", %u clients)", fd, uid, from, lost,
          H.nclients);
    return;
refuse:
    for (int i = 0; i < nfds; i++) close(fds[i]);
    close(fd);
}

static void accept_client(void) {
    int fd = accept4(H.listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd < 0) return;
    /* The hello follows at once (the client sends it right after connecting); it is read before
     * any refusal, since closing on an unread message would lose the refusal's text. */
    struct pollfd p = {.fd = fd, .events = POLLIN};
    char buf[MAX_MSG];
    char cbuf[CMSG_SPACE(sizeof(int) * 4)];
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t n = poll(&p, 1, 500) == 1 ? recvmsg(fd, &mh, MSG_CMSG_CLOEXEC) : -1;
    int fds[4], nfds = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); n >= 0 && cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
        int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int j = 0; j < k && nfds < 4; j++) memcpy(&fds[nfds++], CMSG_DATA(cm) + j * sizeof(int), sizeof(int));
    }
    struct ucred cred;
    socklen_t clen = sizeof cred;
    const char *refusal = NULL;
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) || (cred.uid != 0 && cred.uid != H.session_uid)) {
        logf_("attach refused: uid %u is not the session's", (unsigned)cred.uid);
        refusal = "not your session";
    } else if (n < 1 || buf[0] != MSG_HELLO || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))) {
        refusal = "bad attach request";
    }
    if (refusal) {
        for (int i = 0; i < nfds; i++) close(fds[i]);
        send_text(fd, MSG_ERROR, refusal);
        close(fd);
        return;
    }
    buf[n < MAX_MSG ? n : MAX_MSG - 1] = 0;
    handle_hello(fd, (struct msg_hello *)buf, (size_t)n, fds, nfds, cred.uid);
}

/* Write what the client has not got yet; returns -1 when it is gone. */
static int flush_client(struct client *c) {
    while (c->hdr_off < c->hdr_len) {
        ssize_t w = write(c->out, c->hdr + c->hdr_off, c->hdr_len - c->hdr_off);
        if (w < 0) return errno == EAGAIN ? 0 : -1;
        c->hdr_off += (size_t)w;
    }
    while (c->pos < H.total) {
        size_t off = (size_t)(c->pos % RING_SIZE);
        size_t len = RING_SIZE - off;
        if (len > H.total - c->pos) len = (size_t)(H.total - c->pos);
        ssize_t w = write(c->out, H.ring + off, len);
        if (w < 0) return errno == EAGAIN ? 0 : -1;
        c->pos += (uint64_t)w;
        c->progress_at = now_ms();
    }
    return 0;
}

static int caught_up(const struct client *c) { return c->hdr_off == c->hdr_len && c->pos == H.total; }

static int at_ring_limit(const struct client *c) { return H.total - c->pos + CHUNK > RING_SIZE; }

static int pty_paused(void) {
    int behind = 0;
    for (int i = 0; i < H.nclients; i++) {
        if (at_ring_limit(&H.clients[i])) return 1;
        behind += H.total - H.clients[i].pos >= FLOW_HIGH;
    }
    return H.nclients && behind == H.nclients;
}

static void drop_stalled(int64_t now) {
    for (int i = 0; i < H.nclients; i++) {
        struct client *c = &H.clients[i];
        if (!c->gone && at_ring_limit(c) && now - c->progress_at >= STALL_MS) {
            send_msg(c->ctl, &(uint8_t){MSG_DROP}, 1);
            c->gone = "took no output for too long";
        }
    }
}

static void read_pty(void) {
    size_t off = (size_t)(H.total % RING_SIZE);
    size_t room = RING_SIZE - off < CHUNK ? RING_SIZE - off : CHUNK;
    ssize_t n = read(H.master, H.ring + off, room);
    if (n > 0) {
        H.total += (uint64_t)n;
        for (int i = 0; i < H.nclients; i++) {
            struct client *c = &H.clients[i];
            if (c->gone) continue;
            if (c->pos < ring_start()) {
                send_msg(c->ctl, &(uint8_t){MSG_DROP}, 1);
                c->gone = "fell behind the output buffer";
            } else if (flush_client(c) < 0) {
                c->gone = "its terminal closed";
            }
        }
    } else if (n == 0 || errno != EAGAIN || H.shell_done) {
        H.master_done = 1; /* EIO: no one holds the terminal any more; or drained after exit */
    }
}

static void write_pty(void) {
    ssize_t w = write(H.master, H.pending + H.pending_off, H.pending_len - H.pending_off);
    if (w > 0) H.pending_off += (size_t)w;
    else if (w < 0 && errno != EAGAIN) H.pending_off = H.pending_len;
    if (H.pending_off == H.pending_len) H.pending_len = H.pending_off = 0;
}

/* Frames in buf[0..n) to input bytes, in place; a size frame takes effect at once. Returns the
 * number of input bytes, or -1 on a malformed frame. */
static ssize_t unframe(struct client *c, char *buf, size_t n) {
    size_t out = 0;
    for (size_t i = 0; i < n;) {
        if (c->fhdr_len < 3) {
            c->fhdr[c->fhdr_len++] = (uint8_t)buf[i++];
            if (c->fhdr_len < 3) continue;
            c->fleft = (size_t)c->fhdr[1] << 8 | c->fhdr[2];
            c->fctl_len = 0;
            if (c->fhdr[0] != FRAME_DATA && (c->fhdr[0] != FRAME_WINCH || c->fleft != sizeof c->fctl)) return -1;
        } else {
            size_t take = n - i < c->fleft ? n - i : c->fleft;
            if (c->fhdr[0] == FRAME_DATA) memmove(buf + out, buf + i, take), out += take;
            else memcpy(c->fctl + c->fctl_len, buf + i, take), c->fctl_len += take;
            i += take, c->fleft -= take;
        }
        if (c->fleft) continue;
        if (c->fhdr[0] == FRAME_WINCH) {
            c->rows = (uint16_t)(c->fctl[0] << 8 | c->fctl[1]);
            c->cols = (uint16_t)(c->fctl[2] << 8 | c->fctl[3]);
            set_size(c->rows, c->cols);
        }
        c->fhdr_len = 0;
    }
    return (ssize_t)out;
}

static void client_input(int i) {
    struct client *c = &H.clients[i];
    if (H.pending_len) return; /* another client's input is still on its way */
    ssize_t n = read(c->in, H.pending, sizeof H.pending);
    if (n < 0 && errno == EAGAIN) return;
    if (n <= 0) {
        if (c->framed) {
            c->gone = ""; /* the gateway closed the channel, or its connection went */
            return;
        }
        /* stdin ended (output goes on), or a tty hung up (which the output side notices too) */
        if (c->in != c->out) close_fd(&c->in);
        c->in = -1;
        return;
    }
    if (c->framed && (n = unframe(c, H.pending, (size_t)n)) < 0) {
        c->gone = "malformed input frame";
        return;
    }
    H.last_activity = now_ms();
    set_size(c->rows, c->cols); /* the one who types (or resizes) gets their size */
    if (n == 0) return;
    H.pending_len = (size_t)n, H.pending_off = 0;
    write_pty();
}

static void client_control(int i) {
    struct client *c = &H.clients[i];
    char buf[MAX_MSG];
    ssize_t n = recv(c->ctl, buf, sizeof buf, MSG_DONTWAIT);
    if (n <= 0) {
        if (n == 0 || errno != EAGAIN) c->gone = "";
        return;
    }
    if (buf[0] == MSG_WINCH && (size_t)n >= sizeof(struct msg_winch)) {
        struct msg_winch m;
        memcpy(&m, buf, sizeof m);
        c->rows = m.rows, c->cols = m.cols;
        set_size(m.rows, m.cols);
    }
}

/* Detach the clients marked gone; detaching moves the last client into the hole, so from the end. */
static void sweep(void) {
    for (int i = H.nclients - 1; i >= 0; i--)
        if (H.clients[i].gone) detach(i, *H.clients[i].gone ? H.clients[i].gone : NULL);
}

static void end_session(const char *why) {
    if (H.ending) return;
    H.ending = why;
    logf_("ending the session: %s", why);
    if (H.shell < 0 || H.shell_done) {
        H.finish_by = now_ms();
        return;
    }
    /* Hanging up the terminal sends SIGHUP and SIGCONT to the shell and its foreground job, as a
     * dropped sshd connection did (no CAP_KILL needed); whatever outlives the grace ends with
     * the container. */
    close_fd(&H.master);
    H.master_done = 1;
    H.finish_by = now_ms() + HANGUP_GRACE_MS;
}

static void reap(void) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (pid == H.shell) {
            H.shell_done = 1;
            H.shell_status = code;
            if (!H.finish_by) H.finish_by = now_ms() + FINISH_MS;
            logf_("shell exited with status %d", code);
        } else if (pid == H.companion) {
            logf_("%s exited with status %d", "the ssh server", code);
            H.companion = -1;
            end_session("the ssh server exited");
        }
    }
}

static void handle_signals(void) {
    struct signalfd_siginfo si;
    while (read(H.sig_fd, &si, sizeof si) == sizeof si) {
        if (si.ssi_signo == SIGCHLD) reap();
        else if (si.ssi_signo == SIGUSR1) claimed();
        else end_session(si.ssi_signo == SIGTERM ? "stopped (SIGTERM)" : "interrupted");
    }
}

static void check_timers(int64_t now) {
    int64_t life_from = claimed() ? H.claimed : H.started;
    if (H.lifetime_ms && now - life_from >= H.lifetime_ms) end_session("maximum lifetime reached");
    if (H.idle_ms && H.shell > 0 && H.nclients == 0 && now - H.last_activity >= H.idle_ms)
        end_session("idle with nobody attached");
}

/* Until the next deadline: a holder with nothing to do does not wake up (250 sessions: 250 idle
 * processes on the host). */
static int poll_timeout(int64_t now) {
    int64_t next = now + 60000;
#define SOONER(t) if ((t) < next) next = (t)
    if (H.lifetime_ms) SOONER((H.claimed ? H.claimed : H.started) + H.lifetime_ms);
    if (H.idle_ms && H.shell > 0 && !H.nclients) SOONER(H.last_activity + H.idle_ms);
    if (!H.claimed) SOONER(now + 1000); /* the account's SIGUSR1 is the fast path */
    for (int i = 0; i < H.nclients; i++)
        if (at_ring_limit(&H.clients[i])) SOONER(H.clients[i].progress_at + STALL_MS);
#undef SOONER
    return next <= now ? 0 : (int)(next - now + 1);
}

/* Shell gone and its output handed out: tell every client its status, wait until sshd has let go
 * of their terminals (so the exit status is on its way before the container stops), exit. */
static int finish(void) {
    int status = H.shell_done ? H.shell_status : 129;
    struct msg_exit m = {.type = MSG_EXIT, .status = status};
    for (int i = 0; i < H.nclients; i++) {
        struct client *c = &H.clients[i];
        send_msg(c->ctl, &m, sizeof m);
        if (c->in != c->out) close_fd(&c->in);
        c->in = -1;
        close_fd(&c->out); /* sshd sees its terminal let go */
    }
    int64_t deadline = now_ms() + 2000;
    while (H.nclients && now_ms() < deadline) {
        struct pollfd p[MAX_CLIENTS];
        for (int i = 0; i < H.nclients; i++) p[i] = (struct pollfd){.fd = H.clients[i].ctl, .events = POLLIN};
        if (poll(p, (nfds_t)H.nclients, 100) < 0 && errno != EINTR) break;
        for (int i = H.nclients - 1; i >= 0; i--)
            if (p[i].revents) {
                char b[64];
                if (recv(H.clients[i].ctl, b, sizeof b, MSG_DONTWAIT) <= 0) detach(i, NULL);
            }
    }
    usleep(200 * 1000);
    unlink(SOCK_PATH);
    logf_("exiting with status %d", status);
    return status;
}

static long env_seconds(const char *name) {
    const char *v = getenv(name);
    if (!v || !*v) return 0;
    char *end;
    long s = strtol(v, &end, 10);
    if (*end || s < 0) {
        logf_("%s=%s is not a number of seconds; ignored", name, v);
        return 0;
    }
    return s;
}

/* Root's alone until the account exists (claimed() opens it to the account's group). */
static int listen_socket(void) {
    if (mkdir(SOCK_DIR, 0700) && errno != EEXIST) return -1;
    if (chown(SOCK_DIR, 0, 0) || chmod(SOCK_DIR, 0700)) return -1;
    unlink(SOCK_PATH);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX, .sun_path = SOCK_PATH};
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || chmod(SOCK_PATH, 0660) || listen(fd, 16))
        return -1;
    return fd;
}

static int serve(int argc, char **argv) {
    const char *mode = getenv("TERMBRIDGE_MODE");
    H.root_mode = mode && strcmp(mode, "root") == 0;
    H.session_uid = H.root_mode ? 0 : (uid_t)-1;
    H.idle_ms = env_seconds("TERMBRIDGE_IDLE_TIMEOUT") * 1000;
    H.lifetime_ms = env_seconds("TERMBRIDGE_MAX_LIFETIME") * 1000;
    H.started = H.last_activity = now_ms();
    signal(SIGPIPE, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGCHLD);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    H.sig_fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    H.listen_fd = listen_socket();
    if (H.sig_fd < 0 || H.listen_fd < 0) {
        logf_("cannot listen on %s: %s", SOCK_PATH, strerror(errno));
        return 1;
    }
    claimed();
    FILE *pid = fopen(PID_FILE, "we");
    if (!pid || fprintf(pid, "%d\n", (int)getpid()) < 0 || fclose(pid)) logf_("cannot write %s", PID_FILE);
    if (argc > 0) {
        H.companion = fork();
        if (H.companion == 0) {
            sigset_t none;
            sigemptyset(&none);
            sigprocmask(SIG_SETMASK, &none, NULL);
            signal(SIGPIPE, SIG_DFL);
            signal(SIGHUP, SIG_DFL);
            execv(argv[0], argv);
            logf_("cannot run %s: %s", argv[0], strerror(errno));
            _exit(127);
        }
    }
    logf_("serving on %s (idle %lds, lifetime %lds)", SOCK_PATH, (long)(H.idle_ms / 1000),
          (long)(H.lifetime_ms / 1000));

    struct pollfd p[3 + 3 * MAX_CLIENTS];
    int who[3 + 3 * MAX_CLIENTS]; /* client index, or -1 */
    char what[3 + 3 * MAX_CLIENTS];
    for (;;) {
        int64_t now = now_ms();
        check_timers(now);
        drop_stalled(now);
        sweep();
        if (H.shell_done && H.master_done) {
            int all = 1;
            for (int i = 0; i < H.nclients; i++) all &= caught_up(&H.clients[i]);
            if (all) return finish();
        }
        if (H.finish_by && now >= H.finish_by) return finish();

        nfds_t n = 0;
        p[n] = (struct pollfd){.fd = H.sig_fd, .events = POLLIN}, who[n] = -1, what[n++] = 's';
        p[n] = (struct pollfd){.fd = H.listen_fd, .events = POLLIN}, who[n] = -1, what[n++] = 'l';
        if (H.master >= 0 && !H.master_done) {
            short ev = (short)((pty_paused() ? 0 : POLLIN) | (H.pending_len ? POLLOUT : 0));
            p[n] = (struct pollfd){.fd = H.master, .events = ev}, who[n] = -1, what[n++] = 'm';
        }
        for (int i = 0; i < H.nclients; i++) {
            struct client *c = &H.clients[i];
            p[n] = (struct pollfd){.fd = c->ctl, .events = POLLIN}, who[n] = i, what[n++] = 'c';
            if (c->in >= 0 && !H.pending_len)
                p[n] = (struct pollfd){.fd = c->in, .events = POLLIN}, who[n] = i, what[n++] = 'i';
            if (!caught_up(c)) p[n] = (struct pollfd){.fd = c->out, .events = POLLOUT}, who[n] = i, what[n++] = 'o';
        }
        /* after the shell's exit the pty is read until it has nothing more (EAGAIN or EIO) */
        int drain = H.shell_done && !H.master_done && !pty_paused();
        int timeout = drain ? 0 : H.shell_done || H.ending ? 50 : poll_timeout(now);
        if (poll(p, n, timeout) < 0 && errno != EINTR) {
            logf_("poll: %s", strerror(errno));
            return finish();
        }
        for (nfds_t k = 0; k < n; k++) {
            short rev = p[k].revents;
            int i = who[k];
            if (what[k] == 'm' && drain) rev |= POLLIN;
            if (!rev || (i >= 0 && H.clients[i].gone)) continue;
            switch (what[k]) {
            case 's': handle_signals(); break;
            case 'l': accept_client(); break;
            case 'm':
                if (rev & POLLOUT) write_pty();
                if (rev & (POLLIN | POLLHUP | POLLERR)) read_pty();
                break;
            case 'c': client_control(i); break;
            case 'i': client_input(i); break;
            case 'o':
                if (flush_client(&H.clients[i]) < 0) H.clients[i].gone = "its terminal closed";
                break;
            }
        }
        sweep();
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* attach                                                                                          */

static struct termios saved_tty;
static int tty_saved;

static void restore_tty(void) {
    if (tty_saved) tcsetattr(0, TCSADRAIN, &saved_tty);
}

static void window_size(uint16_t *rows, uint16_t *cols) {
    struct winsize ws = {0};
    if (ioctl(0, TIOCGWINSZ, &ws) && ioctl(1, TIOCGWINSZ, &ws)) ws.ws_row = ws.ws_col = 0;
    *rows = ws.ws_row, *cols = ws.ws_col;
}

static int connect_holder(void) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX, .sun_path = SOCK_PATH};
    for (int tries = 0;; tries++) {
        int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) return fd;
        int err = errno;
        if (fd >= 0) close(fd);
        /* right after the container starts the holder may not listen yet */
        if ((err != ENOENT && err != ECONNREFUSED && err != EAGAIN) || tries >= 60) {
            dprintf(2, "tb-holder: no session holder at %s: %s\r\n", SOCK_PATH, strerror(err));
            return -1;
        }
        usleep(50 * 1000);
    }
}

static int attach(int argc, char **argv) {
    uint64_t offset = 0;
    uint8_t flags = 0;
    uint16_t size_rows = 0, size_cols = 0;
    for (int i = 0; i < argc; i++) {
        char *end;
        if (strcmp(argv[i], "--offset") == 0 && i + 1 < argc) {
            errno = 0;
            offset = strtoull(argv[++i], &end, 10);
            if (*end || errno || argv[i][0] == '-') goto usage;
        } else if (strcmp(argv[i], "--repaint") == 0) {
            flags |= HELLO_REPAINT;
        } else if (strcmp(argv[i], "--framed") == 0) {
            flags |= HELLO_FRAMED;
        } else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) {
            unsigned c, r;
            char x;
            if (sscanf(argv[++i], "%ux%u%c", &c, &r, &x) != 2 || !c || !r || c > 9999 || r > 9999) goto usage;
            size_cols = (uint16_t)c, size_rows = (uint16_t)r;
        } else {
            goto usage;
        }
    }
    int fd = connect_holder();
    if (fd < 0) return EXIT_NO_HOLDER;
    if (!(flags & HELLO_FRAMED) && isatty(0) && tcgetattr(0, &saved_tty) == 0) {
        struct termios raw = saved_tty;
        cfmakeraw(&raw);
        tty_saved = tcsetattr(0, TCSANOW, &raw) == 0;
        atexit(restore_tty);
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGWINCH);
    sigprocmask(SIG_BLOCK, &set, NULL);
    int sig_fd = signalfd(-1, &set, SFD_CLOEXEC);

    char buf[MAX_MSG];
    struct msg_hello *h = (struct msg_hello *)buf;
    memset(h, 0, sizeof *h);
    h->type = MSG_HELLO, h->flags = flags, h->offset = offset;
    window_size(&h->rows, &h->cols);
    if (size_rows) h->rows = size_rows, h->cols = size_cols;
    size_t len = sizeof *h;
    extern char **environ;
    for (char **e = environ; *e; e++) {
        size_t l = strlen(*e) + 1;
        if (allowed_env(*e) && len + l <= sizeof buf) memcpy(buf + len, *e, l), len += l;
    }
    int fds[2] = {0, 1};
    char cbuf[CMSG_SPACE(sizeof fds)];
    memset(cbuf, 0, sizeof cbuf);
    struct iovec iov = {.iov_base = buf, .iov_len = len};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS, cm->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    if (sendmsg(fd, &mh, MSG_NOSIGNAL) < 0) {
        dprintf(2, "tb-holder: attach failed: %s\r\n", strerror(errno));
        return EXIT_NO_HOLDER;
    }
    for (;;) {
        struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = sig_fd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return EXIT_HOLDER_LOST;
        }
        if (p[1].revents) {
            struct signalfd_siginfo si;
            if (read(sig_fd, &si, sizeof si) == sizeof si) {
                struct msg_winch m = {.type = MSG_WINCH};
                window_size(&m.rows, &m.cols);
                send(fd, &m, sizeof m, MSG_NOSIGNAL);
            }
        }
        if (!p[0].revents) continue;
        ssize_t n = recv(fd, buf, sizeof buf - 1, 0);
        if (n <= 0) {
            restore_tty();
            dprintf(2, "\r\ntb-holder: the session holder went away\r\n");
            return EXIT_HOLDER_LOST;
        }
        buf[n] = 0;
        switch (buf[0]) {
        case MSG_EXIT: {
            struct msg_exit m;
            memcpy(&m, buf, sizeof m);
            return m.status & 0xff;
        }
        case MSG_DROP:
            /* fell behind the holder's buffer: the caller attaches again from its offset */
            restore_tty();
            signal(SIGUSR1, SIG_DFL);
            raise(SIGUSR1);
            return EXIT_HOLDER_LOST;
        case MSG_ERROR:
            restore_tty();
            dprintf(2, "tb-holder: %s\r\n", buf + 1);
            return EXIT_REFUSED;
        }
    }
usage:
    dprintf(2, "usage: tb-holder attach [--offset N] [--repaint] [--framed --size COLSxROWS]\n");
    return EXIT_USAGE;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "serve") == 0) {
        int skip = argc >= 3 && strcmp(argv[2], "--") == 0 ? 3 : 2;
        return serve(argc - skip, argv + skip);
    }
    if (argc >= 2 && strcmp(argv[1], "attach") == 0) return attach(argc - 2, argv + 2);
    dprintf(2, "usage: tb-holder serve [-- COMMAND...] | tb-holder attach [--offset N] [--repaint] [--framed --size COLSxROWS]\n");
    return EXIT_USAGE;
}
