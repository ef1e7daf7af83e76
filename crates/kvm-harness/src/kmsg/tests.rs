use super::*;

fn kernel(seq: u64, text: &str) -> LogRecord {
    LogRecord { seq, facility: 0, level: 4, usec: seq * 1000, text: text.into() }
}

fn user(seq: u64, text: &str) -> LogRecord {
    LogRecord { seq, facility: 1, level: 6, usec: seq * 1000, text: text.into() }
}

/// The head of a WARN splat as 6.12 prints it for a KVM_BUG_ON().
fn warn_splat(first_seq: u64) -> Vec<LogRecord> {
    [
        "------------[ cut here ]------------",
        "WARNING: CPU: 1 PID: 312 at arch/x86/kvm/mmu/mmu.c:7412 kvm_arch_post_set_memory_attributes+0x2b/0x40",
        "Modules linked in:",
        "CPU: 1 UID: 0 PID: 312 Comm: memory_attribu Not tainted 6.12.118 #1",
        "RIP: 0010:kvm_arch_post_set_memory_attributes+0x2b/0x40",
        "Code: 37 00 48 39 eb 72 84 4c 89 ef e8 ec 9e 0d 00 e9 cb 00 00 00 49 89 d5 48 c1 f8 0c <0f> 0b",
        "RSP: 0018:ffff888000b27e90 EFLAGS: 00000202",
    ]
    .iter()
    .enumerate()
    .map(|(i, t)| kernel(first_seq + i as u64, t))
    .collect()
}

#[test]
fn records_parse_with_facility_level_and_escapes() {
    let r = LogRecord::parse(b"4,1234,5140900,-;WARNING: at a\\x0aline two\n SUBSYSTEM=x\n").unwrap();
    assert_eq!((r.seq, r.facility, r.level, r.usec), (1234, 0, 4, 5_140_900));
    assert_eq!(r.text, "WARNING: at a\nline two");
    let u = LogRecord::parse(b"14,7,1,-;kvm-selftests: binary vm_types start\n").unwrap();
    assert_eq!((u.facility, u.level), (1, 6));
    assert!(!u.starts_report());
    assert!(LogRecord::parse(b"garbage").is_none());
}

#[test]
fn only_kernel_reports_count_and_each_marker_is_recognised() {
    for text in [
        "WARNING: CPU: 0 PID: 1 at virt/kvm/guest_memfd.c:100 kvm_gmem_punch_hole+0x1/0x2",
        "WARNING: possible circular locking dependency detected",
        "WARNING: suspicious RCU usage",
        "WARNING: inconsistent lock state",
        "BUG: KASAN: slab-use-after-free in kvm_gmem_release+0x1/0x2",
        "BUG: sleeping function called from invalid context at mm/memory.c:1",
        "kernel BUG at lib/list_debug.c:59!",
        "UBSAN: shift-out-of-bounds in arch/x86/kvm/mmu/mmu.c:12:3",
        "rcu: INFO: rcu_sched self-detected stall on CPU",
        "INFO: task model:77 blocked for more than 120 seconds.",
        "Oops: general protection fault, probably for non-canonical address",
        "Kernel panic - not syncing: Fatal exception",
        "list_del corruption, ffff888000000000->next is NULL",
    ] {
        assert!(kernel(1, text).starts_report(), "{text}");
        assert!(!user(1, text).starts_report(), "user space wrote {text}");
    }
    for text in ["kvm: Nested Virtualization enabled", "rcupdate.rcu_cpu_stall_cputime=1", "Lock dependency validator"]
    {
        assert!(!kernel(1, text).starts_report(), "{text}");
    }
}

#[test]
fn a_report_is_its_first_lines_up_to_the_next_report_or_its_end() {
    let mut records = vec![kernel(1, "kvm: booted")];
    records.extend([
        kernel(2, "======================================================"),
        kernel(3, "WARNING: possible circular locking dependency detected"),
    ]);
    for i in 0..20 {
        records.push(kernel(4 + i, &format!("line {i}")));
    }
    records.push(user(24, "kvm-selftests: binary model end"));
    records.extend(warn_splat(30));
    records.push(kernel(37, "---[ end trace 0000000000000000 ]---"));
    records.push(kernel(38, "kvm: unrelated"));
    records.extend(warn_splat(40));
    let found = reports(&records);
    let starts: Vec<u64> = found.iter().map(|r| r.seq).collect();
    assert_eq!(starts, [3, 31, 41], "{found:?}");
    assert_eq!(found[0].lines.len(), QUOTED_LINES);
    assert_eq!(found[0].lines[0], "WARNING: possible circular locking dependency detected");
    // The splat's RIP line is part of it, its code and register dump are
    // not, the end-trace line closes it.
    assert_eq!(found[1].lines.len(), 5);
    assert_eq!(found[1].lines[4], "---[ end trace 0000000000000000 ]---");
    assert_eq!(found[2].lines.len(), 4);
}

