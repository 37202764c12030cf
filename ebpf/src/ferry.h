/* Types shared by Ferry's eBPF programs and the agent that reads their maps.
 * Every struct here has a #[repr(C)] mirror in src/lib.rs; a test compares sizes. */
#ifndef FERRY_H
#define FERRY_H

/* VMs watched at once; each gets a slot (its index into the per-VM arrays). */
#define FERRY_MAX_VMS 16
/* Working-set bitmap per VM: 2^22 pages (16 GiB of guest memory at 4 KiB). */
#define FERRY_WS_PAGE_BITS 22
#define FERRY_WS_WORDS (1u << (FERRY_WS_PAGE_BITS - 6))
/* log2 latency buckets: bucket i holds [2^i, 2^(i+1)) nanoseconds. */
#define FERRY_HIST_BUCKETS 32

/* Where a dirtied page was seen (the agent decides which live one to believe). */
enum ferry_dirty_source {
	FERRY_DIRTY_RING = 0,       /* kvm:kvm_dirty_ring_push (dirty ring mode) */
	FERRY_DIRTY_PAGE_FAULT = 1, /* kvm:kvm_page_fault, write bit (VMX/SVM) */
	FERRY_DIRTY_WALK = 2,       /* kvmmmu:kvm_mmu_pagetable_walk, write bit */
	FERRY_DIRTY_SPTE = 3,       /* kvmmmu:kvm_mmu_set_spte, writable */
	FERRY_DIRTY_SOURCES = 4,
};

/* No source picked yet for the working-set bitmap. */
#define FERRY_WS_NONE 0xffffffffu

enum ferry_exit_kind {
	FERRY_EXIT_KVM = 0,       /* kvm:kvm_exit, by hardware exit reason */
	FERRY_EXIT_USERSPACE = 1, /* kvm:kvm_userspace_exit, by KVM_EXIT_* reason */
	FERRY_EXIT_PIO = 2,       /* kvm:kvm_pio, by port */
};

enum ferry_io_op {
	FERRY_IO_READ = 0,  /* pread64, preadv, preadv2 */
	FERRY_IO_WRITE = 1, /* pwrite64, pwritev, pwritev2 */
	FERRY_IO_SYNC = 2,  /* fsync, fdatasync */
	FERRY_IO_OPS = 3,
};

/* WATCH: tgid -> this. Only watched processes are counted. */
struct ferry_watch {
	__u32 slot;      /* < FERRY_MAX_VMS */
	__u32 ws_source; /* enum ferry_dirty_source feeding the bitmap, or FERRY_WS_NONE */
};

/* VM_COUNTS (per-CPU array, by slot). */
struct ferry_vm_counts {
	__u64 dirty[FERRY_DIRTY_SOURCES]; /* dirtied-page events per source */
	__u64 read_walks;                 /* page-table walks without the write bit */
	__u64 readonly_sptes;             /* SPTEs set without the writable bit */
	__u64 harvests; /* KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS calls:
	                 * the VMM has dirty logging on, so writes fault and can be seen */
	/* The latest memslot update this CPU saw (KVM_SET_USER_MEMORY_REGION{,2}): when, and
	 * whether it turned dirty logging on. The newest over all CPUs is the VM's state. */
	__u64 memslot_ns;
	__u64 memslot_logging;
};

/* The dirty-log ioctls (linux/kvm.h): _IOW(KVMIO, 0x42, 16), _IOWR(KVMIO, 0xc0, 24),
 * _IO(KVMIO, 0xc7). */
#define FERRY_KVM_GET_DIRTY_LOG 0x4010ae42u
#define FERRY_KVM_CLEAR_DIRTY_LOG 0xc018aec0u
#define FERRY_KVM_RESET_DIRTY_RINGS 0xaec7u
/* _IOW(KVMIO, 0x46, 32) and _IOW(KVMIO, 0x49, 160); both structs hold flags at byte 4. */
#define FERRY_KVM_SET_USER_MEMORY_REGION 0x4020ae46u
#define FERRY_KVM_SET_USER_MEMORY_REGION2 0x40a0ae49u
#define FERRY_KVM_MEM_LOG_DIRTY_PAGES 1u

/* EXITS (per-CPU hash). */
struct ferry_exit_key {
	__u32 slot;
	__u32 kind;   /* enum ferry_exit_kind */
	__u32 reason; /* exit reason, or port for FERRY_EXIT_PIO */
};

/* IO_START (hash by pid_tgid): a system call in flight. */
struct ferry_io_start {
	__u64 ts_ns;
	__u32 op;
	__u32 slot;
};

/* IO (per-CPU array, by slot * FERRY_IO_OPS + op) and BLOCK (per-CPU hash). */
struct ferry_io_stats {
	__u64 calls;
	__u64 bytes;
	__u64 errors;
	__u64 latency_ns;
	__u64 hist[FERRY_HIST_BUCKETS];
};

/* BLOCK_START (hash): a block request in flight. */
struct ferry_rq_key {
	__u32 dev;
	__u32 pad;
	__u64 sector;
};

struct ferry_rq_start {
	__u64 ts_ns;
	__u64 bytes;
	__u32 slot; /* submitting VM's slot, or FERRY_MAX_VMS for anyone else */
	__u32 write;
};

struct ferry_block_key {
	__u32 dev;
	__u32 slot; /* as in ferry_rq_start */
	__u32 write;
};

#endif
