// SPDX-License-Identifier: GPL-2.0
/* Ferry's probes: per-VM dirty pages, exits and disk I/O, from tracepoints only.
 *
 * Every program is a thin entry that calls one shared function. A VM is a watched
 * process (its tgid in WATCH, put there by the agent); everything else returns after
 * one lookup, which is what system-wide syscall tracepoints cost other processes.
 * Counters live in per-CPU maps: no atomics and no locks on the hot path. The one
 * shared structure, the working-set bitmap, is set with a lock-free atomic OR and read
 * (and cleared) by the agent through mmap. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "ferry.h"

char LICENSE[] SEC("license") = "GPL";

#define PFERR_WRITE_MASK (1ull << 1)
#define SPTE_WRITABLE (1ull << 1)

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FERRY_MAX_VMS);
	__type(key, __u32);
	__type(value, struct ferry_watch);
} WATCH SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FERRY_MAX_VMS);
	__type(key, __u32);
	__type(value, struct ferry_vm_counts);
} VM_COUNTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, FERRY_MAX_VMS * FERRY_WS_WORDS);
	__uint(map_flags, BPF_F_MMAPABLE);
	__type(key, __u32);
	__type(value, __u64);
} WS_BITMAP SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ferry_exit_key);
	__type(value, __u64);
} EXITS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct ferry_io_start);
} IO_START SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FERRY_MAX_VMS * FERRY_IO_OPS);
	__type(key, __u32);
	__type(value, struct ferry_io_stats);
} IO SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ferry_rq_key);
	__type(value, struct ferry_rq_start);
} BLOCK_START SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ferry_block_key);
	__type(value, struct ferry_io_stats);
} BLOCK SEC(".maps");

static __always_inline struct ferry_watch *watched(void)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	return bpf_map_lookup_elem(&WATCH, &tgid);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline void add_latency(struct ferry_io_stats *s, __u64 ns, __u64 bytes, int failed)
{
	__u32 b = log2_u64(ns);
	if (b >= FERRY_HIST_BUCKETS)
		b = FERRY_HIST_BUCKETS - 1;
	s->calls++;
	s->latency_ns += ns;
	if (failed)
		s->errors++;
	else
		s->bytes += bytes;
	s->hist[b]++;
}

/* ---- dirty pages ---- */

static __always_inline int dirtied(__u32 source, __u64 page)
{
	struct ferry_watch *w = watched();
	if (!w)
		return 0;
	__u32 slot = w->slot;
	struct ferry_vm_counts *c = bpf_map_lookup_elem(&VM_COUNTS, &slot);
	if (!c)
		return 0;
	if (source < FERRY_DIRTY_SOURCES)
		c->dirty[source]++;
	if (w->ws_source == source && slot < FERRY_MAX_VMS) {
		__u64 p = page & ((1ull << FERRY_WS_PAGE_BITS) - 1);
		__u32 word = slot * FERRY_WS_WORDS + (__u32)(p >> 6);
		__u64 *bits = bpf_map_lookup_elem(&WS_BITMAP, &word);
		if (bits)
			__sync_fetch_and_or(bits, 1ull << (p & 63));
	}
	return 0;
}

SEC("tracepoint/kvm/kvm_dirty_ring_push")
int dirty_ring_push(struct trace_event_raw_kvm_dirty_ring_push *ctx)
{
	/* Memslot and offset name the page; a VM with one RAM slot has offset == gfn,
	 * and other slots are spread over the bitmap rather than piled on slot 0's. */
	__u64 page = ctx->offset + ((__u64)(ctx->slot & 0xffff) * 0x9e3779b1ull);
	return dirtied(FERRY_DIRTY_RING, page);
}

SEC("tracepoint/kvm/kvm_page_fault")
int page_fault(struct trace_event_raw_kvm_page_fault *ctx)
{
	if (!(ctx->error_code & PFERR_WRITE_MASK))
		return 0;
	return dirtied(FERRY_DIRTY_PAGE_FAULT, ctx->fault_address >> 12);
}

