/*
 * loadgen: drives a relay the way Kamailio + phones do, and measures it.
 *
 *   loadgen -c HOST:PORT -n SESSIONS -t SECONDS [-p RELAY_PID] [-q] [-s SRC_IP]
 *
 * Creates SESSIONS calls with the legacy control protocol (U then L, as Kamailio sends them),
 * then plays G.711-shaped RTP (172-byte packets: 12-byte header + 160 bytes, 50 packets/s per
 * direction, real SSRC/seq/timestamp) both ways through every call for SECONDS, spread evenly
 * over each 20 ms period. Each payload carries its send time, so the receiver measures the
 * added latency. Prints one JSON object: packets sent/received, loss, latency p50/p99/max (us),
 * the relay's CPU seconds (utime+stime from /proc/PID/stat) over the media phase, and control
 * round-trip times. Ends the calls with D. -q: never send Q (rtpengine 10.5 hangs after one).
 *
 * Part of the benchmark harness only; not installed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PKT 172
#define PERIOD_NS 20000000LL
#define HIST_US 100000          /* latency histogram: 1 us buckets up to 100 ms */

struct call {
    int caller, callee;         /* sockets */
    uint16_t p0, p1;            /* relay ports: callee sends to p0, caller to p1 */
    uint32_t seq;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct sockaddr_in ctl_addr, relay_addr;
static int ctl_fd;
static unsigned cookie_seq;
static uint64_t *ctl_rtt_us;
static size_t n_rtt, cap_rtt;

static void die(const char *what)
{
    perror(what);
    exit(2);
}

/* One command, waiting for its cookie; retries like Kamailio (5 x 1 s). */
static int command(const char *cmd, char *reply, size_t len)
{
    char buf[2048], ck[32];
    snprintf(ck, sizeof(ck), "%d_%u", getpid(), ++cookie_seq);
    int n = snprintf(buf, sizeof(buf), "%s %s", ck, cmd);
    for (int attempt = 0; attempt < 5; attempt++) {
        int64_t t0 = now_ns();
        if (sendto(ctl_fd, buf, (size_t)n, 0, (struct sockaddr *)&ctl_addr, sizeof(ctl_addr)) < 0)
            die("control send");
        for (;;) {
            ssize_t r = recv(ctl_fd, reply, len - 1, 0);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                die("control recv");
            }
            reply[r] = 0;
            size_t cl = strlen(ck);
            if ((size_t)r > cl && strncmp(reply, ck, cl) == 0 && reply[cl] == ' ') {
                memmove(reply, reply + cl + 1, (size_t)r - cl);
                char *nl = strchr(reply, '\n');
                if (nl)
                    *nl = 0;
                if (n_rtt == cap_rtt) {
                    cap_rtt = cap_rtt ? cap_rtt * 2 : 1024;
                    ctl_rtt_us = realloc(ctl_rtt_us, cap_rtt * sizeof(*ctl_rtt_us));
                }
                ctl_rtt_us[n_rtt++] = (uint64_t)((now_ns() - t0) / 1000);
                return 0;
            }
        }
    }
    return -1;
}

static int udp_socket(const char *ip, uint16_t *port)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0)
        die("socket");
    int buf = 1 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
    struct sockaddr_in a = {.sin_family = AF_INET};
    inet_pton(AF_INET, ip, &a.sin_addr);
    if (bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0)
        die("bind");
    socklen_t l = sizeof(a);
    getsockname(fd, (struct sockaddr *)&a, &l);
    *port = ntohs(a.sin_port);
    return fd;
}

/* Idle CPU time of the whole machine (all cores), seconds. Busy time is then cores x wall - idle:
 * on some VMs the busy columns of /proc/stat add up to more than the wall clock allows, while
 * idle advances exactly. What the kernel tier's forwarding costs shows up here (softirq), not in
 * any process. */
static double idle_cpu_seconds(void)
{
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return -1;
    unsigned long long v[5] = {0};
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4]);
    fclose(f);
    if (got < 5)
        return -1;
    return (double)(v[3] + v[4]) / (double)sysconf(_SC_CLK_TCK);     /* idle + iowait */
}

