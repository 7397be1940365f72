/*
 * relay.h: the one contract between the C media engine and Python.
 *
 * This file is both the C header and the cffi cdef (build_relay.py feeds it to
 * ffibuilder.cdef), so it holds only declarations cffi understands: no
 * includes, no macros other than integer constants, no inline code.
 *
 * Rules (see DESIGN.md §3):
 *  - every exported symbol starts with rp_; calls return >= 0 or -errno;
 *  - Python opens, binds and closes sockets; C only uses the fds it is given;
 *  - rp_stream_set / rp_stream_del return only once no worker can still be
 *    using an fd the call replaced or removed, so Python may close it then
 *    (rp_stream_retire + rp_quiesce: the same guarantee, one wait for many;
 *    rp_stream_retire + rp_grace_begin/rp_grace_passed: the same, with no wait);
 *  - any change to a struct below bumps RP_ABI_VERSION (checked at import and
 *    by tests/test_abi.py with ffi.sizeof/offsetof).
 */

#define RP_ABI_VERSION 5

/* An endpoint. family is 0 (none), 2 (AF_INET) or 10 (AF_INET6); port in host
 * byte order; ip holds 4 (IPv4) or 16 (IPv6) bytes in network order. */
struct rp_addr {
    uint16_t family;
    uint16_t port;
    uint8_t ip[16];
};

/* What to do with a packet from a source other than the latched one. */
#define RP_MISMATCH_DROP 0      /* drop, count, report (rate-limited) */
#define RP_MISMATCH_FORWARD 1   /* forward, count, report: the learning window after a U/L */
#define RP_MISMATCH_FORWARD_UNHEARD 2 /* forward until a packet from the latched source arrives
                                         (learning while pre-latched to the SDP address), then drop */

/* How the latched source is compared with a packet's source. */
#define RP_MATCH_ADDR 0         /* address and port (symmetric latching) */
#define RP_MATCH_IP 1           /* address only (asymmetric: rtpproxy's 'A') */

/* One local socket's forwarding entry: packets arriving on fd are sent out of
 * out_fd to dst. A packet is "from the latched source" when its source matches
 * latched (per match) and, if ssrc_locked, it is RTP with SSRC lock_ssrc (or not
 * RTP at all: RTCP multiplexed on the RTP port is never checked by SSRC). */
struct rp_stream {
    int32_t fd;                 /* socket packets arrive on */
    int32_t out_fd;             /* socket they leave from; -1: count and drop */
    struct rp_addr latched;     /* family 0: not latched: every packet is a mismatch */
    struct rp_addr dst;         /* family 0: nowhere to send yet: count and drop */
    uint32_t gen;               /* echoed in events so Python can ignore those of a reused id */
    uint8_t on_mismatch;        /* RP_MISMATCH_*: what happens to packets not from the latched source */
    uint8_t match;              /* RP_MATCH_* */
    uint8_t is_rtp;             /* parse RTP headers (SSRC, seq) for counters and events */
    uint8_t ssrc_locked;        /* also require SSRC lock_ssrc from the latched source */
    uint32_t lock_ssrc;
    uint8_t relatch_packets;    /* >0: raise RP_EV_CANDIDATE after this many consecutive packets
                                   (one SSRC, sequence numbers +1 each) from one other source */
    uint8_t reserved[3];
    int64_t forward_until_ns;   /* with RP_MISMATCH_FORWARD: forward only until this CLOCK_MONOTONIC
                                   time, then drop (the update window closes without a call); 0 = always */
};

/* Per-stream counters, written only by the stream's worker, read by Python
 * straight from memory (no syscall). */
struct rp_counters {
    uint64_t packets;           /* datagrams received on the socket */
    uint64_t bytes;             /* their payload bytes */
    uint64_t relayed;           /* datagrams sent on to dst */
    uint64_t dropped;           /* not sent: source refused, no destination, send failure, oversize */
    uint64_t mismatched;        /* from a source other than the latched one */
    int64_t last_rx_ns;         /* CLOCK_MONOTONIC of the last accepted packet; 0 = none yet */
    uint32_t last_ssrc;         /* of the last accepted RTP packet */
    uint16_t last_seq;
    uint16_t reserved;
};

#define RP_EV_UNLATCHED 1       /* packet on a stream with no latched source */
#define RP_EV_MISMATCH 2        /* packet from a source other than the latched one */
#define RP_EV_SILENT 3          /* an active stream received nothing for the silence interval */
#define RP_EV_CANDIDATE 4       /* relatch_packets consecutive packets from one other source */

struct rp_event {
    uint16_t kind;              /* RP_EV_* */
    uint8_t rtp_valid;          /* the packet parsed as RTP v2 with a non-zero SSRC */
    uint8_t reserved;
    uint32_t stream_id;
    uint32_t gen;
    uint16_t seq;
    uint16_t reserved2;
    uint32_t ssrc;
    struct rp_addr src;
    int64_t ts_ns;              /* CLOCK_MONOTONIC */
};

/* Engine-wide figures, per worker. */
struct rp_worker_stats {
    uint64_t wakeups;           /* epoll_wait returns */
    uint64_t packets;           /* datagrams received */
    uint64_t relayed;           /* datagrams sent */
    uint64_t dropped;
    uint64_t events;            /* events queued */
    uint64_t events_lost;       /* events refused because the ring was full */
    uint32_t streams;           /* streams owned */
    uint32_t control_yields;    /* times the core was yielded to a command (rp_engine_watch) */
};

struct rp_engine;

int rp_abi_version(void);
/* max_streams bounds stream ids; events_per_sec and burst bound the events one
 * stream may raise; silence_ms is the quiet time before RP_EV_SILENT (0 = off). */
struct rp_engine *rp_engine_new(unsigned workers, unsigned max_streams,
                                unsigned events_per_sec, unsigned burst,
                                unsigned silence_ms);
void rp_engine_free(struct rp_engine *);
int rp_engine_start(struct rp_engine *);
int rp_engine_stop(struct rp_engine *);
int rp_engine_workers(struct rp_engine *);
/* Workers yield the CPU as soon as fd (a control socket) becomes readable, so a command does not
 * wait for a busy worker's time slice on a shared core. The engine never reads fd; closing it
 * ends the watch. */
int rp_engine_watch(struct rp_engine *, int fd);
int rp_stream_set(struct rp_engine *, uint32_t id, const struct rp_stream *);
int rp_stream_del(struct rp_engine *, uint32_t id);
/* Deferred deletion, for the control path: rp_stream_retire removes the entry without waiting;
 * the fds it used may be closed only after a later rp_quiesce (one wait covers any number of
 * retired entries). */
int rp_stream_retire(struct rp_engine *, uint32_t id);
int rp_quiesce(struct rp_engine *);
/* The same guarantee without waiting: rp_grace_begin wakes every worker and notes where each must
 * get to; once rp_grace_passed returns 1, fds of entries retired before the begin may be closed.
 * One grace period at a time (a new begin replaces the previous one). */
int rp_grace_begin(struct rp_engine *);
int rp_grace_passed(struct rp_engine *);
struct rp_counters *rp_counters(struct rp_engine *);
int rp_counters_reset(struct rp_engine *, uint32_t id);
int rp_event_fd(struct rp_engine *);
int rp_events_read(struct rp_engine *, struct rp_event *out, int max);
int rp_worker_stats(struct rp_engine *, unsigned worker, struct rp_worker_stats *out);
