/*
 * vmferry's test guest: the judge of every end-to-end test.
 *
 * workload: for every writable virtio disk, writes numbered 4 KiB records
 *   (record k carries k, the disk's name, its slot and a checksum; the slot
 *   cycles through the record area), each made durable (O_DIRECT + fdatasync,
 *   so a FLUSH reaches the storage) before "ACK <disk> <k>" goes to ttyS1.
 *   Optionally dirties memory and writes unacknowledged bulk data.
 *   A partitioned disk (the disk the guest booted from) keeps its boot loader
 *   and file systems: its records go to its last partition.
 * verify: reads every disk's record area back and prints, per disk,
 *   "VERIFY <disk> highest=<k> intact=<n> corrupt=<m> missing=<x>", then
 *   "VERIFY-DONE", and powers off.
 *
 * iobench: fio's four jobs on the first writable disk, for bench/storage-guest.ts:
 *   vmferry.io_jobs=<rw>:<block KiB>:<depth>,... (rw: randread, randwrite, read,
 *   write; depth is the number of threads, each with one O_DIRECT request in
 *   flight) for vmferry.io_seconds= each over the first vmferry.span_mib= of the
 *   disk; per job "IOBENCH-START <job>", then "IOBENCH <job> ios=<n> bytes=<n>
 *   usec=<n>"; then "IOBENCH-DONE", and powers off.
 *
 * stream (workload mode, with vmferry.stream_port=): a TCP server on that port
 *   that sends every client a numbered stream: 8-byte big-endian numbers 0, 1,
 *   2, … one every vmferry.stream_ms (default 10) ms, so the client sees any
 *   number lost, repeated or out of order. init sets the address (vmferry.ip=).
 *
 * Options come from the kernel command line: vmferry.mode=, vmferry.span_mib=,
 * vmferry.dirty_mib=, vmferry.dirty_rate_mib=, vmferry.bulk_mib_s=,
 * vmferry.bulk_disks=, vmferry.interval_ms=, vmferry.stream_port=, vmferry.stream_ms=,
 * vmferry.io_jobs=, vmferry.io_seconds=.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <sys/socket.h>

#define RECORD_SIZE 4096
#define MAGIC "VMFREC01"
#define MAX_DISKS 16
#define NAME_LEN 32

struct record_header {
	char magic[8];
	uint64_t k;
	uint64_t slot;
	char disk[NAME_LEN];
};

struct disk {
	char dev[64];
	char name[NAME_LEN];
	int readonly;
	uint64_t size;
	uint64_t base; /* where the record area starts: 0, or a partitioned disk's last partition */
	uint64_t room; /* bytes from base on that records and bulk data may use */
	uint64_t slots; /* records in the record area */
	int bulk;
};

static struct disk disks[MAX_DISKS];
static int ndisks;
static int report_fd = -1;
static pthread_mutex_t report_lock = PTHREAD_MUTEX_INITIALIZER;

static struct {
	char mode[16];
	uint64_t span_mib, dirty_mib, dirty_rate_mib, bulk_mib_s, interval_ms;
	char bulk_disks[256];
	uint64_t stream_port, stream_ms;
	char io_jobs[256];
	uint64_t io_seconds;
} opt = { "workload", 64, 0, 8, 0, 0, "", 0, 10, "", 5 };

static void report(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* One write per line: the host parses whole lines. */
	pthread_mutex_lock(&report_lock);
	if (write(report_fd, line, n) < 0) {
		/* Nothing better to do than keep going; the host times out on silence. */
	}
	pthread_mutex_unlock(&report_lock);
}

static void power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static _Noreturn void fail(const char *what)
{
	report("GUEST-ERROR %s: %s", what, strerror(errno));
	power_off();
	exit(1);
}

/* FNV-1a 64 over the record with the checksum field (last 8 bytes) excluded. */
static uint64_t checksum(const unsigned char *buf)
{
	uint64_t h = 1469598103934665603ULL;
	for (size_t i = 0; i < RECORD_SIZE - 8; i++) {
		h ^= buf[i];
		h *= 1099511628211ULL;
	}
	return h;
}

