/*
 * engine.c: the media forwarding engine.
 *
 * N worker threads, each with its own epoll set and the shard of sockets it
 * owns. A readable socket is drained in batches with recvmmsg; every packet is
 * checked against the stream's latched source and the accepted ones leave in
 * one sendmmsg towards the stream's destination. The packet path allocates
 * nothing, logs nothing and takes no lock: the control thread publishes a
 * stream's entry under a per-slot sequence lock, and a worker that finds the
 * entry changing simply reads it again.
 *
 * Decisions (latching, re-latching, timeouts) belong to Python. The engine only
 * reports what it saw through per-worker single-producer rings and one eventfd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>

#include "relay.h"

#define BATCH 32
#define PKT_BUF 2048            /* RTP never exceeds an Ethernet MTU; larger datagrams are counted as drops */
#define EPOLL_BATCH 64
#define RING_SIZE 4096          /* events per worker; a power of two */
#define WAKE_ID UINT32_MAX
#define WATCH_ID (UINT32_MAX - 1)      /* a control socket (rp_engine_watch) became readable */
#define TICK_MS 200

struct rp_slot {
    uint32_t seq;                       /* odd while the control thread writes */
    uint8_t active;
    uint8_t silent;                     /* RP_EV_SILENT already raised; cleared by the next packet */
    uint16_t worker;
    uint8_t heard;                      /* a packet from cfg.latched was accepted (FORWARD_UNHEARD) */
    struct rp_stream cfg;
    struct sockaddr_in6 dst_sa;         /* cfg.dst, pre-converted (large enough for IPv4 too) */
    socklen_t dst_len;
    /* owned by the worker: event rate limiting (general, and candidates apart so a flood of
     * mismatches cannot hide a NAT rebinding) */
    int64_t tokens_ns;                  /* token bucket, in nanoseconds of credit */
    int64_t bucket_ts;
    int64_t cand_tokens_ns;
    int64_t cand_bucket_ts;
    /* owned by the worker: the one source currently trying to take over the stream */
    struct sockaddr_in6 cand_sa;
    uint32_t cand_ssrc;
    uint16_t cand_seq;
    uint16_t cand_count;
};

struct rp_ring {
    uint32_t head;                      /* written by the worker */
    uint32_t tail;                      /* written by the consumer */
    struct rp_event ev[RING_SIZE];
};

struct rp_worker {
    struct rp_engine *eng;
    unsigned index;
    int epfd;
    int wakefd;
    pthread_t thread;
    uint64_t epoch;                     /* odd while handling a batch of epoll events */
    uint64_t grace_target;              /* rp_grace_begin: the epoch that ends the grace period */
    struct rp_worker_stats st;
    struct rp_ring ring;
    int64_t last_tick;
    /* packet buffers, allocated once */
    struct mmsghdr rx[BATCH];
    struct iovec rx_iov[BATCH];
    struct sockaddr_in6 rx_src[BATCH];
    struct mmsghdr tx[BATCH];
    struct iovec tx_iov[BATCH];
    uint8_t buf[BATCH][PKT_BUF];
};

struct rp_engine {
    unsigned nworkers;
    unsigned max_streams;
    int64_t event_cost_ns;              /* 1e9 / events_per_sec */
    int64_t event_burst_ns;
    int64_t silence_ns;
    int evfd;
    uint32_t ev_armed;                  /* consumer wants an eventfd wake-up */
    uint32_t stopping;
    int running;
    uint32_t high_water;                /* 1 + highest id ever set: bounds the silence scan */
    pthread_mutex_t ctl;                /* serialises control calls, never taken by workers */
    struct rp_slot *slots;
    struct rp_counters *counters;
    struct rp_worker *workers;
};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int rp_abi_version(void) { return RP_ABI_VERSION; }

/* ---- addresses ---------------------------------------------------------- */

static socklen_t addr_to_sa(const struct rp_addr *a, struct sockaddr_in6 *out)
{
    memset(out, 0, sizeof(*out));
    if (a->family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)out;
        s4->sin_family = AF_INET;
        s4->sin_port = htons(a->port);
        memcpy(&s4->sin_addr, a->ip, 4);
        return sizeof(*s4);
    }
    if (a->family == AF_INET6) {
        out->sin6_family = AF_INET6;
        out->sin6_port = htons(a->port);
        memcpy(&out->sin6_addr, a->ip, 16);
        return sizeof(*out);
    }
    return 0;
}

