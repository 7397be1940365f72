/*
 * flood: RTP-shaped packets from many source ports to one relay port, at a fixed rate.
 *
 *   flood -d HOST:PORT -r PPS -t SECONDS [-s SRC_IP] [-n SOURCES]
 *
 * Each source uses its own SSRC and consecutive sequence numbers, so the relay's candidate
 * tracking sees plausible streams. Prints {"sent": N, "seconds": S}. Benchmark harness only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    const char *dst = NULL, *src_ip = "127.0.0.66";
    long pps = 100000, secs = 5, nsrc = 256;
    int opt;
    while ((opt = getopt(argc, argv, "d:r:t:s:n:")) != -1) {
        switch (opt) {
        case 'd': dst = optarg; break;
        case 'r': pps = atol(optarg); break;
        case 't': secs = atol(optarg); break;
        case 's': src_ip = optarg; break;
        case 'n': nsrc = atol(optarg); break;
        default: fprintf(stderr, "usage: flood -d HOST:PORT -r PPS -t SECONDS [-s SRC_IP] [-n SOURCES]\n"); return 2;
        }
    }
    const char *colon = dst ? strrchr(dst, ':') : NULL;
    if (!colon || pps <= 0 || secs <= 0 || nsrc <= 0 || nsrc > 4096) {
        fprintf(stderr, "flood: -d HOST:PORT, -r > 0, -t > 0, 0 < -n <= 4096 are required\n");
        return 2;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1))};
    char host[64];
    snprintf(host, sizeof(host), "%.*s", (int)(colon - dst), dst);
    if (inet_pton(AF_INET, host, &to.sin_addr) != 1) {
        fprintf(stderr, "flood: bad address %s\n", host);
        return 2;
    }
    int *fds = calloc((size_t)nsrc, sizeof(int));
    uint16_t *seq = calloc((size_t)nsrc, sizeof(uint16_t));
    for (long i = 0; i < nsrc; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        struct sockaddr_in a = {.sin_family = AF_INET};
        inet_pton(AF_INET, src_ip, &a.sin_addr);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof(a)) < 0) {
            perror("flood: socket/bind");
            return 2;
        }
    }
    uint8_t pkt[172];
    memset(pkt, 0x55, sizeof(pkt));
    pkt[0] = 0x80;
    int64_t start = now_ns(), end = start + secs * 1000000000LL;
    uint64_t sent = 0;
    const int64_t tick = 1000000;              /* send in 1 ms slices */
    int64_t next = start;
    long i = 0;
    while (now_ns() < end) {
        long quota = pps / 1000;
        for (long k = 0; k < quota; k++, i = (i + 1) % nsrc) {
            pkt[2] = (uint8_t)(seq[i] >> 8);
            pkt[3] = (uint8_t)seq[i];
            uint32_t ssrc = htonl((uint32_t)(0x5000 + i));
            memcpy(pkt + 8, &ssrc, 4);
            seq[i]++;
            if (sendto(fds[i], pkt, sizeof(pkt), 0, (struct sockaddr *)&to, sizeof(to)) > 0)
                sent++;
        }
        next += tick;
        int64_t sleep_ns = next - now_ns();
        if (sleep_ns > 0) {
            struct timespec ts = {0, sleep_ns};
            nanosleep(&ts, NULL);
        }
    }
    printf("{\"sent\": %lu, \"seconds\": %.3f}\n", (unsigned long)sent, (double)(now_ns() - start) / 1e9);
    return 0;
}