static void fill_record(unsigned char *buf, const struct disk *d, uint64_t k, uint64_t slot)
{
	struct record_header h;
	memset(&h, 0, sizeof(h));
	memcpy(h.magic, MAGIC, 8);
	h.k = k;
	h.slot = slot;
	memcpy(h.disk, d->name, strnlen(d->name, NAME_LEN - 1));
	memcpy(buf, &h, sizeof(h));
	/* A payload that depends on k and the disk, so a stale or misplaced block is caught. */
	uint64_t x = k * 0x9E3779B97F4A7C15ULL ^ (uint64_t)d->name[0] << 32;
	for (size_t i = sizeof(h); i < RECORD_SIZE - 8; i += 8) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		memcpy(buf + i, &x, 8);
	}
	uint64_t sum = checksum(buf);
	memcpy(buf + RECORD_SIZE - 8, &sum, 8);
}

static void parse_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		fail("open /proc/cmdline");
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n < 0)
		fail("read /proc/cmdline");
	buf[n] = 0;
	for (char *tok = strtok(buf, " \n"); tok; tok = strtok(NULL, " \n")) {
		if (strncmp(tok, "vmferry.", 8))
			continue;
		char *key = tok + 8, *val = strchr(key, '=');
		if (!val)
			continue;
		*val++ = 0;
		if (!strcmp(key, "mode"))
			snprintf(opt.mode, sizeof(opt.mode), "%s", val);
		else if (!strcmp(key, "span_mib"))
			opt.span_mib = strtoull(val, NULL, 10);
		else if (!strcmp(key, "dirty_mib"))
			opt.dirty_mib = strtoull(val, NULL, 10);
		else if (!strcmp(key, "dirty_rate_mib"))
			opt.dirty_rate_mib = strtoull(val, NULL, 10);
		else if (!strcmp(key, "bulk_mib_s"))
			opt.bulk_mib_s = strtoull(val, NULL, 10);
		else if (!strcmp(key, "bulk_disks"))
			snprintf(opt.bulk_disks, sizeof(opt.bulk_disks), "%s", val);
		else if (!strcmp(key, "interval_ms"))
			opt.interval_ms = strtoull(val, NULL, 10);
		else if (!strcmp(key, "stream_port"))
			opt.stream_port = strtoull(val, NULL, 10);
		else if (!strcmp(key, "stream_ms"))
			opt.stream_ms = strtoull(val, NULL, 10);
		else if (!strcmp(key, "io_jobs"))
			snprintf(opt.io_jobs, sizeof(opt.io_jobs), "%s", val);
		else if (!strcmp(key, "io_seconds"))
			opt.io_seconds = strtoull(val, NULL, 10);
	}
}

static int read_sysfs(const char *dev, const char *attr, char *out, size_t len)
{
	char path[256];
	snprintf(path, sizeof(path), "/sys/block/%s/%s", dev, attr);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, out, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	out[n] = 0;
	out[strcspn(out, "\n")] = 0;
	return 0;
}

static int listed(const char *list, const char *name)
{
	if (!*list)
		return 1;
	char copy[256];
	snprintf(copy, sizeof(copy), "%s", list);
	for (char *t = strtok(copy, ","); t; t = strtok(NULL, ","))
		if (!strcmp(t, name))
			return 1;
	return 0;
}

static uint32_t le32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/*
 * The last partition of an MBR-partitioned disk, as base and room; the whole
 * disk otherwise. A disk whose first block is a record is a record disk, even
 * when its random payload happens to end sector 0 with the MBR signature.
 */
static void find_record_area(struct disk *d)
{
	unsigned char mbr[512];
	d->base = 0;
	d->room = d->size;
	int fd = open(d->dev, O_RDONLY);
	if (fd < 0)
		fail(d->dev);
	ssize_t n = pread(fd, mbr, sizeof(mbr), 0);
	close(fd);
	if (n != (ssize_t)sizeof(mbr) || !memcmp(mbr, MAGIC, 8) || mbr[510] != 0x55 || mbr[511] != 0xAA)
		return;
	for (int i = 0; i < 4; i++) {
		const unsigned char *e = mbr + 446 + 16 * i;
		uint64_t start = (uint64_t)le32(e + 8) * 512, len = (uint64_t)le32(e + 12) * 512;
		if (e[4] == 0 || start == 0 || len == 0 || start + len > d->size || start <= d->base)
			continue;
		d->base = start;
		d->room = len;
	}
}