static double cpu_seconds(int pid)
{
    if (pid <= 0)
        return -1;
    char path[64], buf[4096];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    unsigned long utime = 0, stime = 0;
    /* fields after ')': state(3) ... utime(14) stime(15) */
    sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime);
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

/* Control churn (-w W): while media plays, keep W commands in flight on a second control socket,
 * each slot running U, L, D of its own short call over and over. Measures how many U/L/D per
 * second the relay answers while it forwards the media. */
struct churn_slot {
    unsigned call;              /* call number of this slot's current cycle */
    int stage;                  /* 0 U, 1 L, 2 D */
    int64_t sent_ns;            /* CLOCK_REALTIME, the clock of the kernel's receive stamps */
};

static int churn_fd = -1;
static struct churn_slot *churn;
static int churn_window;
static int churn_rate;            /* -R: commands per second, paced (0: each answer sends the next) */
static int churn_idle;            /* paced: slot 0 waits for its time */
static int64_t churn_next_ns;
static unsigned churn_calls;
static uint64_t churn_done, churn_errors;
static uint32_t *churn_hist;

static void churn_send(int slot)
{
    /* A fresh cookie per command (relays answer a repeated cookie from their reply cache). */
    /* Shaped like Kamailio's: codecs, tags with the media number (rtpengine needs them). */
    static const char *fmt[3] = {"%d_w%d_%u Uc0,8 cw%d-%u@bench %s 9 ft;1", "%d_w%d_%u Lc0,8 cw%d-%u@bench %s 9 ft;1 tt;1",
                                 "%d_w%d_%u D cw%d-%u@bench ft tt"};
    static unsigned seq;
    char buf[256];
    struct churn_slot *c = &churn[slot];
    seq++;
    int n = c->stage == 2 ? snprintf(buf, sizeof(buf), fmt[2], getpid(), slot, seq, getpid(), c->call)
                          : snprintf(buf, sizeof(buf), fmt[c->stage], getpid(), slot, seq, getpid(), c->call,
                                     "127.0.0.1");
    c->sent_ns = realtime_ns();
    sendto(churn_fd, buf, (size_t)n, 0, (struct sockaddr *)&ctl_addr, sizeof(ctl_addr));
}

static void churn_start(int window)
{
    churn_window = window;
    churn = calloc((size_t)window, sizeof(*churn));
    churn_hist = calloc(HIST_US + 1, sizeof(uint32_t));
    churn_fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    int buf = 1 << 20;
    setsockopt(churn_fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
    /* Replies carry the kernel's arrival time: the latency is the relay's, not the time this
     * process took to get round to the reply between media packets on its own core. */
    int on = 1;
    setsockopt(churn_fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof(on));
    for (int i = 0; i < window; i++) {
        churn[i].call = churn_calls++;
        churn_send(i);
    }
}

/* Replies: "<pid>_w<slot>_<seq> <reply>"; each answered command sends the slot's next one. */
static void churn_receive(void)
{
    char in[2048];
    union {
        char buf[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } anc;
    for (;;) {
        struct iovec iov = {.iov_base = in, .iov_len = sizeof(in) - 1};
        struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = anc.buf,
                            .msg_controllen = sizeof(anc.buf)};
        ssize_t r = recvmsg(churn_fd, &mh, 0);
        if (r < 0)
            return;
        in[r] = 0;
        int64_t arrived = realtime_ns();
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
                struct timespec ts;
                memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
                arrived = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
            }
        char *w = strstr(in, "_w"), *sp = strchr(in, ' ');
        if (!w || !sp)
            continue;
        int slot = atoi(w + 2);
        if (slot < 0 || slot >= churn_window)
            continue;
        struct churn_slot *c = &churn[slot];
        int64_t us = (arrived - c->sent_ns) / 1000;
        if (us < 0)
            us = 0;
        churn_hist[us < HIST_US ? us : HIST_US]++;
        churn_done++;
        if (sp[1] == 'E')
            churn_errors++;
        if (++c->stage == 3) {
            c->stage = 0;
            c->call = churn_calls++;
        }
        if (churn_rate)
            churn_idle = 1;          /* churn_pace() sends it on time */
        else
            churn_send(slot);
    }
}

