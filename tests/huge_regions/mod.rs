//! Huge pages under mixed attributes: the scenario `memory_attributes`
//! (host `KVM_SET_MEMORY_ATTRIBUTES`) and `private_mem_conversions`
//! (guest `KVM_HC_MAP_GPA_RANGE`) each run with their way of converting.
//!
//! KVM maps a 2 MiB range of a memslot with one huge page only when every
//! page of it has the same attributes: kvm_arch_post_set_memory_attributes()
//! keeps a "mixed" flag per 2 MiB and 1 GiB range (`KVM_LPAGE_MIXED_FLAG`
//! in the memslot's lpage_info, the same in 6.12 and 7.3), and
//! kvm_arch_pre_set_memory_attributes() zaps what a change affects. A
//! region whose flag is wrong can be mapped as one shared huge page while
//! some of its pages are private, when the shared side is a huge page (THP
//! or hugetlb): the guest then reads and writes the shared copy of private
//! pages, and the host sees the guest's private writes.
//!
//! Each case converts one range of two adjacent 2 MiB regions, starting and
//! ending at one class of offset (aligned, mid, first or last page,
//! spanning both regions, running to a region's end), to private from all
//! shared and to shared from all private. Before and after the conversion
//! the guest reads and writes the boundary pages (the range's first and
//! last pages, the pages just outside it, each region's first and last
//! pages), shared pages first, so that a wrongly allowed huge page is
//! mapped before the private pages are read. Private pages must show
//! guest_memfd's data (the host fills the shared side with a marker the
//! guest never writes privately), shared pages the host's, the host's
//! mapping never holds a private write, and KVM's `pages_2m` statistic shows
//! the all-shared regions mapped by huge pages before the conversion (so
//! the case can fail) and no region of mixed attributes mapped huge after.

use std::fmt;
use std::sync::Arc;

use guest_payloads::{layout::TEST_AREA_GPA, GUEST_AGENT};
use kvm_harness::backing::Backing;
use kvm_harness::stats::Stats;
use kvm_harness::uapi::{
    KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_DECRYPTED, KVM_MAP_GPA_RANGE_ENCRYPTED, KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
};
use kvm_harness::{
    ensure, Agent, Cap, Error, Fill, GmemBinding, GuestMemfd, HostMemory, Kvm, Need, Probe, Region, Result, Vm, VmType,
};

const PAGE: u64 = 4096;
const SZ_2M: u64 = 2 << 20;
const SZ_1G: u64 = 1 << 30;
/// Pages of one 2 MiB region.
const REGION_PAGES: u64 = SZ_2M / PAGE;
/// The two adjacent regions every case converts inside.
const AREA_PAGES: u64 = 2 * REGION_PAGES;
const AREA_SIZE: u64 = AREA_PAGES * PAGE;
const SLOT: u32 = 10;

/// The host's marker at word 0 (and throughout) of shared page `i`: never
/// a value the guest writes.
fn shared_marker(page: u64) -> u64 {
    0x5348_4152_4544_0000 | page
}
/// What the guest stores at word 0 of page `i` in `pass` while it is private.
fn private_store(pass: u64, page: u64) -> u64 {
    0x5052_4956_0000_0000 | pass << 16 | page
}
/// What the guest stores at word 0 of page `i` in `pass` while it is shared.
fn shared_store(pass: u64, page: u64) -> u64 {
    0x4753_4852_0000_0000 | pass << 16 | page
}

/// How a case changes the attributes of its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// The host calls `KVM_SET_MEMORY_ATTRIBUTES`.
    HostIoctl,
    /// The guest calls `KVM_HC_MAP_GPA_RANGE`; the host answers the exit as
    /// upstream's conversion test does: fallocate (private) or punch hole
    /// (shared) the guest_memfd range, then `KVM_SET_MEMORY_ATTRIBUTES`.
    GuestHypercall,
}

/// Where the memslot lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    /// At a GPA that is 2 MiB aligned but not 1 GiB aligned; a 4 MiB memslot.
    Mib2,
    /// At a 1 GiB-aligned GPA. With THP the memslot is the whole gigabyte
    /// (so KVM also tracks the 1 GiB range, hugepage_has_attrs() above
    /// 2 MiB) and the cases run in its last 4 MiB; with hugetlb, whose
    /// pages are reserved up front, a 4 MiB memslot at the gigabyte's start.
    Gib1,
}