static void find_disks(void)
{
	DIR *dir = opendir("/sys/block");
	if (!dir)
		fail("opendir /sys/block");
	struct dirent *e;
	while ((e = readdir(dir)) && ndisks < MAX_DISKS) {
		if (strncmp(e->d_name, "vd", 2) || strlen(e->d_name) > 16)
			continue;
		struct disk *d = &disks[ndisks];
		char value[64];
		snprintf(d->dev, sizeof(d->dev), "/dev/%.16s", e->d_name);
		if (read_sysfs(e->d_name, "serial", d->name, sizeof(d->name)) || !d->name[0])
			snprintf(d->name, sizeof(d->name), "%.16s", e->d_name);
		d->readonly = read_sysfs(e->d_name, "ro", value, sizeof(value)) == 0 && value[0] == '1';
		if (read_sysfs(e->d_name, "size", value, sizeof(value)))
			continue;
		d->size = strtoull(value, NULL, 10) * 512;
		find_record_area(d);
		uint64_t span = opt.span_mib * 1024 * 1024;
		if (span == 0 || span > d->room)
			span = d->room;
		d->slots = span / RECORD_SIZE;
		d->bulk = opt.bulk_mib_s > 0 && !d->readonly && listed(opt.bulk_disks, d->name) && d->room > span;
		if (d->slots > 0)
			ndisks++;
	}
	closedir(dir);
}

struct scan {
	uint64_t highest, intact, corrupt, missing;
};

/* Reads the record area: the highest intact record, and what is intact, corrupt or missing below it. */
static struct scan scan_records(const struct disk *d)
{
	int fd = open(d->dev, O_RDONLY | O_DIRECT);
	if (fd < 0)
		fail(d->dev);
	const size_t chunk = 1024 * 1024;
	unsigned char *buf;
	if (posix_memalign((void **)&buf, 4096, chunk))
		fail("posix_memalign");
	uint64_t *found = calloc(d->slots, sizeof(uint64_t)); /* intact record k per slot, 0 if none */
	if (!found)
		fail("calloc");
	uint64_t highest = 0, intact = 0, corrupt = 0;
	for (uint64_t off = 0; off < d->slots * RECORD_SIZE; off += chunk) {
		size_t len = d->slots * RECORD_SIZE - off < chunk ? d->slots * RECORD_SIZE - off : chunk;
		if (pread(fd, buf, len, (off_t)(d->base + off)) != (ssize_t)len)
			fail("pread");
		for (size_t i = 0; i < len; i += RECORD_SIZE) {
			unsigned char *rec = buf + i;
			uint64_t slot = (off + i) / RECORD_SIZE, sum;
			struct record_header h;
			memcpy(&h, rec, sizeof(h));
			if (memcmp(h.magic, MAGIC, 8))
				continue;
			memcpy(&sum, rec + RECORD_SIZE - 8, 8);
			if (sum != checksum(rec) || h.slot != slot || strncmp(h.disk, d->name, NAME_LEN) ||
			    h.k == 0 || (h.k - 1) % d->slots != slot) {
				corrupt++;
				continue;
			}
			found[slot] = h.k;
			intact++;
			if (h.k > highest)
				highest = h.k;
		}
	}
	uint64_t missing = 0;
	uint64_t first = highest > d->slots ? highest - d->slots + 1 : 1;
	for (uint64_t k = first; highest && k <= highest; k++)
		if (found[(k - 1) % d->slots] != k)
			missing++;
	free(found);
	free(buf);
	close(fd);
	return (struct scan){ highest, intact, corrupt, missing };
}

static void *write_records(void *arg)
{
	struct disk *d = arg;
	int fd = open(d->dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		fail(d->dev);
	unsigned char *buf;
	if (posix_memalign((void **)&buf, RECORD_SIZE, RECORD_SIZE))
		fail("posix_memalign");
	/*
	 * A guest started again on its disk (after a crash, on the host it moved to) goes on after the highest record it
	 * finds, as a log would: numbered from 1 again, its records would overwrite a ring that wrapped with lower numbers,
	 * and a verify would count the records they replaced as missing. What it found is reported for the host to check
	 * against what was acknowledged before the restart.
	 */
	struct scan before = scan_records(d);
	report("FOUND %s highest=%" PRIu64 " missing=%" PRIu64 " corrupt=%" PRIu64, d->name, before.highest, before.missing,
	       before.corrupt);
	for (uint64_t k = before.highest + 1;; k++) {
		uint64_t slot = (k - 1) % d->slots;
		fill_record(buf, d, k, slot);
		if (pwrite(fd, buf, RECORD_SIZE, (off_t)(d->base + slot * RECORD_SIZE)) != RECORD_SIZE)
			fail("pwrite record");
		if (fdatasync(fd))
			fail("fdatasync");
		report("ACK %s %" PRIu64, d->name, k);
		if (opt.interval_ms)
			usleep(opt.interval_ms * 1000);
	}
	return NULL;
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };
	nanosleep(&ts, NULL);
}

