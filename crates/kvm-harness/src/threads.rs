//! Joining the threads a scenario spawns (vCPUs, memslot workers): a panic
//! on one becomes an [`Error::Panic`] naming it, not a second panic that
//! hides which thread died.

use std::any::Any;
use std::thread::ScopedJoinHandle;

use crate::error::{Error, Result};

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "non-string panic payload".into())
}

/// Joins a scoped thread; a panic becomes [`Error::Panic`] naming `thread`.
pub fn join<T>(handle: ScopedJoinHandle<'_, T>, thread: &str) -> Result<T> {
    handle.join().map_err(|payload| Error::Panic { thread: thread.to_string(), message: panic_text(&*payload) })
}

/// [`join`] for a thread of `std::thread::spawn`.
pub fn join_spawned<T>(handle: std::thread::JoinHandle<T>, thread: &str) -> Result<T> {
    handle.join().map_err(|payload| Error::Panic { thread: thread.to_string(), message: panic_text(&*payload) })
}

/// [`join`] for a thread whose body returns a [`Result`]: either failure is the error.
pub fn join_result<T>(handle: ScopedJoinHandle<'_, Result<T>>, thread: &str) -> Result<T> {
    join(handle, thread)?
}