impl Alignment {
    /// For test names.
    pub fn name(self) -> &'static str {
        match self {
            Alignment::Mib2 => "2m_aligned",
            Alignment::Gib1 => "1g_aligned",
        }
    }

    /// (memslot GPA, memslot size, offset of the two regions in it).
    fn geometry(self, backing: Backing) -> (u64, u64, u64) {
        match (self, backing) {
            (Alignment::Mib2, _) => (TEST_AREA_GPA + SZ_2M, AREA_SIZE, 0),
            (Alignment::Gib1, Backing::AnonymousThp) => (TEST_AREA_GPA + SZ_1G, SZ_1G, SZ_1G - AREA_SIZE),
            (Alignment::Gib1, _) => (TEST_AREA_GPA + SZ_1G, AREA_SIZE, 0),
        }
    }
}

/// A range of the two regions, in pages from the first region's start.
struct Range {
    name: &'static str,
    first: u64,
    end: u64,
}

const MID: u64 = 300;

/// Every class of start and end inside a huge region.
const RANGES: &[Range] = &[
    Range { name: "first_page", first: 0, end: 1 },
    Range { name: "aligned_start_to_mid", first: 0, end: MID },
    Range { name: "mid_to_mid", first: 100, end: MID },
    Range { name: "mid_to_region_end", first: MID, end: REGION_PAGES },
    Range { name: "last_page", first: REGION_PAGES - 1, end: REGION_PAGES },
    Range { name: "whole_region", first: 0, end: REGION_PAGES },
    Range { name: "last_page_to_next_first_page", first: REGION_PAGES - 1, end: REGION_PAGES + 1 },
    Range { name: "mid_spanning_two_regions", first: MID, end: REGION_PAGES + MID + 100 },
    Range { name: "mid_to_second_region_end", first: MID, end: AREA_PAGES },
    Range { name: "aligned_second_region_start_to_mid", first: REGION_PAGES, end: REGION_PAGES + MID },
    Range { name: "second_region_mid_to_its_end", first: REGION_PAGES + MID, end: AREA_PAGES },
];

/// Every backing and alignment the scenario runs with.
const SHAPES: [(Backing, Alignment); 4] = [
    (Backing::AnonymousThp, Alignment::Mib2),
    (Backing::AnonymousThp, Alignment::Gib1),
    (Backing::SharedHugetlb2M, Alignment::Mib2),
    (Backing::SharedHugetlb2M, Alignment::Gib1),
];

/// Registers the scenario for every shape, converting with `conversion`, as
/// `{rule}_hold_per_page_with_shared_side_in_{backing}_at_{alignment}_gpa`.
pub fn register(suite: &mut kvm_harness::Suite, rule: &str, conversion: Conversion) {
    for (backing, alignment) in SHAPES {
        suite.test(
            format!("{rule}_hold_per_page_with_shared_side_in_{backing}_at_{}_gpa", alignment.name()),
            needs(backing, conversion),
            move |kvm| run(kvm, backing, alignment, conversion),
        );
    }
}

/// What a test of this scenario needs.
pub fn needs(backing: Backing, conversion: Conversion) -> Vec<Need> {
    let mut needs = vec![Need::VmType(VmType::SwProtected), Need::VmCap(VmType::SwProtected, Cap::MemoryAttributes)];
    if conversion == Conversion::GuestHypercall {
        needs.push(Need::Cap(Cap::ExitHypercall));
    }
    needs.extend(backing.need(AREA_SIZE));
    needs
}

/// The whole scenario: every range, both directions, on one VM.
pub fn run(kvm: &Arc<Kvm>, backing: Backing, alignment: Alignment, conversion: Conversion) -> Result<()> {
    let mut f = Fixture::new(kvm, backing, alignment, conversion)?;
    for range in RANGES {
        for to_private in [true, false] {
            f.case(range, to_private)?;
        }
    }
    f.agent.done().map(drop)
}

struct Fixture {
    vm: Vm,
    gmem: Arc<GuestMemfd>,
    shared: Arc<HostMemory>,
    stats: Stats,
    agent: Agent,
    conversion: Conversion,
    /// GPA of the first region, and its offset in the memslot (and in the
    /// guest_memfd, bound at offset 0).
    area_gpa: u64,
    area_offset: u64,
    /// Per page of the area: private now, and word 0 of each side.
    private: Vec<bool>,
    shared_word: Vec<u64>,
    private_word: Vec<u64>,
    passes: u64,
    what: String,
}