static void sa_to_addr(const struct sockaddr_in6 *sa, struct rp_addr *out)
{
    memset(out, 0, sizeof(*out));
    if (sa->sin6_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        out->family = AF_INET;
        out->port = ntohs(s4->sin_port);
        memcpy(out->ip, &s4->sin_addr, 4);
    } else if (sa->sin6_family == AF_INET6) {
        out->family = AF_INET6;
        out->port = ntohs(sa->sin6_port);
        memcpy(out->ip, &sa->sin6_addr, 16);
    }
}

static int same_source(const struct sockaddr_in6 *a, const struct sockaddr_in6 *b)
{
    if (a->sin6_family != b->sin6_family)
        return 0;
    if (a->sin6_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a, *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    return a->sin6_port == b->sin6_port && memcmp(&a->sin6_addr, &b->sin6_addr, 16) == 0;
}

/* Does the packet's source equal the latched address (ip only when match is RP_MATCH_IP)? */
static int source_matches(const struct rp_stream *c, const struct sockaddr_in6 *sa)
{
    if (sa->sin6_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        if (c->latched.family != AF_INET || memcmp(c->latched.ip, &s4->sin_addr, 4) != 0)
            return 0;
        return c->match == RP_MATCH_IP || c->latched.port == ntohs(s4->sin_port);
    }
    if (c->latched.family != AF_INET6 || memcmp(c->latched.ip, &sa->sin6_addr, 16) != 0)
        return 0;
    return c->match == RP_MATCH_IP || c->latched.port == ntohs(sa->sin6_port);
}

/* ---- the slot sequence lock -------------------------------------------- */

/* Copy a slot's entry as one consistent snapshot. Returns 0 if inactive. */
static int slot_read(struct rp_slot *s, struct rp_stream *cfg, struct sockaddr_in6 *dst, socklen_t *dst_len)
{
    for (;;) {
        uint32_t a = __atomic_load_n(&s->seq, __ATOMIC_ACQUIRE);
        if (a & 1) {
            sched_yield();
            continue;
        }
        int active = s->active;
        *cfg = s->cfg;
        *dst = s->dst_sa;
        *dst_len = s->dst_len;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&s->seq, __ATOMIC_RELAXED) == a)
            return active;
    }
}