static __always_inline int count_all(int walk)
{
	struct ferry_watch *w = watched();
	if (!w)
		return 0;
	__u32 slot = w->slot;
	struct ferry_vm_counts *c = bpf_map_lookup_elem(&VM_COUNTS, &slot);
	if (c) {
		if (walk)
			c->read_walks++;
		else
			c->readonly_sptes++;
	}
	return 0;
}

SEC("tracepoint/kvmmmu/kvm_mmu_pagetable_walk")
int mmu_walk(struct trace_event_raw_kvm_mmu_pagetable_walk *ctx)
{
	if (!(ctx->pferr & PFERR_WRITE_MASK))
		return count_all(1);
	return dirtied(FERRY_DIRTY_WALK, ctx->addr >> 12);
}

SEC("tracepoint/kvmmmu/kvm_mmu_set_spte")
int mmu_set_spte(struct trace_event_raw_kvm_mmu_set_spte *ctx)
{
	if (!(ctx->spte & SPTE_WRITABLE))
		return count_all(0);
	return dirtied(FERRY_DIRTY_SPTE, ctx->gfn);
}

SEC("tracepoint/syscalls/sys_enter_ioctl")
int ioctl(struct trace_event_raw_sys_enter *ctx)
{
	/* KVM_RUN goes through here at every exit: test the command before the lookup. */
	__u32 cmd = (__u32)ctx->args[1];
	int harvest = cmd == FERRY_KVM_GET_DIRTY_LOG || cmd == FERRY_KVM_CLEAR_DIRTY_LOG ||
		      cmd == FERRY_KVM_RESET_DIRTY_RINGS;
	int memslot = cmd == FERRY_KVM_SET_USER_MEMORY_REGION ||
		      cmd == FERRY_KVM_SET_USER_MEMORY_REGION2;
	if (!harvest && !memslot)
		return 0;
	struct ferry_watch *w = watched();
	if (!w)
		return 0;
	__u32 slot = w->slot;
	struct ferry_vm_counts *c = bpf_map_lookup_elem(&VM_COUNTS, &slot);
	if (!c)
		return 0;
	if (harvest) {
		c->harvests++;
		return 0;
	}
	__u32 flags = 0;
	if (bpf_probe_read_user(&flags, sizeof(flags), (void *)(ctx->args[2] + 4)) == 0) {
		c->memslot_ns = bpf_ktime_get_ns();
		c->memslot_logging = (flags & FERRY_KVM_MEM_LOG_DIRTY_PAGES) != 0;
	}
	return 0;
}

/* ---- exits ---- */

static __always_inline int exited(__u32 kind, __u32 reason)
{
	struct ferry_watch *w = watched();
	if (!w)
		return 0;
	struct ferry_exit_key k = { .slot = w->slot, .kind = kind, .reason = reason };
	__u64 *n = bpf_map_lookup_elem(&EXITS, &k);
	if (n) {
		(*n)++;
	} else {
		__u64 one = 1;
		bpf_map_update_elem(&EXITS, &k, &one, BPF_NOEXIST);
	}
	return 0;
}

SEC("tracepoint/kvm/kvm_exit")
int kvm_exit(struct trace_event_raw_kvm_exit *ctx)
{
	return exited(FERRY_EXIT_KVM, ctx->exit_reason);
}

SEC("tracepoint/kvm/kvm_userspace_exit")
int userspace_exit(struct trace_event_raw_kvm_userspace_exit *ctx)
{
	/* A negative errno is an interrupted KVM_RUN, not a guest exit. */
	if (ctx->errno < 0)
		return 0;
	return exited(FERRY_EXIT_USERSPACE, ctx->reason);
}

SEC("tracepoint/kvm/kvm_pio")
int pio(struct trace_event_raw_kvm_pio *ctx)
{
	return exited(FERRY_EXIT_PIO, ctx->port);
}

