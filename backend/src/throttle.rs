//! In-memory guards against floods: failed sign-ins slow down and then lock an account and a
//! client address for a while, and repeated denial events are folded so that a flood of
//! refused requests cannot bloat the audit chain.
//!
//! Both live in the server process: a restart forgets them (a lock then ends early, which
//! errs on the side of letting people in; the audit trail keeps every first failure).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::configuration::ThrottleSettings;

/// Tracks failed sign-ins per account and per client address.
#[derive(Clone)]
pub struct SignInThrottle {
    settings: ThrottleSettings,
    state: Arc<Mutex<HashMap<Key, Failures>>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum Key {
    Account(String),
    Client(IpAddr),
}

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    first: Instant,
    locked_until: Option<Instant>,
}

/// A sign-in that may not be tried now, and for how much longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    pub retry_after: Duration,
    /// Whether the account (rather than the client address) is locked.
    pub account: bool,
}

impl SignInThrottle {
    pub fn new(settings: ThrottleSettings) -> Self {
        SignInThrottle {
            settings,
            state: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn keys(account: &str, client: Option<IpAddr>) -> Vec<Key> {
        let mut keys = vec![Key::Account(account.to_string())];
        keys.extend(client.map(Key::Client));
        keys
    }

    /// Refuses an attempt while the account or the client is locked.
    pub fn check(&self, account: &str, client: Option<IpAddr>) -> Result<(), Locked> {
        let now = Instant::now();
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for key in Self::keys(account, client) {
            if let Some(until) = state.get(&key).and_then(|f| f.locked_until)
                && until > now
            {
                return Err(Locked {
                    retry_after: until - now,
                    account: matches!(key, Key::Account(_)),
                });
            }
        }
        Ok(())
    }

    /// Counts a failed attempt; past the limit, each further failure locks for twice as long
    /// as the one before (1 s, 2 s, 4 s, … up to `max_lock_seconds`).
    pub fn failed(&self, account: &str, client: Option<IpAddr>) {
        let now = Instant::now();
        let window = Duration::from_secs(self.settings.window_seconds);
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.len() > 100_000 {
            state.retain(|_, f| now.duration_since(f.first) < window);
        }
        for key in Self::keys(account, client) {
            let limit = match key {
                Key::Account(_) => self.settings.account_failures,
                Key::Client(_) => self.settings.client_failures,
            };
            let f = state.entry(key).or_insert(Failures {
                count: 0,
                first: now,
                locked_until: None,
            });
            if now.duration_since(f.first) >= window && f.locked_until.is_none_or(|u| u <= now) {
                *f = Failures {
                    count: 0,
                    first: now,
                    locked_until: None,
                };
            }
            f.count = f.count.saturating_add(1);
            if f.count >= limit {
                let over = (f.count - limit).min(30);
                let secs = (1u64 << over).min(self.settings.max_lock_seconds);
                f.locked_until = Some(now + Duration::from_secs(secs));
            }
        }
    }

    /// A successful sign-in clears the account's failures (not the client's).
    pub fn succeeded(&self, account: &str) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.remove(&Key::Account(account.to_string()));
    }
}

/// Folds repeated audit events of one kind from one source: the first in each window is
/// written, the rest are counted and the count goes with the next one written.
#[derive(Clone, Default)]
pub struct AuditFold {
    state: Arc<Mutex<HashMap<String, (Instant, u64)>>>,
}

/// How long repeated denials from one source are folded into one event.
pub const FOLD_WINDOW: Duration = Duration::from_secs(60);

impl AuditFold {
    /// `Some(n)` when an event for `key` should be written now, `n` being how many were folded
    /// since the last one; `None` when this one is folded.
    pub fn admit(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.len() > 100_000 {
            state.retain(|_, (at, _)| now.duration_since(*at) < FOLD_WINDOW);
        }
        match state.get_mut(key) {
            Some((at, folded)) if now.duration_since(*at) < FOLD_WINDOW => {
                *folded += 1;
                None
            }
            Some((at, folded)) => {
                let n = *folded;
                *at = now;
                *folded = 0;
                Some(n)
            }
            None => {
                state.insert(key.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> ThrottleSettings {
        ThrottleSettings {
            account_failures: 3,
            client_failures: 5,
            window_seconds: 900,
            max_lock_seconds: 900,
        }
    }

    #[test]
    fn an_account_locks_after_its_limit_and_longer_each_time() {
        let t = SignInThrottle::new(settings());
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..2 {
            t.failed("a@x", Some(ip));
            assert!(t.check("a@x", Some(ip)).is_ok());
        }
        t.failed("a@x", Some(ip));
        let first = t.check("a@x", None).unwrap_err();
        assert!(first.account);
        assert!(first.retry_after <= Duration::from_secs(1));
        t.failed("a@x", Some(ip));
        let second = t.check("a@x", None).unwrap_err();
        assert!(second.retry_after > Duration::from_secs(1));
        // Another account from another address is not affected.
        assert!(t.check("b@x", Some([10, 0, 0, 2].into())).is_ok());
        t.succeeded("a@x");
        assert!(t.check("a@x", None).is_ok());
    }

    #[test]
    fn a_client_locks_across_accounts() {
        let t = SignInThrottle::new(settings());
        let ip: IpAddr = [10, 0, 0, 9].into();
        for i in 0..5 {
            t.failed(&format!("user{i}@x"), Some(ip));
        }
        let locked = t.check("fresh@x", Some(ip)).unwrap_err();
        assert!(!locked.account);
        assert!(t.check("fresh@x", Some([10, 0, 0, 8].into())).is_ok());
    }

    #[test]
    fn repeated_events_are_folded_within_the_window() {
        let f = AuditFold::default();
        assert_eq!(f.admit("k"), Some(0));
        assert_eq!(f.admit("k"), None);
        assert_eq!(f.admit("k"), None);
        assert_eq!(f.admit("other"), Some(0));
    }
}
