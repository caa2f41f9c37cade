//! Pre-authentication accounting: how many unauthenticated connections (in the handshake or
//! not yet logged in) each source address holds on one shard, for `max_preauth_per_ip`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;

/// Counts unauthenticated connections per source address on one shard.
#[derive(Clone, Debug, Default)]
pub struct PreauthCounter(Rc<RefCell<HashMap<IpAddr, u32>>>);

impl PreauthCounter {
    /// Takes a slot for `ip` unless it already holds `max` (0 = unlimited).
    pub fn try_acquire(&self, ip: IpAddr, max: u32) -> Option<PreauthSlot> {
        let mut m = self.0.borrow_mut();
        let n = m.entry(ip).or_insert(0);
        if max > 0 && *n >= max {
            return None;
        }
        *n += 1;
        Some(PreauthSlot {
            counter: self.clone(),
            ip,
        })
    }

    /// Slots held by `ip`.
    pub fn held(&self, ip: IpAddr) -> u32 {
        self.0.borrow().get(&ip).copied().unwrap_or(0)
    }
}

/// One unauthenticated connection's place in its address's count; released on drop (login,
/// hand-off, close, or a failed handshake).
#[derive(Debug)]
pub struct PreauthSlot {
    counter: PreauthCounter,
    ip: IpAddr,
}

impl Drop for PreauthSlot {
    fn drop(&mut self) {
        let mut m = self.counter.0.borrow_mut();
        if let Some(n) = m.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_capped_per_address_and_released_on_drop() {
        let c = PreauthCounter::default();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = c.try_acquire(ip, 2).unwrap();
        let _b = c.try_acquire(ip, 2).unwrap();
        assert!(c.try_acquire(ip, 2).is_none());
        assert!(c.try_acquire("10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert_eq!(c.held(ip), 1);
        assert!(c.try_acquire(ip, 0).is_some(), "0 means unlimited");
    }
}