/// Which way a case converts, and where it is.
#[derive(Clone, Copy)]
struct Case<'a> {
    range: &'a Range,
    to_private: bool,
}

impl fmt::Display for Case<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "range {} (pages [{}, {}) of two 2 MiB regions) converted to {}",
            self.range.name,
            self.range.first,
            self.range.end,
            if self.to_private { "private from all shared" } else { "shared from all private" }
        )
    }
}

impl Fixture {
    fn new(kvm: &Arc<Kvm>, backing: Backing, alignment: Alignment, conversion: Conversion) -> Result<Self> {
        let (slot_gpa, slot_size, area_offset) = alignment.geometry(backing);
        let vm = Vm::with_payload(kvm, VmType::SwProtected, &GUEST_AGENT)?;
        if conversion == Conversion::GuestHypercall {
            vm.enable_map_gpa_range_exits()?;
        }
        let gmem = Arc::new(vm.create_guest_memfd(slot_size, 0)?);
        let shared = Arc::new(backing.allocate(slot_size)?);
        // Every shared page holds its marker; this also faults in the huge
        // pages of the two regions (the rest of a 1 GiB slot stays unbacked).
        for page in 0..AREA_PAGES {
            shared.fill_u64(area_offset + page * PAGE, PAGE, shared_marker(page));
        }
        let region = Region::new(SLOT, slot_gpa, shared.clone()).with_guest_memfd(GmemBinding::Memfd(gmem.clone()), 0);
        vm.set_region(&region)?;
        let stats = vm.stats()?;
        let agent = Agent::start(vm.vcpu(0, [0; 4])?)?;
        Ok(Self {
            vm,
            gmem,
            shared,
            stats,
            agent,
            conversion,
            area_gpa: slot_gpa + area_offset,
            area_offset,
            private: vec![false; AREA_PAGES as usize],
            shared_word: (0..AREA_PAGES).map(shared_marker).collect(),
            private_word: vec![0; AREA_PAGES as usize],
            passes: 0,
            what: format!(
                "shared side in {backing}, memslot [{slot_gpa:#x}, +{slot_size:#x}), regions at {:#x}, {conversion:?}",
                slot_gpa + area_offset
            ),
        })
    }

    fn gpa(&self, page: u64) -> u64 {
        self.area_gpa + page * PAGE
    }

    /// All pages private (`private`) or shared, no mapping left, guest_memfd
    /// empty, the shared side back to its markers.
    fn reset(&mut self, private: bool) -> Result<()> {
        // Converting the whole area the other way first zaps every mapping
        // (each conversion zaps the side it takes away), so the pass before
        // the conversion maps each region anew, huge where it can be.
        let (gpa, size) = (self.area_gpa, AREA_SIZE);
        self.vm.set_memory_attributes(gpa, size, if private { 0 } else { attr(true) })?;
        self.vm.set_memory_attributes(gpa, size, attr(private))?;
        self.gmem.punch_hole(self.area_offset, size)?;
        for page in 0..AREA_PAGES {
            let i = page as usize;
            if self.shared_word[i] != shared_marker(page) {
                self.shared.write_u64(self.area_offset + page * PAGE, shared_marker(page));
                self.shared_word[i] = shared_marker(page);
            }
            self.private_word[i] = 0;
            self.private[i] = private;
        }
        Ok(())
    }

    fn case(&mut self, range: &Range, to_private: bool) -> Result<()> {
        let case = Case { range, to_private };
        self.reset(!to_private)?;
        let pages = boundary_pages(range);
        self.pass(&pages, case, "before the conversion")?;
        if to_private {
            // Both regions are all shared and were touched: each is one
            // huge page on the host, so KVM maps each with one 2 MiB page.
            let huge = self.stats.get("pages_2m")?;
            ensure!(
                huge >= 2,
                "KVM maps an all-shared 2 MiB region whose shared side is one huge page with a 2 MiB page \
                 (the precondition of the mixed-attribute checks)",
                "{}: {case}: after the guest touched both all-shared regions, pages_2m = {huge}",
                self.what
            );
        }
        self.convert(range, to_private)?;
        self.pass(&pages, case, "after the conversion")?;
        self.expect_host_view(&pages, case)?;
        self.expect_no_mixed_huge_page(case)
    }