/* Paced mode: one command at a time, churn_rate per second (a call centre's signalling, not a flood). */
static void churn_pace(int64_t now)
{
    if (churn_rate && churn_idle && now >= churn_next_ns) {
        churn_idle = 0;
        churn_next_ns += 1000000000LL / churn_rate;
        if (churn_next_ns < now)
            churn_next_ns = now;
        churn_send(0);
    }
}

static uint64_t percentile(const uint32_t *hist, uint64_t total, double q)
{
    uint64_t want = (uint64_t)(q * (double)total), acc = 0;
    for (int i = 0; i < HIST_US; i++) {
        acc += hist[i];
        if (acc > want)
            return (uint64_t)i;
    }
    return HIST_US;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const char *ctl = NULL, *src_ip = "127.0.0.1";
    int n = 100, secs = 5, relay_pid = 0, no_query = 0, window = 0;
    int opt;
    while ((opt = getopt(argc, argv, "c:n:t:p:qs:w:R:")) != -1) {
        switch (opt) {
        case 'c': ctl = optarg; break;
        case 'n': n = atoi(optarg); break;
        case 't': secs = atoi(optarg); break;
        case 'p': relay_pid = atoi(optarg); break;
        case 'q': no_query = 1; break;
        case 's': src_ip = optarg; break;
        case 'w': window = atoi(optarg); break;
        case 'R': churn_rate = atoi(optarg); break;
        default:
            fprintf(stderr, "usage: loadgen -c HOST:PORT -n SESSIONS -t SECONDS [-p PID] [-q] [-s SRC_IP] "
                            "[-w CHURN_WINDOW] [-R CHURN_RATE]\n");
            return 2;
        }
    }
    if (!ctl || n <= 0 || secs <= 0) {
        fprintf(stderr, "loadgen: -c HOST:PORT, -n > 0 and -t > 0 are required\n");
        return 2;
    }
    char host[64];
    const char *colon = strrchr(ctl, ':');
    if (!colon || (size_t)(colon - ctl) >= sizeof(host)) {
        fprintf(stderr, "loadgen: -c wants HOST:PORT\n");
        return 2;
    }
    memcpy(host, ctl, (size_t)(colon - ctl));
    host[colon - ctl] = 0;
    ctl_addr.sin_family = AF_INET;
    ctl_addr.sin_port = htons((uint16_t)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &ctl_addr.sin_addr) != 1) {
        fprintf(stderr, "loadgen: %s is not an IPv4 address\n", host);
        return 2;
    }
    struct rlimit rl = {.rlim_cur = (rlim_t)(2 * n + 64), .rlim_max = (rlim_t)(2 * n + 64)};
    setrlimit(RLIMIT_NOFILE, &rl);

    ctl_fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct timeval tv = {.tv_sec = 1};
    setsockopt(ctl_fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));

    struct call *calls = calloc((size_t)n, sizeof(*calls));
    int ep = epoll_create1(0);
    char cmd[512], reply[2048];
    int64_t setup0 = now_ns();
    for (int i = 0; i < n; i++) {
        uint16_t pa, pb;
        calls[i].caller = udp_socket(src_ip, &pa);
        calls[i].callee = udp_socket(src_ip, &pb);
        snprintf(cmd, sizeof(cmd), "Uc0,8,101 lg%d-%d@bench %s %u ft%d;1", getpid(), i, src_ip, pa, i);
        if (command(cmd, reply, sizeof(reply)) < 0 || atoi(reply) <= 0) {
            fprintf(stderr, "loadgen: U for call %d failed: %s\n", i, reply);
            return 1;
        }
        calls[i].p0 = (uint16_t)atoi(reply);
        char *addr = strchr(reply, ' ');
        if (i == 0) {
            relay_addr.sin_family = AF_INET;
            if (!addr || inet_pton(AF_INET, addr + 1, &relay_addr.sin_addr) != 1)
                relay_addr.sin_addr = ctl_addr.sin_addr;   /* port-only reply: the control host */
        }
        snprintf(cmd, sizeof(cmd), "Lc0,8 lg%d-%d@bench %s %u ft%d;1 tt%d;1", getpid(), i, src_ip, pb, i, i);
        if (command(cmd, reply, sizeof(reply)) < 0 || atoi(reply) <= 0) {
            fprintf(stderr, "loadgen: L for call %d failed: %s\n", i, reply);
            return 1;
        }
        calls[i].p1 = (uint16_t)atoi(reply);
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = (uint64_t)i << 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, calls[i].caller, &ev);
        ev.data.u64 = (uint64_t)i << 1 | 1;
        epoll_ctl(ep, EPOLL_CTL_ADD, calls[i].callee, &ev);
    }
    double setup_s = (double)(now_ns() - setup0) / 1e9;
    size_t setup_cmds = n_rtt;

    uint32_t *hist = calloc(HIST_US + 1, sizeof(uint32_t));
    uint64_t sent = 0, rcvd = 0, bad = 0, max_us = 0;
    uint8_t pkt[PKT], in[2048];
    memset(pkt, 0xd5, sizeof(pkt));
    struct epoll_event evs[256];

    double cpu0 = cpu_seconds(relay_pid), idle0 = idle_cpu_seconds();
    int64_t wall0 = now_ns();
    if (churn_rate > 0)
        window = 1;
    if (window > 0) {
        churn_next_ns = now_ns();
        churn_start(window);
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = UINT64_MAX};
        epoll_ctl(ep, EPOLL_CTL_ADD, churn_fd, &ev);
    }
    int64_t start = now_ns(), end = start + (int64_t)secs * 1000000000LL;
    int64_t drain_end = end + 500000000LL;
    int64_t next_slot = start;
    int slot = 0;
    const int slots = 20;          /* sends spread over 20 slices of each 20 ms period */
    for (;;) {
        int64_t t = now_ns();
        if (t >= drain_end)
            break;
        if (t < end && churn_fd >= 0)
            churn_pace(t);
        if (t < end && t >= next_slot) {
            int lo = (int)((int64_t)n * slot / slots), hi = (int)((int64_t)n * (slot + 1) / slots);
            for (int i = lo; i < hi; i++) {
                struct call *c = &calls[i];
                for (int dir = 0; dir < 2; dir++) {
                    uint32_t ssrc = (uint32_t)(i * 2 + dir + 1);
                    pkt[0] = 0x80;
                    pkt[1] = 0;
                    pkt[2] = (uint8_t)(c->seq >> 8);
                    pkt[3] = (uint8_t)c->seq;
                    uint32_t ts = c->seq * 160;
                    memcpy(pkt + 4, &(uint32_t){htonl(ts)}, 4);
                    memcpy(pkt + 8, &(uint32_t){htonl(ssrc)}, 4);
                    int64_t stamp = now_ns();
                    memcpy(pkt + 12, &stamp, 8);
                    struct sockaddr_in to = relay_addr;
                    to.sin_port = htons(dir == 0 ? c->p1 : c->p0);
                    if (sendto(dir == 0 ? c->caller : c->callee, pkt, PKT, 0, (struct sockaddr *)&to,
                               sizeof(to)) == PKT)
                        sent++;
                }
                c->seq++;
            }
            slot = (slot + 1) % slots;
            next_slot += PERIOD_NS / slots;
        }
        int64_t wait_ns = (t < end ? next_slot : drain_end) - now_ns();
        /* Sleep until the next send slot or a packet, to the nanosecond: a millisecond timeout
         * would round sub-ms waits to 0 and spin, which the system-wide CPU figure would count. */
        struct timespec to = {.tv_sec = wait_ns > 0 ? wait_ns / 1000000000LL : 0,
                              .tv_nsec = wait_ns > 0 ? wait_ns % 1000000000LL : 0};
        int k = epoll_pwait2(ep, evs, 256, &to, NULL);
        for (int e = 0; e < k; e++) {
            if (evs[e].data.u64 == UINT64_MAX) {
                if (now_ns() < end)
                    churn_receive();
                continue;
            }
            int i = (int)(evs[e].data.u64 >> 1);
            int fd = (evs[e].data.u64 & 1) ? calls[i].callee : calls[i].caller;
            for (;;) {
                ssize_t r = recv(fd, in, sizeof(in), 0);
                if (r < 0)
                    break;
                if (r != PKT) {
                    bad++;
                    continue;
                }
                int64_t stamp;
                memcpy(&stamp, in + 12, 8);
                int64_t us = (now_ns() - stamp) / 1000;
                if (us < 0)
                    us = 0;
                hist[us < HIST_US ? us : HIST_US]++;
                if ((uint64_t)us > max_us)
                    max_us = (uint64_t)us;
                rcvd++;
            }
        }
    }
    double media_s = (double)(end - start) / 1e9;
    double cpu1 = cpu_seconds(relay_pid), idle1 = idle_cpu_seconds();
    double busy = (double)sysconf(_SC_NPROCESSORS_ONLN) * (double)(now_ns() - wall0) / 1e9 - (idle1 - idle0);

    char q[256] = "";
    if (!no_query) {
        snprintf(cmd, sizeof(cmd), "Q lg%d-0@bench ft0;1 tt0", getpid());
        if (command(cmd, reply, sizeof(reply)) == 0)
            snprintf(q, sizeof(q), "%.200s", reply);
    }
    for (int i = 0; i < n; i++) {
        snprintf(cmd, sizeof(cmd), "D lg%d-%d@bench ft%d tt%d", getpid(), i, i, i);
        command(cmd, reply, sizeof(reply));
        close(calls[i].caller);
        close(calls[i].callee);
    }
    qsort(ctl_rtt_us, setup_cmds, sizeof(uint64_t), cmp_u64);
    uint64_t rtt_p50 = setup_cmds ? ctl_rtt_us[setup_cmds / 2] : 0;
    uint64_t rtt_p99 = setup_cmds ? ctl_rtt_us[(size_t)((double)setup_cmds * 0.99)] : 0;
    double loss = sent ? 100.0 * (double)(sent - (rcvd < sent ? rcvd : sent)) / (double)sent : 0;
    printf("{\"sessions\": %d, \"seconds\": %.3f, \"sent\": %lu, \"received\": %lu, \"malformed\": %lu, "
           "\"loss_pct\": %.4f, \"pps\": %.0f, \"lat_p50_us\": %lu, \"lat_p99_us\": %lu, \"lat_max_us\": %lu, "
           "\"relay_cpu_s\": %.3f, \"system_cpu_s\": %.3f, \"setup_s\": %.3f, \"ctl_rtt_p50_us\": %lu, \"ctl_rtt_p99_us\": %lu, "
           "\"churn_cmds\": %lu, \"churn_per_s\": %.0f, \"churn_p50_us\": %lu, \"churn_p99_us\": %lu, "
           "\"churn_errors\": %lu, \"query\": \"%s\"}\n",
           n, media_s, (unsigned long)sent, (unsigned long)rcvd, (unsigned long)bad, loss,
           (double)sent / media_s, (unsigned long)percentile(hist, rcvd, 0.5),
           (unsigned long)percentile(hist, rcvd, 0.99), (unsigned long)max_us,
           cpu0 >= 0 && cpu1 >= 0 ? cpu1 - cpu0 : -1.0, idle0 >= 0 && idle1 >= 0 ? busy : -1.0, setup_s, (unsigned long)rtt_p50,
           (unsigned long)rtt_p99, (unsigned long)churn_done, (double)churn_done / media_s,
           (unsigned long)(churn_hist ? percentile(churn_hist, churn_done, 0.5) : 0),
           (unsigned long)(churn_hist ? percentile(churn_hist, churn_done, 0.99) : 0), (unsigned long)churn_errors, q);
    return 0;
}
