//! One test per rule, on the 6.12 and 7.3 profiles where they differ.

use super::*;
use crate::decide::{contains_folded, Basis, History, KernelFacts};
use crate::versioned::GMEM_BINDING_OVERLAP;

const P: u64 = PAGE_SIZE;
const BASE: u64 = 1 << 32;

fn model(profile: Profile) -> Model {
    Model::new(profile)
}

fn anon_region(m: &mut Model, slot: u32, gpa: u64, npages: u64) -> MemoryRegion {
    let anon = m.add_anon(npages);
    MemoryRegion { slot, flags: 0, gpa, size: npages * P, user: UserMemory::Anon { anon, page: 0 }, guest_memfd: None }
}

fn gmem_region(slot: u32, gpa: u64, npages: u64, gmem: GmemId, offset: u64) -> MemoryRegion {
    MemoryRegion {
        slot,
        flags: KVM_MEM_GUEST_MEMFD,
        gpa,
        size: npages * P,
        user: UserMemory::Null,
        guest_memfd: Some((GmemFd::File(gmem), offset)),
    }
}

#[test]
fn kernel_versions_parse() {
    assert_eq!(KernelVersion::parse("6.18.44-fc-v595"), Some(KernelVersion { major: 6, minor: 18, patch: 44 }));
    assert_eq!(KernelVersion::parse("7.3.0-rc1"), Some(KernelVersion::new(7, 3)));
    assert_eq!(KernelVersion::parse("garbage"), None);
}

fn facts(release: &str, history: Option<History>) -> KernelFacts {
    KernelFacts {
        release: KernelVersion::parse(release).unwrap(),
        release_source: format!("uname -r = {release}"),
        history,
        settings: Default::default(),
        settings_source: "KVM_SELFTESTS_RULES".into(),
    }
}

/// A Debian changelog excerpt as 6.12.118 ships it: the backported
/// subject wrapped over two lines.
const CHANGELOG_6_12_118: &str =
    "linux (6.12.118-1) trixie-security; urgency=high\n\n  * New upstream stable update:\n    \
    - KVM: guest_memfd: Establish memslot<=>guest_memfd bindings *after* memslot\n      is ready (CVE-2026-99335)\n";

/// The history's search matches what searching the text with its white
/// space folded matched, on texts built to tell them apart: wrapped and
/// indented subjects, a first word that occurs often, words that begin or
/// end others, a subject cut off at the end of the text.
#[test]
fn history_search_matches_the_folded_text() {
    let fold = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
    let texts = [
        "- KVM: x86: fix it\n",
        "- KVM: x86:\n      fix it now",
        "KVM: KVM: x86: fix",
        "xKVM: x86: fixing",
        "KVM:x86: fix it",
        "KVM: x86\t:\tfix it",
        "- KVM: x86: fix",
        "",
        "   \n\t ",
        "KVM: arm64: fix it; KVM: x86: other; KVM: x86: fix it",
    ];
    let subjects = ["KVM: x86: fix it", "KVM: x86: fix", "VM: x86: fi", "fix", "x86: fix it now", "KVM:", " ", ""];
    for text in texts {
        for subject in subjects {
            let words: Vec<&str> = subject.split_whitespace().collect();
            let folded = fold(subject);
            let expected = !folded.is_empty() && fold(text).contains(&folded);
            assert_eq!(contains_folded(text, &words), expected, "text {text:?}, subject {subject:?}");
        }
    }
}

#[test]
fn a_backport_in_the_changelog_decides_over_the_release() {
    let history = History::new("Debian changelog of linux-source-6.12 6.12.118-1~deb12u1", CHANGELOG_6_12_118, true);
    let d = GMEM_BINDING_OVERLAP.decide(&facts("6.12.118", Some(history))).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(Errno::EEXIST), Basis::Carries));
    assert!(d.why.contains("lists \"KVM: guest_memfd: Establish memslot<=>guest_memfd bindings *after*"), "{}", d.why);
}

#[test]
fn a_complete_history_without_the_change_decides_before() {
    let history = History::new("Debian changelog of linux-source-6.12 6.12.117-1~deb12u1", "- KVM: x86: other\n", true);
    let d = GMEM_BINDING_OVERLAP.decide(&facts("6.12.117", Some(history))).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(Errno::EINVAL), Basis::Lacks));
    assert!(d.why.contains("lists none of 7ea987a90585"), "{}", d.why);
}

#[test]
fn the_release_decides_after_and_nothing_decides_before_it() {
    let d = GMEM_BINDING_OVERLAP.decide(&facts("7.3.4", None)).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(Errno::EEXIST), Basis::Release));
    assert!(
        d.why.starts_with("uname -r = 7.3.4 is at or after 7.2, the mainline release of 7ea987a90585"),
        "{}",
        d.why
    );
    let d = GMEM_BINDING_OVERLAP.decide(&facts("6.18.44", None)).unwrap();
    assert_eq!((d.outcome, d.basis), (None, Basis::Undecided));
    let incomplete = History::new("shallow git log", "nothing", false);
    let d = GMEM_BINDING_OVERLAP.decide(&facts("6.18.44", Some(incomplete))).unwrap();
    assert_eq!(d.basis, Basis::Undecided, "{}", d.why);
}