/* ---- the VMM's disk system calls ---- */

static __always_inline int io_enter(__u32 op)
{
	struct ferry_watch *w = watched();
	if (!w)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	struct ferry_io_start s = { .ts_ns = bpf_ktime_get_ns(), .op = op, .slot = w->slot };
	bpf_map_update_elem(&IO_START, &id, &s, BPF_ANY);
	return 0;
}

static __always_inline int io_exit(long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct ferry_io_start *s = bpf_map_lookup_elem(&IO_START, &id);
	if (!s)
		return 0;
	__u64 ns = bpf_ktime_get_ns() - s->ts_ns;
	__u32 i = s->slot * FERRY_IO_OPS + s->op;
	bpf_map_delete_elem(&IO_START, &id);
	struct ferry_io_stats *st = bpf_map_lookup_elem(&IO, &i);
	if (st)
		add_latency(st, ns, ret > 0 ? (__u64)ret : 0, ret < 0);
	return 0;
}

#define IO_PROBES(name, op)                                                     \
	SEC("tracepoint/syscalls/sys_enter_" #name)                             \
	int enter_##name(struct trace_event_raw_sys_enter *ctx) { return io_enter(op); } \
	SEC("tracepoint/syscalls/sys_exit_" #name)                              \
	int exit_##name(struct trace_event_raw_sys_exit *ctx) { return io_exit(ctx->ret); }

IO_PROBES(pread64, FERRY_IO_READ)
IO_PROBES(preadv, FERRY_IO_READ)
IO_PROBES(preadv2, FERRY_IO_READ)
IO_PROBES(pwrite64, FERRY_IO_WRITE)
IO_PROBES(pwritev, FERRY_IO_WRITE)
IO_PROBES(pwritev2, FERRY_IO_WRITE)
IO_PROBES(fsync, FERRY_IO_SYNC)
IO_PROBES(fdatasync, FERRY_IO_SYNC)

/* ---- the block layer: host I/O pressure, and per VM for O_DIRECT images ---- */

SEC("tracepoint/block/block_rq_issue")
int rq_issue(struct trace_event_raw_block_rq *ctx)
{
	struct ferry_rq_key k = { .dev = ctx->dev, .sector = ctx->sector };
	struct ferry_watch *w = watched();
	char op = ctx->rwbs[0];
	struct ferry_rq_start s = {
		.ts_ns = bpf_ktime_get_ns(),
		.bytes = ctx->bytes ? ctx->bytes : (__u64)ctx->nr_sector << 9,
		.slot = w ? w->slot : FERRY_MAX_VMS,
		.write = op == 'W',
	};
	bpf_map_update_elem(&BLOCK_START, &k, &s, BPF_ANY);
	return 0;
}

SEC("tracepoint/block/block_rq_complete")
int rq_complete(struct trace_event_raw_block_rq_completion *ctx)
{
	struct ferry_rq_key k = { .dev = ctx->dev, .sector = ctx->sector };
	struct ferry_rq_start *s = bpf_map_lookup_elem(&BLOCK_START, &k);
	if (!s)
		return 0;
	__u64 ns = bpf_ktime_get_ns() - s->ts_ns;
	struct ferry_block_key bk = { .dev = ctx->dev, .slot = s->slot, .write = s->write };
	__u64 bytes = s->bytes;
	bpf_map_delete_elem(&BLOCK_START, &k);
	struct ferry_io_stats *st = bpf_map_lookup_elem(&BLOCK, &bk);
	if (!st) {
		struct ferry_io_stats zero = {};
		bpf_map_update_elem(&BLOCK, &bk, &zero, BPF_NOEXIST);
		st = bpf_map_lookup_elem(&BLOCK, &bk);
		if (!st)
			return 0;
	}
	add_latency(st, ns, bytes, ctx->error != 0);
	return 0;
}