    /// The guest converts, or the host does, `range` to private or shared.
    fn convert(&mut self, range: &Range, private: bool) -> Result<()> {
        let (gpa, size) = (self.gpa(range.first), (range.end - range.first) * PAGE);
        match self.conversion {
            Conversion::HostIoctl => self.vm.set_memory_attributes(gpa, size, attr(private))?,
            Conversion::GuestHypercall => {
                let page_size = if gpa % SZ_2M == 0 && size % SZ_2M == 0 {
                    KVM_MAP_GPA_RANGE_PAGE_SZ_2M
                } else {
                    KVM_MAP_GPA_RANGE_PAGE_SZ_4K
                };
                let attrs = page_size | if private { KVM_MAP_GPA_RANGE_ENCRYPTED } else { KVM_MAP_GPA_RANGE_DECRYPTED };
                let npages = size / PAGE;
                let (vm, gmem, area_gpa, area_offset) = (&self.vm, &self.gmem, self.area_gpa, self.area_offset);
                let mut exits = 0;
                let ret = self.agent.hypercall(KVM_HC_MAP_GPA_RANGE, [gpa, npages, attrs, 0], |_, nr, args| {
                    exits += 1;
                    ensure!(
                        nr == KVM_HC_MAP_GPA_RANGE && args[..3] == [gpa, npages, attrs],
                        "KVM_HC_MAP_GPA_RANGE exits with the guest's nr, GPA, page count and attrs",
                        "exit nr {nr}, args {:#x?}; the guest passed [{gpa:#x}, {npages:#x}, {attrs:#x}]",
                        &args[..3]
                    );
                    let offset = area_offset + (gpa - area_gpa);
                    if private {
                        gmem.allocate(offset, size)?;
                    } else {
                        gmem.punch_hole(offset, size)?;
                    }
                    vm.set_memory_attributes(gpa, size, attr(private))?;
                    Ok(0)
                })?;
                ensure!(
                    exits == 1 && ret == 0,
                    "one KVM_HC_MAP_GPA_RANGE is one KVM_EXIT_HYPERCALL, and the guest gets the host's answer",
                    "{exits} exits, guest rax {ret:#x} (the host answered 0)"
                );
                if !private {
                    // The punch freed the private pages of the range.
                    for page in range.first..range.end {
                        self.private_word[page as usize] = 0;
                    }
                }
            }
        }
        for page in range.first..range.end {
            self.private[page as usize] = private;
        }
        Ok(())
    }

    /// The guest reads word 0 of each page (shared pages first) and stores
    /// a new value there, then reads every page again.
    fn pass(&mut self, pages: &[u64], case: Case<'_>, when: &str) -> Result<()> {
        self.passes += 1;
        let pass = self.passes;
        let mut order: Vec<u64> = pages.iter().copied().filter(|&p| !self.private[p as usize]).collect();
        order.extend(pages.iter().copied().filter(|&p| self.private[p as usize]));
        let mut probes = Vec::with_capacity(2 * order.len());
        let mut expected = Vec::with_capacity(2 * order.len());
        for &page in &order {
            let i = page as usize;
            let (now, next) = if self.private[i] {
                (self.private_word[i], private_store(pass, page))
            } else {
                (self.shared_word[i], shared_store(pass, page))
            };
            probes.push(Probe { gpa: self.gpa(page), expect: Some(now), store: Some(next) });
            expected.push((page, now, "first read"));
        }
        for &page in &order {
            let i = page as usize;
            let next = if self.private[i] { private_store(pass, page) } else { shared_store(pass, page) };
            probes.push(Probe { gpa: self.gpa(page), expect: Some(next), store: None });
            expected.push((page, next, "read after the guest's store"));
        }
        if let Some(miss) = self.agent.probe(&probes)? {
            let (page, want, read) = expected[miss.index];
            return Err(self.misread(case, when, page, want, miss.actual, read));
        }
        for &page in &order {
            let i = page as usize;
            if self.private[i] {
                self.private_word[i] = private_store(pass, page);
            } else {
                self.shared_word[i] = shared_store(pass, page);
            }
        }
        Ok(())
    }

