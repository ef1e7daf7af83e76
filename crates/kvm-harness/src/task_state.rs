//! What a thread is doing in the kernel, from `/proc/self/task/TID`: its
//! scheduler state, wait channel and kernel CPU time. A deadline that fires
//! says with it whether the thread was running (state R, kernel time
//! growing: a retry loop, or a guest that runs) or asleep in the kernel (S
//! or D, with the wait channel naming where). The lean guest kernel has no
//! `/proc/PID/stack`; these files need nothing but procfs.

use std::fmt;

use nix::unistd::Pid;

/// One sample of a thread's kernel-side state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskState {
    /// `R`, `S`, `D`, ... (proc(5), field 3).
    pub state: String,
    /// The kernel function it sleeps in, or `none` while it runs.
    pub wchan: String,
    /// Kernel CPU time so far, in clock ticks (proc(5), field 15).
    pub kernel_ticks: u64,
}

impl TaskState {
    /// Samples thread `tid` of this process; the error names the file.
    pub fn read(tid: Pid) -> Result<Self, String> {
        let read = |what: &str| {
            let path = format!("/proc/self/task/{tid}/{what}");
            std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))
        };
        let stat = read("stat")?;
        Self::parse(&stat, read("wchan"))
            .ok_or_else(|| format!("/proc/self/task/{tid}/stat: unexpected format: {stat}"))
    }

    fn parse(stat: &str, wchan: Result<String, String>) -> Option<Self> {
        let fields = Stat::parse(stat)?;
        let state = fields.state.to_string();
        let kernel_ticks = fields.kernel_ticks;
        let wchan = match wchan {
            Ok(w) if w.is_empty() || w == "0" => "none".into(),
            Ok(w) => w,
            Err(e) => e,
        };
        Some(Self { state, wchan, kernel_ticks })
    }
}

/// The fields of a `/proc/PID/stat` or `/proc/PID/task/TID/stat` line
/// that the harness and xtask read (proc(5)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat<'a> {
    /// Field 3: `R`, `S`, `D`, ...
    pub state: &'a str,
    /// Field 14, utime: user CPU time in clock ticks.
    pub user_ticks: u64,
    /// Field 15, stime: kernel CPU time in clock ticks.
    pub kernel_ticks: u64,
}

impl<'a> Stat<'a> {
    /// Parses one stat line; `None` if it is not one.
    pub fn parse(stat: &'a str) -> Option<Self> {
        // After the parenthesized command name (which may hold spaces and
        // parentheses): the state (field 3), then utime and stime (14, 15).
        let (_, rest) = stat.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        Some(Self {
            state: fields.first()?,
            user_ticks: fields.get(11)?.parse().ok()?,
            kernel_ticks: fields.get(12)?.parse().ok()?,
        })
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "state {}, wait channel {}, {} ticks of kernel time", self.state, self.wchan, self.kernel_ticks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 13 0 0 20 0 1 0 5 0 0";
        let s = TaskState::parse(stat, Ok("do_sys_poll".into())).unwrap();
        assert_eq!(s, TaskState { state: "S".into(), wchan: "do_sys_poll".into(), kernel_ticks: 13 });
        let running = TaskState::parse(stat, Ok("0".into())).unwrap();
        assert_eq!(running.wchan, "none");
        assert!(TaskState::parse("42 (x) S 1", Ok(String::new())).is_none());
        assert_eq!(Stat::parse(stat), Some(Stat { state: "S", user_ticks: 7, kernel_ticks: 13 }));
    }

    #[test]
    fn this_thread_is_running_while_it_samples_itself() {
        let s = TaskState::read(nix::unistd::gettid()).unwrap();
        assert_eq!(s.state, "R", "{s}");
    }
}