#[test]
fn a_stable_backport_is_found_by_its_upstream_sha() {
    let log = "abcdef0123456789 KVM: guest_memfd: bindings\n\n    commit 7ea987a90585aaaa upstream.\n";
    let d = GMEM_BINDING_OVERLAP.decide(&facts("7.1.9", Some(History::new("git log", log, true)))).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(Errno::EEXIST), Basis::Carries));
}

#[test]
fn an_explicit_setting_decides_first_and_a_bad_one_is_named() {
    let mut f = facts("7.3.4", None);
    f.settings.insert("gmem-binding-overlap".into(), "EINVAL".into());
    let d = GMEM_BINDING_OVERLAP.decide(&f).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(Errno::EINVAL), Basis::Setting));
    f.settings.insert("gmem-binding-overlap".into(), "after".into());
    assert_eq!(GMEM_BINDING_OVERLAP.decide(&f).unwrap().outcome, Some(Errno::EEXIST));
    f.settings.insert("gmem-binding-overlap".into(), "ENOENT".into());
    let e = GMEM_BINDING_OVERLAP.decide(&f).unwrap_err();
    assert!(
        e.contains("gmem-binding-overlap=ENOENT is not an outcome of that rule: use before, after, EINVAL or EEXIST"),
        "{e}"
    );
}

#[test]
fn an_unreleased_fix_is_absent_unless_the_history_names_it() {
    use crate::versioned::STALE_MMIO_PRIVATE_FAULTS;
    let d = STALE_MMIO_PRIVATE_FAULTS.decide(&facts("7.3.4", None)).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(false), Basis::Lacks), "{}", d.why);
    assert!(d.why.starts_with("no mainline release carries \"KVM: x86/mmu: Don't treat private faults"), "{}", d.why);
    let patched = History::new(
        "the Debian changelog of linux-source-7.3 7.3.4-1~bpo13+1 and --patch",
        "Subject: [PATCH 2/2] KVM: x86/mmu: Don't treat private faults on stale MMIO\n SPTEs as shared\n",
        true,
    );
    let d = STALE_MMIO_PRIVATE_FAULTS.decide(&facts("7.3.4", Some(patched))).unwrap();
    assert_eq!((d.outcome, d.basis), (Some(true), Basis::Carries), "{}", d.why);
}

#[test]
fn the_model_counts_rules_and_flags_an_undecided_one() {
    let rules = Rules::decide(&facts("6.18.44", None)).unwrap();
    assert_eq!(rules.gmem_binding_overlap, Decided::Either(Errno::EINVAL, Errno::EEXIST));
    let mut m = model(Profile { rules, ..Profile::linux_7_3(true) });
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    m.set_memory_region(&gmem_region(1, BASE, 2, g, 0)).unwrap();
    assert_eq!(m.take_undecided(), None);
    assert_eq!(m.set_memory_region(&gmem_region(2, BASE + 8 * P, 1, g, P)), Err(Errno::EINVAL));
    assert_eq!(m.take_undecided(), Some("gmem-binding-overlap"));
    assert_eq!(m.take_undecided(), None);
    assert_eq!(m.rule_hits().get("gmem-binding-overlap"), Some(&1));
}

#[test]
fn create_guest_memfd_checks_flags_then_size() {
    let mut old = model(Profile::linux_6_12(true));
    assert_eq!(old.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP), Err(Errno::EINVAL));
    assert_eq!(old.create_guest_memfd(0, 0), Err(Errno::EINVAL));
    assert_eq!(old.create_guest_memfd(P + 1, 0), Err(Errno::EINVAL));
    assert_eq!(old.create_guest_memfd(!(P - 1), 0), Err(Errno::EINVAL), "negative loff_t");
    assert_eq!(old.create_guest_memfd(2 * P, 0), Ok(0));
    let mut new = model(Profile::linux_7_3(false));
    assert_eq!(new.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED), Ok(0));
    assert_eq!(new.create_guest_memfd(P, 1 << 2), Err(Errno::EINVAL));
    // Flags are checked before the size.
    assert_eq!(new.create_guest_memfd(0, 1 << 2), Err(Errno::EINVAL));
    let mut private = model(Profile::linux_7_3(true));
    assert_eq!(private.create_guest_memfd(P, GUEST_MEMFD_FLAG_INIT_SHARED), Err(Errno::EINVAL));
    assert_eq!(private.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP), Ok(0));
    let mut none = model(Profile { guest_memfd: false, ..Profile::linux_7_3(false) });
    assert_eq!(none.create_guest_memfd(P, 0), Err(Errno::ENOTTY));
}