/* Unacknowledged writes after the record area: the load under which a wrong switch-over order breaks. */
static void *write_bulk(void *arg)
{
	struct disk *d = arg;
	const size_t chunk = 1024 * 1024;
	uint64_t start = d->base + d->slots * RECORD_SIZE, area = d->room - d->slots * RECORD_SIZE, pos = 0;
	int fd = open(d->dev, O_RDWR | O_DIRECT);
	if (fd < 0)
		fail(d->dev);
	unsigned char *buf;
	if (posix_memalign((void **)&buf, 4096, chunk))
		fail("posix_memalign");
	for (uint64_t n = 0;; n++) {
		memset(buf, (int)(n & 0xff), chunk);
		if (pos + chunk > area)
			pos = 0;
		if (pwrite(fd, buf, chunk, (off_t)(start + pos)) < 0)
			fail("pwrite bulk");
		pos += chunk;
		sleep_ms(1000 / opt.bulk_mib_s);
	}
	return NULL;
}

static void *dirty_memory(void *arg)
{
	(void)arg;
	size_t len = opt.dirty_mib * 1024 * 1024;
	unsigned char *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (mem == MAP_FAILED)
		fail("mmap");
	size_t step = opt.dirty_rate_mib * 1024 * 1024 / 10, pos = 0;
	if (step == 0)
		step = 4096;
	for (unsigned char v = 1;; v++) {
		/* Touch one byte per page: enough to dirty it for the migration. */
		for (size_t i = 0; i < step; i += 4096, pos += 4096) {
			if (pos >= len)
				pos = 0;
			mem[pos] = v;
		}
		sleep_ms(100);
	}
	return NULL;
}

static void *stream_client(void *arg)
{
	int fd = (int)(intptr_t)arg;
	struct timespec gap = { (time_t)(opt.stream_ms / 1000), (long)(opt.stream_ms % 1000) * 1000000L };
	for (uint64_t k = 0;; k++) {
		unsigned char be[8];
		for (int i = 0; i < 8; i++)
			be[i] = (unsigned char)(k >> (56 - 8 * i));
		/* A short send would split a number: the client would read it as two wrong ones. */
		size_t off = 0;
		while (off < sizeof(be)) {
			ssize_t n = send(fd, be + off, sizeof(be) - off, MSG_NOSIGNAL);
			if (n <= 0) {
				close(fd);
				return NULL;
			}
			off += (size_t)n;
		}
		nanosleep(&gap, NULL);
	}
}

static void *stream_server(void *arg)
{
	(void)arg;
	int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	if (s < 0)
		fail("socket");
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)opt.stream_port), .sin_addr = { htonl(INADDR_ANY) } };
	if (bind(s, (struct sockaddr *)&addr, sizeof(addr)) || listen(s, 16))
		fail("bind/listen stream port");
	report("STREAM port=%" PRIu64, opt.stream_port);
	for (;;) {
		int c = accept(s, NULL, NULL);
		if (c < 0)
			continue;
		pthread_t t;
		if (pthread_create(&t, NULL, stream_client, (void *)(intptr_t)c))
			close(c);
		else
			pthread_detach(t);
	}
}

#define MAX_IO_DEPTH 64

static struct {
	const struct disk *disk;
	int write, random;
	uint64_t block, blocks;
	int depth;
	volatile int stop;
} io;

struct io_worker {
	pthread_t thread;
	int index;
	uint64_t ios;
};