static void slot_write_begin(struct rp_slot *s)
{
    __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static void slot_write_end(struct rp_slot *s)
{
    __atomic_store_n(&s->seq, s->seq + 1, __ATOMIC_RELEASE);
}

/* ---- events ------------------------------------------------------------- */

static void notify_consumer(struct rp_engine *e)
{
    if (__atomic_exchange_n(&e->ev_armed, 0, __ATOMIC_ACQ_REL)) {
        uint64_t one = 1;
        ssize_t r = write(e->evfd, &one, sizeof(one));
        (void)r;                        /* EAGAIN means a wake-up is already pending */
    }
}

/* Token bucket: a flood of spoofed packets raises at most events_per_sec events
 * per stream and bucket, after an initial burst. */
static int bucket_take(struct rp_engine *e, int64_t *tokens, int64_t *ts, int64_t now)
{
    int64_t credit = *tokens + (now - *ts);
    if (credit > e->event_burst_ns)
        credit = e->event_burst_ns;
    *ts = now;
    if (credit < e->event_cost_ns) {
        *tokens = credit;
        return 0;
    }
    *tokens = credit - e->event_cost_ns;
    return 1;
}

static int event_allowed(struct rp_engine *e, struct rp_slot *s, int64_t now)
{
    return bucket_take(e, &s->tokens_ns, &s->bucket_ts, now);
}

/* Count consecutive packets (one SSRC, seq +1 each) from one source other than the latched
 * one; true every `need` packets, which is when Python gets to decide on a re-latch. */
static int candidate_step(struct rp_slot *s, const struct sockaddr_in6 *src, uint32_t ssrc, uint16_t seq,
                          unsigned need)
{
    if (s->cand_count && same_source(&s->cand_sa, src) && s->cand_ssrc == ssrc &&
        (uint16_t)(s->cand_seq + 1) == seq) {
        s->cand_count++;
    } else {
        s->cand_sa = *src;
        s->cand_ssrc = ssrc;
        s->cand_count = 1;
    }
    s->cand_seq = seq;
    return s->cand_count % need == 0;
}

static void push_event(struct rp_worker *w, uint16_t kind, uint32_t id, const struct rp_stream *cfg,
                       const struct sockaddr_in6 *src, int rtp_valid, uint32_t ssrc, uint16_t seq, int64_t now)
{
    struct rp_ring *r = &w->ring;
    uint32_t head = r->head;
    uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
    if (head - tail >= RING_SIZE) {
        w->st.events_lost++;
        return;
    }
    struct rp_event *ev = &r->ev[head & (RING_SIZE - 1)];
    memset(ev, 0, sizeof(*ev));
    ev->kind = kind;
    ev->stream_id = id;
    ev->gen = cfg->gen;
    ev->rtp_valid = (uint8_t)rtp_valid;
    ev->ssrc = ssrc;
    ev->seq = seq;
    ev->ts_ns = now;
    if (src)
        sa_to_addr(src, &ev->src);
    __atomic_store_n(&r->head, head + 1, __ATOMIC_RELEASE);
    w->st.events++;
    notify_consumer(w->eng);
}

int rp_event_fd(struct rp_engine *e) { return e->evfd; }

int rp_events_read(struct rp_engine *e, struct rp_event *out, int max)
{
    int n = 0;
    uint64_t drain;
    /* Order matters: clear the eventfd, then arm, then read the rings. An event pushed after the
     * arming finds the flag set and writes the eventfd again, so it is never left unannounced;
     * one pushed before it is in the rings we are about to read. */
    while (read(e->evfd, &drain, sizeof(drain)) > 0)
        ;
    __atomic_store_n(&e->ev_armed, 1, __ATOMIC_SEQ_CST);
    for (unsigned i = 0; i < e->nworkers && n < max; i++) {
        struct rp_ring *r = &e->workers[i].ring;
        uint32_t tail = r->tail;
        uint32_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
        while (tail != head && n < max)
            out[n++] = r->ev[tail++ & (RING_SIZE - 1)];
        __atomic_store_n(&r->tail, tail, __ATOMIC_RELEASE);
    }
    if (n == max) {                     /* more may be waiting: make sure the loop comes back */
        uint64_t one = 1;
        ssize_t r = write(e->evfd, &one, sizeof(one));
        (void)r;
    }
    return n;
}

/* ---- the packet path ---------------------------------------------------- */

static void handle_readable(struct rp_worker *w, uint32_t id, int64_t now)
{
    struct rp_engine *e = w->eng;
    struct rp_slot *s = &e->slots[id];
    struct rp_counters *c = &e->counters[id];
    struct rp_stream cfg;
    struct sockaddr_in6 dst;
    socklen_t dst_len;

    if (!slot_read(s, &cfg, &dst, &dst_len))
        return;
    for (int i = 0; i < BATCH; i++) {
        w->rx_iov[i].iov_base = w->buf[i];
        w->rx_iov[i].iov_len = PKT_BUF;
        memset(&w->rx[i].msg_hdr, 0, sizeof(w->rx[i].msg_hdr));
        w->rx[i].msg_hdr.msg_iov = &w->rx_iov[i];
        w->rx[i].msg_hdr.msg_iovlen = 1;
        w->rx[i].msg_hdr.msg_name = &w->rx_src[i];
        w->rx[i].msg_hdr.msg_namelen = sizeof(w->rx_src[i]);
    }
    int n = recvmmsg(cfg.fd, w->rx, BATCH, MSG_DONTWAIT, NULL);
    if (n <= 0)
        return;

    int can_send = cfg.out_fd >= 0 && dst_len > 0;
    int ntx = 0;
    uint64_t bytes = 0, dropped = 0, mismatched = 0;
    for (int i = 0; i < n; i++) {
        unsigned len = w->rx[i].msg_len;
        const uint8_t *p = w->buf[i];
        const struct sockaddr_in6 *src = &w->rx_src[i];
        bytes += len;
        if (w->rx[i].msg_hdr.msg_flags & MSG_TRUNC) {
            dropped++;
            continue;
        }
        int rtp_valid = 0;
        uint32_t ssrc = 0;
        uint16_t seq = 0;
        /* RTCP multiplexed on the RTP port (RFC 5761: packet types 192..223 in the second byte)
         * is not RTP: no SSRC/seq from it. */
        if (cfg.is_rtp && len >= 12 && (p[0] >> 6) == 2 && !(p[1] >= 192 && p[1] <= 223)) {
            seq = (uint16_t)(p[2] << 8 | p[3]);
            ssrc = (uint32_t)p[8] << 24 | (uint32_t)p[9] << 16 | (uint32_t)p[10] << 8 | p[11];
            rtp_valid = ssrc != 0;
        }
        int latched = cfg.latched.family != 0;
        if (!latched || !source_matches(&cfg, src) ||
            (cfg.ssrc_locked && rtp_valid && ssrc != cfg.lock_ssrc)) {
            if (latched) {
                mismatched++;
                if (cfg.relatch_packets && rtp_valid &&
                    candidate_step(s, src, ssrc, seq, cfg.relatch_packets) &&
                    bucket_take(e, &s->cand_tokens_ns, &s->cand_bucket_ts, now))
                    push_event(w, RP_EV_CANDIDATE, id, &cfg, src, rtp_valid, ssrc, seq, now);
            }
            if (event_allowed(e, s, now))
                push_event(w, latched ? RP_EV_MISMATCH : RP_EV_UNLATCHED, id, &cfg, src, rtp_valid, ssrc, seq, now);
            int forward = cfg.on_mismatch == RP_MISMATCH_FORWARD ||
                          (cfg.on_mismatch == RP_MISMATCH_FORWARD_UNHEARD && !s->heard);
            if (!forward || (cfg.forward_until_ns && now >= cfg.forward_until_ns)) {
                dropped++;
                continue;
            }
        } else {
            s->heard = 1;
        }
        /* accepted */
        c->last_rx_ns = now;
        s->silent = 0;
        if (rtp_valid) {
            c->last_ssrc = ssrc;
            c->last_seq = seq;
        }
        if (!can_send) {
            dropped++;
            continue;
        }
        w->tx_iov[ntx].iov_base = (void *)p;
        w->tx_iov[ntx].iov_len = len;
        memset(&w->tx[ntx].msg_hdr, 0, sizeof(w->tx[ntx].msg_hdr));
        w->tx[ntx].msg_hdr.msg_iov = &w->tx_iov[ntx];
        w->tx[ntx].msg_hdr.msg_iovlen = 1;
        w->tx[ntx].msg_hdr.msg_name = &dst;
        w->tx[ntx].msg_hdr.msg_namelen = dst_len;
        ntx++;
    }
    int sent = 0;
    while (sent < ntx) {
        int r = sendmmsg(cfg.out_fd, w->tx + sent, (unsigned)(ntx - sent), MSG_DONTWAIT);
        if (r > 0) {
            sent += r;
            continue;
        }
        if (r < 0 && errno == EINTR)
            continue;
        /* EAGAIN (socket buffer full) or an ICMP error queued on the socket: this
         * packet is lost, the rest of the batch still gets its chance. */
        dropped++;
        ntx--;
        if (sent < ntx)
            memmove(w->tx + sent, w->tx + sent + 1, (size_t)(ntx - sent) * sizeof(w->tx[0]));
    }
    c->packets += (uint64_t)n;
    c->bytes += bytes;
    c->relayed += (uint64_t)sent;
    c->dropped += dropped;
    c->mismatched += mismatched;
    w->st.packets += (uint64_t)n;
    w->st.relayed += (uint64_t)sent;
    w->st.dropped += dropped;
}

/* Raise RP_EV_SILENT once for each stream of this worker that has gone quiet. */
static void silence_scan(struct rp_worker *w, int64_t now)
{
    struct rp_engine *e = w->eng;
    uint32_t hw = __atomic_load_n(&e->high_water, __ATOMIC_ACQUIRE);
    for (uint32_t id = 0; id < hw; id++) {
        struct rp_slot *s = &e->slots[id];
        if (!s->active || s->worker != w->index || s->silent)
            continue;
        int64_t last = e->counters[id].last_rx_ns;
        if (last == 0 || now - last < e->silence_ns)
            continue;
        struct rp_stream cfg;
        struct sockaddr_in6 dst;
        socklen_t dst_len;
        if (!slot_read(s, &cfg, &dst, &dst_len))
            continue;
        s->silent = 1;
        push_event(w, RP_EV_SILENT, id, &cfg, NULL, 0, 0, 0, now);
    }
}

static void *worker_main(void *arg)
{
    struct rp_worker *w = arg;
    struct rp_engine *e = w->eng;
    struct epoll_event evs[EPOLL_BATCH];

    while (!__atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE)) {
        int n = epoll_wait(w->epfd, evs, EPOLL_BATCH, TICK_MS);
        __atomic_fetch_add(&w->epoch, 1, __ATOMIC_ACQ_REL);        /* busy */
        int64_t now = now_ns();
        w->st.wakeups++;
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == WATCH_ID) {
                /* A command arrived for the control thread, which may share this core: let it
                 * run now rather than at the next scheduler tick (4 ms at HZ=250 on a kernel
                 * without preemption). Only then: yielding after every batch also handed the
                 * core to the control thread's deferred work and doubled the media p99. */
                w->st.control_yields++;
                sched_yield();
                continue;
            }
            if (id == WAKE_ID) {
                uint64_t v;
                ssize_t r = read(w->wakefd, &v, sizeof(v));
                (void)r;
                continue;
            }
            handle_readable(w, id, now);
        }
        if (e->silence_ns > 0 && now - w->last_tick >= TICK_MS * 1000000LL) {
            w->last_tick = now;
            silence_scan(w, now);
        }
        __atomic_fetch_add(&w->epoch, 1, __ATOMIC_ACQ_REL);        /* idle */
    }
    return NULL;
}