    fn misread(&self, case: Case<'_>, when: &str, page: u64, want: u64, actual: u64, read: &str) -> Error {
        let i = page as usize;
        let side = if self.private[i] { "private" } else { "shared" };
        let hint = if self.private[i] && actual == self.shared_word[i] {
            " -- that is the page's shared copy: the private page was served from the shared (huge) mapping"
        } else if !self.private[i] && actual == self.private_word[i] {
            " -- that is the page's guest_memfd copy: the shared page was served from guest_memfd"
        } else {
            ""
        };
        Error::rule(
            "each page of a 2 MiB region with mixed attributes is served from the side its attribute names \
             (private: guest_memfd; shared: the host's memory)",
            format!(
                "{}: {case}, {when}: page {page} ({}, GPA {:#x}) is {side}: the guest's {read} gave {actual:#x}, \
                 expected {want:#x}{hint}",
                self.what,
                role(case.range, page),
                self.gpa(page)
            ),
        )
    }

    /// The host's mapping of each probed page holds only shared data.
    fn expect_host_view(&self, pages: &[u64], case: Case<'_>) -> Result<()> {
        for &page in pages {
            let (i, offset) = (page as usize, self.area_offset + page * PAGE);
            let word = self.shared.read_u64(offset);
            let leak = if word >> 32 == private_store(0, 0) >> 32 {
                " -- a value the guest stored in a private page: private data reached the shared mapping"
            } else {
                ""
            };
            ensure!(
                word == self.shared_word[i],
                "the host's mapping of a GPA only ever holds shared data",
                "{}: {case}: page {page} ({}, GPA {:#x}, {}): the host sees {word:#x}, expected {:#x}{leak}",
                self.what,
                role(case.range, page),
                self.gpa(page),
                if self.private[i] { "private" } else { "shared" },
                self.shared_word[i]
            );
            self.shared.expect_filled(
                "the host's mapping of a GPA only ever holds shared data",
                offset + 8,
                PAGE - 8,
                Fill::U64(shared_marker(page)),
                |at| {
                    format!(
                        "{}: {case}: the host's byte at GPA {:#x}",
                        self.what,
                        self.area_gpa + at - self.area_offset
                    )
                },
            )?;
        }
        Ok(())
    }

    /// `pages_2m` counts no more huge mappings than there are regions with
    /// uniform attributes: a region of mixed attributes is never one.
    fn expect_no_mixed_huge_page(&self, case: Case<'_>) -> Result<()> {
        let uniform: Vec<u64> = (0..AREA_PAGES / REGION_PAGES)
            .filter(|r| {
                let pages = &self.private[(r * REGION_PAGES) as usize..((r + 1) * REGION_PAGES) as usize];
                pages.iter().all(|&p| p == pages[0])
            })
            .collect();
        let huge = self.stats.get("pages_2m")?;
        ensure!(
            huge <= uniform.len() as u64,
            "KVM never maps a 2 MiB region with mixed attributes with one huge page",
            "{}: {case}: pages_2m = {huge}, but only {} of the regions are uniform ({uniform:?}); the others mix \
             private and shared pages",
            self.what,
            uniform.len()
        );
        Ok(())
    }
}

fn attr(private: bool) -> u64 {
    if private {
        u64::from(kvm_harness::bindings::KVM_MEMORY_ATTRIBUTE_PRIVATE)
    } else {
        0
    }
}

/// The pages a case reads and writes: the range's first two and last two
/// pages, the pages just outside it, and each region's first and last two.
fn boundary_pages(range: &Range) -> Vec<u64> {
    let (s, e) = (range.first as i64, range.end as i64);
    let r = REGION_PAGES as i64;
    let mut pages: Vec<u64> = [s - 1, s, s + 1, e - 2, e - 1, e, 0, 1, r - 2, r - 1, r, r + 1, 2 * r - 2, 2 * r - 1]
        .into_iter()
        .filter(|&p| (0..AREA_PAGES as i64).contains(&p))
        .map(|p| p as u64)
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// What a page is to a range, for messages.
fn role(range: &Range, page: u64) -> String {
    let mut roles = Vec::new();
    if page == range.first {
        roles.push("the range's first page".to_string());
    }
    if page + 1 == range.end {
        roles.push("the range's last page".to_string());
    }
    if page + 1 == range.first {
        roles.push("just before the range".to_string());
    }
    if page == range.end {
        roles.push("just after the range".to_string());
    }
    if roles.is_empty() {
        roles.push(
            if (range.first..range.end).contains(&page) { "inside the range" } else { "outside the range" }.into(),
        );
    }
    let region = page / REGION_PAGES;
    match page % REGION_PAGES {
        0 => roles.push(format!("region {region}'s first page")),
        p if p == REGION_PAGES - 1 => roles.push(format!("region {region}'s last page")),
        _ => {}
    }
    roles.join(", ")
}
