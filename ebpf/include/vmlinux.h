/* The kernel types Ferry's programs read, and nothing else. Every struct is marked
 * preserve_access_index, so clang emits CO-RE relocations and the loader matches each
 * field by name against the running kernel's BTF: offsets here need not be right, and
 * fields the programs do not read are left out. (bpftool's full vmlinux.h is 2.8 MB.) */
#ifndef __VMLINUX_H__
#define __VMLINUX_H__

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
typedef __u16 __be16;
typedef __u32 __be32;
typedef __u32 __wsum;
typedef _Bool bool;

enum bpf_map_type {
	BPF_MAP_TYPE_HASH = 1,
	BPF_MAP_TYPE_ARRAY = 2,
	BPF_MAP_TYPE_PERCPU_HASH = 5,
	BPF_MAP_TYPE_PERCPU_ARRAY = 6,
};
enum { BPF_ANY = 0, BPF_NOEXIST = 1, BPF_EXIST = 2 };
enum { BPF_F_MMAPABLE = 1024 };

#pragma clang attribute push (__attribute__((preserve_access_index)), apply_to = record)
struct trace_entry {
	unsigned short type;
	unsigned char flags;
	unsigned char preempt_count;
	int pid;
};
struct trace_event_raw_kvm_mmu_pagetable_walk {
	struct trace_entry ent;
	__u64 addr;
	__u32 pferr;
};
struct trace_event_raw_kvm_mmu_set_spte {
	struct trace_entry ent;
	__u64 gfn;
	__u64 spte;
};
struct trace_event_raw_kvm_dirty_ring_push {
	struct trace_entry ent;
	int index;
	__u32 dirty_index;
	__u32 reset_index;
	__u32 slot;
	__u64 offset;
};
struct trace_event_raw_kvm_page_fault {
	struct trace_entry ent;
	__u64 fault_address;
	__u64 error_code;
};
struct trace_event_raw_kvm_exit {
	struct trace_entry ent;
	__u32 exit_reason;
};
struct trace_event_raw_kvm_userspace_exit {
	struct trace_entry ent;
	__u32 reason;
	int errno;
};
struct trace_event_raw_kvm_pio {
	struct trace_entry ent;
	__u32 port;
};
struct trace_event_raw_sys_enter {
	struct trace_entry ent;
	long id;
	unsigned long args[6];
};
struct trace_event_raw_sys_exit {
	struct trace_entry ent;
	long id;
	long ret;
};
struct trace_event_raw_block_rq {
	struct trace_entry ent;
	unsigned int dev;
	unsigned long long sector;
	unsigned int nr_sector;
	unsigned int bytes;
	char rwbs[10];
};
struct trace_event_raw_block_rq_completion {
	struct trace_entry ent;
	unsigned int dev;
	unsigned long long sector;
	unsigned int nr_sector;
	int error;
};
#pragma clang attribute pop

#endif