/* Wake worker w and return the epoch after which it can no longer hold a stale copy of any
 * entry changed before this call: the end of the batch that was (or might have been) in progress. */
static uint64_t worker_wake_target(struct rp_worker *w)
{
    uint64_t start = __atomic_load_n(&w->epoch, __ATOMIC_ACQUIRE);
    uint64_t one = 1;
    ssize_t r = write(w->wakefd, &one, sizeof(one));
    (void)r;
    return (start & 1) ? start + 1 : start + 2;
}

/* Wait until worker w can no longer hold a stale copy of any entry. */
static void worker_quiesce(struct rp_worker *w)
{
    if (!w->eng->running)
        return;
    uint64_t target = worker_wake_target(w);
    while ((int64_t)(__atomic_load_n(&w->epoch, __ATOMIC_ACQUIRE) - target) < 0) {
        if (__atomic_load_n(&w->eng->stopping, __ATOMIC_ACQUIRE))
            return;
        sched_yield();
    }
}

/* ---- control calls ------------------------------------------------------ */

struct rp_engine *rp_engine_new(unsigned workers, unsigned max_streams, unsigned events_per_sec,
                                unsigned burst, unsigned silence_ms)
{
    if (workers == 0 || workers > 256 || max_streams == 0 || events_per_sec == 0 || burst == 0) {
        errno = EINVAL;
        return NULL;
    }
    struct rp_engine *e = calloc(1, sizeof(*e));
    if (!e)
        return NULL;
    e->nworkers = workers;
    e->max_streams = max_streams;
    e->event_cost_ns = 1000000000LL / events_per_sec;
    e->event_burst_ns = e->event_cost_ns * burst;
    e->silence_ns = (int64_t)silence_ms * 1000000LL;
    e->ev_armed = 1;
    pthread_mutex_init(&e->ctl, NULL);
    e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->slots = calloc(max_streams, sizeof(*e->slots));
    e->counters = calloc(max_streams, sizeof(*e->counters));
    e->workers = calloc(workers, sizeof(*e->workers));
    if (e->evfd < 0 || !e->slots || !e->counters || !e->workers)
        goto fail;
    for (unsigned i = 0; i < workers; i++) {
        struct rp_worker *w = &e->workers[i];
        w->eng = e;
        w->index = i;
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->epfd < 0 || w->wakefd < 0)
            goto fail;
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = WAKE_ID};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->wakefd, &ev) < 0)
            goto fail;
    }
    return e;