#[test]
fn memslot_flags_depend_on_the_vm_and_are_checked_first() {
    let mut m = model(Profile::linux_6_12(false));
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    // 6.12 default VM: KVM_MEM_GUEST_MEMFD is not a valid flag.
    assert_eq!(m.set_memory_region(&gmem_region(1, BASE, 1, g, 0)), Err(Errno::EINVAL));
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    assert_eq!(m.set_memory_region(&gmem_region(1, BASE, 1, g, 0)), Ok(Change::Create));
    // GUEST_MEMFD excludes LOG_DIRTY_PAGES and READONLY.
    for extra in [KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY] {
        let mut r = gmem_region(2, BASE + 8 * P, 1, g, P);
        r.flags |= extra;
        assert_eq!(m.set_memory_region(&r), Err(Errno::EINVAL), "flags {:#x}", r.flags);
    }
    // An unknown bit, even on an otherwise broken request (misaligned size).
    let mut r = anon_region(&mut m, 3, BASE + 16 * P, 1);
    r.flags = 1 << 3;
    r.size = 1;
    assert_eq!(m.set_memory_region(&r), Err(Errno::EINVAL));
    // READONLY only where kvm_arch_has_readonly_mem().
    let mut m = model(Profile { readonly_mem: false, ..Profile::linux_7_3(false) });
    let mut r = anon_region(&mut m, 1, BASE, 1);
    r.flags = KVM_MEM_READONLY;
    assert_eq!(m.set_memory_region(&r), Err(Errno::EINVAL));
}

#[test]
fn memslot_sanity_checks() {
    let mut m = model(Profile::linux_6_12(true));
    let r = anon_region(&mut m, 1, BASE, 2);
    assert_eq!(m.set_memory_region(&MemoryRegion { size: P + 8, ..r }), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_region(&MemoryRegion { gpa: BASE + 8, ..r }), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_region(&MemoryRegion { slot: 1 << 16 | 1, ..r }), Err(Errno::EINVAL), "as_id 1 of 1");
    assert_eq!(m.set_memory_region(&MemoryRegion { slot: KVM_USER_MEM_SLOTS, ..r }), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_region(&MemoryRegion { gpa: !(P - 1), ..r }), Err(Errno::EINVAL), "wraps");
    assert_eq!(m.set_memory_region(&MemoryRegion { size: 0, ..r }), Err(Errno::EINVAL), "delete of nothing");
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    let unaligned = MemoryRegion { guest_memfd: Some((GmemFd::File(g), 8)), ..gmem_region(1, BASE, 1, g, 0) };
    assert_eq!(m.set_memory_region(&unaligned), Err(Errno::EINVAL));
    let wraps = MemoryRegion { guest_memfd: Some((GmemFd::File(g), !(P - 1))), ..unaligned };
    assert_eq!(m.set_memory_region(&wraps), Err(Errno::EINVAL));
    // Offset rules apply only with the flag: without it the fields are ignored.
    let ignored = MemoryRegion { flags: 0, guest_memfd: Some((GmemFd::Closed, 8)), ..r };
    assert_eq!(m.set_memory_region(&ignored), Ok(Change::Create));
    assert!(m.slots()[&(0, 1)].gmem.is_none());
    // Two address spaces on a default VM with SMM.
    let mut m = model(Profile::linux_6_12(false));
    let r = anon_region(&mut m, 1 << 16 | 1, BASE, 2);
    assert_eq!(m.set_memory_region(&r), Ok(Change::Create));
}

#[test]
fn memslots_create_move_flags_delete() {
    let mut m = model(Profile::linux_7_3(false));
    let r = anon_region(&mut m, 1, BASE, 2);
    assert_eq!(m.set_memory_region(&r), Ok(Change::Create));
    assert_eq!(m.set_memory_region(&r), Ok(Change::Unchanged));
    assert_eq!(m.set_memory_region(&MemoryRegion { gpa: BASE + 4 * P, ..r }), Ok(Change::Move));
    assert_eq!(m.slots()[&(0, 1)].base_gfn, (BASE >> 12) + 4);
    let dirty = MemoryRegion { gpa: BASE + 4 * P, flags: KVM_MEM_LOG_DIRTY_PAGES, ..r };
    assert_eq!(m.set_memory_region(&dirty), Ok(Change::FlagsOnly));
    // A modification must keep size, userspace_addr, READONLY.
    assert_eq!(m.set_memory_region(&MemoryRegion { size: P, ..dirty }), Err(Errno::EINVAL));
    let other = m.add_anon(2);
    let moved_memory = MemoryRegion { user: UserMemory::Anon { anon: other, page: 0 }, ..dirty };
    assert_eq!(m.set_memory_region(&moved_memory), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_region(&MemoryRegion { flags: KVM_MEM_READONLY, ..dirty }), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_region(&MemoryRegion { size: 0, ..dirty }), Ok(Change::Delete));
    assert!(m.slots().is_empty());
}

