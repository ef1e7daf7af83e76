//! Long-mode state: identity-mapped page tables, GDT, TSS, IDT and the
//! special registers that point at them.

use guest_payloads::layout::*;
use guest_payloads::Payload;
use kvm_bindings::{kvm_segment, kvm_sregs};

use crate::memory::HostMemory;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_LARGE: u64 = 1 << 7;
const HUGE_PAGE: u64 = 2 << 20;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Code segment selector.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x18;
const TSS_LIMIT: u32 = 0x67;

// The page directories must end before the mailboxes start.
const _: () = assert!(PD_GPA + IDENTITY_MAP_GIB * 0x1000 <= MAILBOX_GPA);

/// Writes page tables identity-mapping the first `IDENTITY_MAP_GIB` GiB with
/// 2 MiB pages into `system` (the memslot at GPA 0).
pub(crate) fn write_page_tables(system: &HostMemory) {
    system.write_u64(PML4_GPA, PDPT_GPA | PTE_PRESENT | PTE_WRITABLE);
    for gib in 0..IDENTITY_MAP_GIB {
        let pd = PD_GPA + gib * 0x1000;
        system.write_u64(PDPT_GPA + gib * 8, pd | PTE_PRESENT | PTE_WRITABLE);
        for i in 0..512 {
            let gpa = (gib * 512 + i) * HUGE_PAGE;
            system.write_u64(pd + i * 8, gpa | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE);
        }
    }
}

fn segment_descriptor(base: u64, limit: u32, access: u8, flags: u8) -> u64 {
    u64::from(limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | u64::from(access) << 40
        | u64::from((limit >> 16) & 0xf) << 48
        | u64::from(flags & 0xf) << 52
        | (base >> 24 & 0xff) << 56
}

/// Writes the GDT (null, code64, data, TSS) and a zeroed TSS.
pub(crate) fn write_gdt(system: &HostMemory) {
    system.write_u64(GDT_GPA, 0);
    // Present, DPL 0, code, execute/read, accessed; G and L.
    system.write_u64(GDT_GPA + u64::from(CODE_SELECTOR), segment_descriptor(0, 0xfffff, 0x9b, 0xa));
    // Present, DPL 0, data, read/write, accessed; G and D/B.
    system.write_u64(GDT_GPA + u64::from(DATA_SELECTOR), segment_descriptor(0, 0xfffff, 0x93, 0xc));
    // Present 64-bit busy TSS; the second half holds base[63:32].
    system.write_u64(GDT_GPA + u64::from(TSS_SELECTOR), segment_descriptor(TSS_GPA, TSS_LIMIT, 0x8b, 0));
    system.write_u64(GDT_GPA + u64::from(TSS_SELECTOR) + 8, TSS_GPA >> 32);
    system.write(TSS_GPA, &[0; TSS_LIMIT as usize + 1]);
}

/// Writes an IDT whose first 32 vectors are the runtime's exception stubs.
pub(crate) fn write_idt(system: &HostMemory, runtime: &Payload) {
    for vector in 0..32u64 {
        let handler = runtime.label(&format!("vector_{vector}"));
        // Interrupt gate, present, DPL 0.
        let low = (handler & 0xffff) | u64::from(CODE_SELECTOR) << 16 | 0x8e << 40 | (handler >> 16 & 0xffff) << 48;
        system.write_u64(IDT_GPA + vector * 16, low);
        system.write_u64(IDT_GPA + vector * 16 + 8, handler >> 32);
    }
}

fn segment(selector: u16, type_: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` in 64-bit long mode with paging on, using the tables above.
pub(crate) fn set_long_mode(sregs: &mut kvm_sregs) {
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs.cs = segment(CODE_SELECTOR, 0xb, true);
    let data = segment(DATA_SELECTOR, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        s: 0,
        ..segment(TSS_SELECTOR, 0xb, false)
    };
    sregs.tr.db = 0;
    sregs.tr.g = 0;
    sregs.ldt = kvm_segment { unusable: 1, ..Default::default() };
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 0x27;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 32 * 16 - 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_encode_like_the_sdm_examples() {
        assert_eq!(segment_descriptor(0, 0xfffff, 0x9b, 0xa), 0x00af_9b00_0000_ffff);
        assert_eq!(segment_descriptor(0, 0xfffff, 0x93, 0xc), 0x00cf_9300_0000_ffff);
        assert_eq!(segment_descriptor(0x1234_5678, 0x67, 0x8b, 0), 0x1200_8b34_5678_0067);
    }

    #[test]
    fn page_tables_identity_map_with_2mib_pages() {
        let mem = HostMemory::anonymous(SYSTEM_SLOT_SIZE).unwrap();
        write_page_tables(&mem);
        assert_eq!(mem.read_u64(PML4_GPA), PDPT_GPA | 3);
        let last_gib = IDENTITY_MAP_GIB - 1;
        assert_eq!(mem.read_u64(PDPT_GPA + last_gib * 8), (PD_GPA + last_gib * 0x1000) | 3);
        let last_pde = mem.read_u64(PD_GPA + last_gib * 0x1000 + 511 * 8);
        assert_eq!(last_pde, ((IDENTITY_MAP_GIB << 30) - HUGE_PAGE) | 0x83);
    }
}