fail:
    {
        int saved = errno;
        rp_engine_free(e);
        errno = saved;
    }
    return NULL;
}

int rp_engine_workers(struct rp_engine *e) { return (int)e->nworkers; }

int rp_engine_watch(struct rp_engine *e, int fd)
{
    for (unsigned i = 0; i < e->nworkers; i++) {
        /* Edge-triggered: one event per arrival, and the worker never reads the socket. */
        struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.u32 = WATCH_ID};
        if (epoll_ctl(e->workers[i].epfd, EPOLL_CTL_ADD, fd, &ev) < 0 && errno != EEXIST)
            return -errno;
    }
    return 0;
}

int rp_engine_start(struct rp_engine *e)
{
    pthread_mutex_lock(&e->ctl);
    if (e->running) {
        pthread_mutex_unlock(&e->ctl);
        return -EALREADY;
    }
    __atomic_store_n(&e->stopping, 0, __ATOMIC_RELEASE);
    for (unsigned i = 0; i < e->nworkers; i++) {
        int rc = pthread_create(&e->workers[i].thread, NULL, worker_main, &e->workers[i]);
        if (rc != 0) {
            __atomic_store_n(&e->stopping, 1, __ATOMIC_RELEASE);
            for (unsigned j = 0; j < i; j++)
                pthread_join(e->workers[j].thread, NULL);
            pthread_mutex_unlock(&e->ctl);
            return -rc;
        }
    }
    e->running = 1;
    pthread_mutex_unlock(&e->ctl);
    return 0;
}