static void *io_worker(void *arg)
{
	struct io_worker *w = arg;
	int fd = open(io.disk->dev, (io.write ? O_RDWR : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		fail(io.disk->dev);
	unsigned char *buf;
	if (posix_memalign((void **)&buf, 4096, io.block))
		fail("posix_memalign");
	memset(buf, 0x5a, io.block);
	/* Sequential jobs: each thread walks its own stretch, so together they stream as fio's queue does. */
	uint64_t next = io.blocks / (uint64_t)io.depth * (uint64_t)w->index;
	uint64_t x = 0x9E3779B97F4A7C15ULL * (uint64_t)(w->index + 1);
	while (!io.stop) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		uint64_t block = io.random ? x % io.blocks : next++ % io.blocks;
		off_t at = (off_t)(io.disk->base + block * io.block);
		ssize_t n = io.write ? pwrite(fd, buf, io.block, at) : pread(fd, buf, io.block, at);
		if (n != (ssize_t)io.block)
			fail(io.write ? "pwrite iobench" : "pread iobench");
		w->ios++;
	}
	free(buf);
	close(fd);
	return NULL;
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000 + (uint64_t)ts.tv_nsec / 1000;
}

static void iobench_job(const struct disk *d, const char *job)
{
	char rw[16];
	unsigned long kib;
	int depth;
	if (sscanf(job, "%15[a-z]:%lu:%d", rw, &kib, &depth) != 3 || kib == 0 || depth < 1 || depth > MAX_IO_DEPTH) {
		errno = EINVAL;
		fail(job);
	}
	io.disk = d;
	io.write = strstr(rw, "write") != NULL;
	io.random = !strncmp(rw, "rand", 4);
	io.block = (uint64_t)kib * 1024;
	uint64_t span = opt.span_mib * 1024 * 1024;
	if (span == 0 || span > d->room)
		span = d->room;
	io.blocks = span / io.block;
	io.depth = depth;
	io.stop = 0;
	if (io.blocks < (uint64_t)depth) {
		errno = ERANGE;
		fail(job);
	}
	static struct io_worker workers[MAX_IO_DEPTH];
	report("IOBENCH-START %s", job);
	uint64_t started = now_us();
	for (int i = 0; i < depth; i++) {
		workers[i] = (struct io_worker){ .index = i };
		if (pthread_create(&workers[i].thread, NULL, io_worker, &workers[i]))
			fail("pthread_create");
	}
	sleep_ms(opt.io_seconds * 1000);
	io.stop = 1;
	uint64_t ios = 0;
	for (int i = 0; i < depth; i++) {
		pthread_join(workers[i].thread, NULL);
		ios += workers[i].ios;
	}
	report("IOBENCH %s ios=%" PRIu64 " bytes=%" PRIu64 " usec=%" PRIu64, job, ios, ios * io.block, now_us() - started);
}

static void iobench(void)
{
	const struct disk *d = NULL;
	for (int i = 0; i < ndisks && !d; i++)
		if (!disks[i].readonly)
			d = &disks[i];
	if (!d) {
		errno = ENODEV;
		fail("iobench: no writable disk");
	}
	char jobs[sizeof(opt.io_jobs)];
	snprintf(jobs, sizeof(jobs), "%s", opt.io_jobs);
	char *save = NULL;
	for (char *job = strtok_r(jobs, ",", &save); job; job = strtok_r(NULL, ",", &save))
		iobench_job(d, job);
	report("IOBENCH-DONE");
	power_off();
}

static void workload(void)
{
	pthread_t t;
	char names[512] = "";
	for (int i = 0; i < ndisks; i++) {
		if (disks[i].readonly)
			continue;
		strncat(names, " ", sizeof(names) - strlen(names) - 1);
		strncat(names, disks[i].name, sizeof(names) - strlen(names) - 1);
	}
	report("READY%s", names);
	if (opt.stream_port && pthread_create(&t, NULL, stream_server, NULL))
		fail("pthread_create");
	if (opt.dirty_mib && pthread_create(&t, NULL, dirty_memory, NULL))
		fail("pthread_create");
	for (int i = 0; i < ndisks; i++) {
		if (disks[i].readonly)
			continue;
		if (pthread_create(&t, NULL, write_records, &disks[i]))
			fail("pthread_create");
		if (disks[i].bulk && pthread_create(&t, NULL, write_bulk, &disks[i]))
			fail("pthread_create");
	}
	for (;;)
		pause();
}

static void verify_disk(struct disk *d)
{
	struct scan r = scan_records(d);
	report("VERIFY %s highest=%" PRIu64 " intact=%" PRIu64 " corrupt=%" PRIu64 " missing=%" PRIu64, d->name, r.highest,
	       r.intact, r.corrupt, r.missing);
}

int main(void)
{
	report_fd = open("/dev/ttyS1", O_WRONLY | O_NOCTTY);
	if (report_fd < 0)
		report_fd = STDOUT_FILENO;
	parse_cmdline();
	find_disks();
	if (!strcmp(opt.mode, "verify")) {
		for (int i = 0; i < ndisks; i++)
			verify_disk(&disks[i]);
		report("VERIFY-DONE");
		power_off();
	}
	if (!strcmp(opt.mode, "workload"))
		workload();
	if (!strcmp(opt.mode, "iobench"))
		iobench();
	errno = EINVAL;
	fail(opt.mode);
}
