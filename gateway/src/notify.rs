//! A single-threaded wake-up cell for tasks on one glommio executor.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Wakes one waiting task. Notifications are sticky: a `notify` with nobody waiting makes the
/// next `notified()` return at once.
#[derive(Default, Debug)]
pub struct Notify {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Notify {
    /// Sets the flag and wakes the waiter, if any.
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Registers `cx`'s waker; true if a notification was pending (and consumes it).
    pub fn poll_take(&self, cx: &Context<'_>) -> bool {
        if self.flag.replace(false) {
            return true;
        }
        let mut w = self.waker.borrow_mut();
        match w.as_ref() {
            Some(old) if old.will_wake(cx.waker()) => {}
            _ => *w = Some(cx.waker().clone()),
        }
        false
    }

    /// Waits for a notification.
    pub fn notified(&self) -> Notified<'_> {
        Notified { n: self }
    }
}

/// Future returned by [`Notify::notified`].
#[derive(Debug)]
pub struct Notified<'a> {
    n: &'a Notify,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.n.poll_take(cx) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}