int rp_engine_stop(struct rp_engine *e)
{
    pthread_mutex_lock(&e->ctl);
    if (!e->running) {
        pthread_mutex_unlock(&e->ctl);
        return 0;
    }
    __atomic_store_n(&e->stopping, 1, __ATOMIC_RELEASE);
    for (unsigned i = 0; i < e->nworkers; i++) {
        uint64_t one = 1;
        ssize_t r = write(e->workers[i].wakefd, &one, sizeof(one));
        (void)r;
    }
    for (unsigned i = 0; i < e->nworkers; i++)
        pthread_join(e->workers[i].thread, NULL);
    e->running = 0;
    pthread_mutex_unlock(&e->ctl);
    return 0;
}

void rp_engine_free(struct rp_engine *e)
{
    if (!e)
        return;
    rp_engine_stop(e);
    if (e->workers) {
        for (unsigned i = 0; i < e->nworkers; i++) {
            if (e->workers[i].epfd > 0)
                close(e->workers[i].epfd);
            if (e->workers[i].wakefd > 0)
                close(e->workers[i].wakefd);
        }
    }
    if (e->evfd >= 0)
        close(e->evfd);
    pthread_mutex_destroy(&e->ctl);
    free(e->workers);
    free(e->slots);
    free(e->counters);
    free(e);
}

static int valid_addr(const struct rp_addr *a)
{
    return a->family == 0 || a->family == AF_INET || a->family == AF_INET6;
}

/* The least loaded worker takes a new stream, so shards stay even as calls come and go. */
static unsigned pick_worker(struct rp_engine *e)
{
    unsigned best = 0;
    for (unsigned i = 1; i < e->nworkers; i++)
        if (e->workers[i].st.streams < e->workers[best].st.streams)
            best = i;
    return best;
}