#[test]
fn memslots_of_one_address_space_must_not_overlap() {
    let mut m = model(Profile::linux_6_12(false));
    let a = anon_region(&mut m, 1, BASE, 4);
    m.set_memory_region(&a).unwrap();
    let b = anon_region(&mut m, 2, BASE + 3 * P, 2);
    assert_eq!(m.set_memory_region(&b), Err(Errno::EEXIST));
    // A move onto another slot too; a move over itself is fine.
    let c = anon_region(&mut m, 3, BASE + 8 * P, 2);
    m.set_memory_region(&c).unwrap();
    assert_eq!(m.set_memory_region(&MemoryRegion { gpa: BASE + 2 * P, ..c }), Err(Errno::EEXIST));
    assert_eq!(m.set_memory_region(&MemoryRegion { gpa: BASE + 7 * P, ..c }), Ok(Change::Move));
    // The other address space is separate.
    assert_eq!(m.set_memory_region(&MemoryRegion { slot: 1 << 16 | 2, ..b }), Ok(Change::Create));
}

#[test]
fn guest_memfd_slots_are_immutable() {
    let mut m = model(Profile::linux_6_12(true));
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    let r = gmem_region(1, BASE, 2, g, 0);
    m.set_memory_region(&r).unwrap();
    // Re-sending the very same request is a modification with the flag.
    assert_eq!(m.set_memory_region(&r), Err(Errno::EINVAL));
    let moved = MemoryRegion { flags: 0, gpa: BASE + 8 * P, ..r };
    assert_eq!(m.set_memory_region(&moved), Err(Errno::EINVAL), "dropping the flag changes a fixed flag");
    assert_eq!(m.set_memory_region(&MemoryRegion { size: 0, ..r }), Ok(Change::Delete));
}

#[test]
fn guest_memfd_binding_rules_in_check_order() {
    for (profile, overlap) in [(Profile::linux_6_12(true), Errno::EINVAL), (Profile::linux_7_3(true), Errno::EEXIST)] {
        let mut m = model(profile);
        let g = m.create_guest_memfd(4 * P, 0).unwrap();
        let closed = MemoryRegion { guest_memfd: Some((GmemFd::Closed, 0)), ..gmem_region(1, BASE, 1, g, 0) };
        assert_eq!(m.set_memory_region(&closed), Err(Errno::EBADF));
        let not_gmem = MemoryRegion { guest_memfd: Some((GmemFd::NotGuestMemfd, 0)), ..closed };
        assert_eq!(m.set_memory_region(&not_gmem), Err(Errno::EINVAL));
        assert_eq!(m.set_memory_region(&gmem_region(1, BASE, 2, g, 3 * P)), Err(Errno::EINVAL), "past the end");
        m.set_memory_region(&gmem_region(1, BASE, 2, g, P)).unwrap();
        // Pages 1..3 are bound; page 0 and 3 are free.
        assert_eq!(m.set_memory_region(&gmem_region(2, BASE + 8 * P, 1, g, 2 * P)), Err(overlap));
        assert_eq!(m.set_memory_region(&gmem_region(2, BASE + 8 * P, 2, g, 0)), Err(overlap));
        assert_eq!(m.set_memory_region(&gmem_region(2, BASE + 8 * P, 1, g, 0)), Ok(Change::Create));
        assert_eq!(m.set_memory_region(&gmem_region(3, BASE + 9 * P, 1, g, 3 * P)), Ok(Change::Create));
        // The GPA overlap is checked before the fd: a closed fd over slot 1 is EEXIST.
        let both = MemoryRegion { slot: 4, gpa: BASE, ..closed };
        assert_eq!(m.set_memory_region(&both), Err(Errno::EEXIST));
        // Deleting a slot frees its binding.
        m.set_memory_region(&MemoryRegion { size: 0, ..gmem_region(1, BASE, 2, g, P) }).unwrap();
        assert_eq!(m.set_memory_region(&gmem_region(4, BASE + 12 * P, 2, g, P)), Ok(Change::Create));
    }
}

#[test]
fn set_memory_attributes_input_rules() {
    let mut m = model(Profile::linux_6_12(true));
    let private = KVM_MEMORY_ATTRIBUTE_PRIVATE;
    assert_eq!(m.set_memory_attributes(BASE, P, private, 1), Err(Errno::EINVAL), "flags");
    assert_eq!(m.set_memory_attributes(BASE, P, 1, 0), Err(Errno::EINVAL), "unsupported attribute");
    assert_eq!(m.set_memory_attributes(BASE, 0, private, 0), Err(Errno::EINVAL), "size 0");
    assert_eq!(m.set_memory_attributes(!(P - 1), 2 * P, private, 0), Err(Errno::EINVAL), "wraps");
    assert_eq!(m.set_memory_attributes(BASE + 8, P, private, 0), Err(Errno::EINVAL), "address");
    assert_eq!(m.set_memory_attributes(BASE, P + 8, private, 0), Err(Errno::EINVAL), "size");
    assert_eq!(m.attributes(BASE >> 12), 0, "rejected calls change nothing");
    assert_eq!(m.set_memory_attributes(BASE, 2 * P, private, 0), Ok(()));
    assert_eq!((m.attributes(BASE >> 12), m.attributes((BASE >> 12) + 1)), (private, private));
    assert_eq!(m.set_memory_attributes(BASE + P, P, 0, 0), Ok(()));
    assert_eq!((m.attributes(BASE >> 12), m.attributes((BASE >> 12) + 1)), (private, 0));
    // A default VM supports no attribute, but clearing is valid.
    let mut m = model(Profile::linux_7_3(false));
    assert_eq!(m.set_memory_attributes(BASE, P, private, 0), Err(Errno::EINVAL));
    assert_eq!(m.set_memory_attributes(BASE, P, 0, 0), Ok(()));
    let mut m = model(Profile { memory_attributes_ioctl: false, ..Profile::linux_7_3(false) });
    assert_eq!(m.set_memory_attributes(BASE, P, 0, 0), Err(Errno::ENOTTY));
}

