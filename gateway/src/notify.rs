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

    /// Registers `cx`'s waker (always: the caller may go on to wait on something else and must
    /// still be woken by the next notification) and returns true if a notification was
    /// pending, consuming it.
    pub fn poll_take(&self, cx: &Context<'_>) -> bool {
        {
            let mut w = self.waker.borrow_mut();
            match w.as_ref() {
                Some(old) if old.will_wake(cx.waker()) => {}
                _ => *w = Some(cx.waker().clone()),
            }
        }
        self.flag.replace(false)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Regression: a task woken by one notification and polled again must be woken by the next
    /// one too, even though the first was consumed.
    #[test]
    fn every_notification_wakes_the_registered_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let cx = Context::from_waker(&waker);
        let n = Notify::default();
        assert!(!n.poll_take(&cx));
        n.notify();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(n.poll_take(&cx));
        n.notify();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(n.poll_take(&cx));
        assert!(!n.poll_take(&cx));
    }
}