int rp_stream_set(struct rp_engine *e, uint32_t id, const struct rp_stream *cfg)
{
    if (id >= e->max_streams || cfg->fd < 0 || !valid_addr(&cfg->latched) || !valid_addr(&cfg->dst) ||
        cfg->on_mismatch > RP_MISMATCH_FORWARD_UNHEARD || cfg->match > RP_MATCH_IP)
        return -EINVAL;
    pthread_mutex_lock(&e->ctl);
    struct rp_slot *s = &e->slots[id];
    int rc = 0;
    if (s->active) {
        struct rp_worker *w = &e->workers[s->worker];
        int old_fd = s->cfg.fd, old_out = s->cfg.out_fd;
        if (old_fd != cfg->fd) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
            if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, cfg->fd, &ev) < 0) {
                rc = -errno;
                goto out;
            }
            epoll_ctl(w->epfd, EPOLL_CTL_DEL, old_fd, NULL);
        }
        int moved = memcmp(&s->cfg.latched, &cfg->latched, sizeof(cfg->latched)) != 0;
        slot_write_begin(s);
        s->cfg = *cfg;
        s->dst_len = addr_to_sa(&cfg->dst, &s->dst_sa);
        if (moved)
            s->heard = 0;
        slot_write_end(s);
        /* Only a replaced fd can be closed by the caller next; -1 -> fd protects nothing. */
        if (old_fd != cfg->fd || (old_out >= 0 && old_out != cfg->out_fd))
            worker_quiesce(w);
    } else {
        unsigned wi = pick_worker(e);
        struct rp_worker *w = &e->workers[wi];
        slot_write_begin(s);
        s->cfg = *cfg;
        s->dst_len = addr_to_sa(&cfg->dst, &s->dst_sa);
        s->worker = (uint16_t)wi;
        s->silent = 0;
        s->heard = 0;
        s->tokens_ns = s->cand_tokens_ns = e->event_burst_ns;
        s->bucket_ts = s->cand_bucket_ts = 0;
        s->cand_count = 0;
        s->active = 1;
        slot_write_end(s);
        memset(&e->counters[id], 0, sizeof(e->counters[id]));
        if (id + 1 > e->high_water)
            __atomic_store_n(&e->high_water, id + 1, __ATOMIC_RELEASE);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = id};
        if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, cfg->fd, &ev) < 0) {
            rc = -errno;
            slot_write_begin(s);
            s->active = 0;
            slot_write_end(s);
            goto out;
        }
        w->st.streams++;
    }
out:
    pthread_mutex_unlock(&e->ctl);
    return rc;
}

static int stream_remove(struct rp_engine *e, uint32_t id, int wait)
{
    if (id >= e->max_streams)
        return -EINVAL;
    pthread_mutex_lock(&e->ctl);
    struct rp_slot *s = &e->slots[id];
    if (!s->active) {
        pthread_mutex_unlock(&e->ctl);
        return -ENOENT;
    }
    struct rp_worker *w = &e->workers[s->worker];
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, s->cfg.fd, NULL);
    slot_write_begin(s);
    s->active = 0;
    slot_write_end(s);
    w->st.streams--;
    if (wait)
        worker_quiesce(w);
    pthread_mutex_unlock(&e->ctl);
    return 0;
}

int rp_stream_del(struct rp_engine *e, uint32_t id) { return stream_remove(e, id, 1); }

int rp_stream_retire(struct rp_engine *e, uint32_t id) { return stream_remove(e, id, 0); }

int rp_grace_begin(struct rp_engine *e)
{
    pthread_mutex_lock(&e->ctl);
    if (e->running)
        for (unsigned i = 0; i < e->nworkers; i++)
            e->workers[i].grace_target = worker_wake_target(&e->workers[i]);
    pthread_mutex_unlock(&e->ctl);
    return 0;
}

int rp_grace_passed(struct rp_engine *e)
{
    if (!e->running || __atomic_load_n(&e->stopping, __ATOMIC_ACQUIRE))
        return 1;
    for (unsigned i = 0; i < e->nworkers; i++) {
        struct rp_worker *w = &e->workers[i];
        if ((int64_t)(__atomic_load_n(&w->epoch, __ATOMIC_ACQUIRE) - w->grace_target) < 0)
            return 0;
    }
    return 1;
}

int rp_quiesce(struct rp_engine *e)
{
    pthread_mutex_lock(&e->ctl);
    for (unsigned i = 0; i < e->nworkers; i++)
        worker_quiesce(&e->workers[i]);
    pthread_mutex_unlock(&e->ctl);
    return 0;
}

struct rp_counters *rp_counters(struct rp_engine *e) { return e->counters; }

int rp_counters_reset(struct rp_engine *e, uint32_t id)
{
    if (id >= e->max_streams)
        return -EINVAL;
    memset(&e->counters[id], 0, sizeof(e->counters[id]));
    return 0;
}

int rp_worker_stats(struct rp_engine *e, unsigned worker, struct rp_worker_stats *out)
{
    if (worker >= e->nworkers)
        return -EINVAL;
    *out = e->workers[worker].st;
    return 0;
}