#[test]
fn fallocate_rules() {
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    assert_eq!(m.fallocate(g, Fallocate::Allocate, 0, 0), Err(Errno::EINVAL), "len 0");
    assert_eq!(m.fallocate(g, Fallocate::PunchHole, 0, 0), Err(Errno::EINVAL), "len 0");
    assert_eq!(m.fallocate(g, Fallocate::Allocate, 8, P), Err(Errno::EINVAL), "offset");
    assert_eq!(m.fallocate(g, Fallocate::Allocate, 0, 8), Err(Errno::EINVAL), "len");
    assert_eq!(m.fallocate(g, Fallocate::Allocate, 3 * P, 2 * P), Err(Errno::EINVAL), "past the end");
    assert_eq!(m.fallocate(g, Fallocate::Allocate, 0, !(P - 1)), Err(Errno::EINVAL), "negative len");
    assert_eq!(m.fallocate(g, Fallocate::Allocate, i64::MAX as u64 & !(P - 1), 2 * P), Err(Errno::EFBIG));
    assert_eq!(m.fallocate(g, Fallocate::Allocate, P, 2 * P), Ok(()));
    assert_eq!(m.gmems()[g].pages.keys().copied().collect::<Vec<_>>(), [1, 2]);
    assert_eq!(m.fallocate(g, Fallocate::PunchHole, 2 * P, 8 * P), Ok(()), "punching past the end is fine");
    assert_eq!(m.gmems()[g].pages.keys().copied().collect::<Vec<_>>(), [1]);
}