#[test]
fn a_windows_failure_quotes_the_report_and_names_the_tests_beside_it() {
    let seen = Seen { reports: reports(&warn_splat(10)), overlapped: vec![], lost: 0 };
    let alone = seen.failure().unwrap();
    assert!(
        alone.starts_with(
            "rule violated: the kernel logs no warning, BUG, lockdep, KASAN, UBSAN, RCU-stall or hung-task report \
             while a test runs: 1 report (log record 11) while this test ran; the first:\n    WARNING: CPU: 1 PID: \
             312 at arch/x86/kvm/mmu/mmu.c:7412"
        ),
        "{alone}"
    );
    let parallel = Seen { overlapped: vec!["a".into(), "b".into()], ..seen };
    let shared = parallel.failure().unwrap();
    assert!(shared.contains("; 2 other tests of this binary ran during part of this window (a, b): the report may"));
    assert_eq!(Seen::default().failure(), None);
}

#[test]
fn reports_outside_the_tests_are_placed_by_the_binaries_marks() {
    let mut records = warn_splat(1);
    records.push(user(10, "kvm-selftests: binary vm_types start"));
    records.extend(warn_splat(11));
    records.push(user(20, "kvm-selftests: binary vm_types end"));
    records.extend(warn_splat(21));
    let placed: Vec<String> = [2, 12, 22].iter().map(|&s| place(&records, s)).collect();
    assert_eq!(
        placed,
        [
            "before the first test binary (boot, the guest's setup or the probe)",
            "while vm_types ran, outside its tests' windows (its setup or teardown)",
            "after vm_types ended, before the next binary started",
        ]
    );
    let outside: Vec<(Report, String)> = reports(&records).into_iter().zip(placed).collect();
    let failure = outside_failure(&outside).unwrap();
    assert_eq!(
        (failure.binary.as_str(), failure.test.as_str(), failure.outcome),
        (OUTSIDE_BINARY, OUTSIDE_TEST, Outcome::Fail)
    );
    assert!(
        failure.message.contains(
            "3 reports outside every test's window, the first (log record 2) before the first test binary (boot, \
             the guest's setup or the probe); also: record 12 while vm_types ran"
        ),
        "{}",
        failure.message
    );
    assert!(
        failure.message.ends_with("RIP: 0010:kvm_arch_post_set_memory_attributes+0x2b/0x40"),
        "{}",
        failure.message
    );
    assert!(outside_failure(&[]).is_none());
}

#[test]
fn overlapping_windows_name_each_other() {
    // Only where this process may read the log (root or CAP_SYSLOG).
    if *oracle() != Oracle::On {
        return;
    }
    let a = Window::open("kmsg_self_test_a").unwrap();
    let b = Window::open("kmsg_self_test_b").unwrap();
    let seen_b = b.close().unwrap();
    let seen_a = a.close().unwrap();
    assert!(seen_a.overlapped.contains(&"kmsg_self_test_b".to_string()), "{seen_a:?}");
    assert!(seen_b.overlapped.contains(&"kmsg_self_test_a".to_string()), "{seen_b:?}");
}

#[test]
fn the_seen_file_sits_next_to_the_results() {
    assert_eq!(seen_path(Path::new("/run/results/results.jsonl")), Path::new("/run/results/results.jsonl.kernel-log"));
    let line = Checked { binary: "b".into(), test: "t".into(), checked: true, why: String::new(), reports: vec![3] };
    let json = serde_json::to_string(&line).unwrap();
    assert_eq!(json, r#"{"binary":"b","test":"t","checked":true,"reports":[3]}"#);
    assert_eq!(serde_json::from_str::<Checked>(&json).unwrap(), line);
}