#[test]
fn guest_accesses_without_a_slot_are_mmio_or_private_faults() {
    let mut m = model(Profile::linux_6_12(true));
    assert_eq!(m.guest_read(BASE + 16), GuestAccess::Mmio { gpa: BASE + 16, len: 8, is_write: false, data: 0 });
    assert_eq!(m.guest_write(BASE + 16, 7), GuestAccess::Mmio { gpa: BASE + 16, len: 8, is_write: true, data: 7 });
    // A GFN no access has made MMIO yet (see the next test for one that has).
    m.set_memory_attributes(BASE + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    let fault =
        GuestAccess::MemoryFault { flags: KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa: BASE + P, size: P, errno: Errno::EFAULT };
    assert_eq!(m.guest_read(BASE + P + 16), fault);
    assert_eq!(m.guest_write(BASE + P + 16, 7), fault);
}

#[test]
fn a_cached_mmio_gfn_made_private_is_mmio_then_a_shared_fault_after_any_memslot_change() {
    let mut m = model(Profile::linux_6_12(true));
    let mmio = GuestAccess::Mmio { gpa: BASE, len: 8, is_write: false, data: 0 };
    assert_eq!(m.guest_read(BASE), mmio);
    m.set_memory_attributes(BASE, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(m.guest_read(BASE), mmio, "the current MMIO SPTE survives the attribute change");
    let private =
        |gpa| GuestAccess::MemoryFault { flags: KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa, size: P, errno: Errno::EFAULT };
    m.set_memory_attributes(BASE + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(m.guest_read(BASE + P), private(BASE + P), "a GFN never accessed faults as private");

    let far = anon_region(&mut m, 3, BASE + (1 << 30), 1);
    m.set_memory_region(&far).unwrap();
    let shared_fault = GuestAccess::MemoryFault { flags: 0, gpa: BASE, size: P, errno: Errno::EFAULT };
    assert_eq!(m.guest_read(BASE), shared_fault, "a stale MMIO SPTE makes the private access a shared fault");
    m.set_memory_region(&MemoryRegion { size: 0, ..far }).unwrap();
    assert_eq!(m.guest_read(BASE), shared_fault, "a protected VM's memslot deletion zaps only that memslot");
    m.set_memory_attributes(BASE, P, 0, 0).unwrap();
    assert_eq!(m.guest_read(BASE), mmio, "a shared access re-installs a current MMIO SPTE");

    let fixed = Rules { stale_mmio_private_faults: Decided::Is(true), ..Rules::of_release(7, 3) };
    let mut m = model(Profile { rules: fixed, ..Profile::linux_7_3(true) });
    assert_eq!(m.guest_read(BASE), mmio);
    m.set_memory_attributes(BASE, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(m.guest_read(BASE), mmio, "with the fix, a current MMIO SPTE is still emulated MMIO");
    let far = anon_region(&mut m, 3, BASE + (1 << 30), 1);
    m.set_memory_region(&far).unwrap();
    assert_eq!(
        m.guest_read(BASE),
        private(BASE),
        "with the fix, a stale MMIO SPTE changes nothing for a private access"
    );

    let mut uncached = model(Profile { mmio_caching: false, ..Profile::linux_6_12(true) });
    assert_eq!(uncached.guest_read(BASE), mmio);
    uncached.set_memory_attributes(BASE, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(uncached.guest_read(BASE), private(BASE), "without MMIO caching every access takes the full fault path");
}

#[test]
fn shared_accesses_go_through_userspace_memory_and_private_ones_to_guest_memfd() {
    let mut m = model(Profile::linux_6_12(true));
    let g = m.create_guest_memfd(4 * P, 0).unwrap();
    let anon = m.add_anon(2);
    let r = MemoryRegion { user: UserMemory::Anon { anon, page: 0 }, ..gmem_region(1, BASE, 2, g, 2 * P) };
    m.set_memory_region(&r).unwrap();
    assert_eq!(m.guest_write(BASE + P + 8, 0x1111), GuestAccess::Done(0));
    let mut buf = [0; 8];
    m.host_read(HostMemory::Anon(anon), P + 8, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0x1111);
    m.set_memory_attributes(BASE + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    // The private view is guest_memfd page 3: fresh, zero.
    assert_eq!(m.guest_read(BASE + P + 8), GuestAccess::Done(0));
    assert_eq!(m.guest_write(BASE + P + 8, 0x2222), GuestAccess::Done(0));
    m.host_read(HostMemory::Anon(anon), P + 8, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0x1111, "private bytes never reach the shared view");
    let mut page = [0; 8];
    m.gmems()[g].read(3 * P + 8, &mut page);
    assert_eq!(u64::from_le_bytes(page), 0x2222);
    // Back to shared and private again: guest_memfd keeps its contents.
    m.set_memory_attributes(BASE + P, P, 0, 0).unwrap();
    assert_eq!(m.guest_read(BASE + P + 8), GuestAccess::Done(0x1111));
    m.set_memory_attributes(BASE + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(m.guest_read(BASE + P + 8), GuestAccess::Done(0x2222));
    // Punching the hole discards them.
    m.fallocate(g, Fallocate::PunchHole, 3 * P, P).unwrap();
    assert_eq!(m.guest_read(BASE + P + 8), GuestAccess::Done(0));
}

#[test]
fn private_access_to_a_slot_without_guest_memfd_is_a_memory_fault() {
    let mut m = model(Profile::linux_6_12(true));
    let r = anon_region(&mut m, 1, BASE, 2);
    m.set_memory_region(&r).unwrap();
    m.set_memory_attributes(BASE + P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    let fault =
        GuestAccess::MemoryFault { flags: KVM_MEMORY_EXIT_FLAG_PRIVATE, gpa: BASE + P, size: P, errno: Errno::EFAULT };
    assert_eq!(m.guest_write(BASE + P + 0x18, 5), fault);
    assert_eq!(m.guest_read(BASE + 0x18), GuestAccess::Done(0), "the shared page next to it is fine");
}

#[test]
fn read_only_slots_turn_writes_into_mmio() {
    let mut m = model(Profile::linux_7_3(false));
    let mut r = anon_region(&mut m, 1, BASE, 1);
    r.flags = KVM_MEM_READONLY;
    m.set_memory_region(&r).unwrap();
    m.host_write(HostMemory::Anon(0), 0, &9u64.to_le_bytes()).unwrap();
    assert_eq!(m.guest_read(BASE), GuestAccess::Done(9));
    assert_eq!(m.guest_write(BASE, 1), GuestAccess::Mmio { gpa: BASE, len: 8, is_write: true, data: 1 });
    assert_eq!(m.guest_read(BASE), GuestAccess::Done(9));
}

#[test]
fn gmem_only_slots_serve_every_access_from_guest_memfd() {
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).unwrap();
    let anon = m.add_anon(2);
    // userspace_addr points at anonymous memory, but the binding wins.
    let r = MemoryRegion { user: UserMemory::Anon { anon, page: 0 }, ..gmem_region(1, BASE, 2, g, 0) };
    m.set_memory_region(&r).unwrap();
    assert!(m.slots()[&(0, 1)].gmem_only);
    m.host_write(HostMemory::GmemMap(g), P, &0xabcdu64.to_le_bytes()).unwrap();
    assert_eq!(m.guest_read(BASE + P), GuestAccess::Done(0xabcd));
    assert_eq!(m.guest_write(BASE, 3), GuestAccess::Done(0));
    let mut buf = [0; 8];
    m.host_read(HostMemory::Anon(anon), 0, &mut buf).unwrap();
    assert_eq!(buf, [0; 8]);
    m.host_read(HostMemory::GmemMap(g), 0, &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 3);
    // A slot with userspace_addr 0 bound to it is served the same way.
    let g2 = m.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP).unwrap();
    m.set_memory_region(&gmem_region(2, BASE + 4 * P, 1, g2, 0)).unwrap();
    assert_eq!(m.guest_read(BASE + 4 * P), GuestAccess::Done(0));
}

#[test]
fn host_mappings_of_guest_memfd_fault_on_private_memory() {
    let mut m = model(Profile::linux_7_3(false));
    let private = m.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP).unwrap();
    let shared = m.create_guest_memfd(P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).unwrap();
    let mut buf = [0; 8];
    assert_eq!(m.host_read(HostMemory::GmemMap(private), 0, &mut buf), Err(HostFault::Sigbus));
    assert_eq!(m.host_write(HostMemory::GmemMap(shared), P, &buf), Err(HostFault::Sigbus), "past the end");
    assert_eq!(m.host_read(HostMemory::GmemMap(shared), 0, &mut buf), Ok(()));
    assert!(m.gmems()[shared].pages.contains_key(&0), "a host fault allocates the page");
}

#[test]
fn unbacked_shared_accesses_are_unmodeled() {
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(P, 0).unwrap();
    m.set_memory_region(&gmem_region(1, BASE, 1, g, 0)).unwrap();
    assert!(matches!(m.guest_read(BASE), GuestAccess::Unmodeled(_)));
}

#[test]
fn punch_hole_discards_what_the_host_mapping_wrote() {
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(2 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).unwrap();
    m.host_write(HostMemory::GmemMap(g), P + 16, &[1, 2, 3]).unwrap();
    m.fallocate(g, Fallocate::PunchHole, 0, 2 * P).unwrap();
    let mut buf = [9; 3];
    m.host_read(HostMemory::GmemMap(g), P + 16, &mut buf).unwrap();
    assert_eq!(buf, [0; 3]);
}

#[test]
fn fetches_run_stubs_and_fault_like_reads() {
    assert_eq!(stub_result(ret_stub(7)), Some(7));
    assert_eq!(stub_result(ret_stub(0xffff_fffe)), Some(-2i64 as u64), "the immediate is sign-extended");
    assert_eq!(stub_result(0), None);
    let mut m = model(Profile::linux_6_12(true));
    let g = m.create_guest_memfd(2 * P, 0).unwrap();
    let anon = m.add_anon(2);
    let r = MemoryRegion { user: UserMemory::Anon { anon, page: 0 }, ..gmem_region(1, BASE, 2, g, 0) };
    m.set_memory_region(&r).unwrap();
    assert_eq!(m.unmodeled_guest_fetch(BASE), Some("a fetch of bytes that are not a return stub"));
    assert_eq!(m.guest_fetch(BASE + 16 * P), GuestAccess::Unmodeled("an instruction fetch from emulated MMIO"));
    m.guest_write(BASE + 8, ret_stub(0x55));
    assert_eq!(m.guest_fetch(BASE + 8), GuestAccess::Done(0x55));
    // Private without the stub in guest_memfd: not modeled; a private
    // fetch from a slot without guest_memfd faults with flags PRIVATE.
    m.set_memory_attributes(BASE, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert!(m.unmodeled_guest_fetch(BASE + 8).is_some());
    m.guest_write(BASE + 8, ret_stub(0x66));
    assert_eq!(m.guest_fetch(BASE + 8), GuestAccess::Done(0x66), "served from guest_memfd");
    let plain = anon_region(&mut m, 2, BASE + 4 * P, 1);
    m.set_memory_region(&plain).unwrap();
    m.set_memory_attributes(BASE + 4 * P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    let fault = GuestAccess::MemoryFault {
        flags: KVM_MEMORY_EXIT_FLAG_PRIVATE,
        gpa: BASE + 4 * P,
        size: P,
        errno: Errno::EFAULT,
    };
    assert_eq!(m.guest_fetch(BASE + 4 * P + 0x20), fault);
}

#[test]
fn pre_fault_memory_progress_and_errors() {
    let mut m = model(Profile::linux_6_12(true));
    let r = anon_region(&mut m, 1, BASE, 2);
    m.set_memory_region(&r).unwrap();
    let einval = |gpa, size| PreFault { result: Err(Errno::EINVAL), gpa, size };
    assert_eq!(m.pre_fault_memory(BASE, P, 1), Ok(einval(BASE, P)), "flags must be 0");
    assert_eq!(m.pre_fault_memory(BASE + 8, P, 0), Ok(einval(BASE + 8, P)));
    assert_eq!(m.pre_fault_memory(BASE, 0, 0), Ok(einval(BASE, 0)), "size 0");
    assert_eq!(m.pre_fault_memory(u64::MAX - P + 1, P, 0), Ok(einval(u64::MAX - P + 1, P)), "wraps to 0");
    assert_eq!(m.pre_fault_memory(BASE, 2 * P, 0), Ok(PreFault { result: Ok(()), gpa: BASE + 2 * P, size: 0 }));
    // Past the slot: the mapped part is success, the rest is left.
    assert_eq!(m.pre_fault_memory(BASE + P, 3 * P, 0), Ok(PreFault { result: Ok(()), gpa: BASE + 2 * P, size: 2 * P }));
    assert_eq!(
        m.pre_fault_memory(BASE + 2 * P, P, 0),
        Ok(PreFault { result: Err(Errno::ENOENT), gpa: BASE + 2 * P, size: P })
    );
    // Private without guest_memfd: EFAULT.
    m.set_memory_attributes(BASE, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert_eq!(m.pre_fault_memory(BASE, P, 0), Ok(PreFault { result: Err(Errno::EFAULT), gpa: BASE, size: P }));
    assert_eq!(
        m.pre_fault_memory(BASE + 3 * P, P, 0),
        Ok(PreFault { result: Err(Errno::ENOENT), gpa: BASE + 3 * P, size: P })
    );
    // The MMIO SPTE that left: a later private read of that GFN is emulated MMIO.
    m.set_memory_attributes(BASE + 3 * P, P, KVM_MEMORY_ATTRIBUTE_PRIVATE, 0).unwrap();
    assert!(matches!(m.guest_read(BASE + 3 * P), GuestAccess::Mmio { .. }));
    assert_eq!(
        m.pre_fault_memory(BASE + 3 * P, P, 0),
        Ok(PreFault { result: Err(Errno::EFAULT), gpa: BASE + 3 * P, size: P })
    );
}

#[test]
fn pre_fault_after_a_zap_all_needs_the_vcpu_to_run_first_before_6_18() {
    for (profile, spins) in [(Profile::linux_6_12(false), true), (Profile::linux_7_3(false), false)] {
        let mut m = model(profile);
        let r = anon_region(&mut m, 1, BASE, 1);
        m.set_memory_region(&r).unwrap();
        m.set_memory_region(&MemoryRegion { gpa: BASE + P, ..r }).unwrap();
        assert_eq!(m.unmodeled_pre_fault(BASE + P, P, 0).is_some(), spins, "after a move");
        assert_eq!(m.pre_fault_memory(BASE + P, P, 1).unwrap().result, Err(Errno::EINVAL), "input checks come first");
        m.guest_read(BASE + P);
        assert_eq!(m.pre_fault_memory(BASE + P, P, 0).unwrap().result, Ok(()), "the vCPU ran: fresh root");
    }
    let mut private = model(Profile::linux_6_12(true));
    let r = anon_region(&mut private, 1, BASE, 1);
    private.set_memory_region(&r).unwrap();
    private.set_memory_region(&MemoryRegion { size: 0, ..r }).unwrap();
    assert_eq!(private.unmodeled_pre_fault(BASE, P, 0), None, "a protected VM zaps only the memslot");
}

#[test]
fn map_gpa_range_hypercalls_exit_only_when_enabled_and_valid() {
    let mut m = model(Profile::linux_7_3(true));
    assert_eq!(m.map_gpa_range(BASE, 1, 0), MapGpaRange::Returned(-1000i64 as u64), "-KVM_ENOSYS");
    assert_eq!(m.enable_hypercall_exits(1 << 3), Err(Errno::EINVAL));
    m.enable_hypercall_exits(KVM_EXIT_HYPERCALL_VALID_MASK).unwrap();
    let exit = MapGpaRange::Exit { args: [BASE, 2, KVM_MAP_GPA_RANGE_ENCRYPTED], flags: KVM_EXIT_HYPERCALL_LONG_MODE };
    assert_eq!(m.map_gpa_range(BASE, 2, KVM_MAP_GPA_RANGE_ENCRYPTED), exit);
    let einval = MapGpaRange::Returned(-22i64 as u64);
    assert_eq!(m.map_gpa_range(BASE + 8, 1, 0), einval);
    assert_eq!(m.map_gpa_range(BASE, 0, 0), einval);
    assert_eq!(m.map_gpa_range(BASE, u64::MAX, 0), einval, "the GFN range wraps");
    m.enable_hypercall_exits(0).unwrap();
    assert_eq!(m.map_gpa_range(BASE, 1, 0), MapGpaRange::Returned(-1000i64 as u64), "disabled again");
}

#[test]
fn a_closed_guest_memfd_is_released_once_nothing_maps_it_and_its_bindings_fault() {
    let mut m = model(Profile::linux_7_3(false));
    let g = m.create_guest_memfd(4 * P, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED).unwrap();
    let bound = gmem_region(1, BASE, 1, g, 0);
    m.set_memory_region(&bound).unwrap();
    let mapped = MemoryRegion { user: UserMemory::GmemMap { gmem: g, page: 2 }, ..anon_region(&mut m, 2, BASE + P, 1) };
    m.set_memory_region(&mapped).unwrap();
    assert_eq!(m.guest_write(BASE, 7), GuestAccess::Done(0));
    m.close_guest_memfd(g);
    assert!(!m.gmems()[g].released, "slot 2's userspace mapping holds the file");
    assert_eq!(m.guest_read(BASE), GuestAccess::Done(7));
    m.set_memory_region(&MemoryRegion { size: 0, ..mapped }).unwrap();
    assert!(m.gmems()[g].released);
    // The gmem-only slot stays, but kvm_gmem_get_pfn() finds no file.
    let fault = GuestAccess::MemoryFault { flags: 0, gpa: BASE, size: P, errno: Errno::EFAULT };
    assert_eq!(m.guest_read(BASE), fault);
    assert_eq!(m.pre_fault_memory(BASE, P, 0).unwrap().result, Err(Errno::EFAULT));
}
